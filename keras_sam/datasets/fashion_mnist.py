"""Fashion-MNIST, read from local files when it can be and checked before use.

`load_data()` returns the same arrays as `keras.datasets.fashion_mnist.load_data()`, but
first looks for the four IDX files on this machine, in this order:

1. the `path` argument, a directory;
2. the directory named by the `KERAS_SAM_FASHION_MNIST` environment variable;
3. `/usr/share/datasets/fashion-mnist`, where the Debian package `dataset-fashion-mnist`
   installs them;
4. the Keras cache, `$KERAS_HOME/datasets/fashion-mnist` (`~/.keras/...` by default);

and only then downloads them into the Keras cache with `keras.utils.get_file`, from the
address Keras itself uses. A directory may hold the files gzip-compressed (`*.gz`, as
distributed) or not. Every file is checked: the IDX header (magic number, count, 28x28),
its length, the labels' range and, unless `verify=False`, the SHA-256 of the decompressed
content, so that both the upstream files and Debian's recompressed copies are accepted.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib

import numpy as np

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

ENV_VAR = "KERAS_SAM_FASHION_MNIST"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
CACHE_SUBDIR = os.path.join("datasets", "fashion-mnist")
BASE_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"

# The four files, in the order they are read, without the ".gz".
FILES = (
    "train-labels-idx1-ubyte",
    "train-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
)

# SHA-256 of the decompressed IDX content (the same for the upstream and the Debian copies).
SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

_OFFICIAL_COUNTS = {"train": 60000, "t10k": 10000}
_IMAGE_MAGIC = 2051
_LABEL_MAGIC = 2049
_SIDE = 28
_NUM_CLASSES = len(CLASS_NAMES)


class DatasetFileError(ValueError):
    """A data file is truncated, corrupt, or not the file it should be.

    The message names the file and says what to do about it.
    """


def _keras_home():
    """The Keras home directory, found as Keras finds it (`KERAS_HOME`, else `~/.keras`)."""
    home = os.environ.get("KERAS_HOME")
    if home:
        return os.path.expanduser(home)
    base = os.path.expanduser("~")
    if not os.access(base, os.W_OK):
        base = "/tmp"
    return os.path.join(base, ".keras")


def _cache_dir():
    return os.path.join(_keras_home(), CACHE_SUBDIR)


def _files_in(directory):
    """Maps each of the four names to its file in `directory` (raw preferred to `.gz`).

    Returns `(files, missing)`: `files` is None unless all four are there; `missing`
    lists the names not found.
    """
    files, missing = {}, []
    for name in FILES:
        for candidate in (name, name + ".gz"):
            full = os.path.join(directory, candidate)
            if os.path.isfile(full):
                files[name] = full
                break
        else:
            missing.append(name)
    return (None if missing else files), missing


def _missing_message(directory, missing):
    listed = ", ".join(os.path.join(directory, name) + "[.gz]" for name in missing)
    return f"missing {listed}"


def _locate(path):
    """Where the files are: `(directory, source, files)`; `files` is None for a download."""
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(
                "`path` must be a directory (a string or os.PathLike) or None. "
                f"Received: path={path!r} of type {type(path).__name__}"
            )
        directory = os.path.expanduser(os.fspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"`path` must be a directory holding the four Fashion-MNIST files, but "
                f"{directory!r} is not a directory. Received: path={path!r}"
            )
        files, missing = _files_in(directory)
        if files is None:
            raise FileNotFoundError(
                f"The directory given as `path` ({directory!r}) does not hold the Fashion-MNIST "
                f"files: {_missing_message(directory, missing)}. Put the four files there "
                "(gzip-compressed or not), or leave `path=None` to search the usual places."
            )
        return directory, "path", files

    env_value = os.environ.get(ENV_VAR)
    if env_value:
        directory = os.path.expanduser(env_value)
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"The environment variable {ENV_VAR} must name a directory holding the four "
                f"Fashion-MNIST files, but {directory!r} is not a directory. Fix it, or unset "
                f"{ENV_VAR} to search the usual places."
            )
        files, missing = _files_in(directory)
        if files is None:
            raise FileNotFoundError(
                f"The directory named by {ENV_VAR} ({directory!r}) does not hold the "
                f"Fashion-MNIST files: {_missing_message(directory, missing)}. Put the four "
                f"files there (gzip-compressed or not), or unset {ENV_VAR} to search the usual "
                "places."
            )
        return directory, "env", files

    for directory, source in ((DEBIAN_DIR, "debian"), (_cache_dir(), "cache")):
        files, _ = _files_in(directory)
        if files is not None:
            return directory, source, files
    return _cache_dir(), "download", None


def find_data_dir(path: str | os.PathLike | None = None) -> str:
    """Tells which directory `load_data(path)` would read the files from.

    The search order is `path`, then `$KERAS_SAM_FASHION_MNIST`, then the Debian package's
    `/usr/share/datasets/fashion-mnist`, then the Keras cache. A directory counts only if
    it holds all four files (each gzip-compressed or not). Nothing is read or downloaded.

    Args:
        path: a directory (string or `os.PathLike`) that must hold the four files, or
            `None` to search. Defaults to `None`.

    Returns:
        The directory as a string. When no local copy exists, this is the Keras cache
        directory, into which `load_data()` would download the files.

    Raises:
        FileNotFoundError: `path` or `$KERAS_SAM_FASHION_MNIST` is given but does not hold
            the four files (there is no silent fall-back to the other places).

    Example:

    ```python
    from keras_sam.datasets import fashion_mnist

    print(fashion_mnist.find_data_dir())  # e.g. /usr/share/datasets/fashion-mnist
    ```
    """
    directory, _, _ = _locate(path)
    return directory


def _fix_hint(source):
    """What to do about a bad file, depending on where it was found."""
    if source == "debian":
        return (
            "Reinstall it with `sudo apt-get install --reinstall dataset-fashion-mnist`, or "
            f"set {ENV_VAR} to a directory holding good copies."
        )
    if source in ("cache", "download"):
        return "Delete it so that load_data() downloads it again."
    if source == "env":
        return f"Replace it with a good copy, or point {ENV_VAR} at another directory."
    return "Replace it with a good copy, or pass another `path`."


def _read_content(file_path, source):
    """The file's bytes, decompressed when the name ends in `.gz`."""
    with open(file_path, "rb") as f:
        data = f.read()
    if not file_path.endswith(".gz"):
        return data
    try:
        return gzip.decompress(data)
    except EOFError as e:
        raise DatasetFileError(
            f"{file_path} is truncated: the gzip stream ends early ({e}). {_fix_hint(source)}"
        ) from e
    except (OSError, zlib.error) as e:
        raise DatasetFileError(
            f"{file_path} is not a valid gzip file ({e}). {_fix_hint(source)}"
        ) from e


def _parse_idx(data, file_path, *, images, expected_count, sha256, source):
    """Checks one decompressed IDX file and returns its array (a writable copy)."""
    header_size = 16 if images else 8
    magic_wanted = _IMAGE_MAGIC if images else _LABEL_MAGIC
    what = "image" if images else "label"
    hint = _fix_hint(source)
    if len(data) < header_size:
        raise DatasetFileError(
            f"{file_path} is truncated: an IDX {what} file starts with a {header_size}-byte "
            f"header, but the content is {len(data)} bytes long. {hint}"
        )
    magic, count = struct.unpack(">II", data[:8])
    if magic != magic_wanted:
        raise DatasetFileError(
            f"{file_path} is not an IDX {what} file: its magic number must be {magic_wanted}, "
            f"got {magic}. {hint}"
        )
    if expected_count is not None and count != expected_count:
        raise DatasetFileError(
            f"{file_path} must hold {expected_count} {what}s, but its header says {count}. {hint}"
        )
    shape = (count,)
    if images:
        rows, cols = struct.unpack(">II", data[8:16])
        if (rows, cols) != (_SIDE, _SIDE):
            raise DatasetFileError(
                f"{file_path} must hold {_SIDE}x{_SIDE} images, but its header says "
                f"{rows}x{cols}. {hint}"
            )
        shape = (count, rows, cols)
    wanted_length = header_size + int(np.prod(shape, dtype=np.int64))
    if len(data) < wanted_length:
        raise DatasetFileError(
            f"{file_path} is truncated: its header promises {count} {what}s "
            f"({wanted_length} bytes of content), but the content is {len(data)} bytes long. "
            f"{hint}"
        )
    if len(data) > wanted_length:
        raise DatasetFileError(
            f"{file_path} is corrupt: its header promises {count} {what}s "
            f"({wanted_length} bytes of content), but the content is {len(data)} bytes long. "
            f"{hint}"
        )
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise DatasetFileError(
                f"{file_path} is corrupt or is not the official Fashion-MNIST file: the "
                f"SHA-256 of its decompressed content must be {sha256}, got {digest}. {hint} "
                "To load custom files on purpose, pass verify=False."
            )
    array = np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape).copy()
    if not images and array.size and int(array.max()) >= _NUM_CLASSES:
        bad = int(np.flatnonzero(array >= _NUM_CLASSES)[0])
        raise DatasetFileError(
            f"{file_path} holds a label outside 0..{_NUM_CLASSES - 1}: label {bad} is "
            f"{int(array[bad])}. {hint}"
        )
    return array


def _download():
    """Downloads the four files into the Keras cache; returns `(directory, files)`."""
    import keras

    files = {}
    for name in FILES:
        fname = name + ".gz"
        try:
            downloaded = keras.utils.get_file(
                fname, origin=BASE_URL + fname, cache_dir=_keras_home(), cache_subdir=CACHE_SUBDIR
            )
        except Exception as e:
            raise FileNotFoundError(
                f"Fashion-MNIST is not on this machine ({ENV_VAR} unset, nothing in "
                f"{DEBIAN_DIR} or {_cache_dir()}) and downloading {BASE_URL + fname} failed: "
                f"{e}. Install it with `sudo apt-get install dataset-fashion-mnist`, or set "
                f"{ENV_VAR} to a directory holding the four files."
            ) from e
        files[name] = os.fspath(downloaded)
    return os.path.dirname(files[FILES[0]]), files


def load_data(
    path: str | os.PathLike | None = None, *, verify: bool = True
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Loads Fashion-MNIST like `keras.datasets.fashion_mnist.load_data()`, from local files.

    The files are looked for in `path`, then in `$KERAS_SAM_FASHION_MNIST`, then in the
    Debian package's `/usr/share/datasets/fashion-mnist`, then in the Keras cache
    (`$KERAS_HOME/datasets/fashion-mnist`, by default `~/.keras/datasets/fashion-mnist`);
    only when none of them holds all four files are they downloaded into the Keras cache
    with `keras.utils.get_file`. When `path` or the environment variable is given, the files
    must be there: there is no fall-back to the other places.

    Every file is checked before use: IDX magic number (2051 for images, 2049 for labels),
    28x28 images, content length matching the header, labels in 0..9, equal image and label
    counts, and with `verify=True` the official counts (60000 and 10000) and the SHA-256 of
    the decompressed content. A bad file raises `DatasetFileError` (a `ValueError`) naming it.

    Args:
        path: a directory (string or `os.PathLike`) holding `train-images-idx3-ubyte`,
            `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`,
            each gzip-compressed (`.gz`) or not, or `None` to search. Defaults to `None`.
        verify: bool. `True` requires the official files (checksums and counts); `False`
            skips only those two checks, so that custom IDX files of any size load, while
            the structure checks still apply. Defaults to `True`.

    Returns:
        Tuple of NumPy arrays `(x_train, y_train), (x_test, y_test)`: `uint8` images of
        shape `(60000, 28, 28)` and `(10000, 28, 28)`, `uint8` labels of shape `(60000,)`
        and `(10000,)` (class names in `CLASS_NAMES`). The arrays are writable copies.

    Raises:
        FileNotFoundError: the files are not where `path` or `$KERAS_SAM_FASHION_MNIST`
            says, or they are nowhere on this machine and the download failed.
        DatasetFileError: a file is truncated, corrupt, or not the expected file.
        ValueError: an argument has the wrong type.

    Example:

    ```python
    from keras_sam.datasets import fashion_mnist

    (x_train, y_train), (x_test, y_test) = fashion_mnist.load_data()
    assert x_train.shape == (60000, 28, 28) and y_test.shape == (10000,)
    print(fashion_mnist.CLASS_NAMES[y_train[0]])  # Ankle boot
    ```
    """
    if not isinstance(verify, bool):
        raise ValueError(f"`verify` must be True or False. Received: verify={verify!r}")
    directory, source, files = _locate(path)
    if files is None:
        directory, files = _download()

    arrays = {}
    for name in FILES:
        split = name.split("-")[0]
        arrays[name] = _parse_idx(
            _read_content(files[name], source),
            files[name],
            images="images" in name,
            expected_count=_OFFICIAL_COUNTS[split] if verify else None,
            sha256=SHA256[name] if verify else None,
            source=source,
        )
    for split in ("train", "t10k"):
        labels_name, images_name = f"{split}-labels-idx1-ubyte", f"{split}-images-idx3-ubyte"
        n_labels, n_images = len(arrays[labels_name]), len(arrays[images_name])
        if n_labels != n_images:
            raise DatasetFileError(
                f"{files[images_name]} holds {n_images} images but {files[labels_name]} holds "
                f"{n_labels} labels: the two files must have the same count. "
                f"{_fix_hint(source)}"
            )
    return (
        (arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]),
        (arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]),
    )
