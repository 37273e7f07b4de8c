import gzip
import hashlib
import os
import pathlib

import keras
import numpy as np
import pytest

from keras_sam.datasets import fashion_mnist
from keras_sam.datasets.fashion_mnist import DatasetFileError

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
REAL_DIR = "/usr/share/datasets/fashion-mnist"


def idx_bytes(array, *, magic=None, count=None, dims=None):
    """An IDX file: big-endian header (magic, count[, rows, cols]) then the uint8 data."""
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 2051 if array.ndim == 3 else 2049
    header = [magic, len(array) if count is None else count]
    header += list(array.shape[1:] if dims is None else dims)
    return np.array(header, dtype=">u4").tobytes() + array.tobytes()


def write_file(directory, name, content, *, gz):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name + ".gz" if gz else name)
    path.write_bytes(gzip.compress(content, mtime=0) if gz else content)
    return str(path)


def make_set(directory, *, n_train=20, n_test=10, gz=True, seed=0):
    """Writes a small valid Fashion-MNIST-shaped set; returns its arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        TRAIN_IMAGES: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        TRAIN_LABELS: (np.arange(n_train) % 10).astype(np.uint8),
        TEST_IMAGES: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        TEST_LABELS: (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for i, (name, array) in enumerate(arrays.items()):
        compress = gz if isinstance(gz, bool) else bool(i % 2)  # gz="mixed" alternates
        write_file(directory, name, idx_bytes(array), gz=compress)
    return arrays


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real Debian directory, a private Keras home, no env var, and no network."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "debian"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError(f"a test tried to download: {args} {kwargs}")

    monkeypatch.setattr(keras.utils, "get_file", no_download)
    return tmp_path


def cache_dir(tmp_path):
    return tmp_path / "keras_home" / "datasets" / "fashion-mnist"


# ---------------------------------------------------------------- good files


@pytest.mark.parametrize("gz", [True, False, "mixed"])
def test_generated_set_loads_with_exact_values(tmp_path, gz):
    arrays = make_set(tmp_path / "data", n_train=20, n_test=10, gz=gz)
    (x_train, y_train), (x_test, y_test) = fashion_mnist.load_data(tmp_path / "data", verify=False)
    assert x_train.shape == (20, 28, 28) and x_test.shape == (10, 28, 28)
    assert y_train.shape == (20,) and y_test.shape == (10,)
    for a in (x_train, y_train, x_test, y_test):
        assert a.dtype == np.uint8
        assert a.flags.writeable
    np.testing.assert_array_equal(x_train, arrays[TRAIN_IMAGES])
    np.testing.assert_array_equal(y_train, arrays[TRAIN_LABELS])
    np.testing.assert_array_equal(x_test, arrays[TEST_IMAGES])
    np.testing.assert_array_equal(y_test, arrays[TEST_LABELS])


def test_raw_file_is_preferred_to_gz_in_the_same_directory(tmp_path):
    make_set(tmp_path / "data", gz=True, seed=0)
    raw = make_set(tmp_path / "data", gz=False, seed=1)
    (x_train, _), _ = fashion_mnist.load_data(tmp_path / "data", verify=False)
    np.testing.assert_array_equal(x_train, raw[TRAIN_IMAGES])


def test_verify_accepts_files_matching_the_checksum_table(tmp_path, monkeypatch):
    arrays = make_set(tmp_path / "data", n_train=20, n_test=10)
    table = {name: hashlib.sha256(idx_bytes(a)).hexdigest() for name, a in arrays.items()}
    monkeypatch.setattr(fashion_mnist, "SHA256", table)
    monkeypatch.setattr(fashion_mnist, "_OFFICIAL_COUNTS", {"train": 20, "t10k": 10})
    (x_train, _), _ = fashion_mnist.load_data(tmp_path / "data")
    np.testing.assert_array_equal(x_train, arrays[TRAIN_IMAGES])

    changed = arrays[TRAIN_IMAGES].copy()
    changed[3, 14, 14] ^= 1  # one bit of one pixel
    bad = write_file(tmp_path / "data", TRAIN_IMAGES, idx_bytes(changed), gz=True)
    with pytest.raises(DatasetFileError, match="SHA-256") as info:
        fashion_mnist.load_data(tmp_path / "data")
    assert bad in str(info.value)
    assert table[TRAIN_IMAGES] in str(info.value)
    assert "verify=False" in str(info.value)
    # The structure is fine, so verify=False loads the changed file.
    (x_train, _), _ = fashion_mnist.load_data(tmp_path / "data", verify=False)
    assert x_train[3, 14, 14] == changed[3, 14, 14]


def test_class_names():
    assert len(fashion_mnist.CLASS_NAMES) == 10
    assert fashion_mnist.CLASS_NAMES[0] == "T-shirt/top"
    assert fashion_mnist.CLASS_NAMES[6] == "Shirt"
    assert fashion_mnist.CLASS_NAMES[9] == "Ankle boot"


# ---------------------------------------------------------------- bad files


def test_official_checksum_rejects_a_well_formed_full_size_label_file(tmp_path):
    labels = (np.arange(60000) % 10).astype(np.uint8)  # right size, wrong content
    bad = write_file(tmp_path / "data", TRAIN_LABELS, idx_bytes(labels), gz=False)
    for name in (TRAIN_IMAGES, TEST_IMAGES, TEST_LABELS):
        write_file(tmp_path / "data", name, b"never read", gz=False)
    with pytest.raises(DatasetFileError, match="SHA-256") as info:
        fashion_mnist.load_data(tmp_path / "data")
    assert bad in str(info.value)
    assert fashion_mnist.SHA256[TRAIN_LABELS] in str(info.value)


def test_official_counts_are_enforced_when_verifying(tmp_path):
    make_set(tmp_path / "data", n_train=20)
    with pytest.raises(DatasetFileError, match="must hold 60000 labels") as info:
        fashion_mnist.load_data(tmp_path / "data")
    assert os.path.join(str(tmp_path / "data"), TRAIN_LABELS + ".gz") in str(info.value)


def test_truncated_gzip_names_the_file_and_chains_the_cause(tmp_path):
    make_set(tmp_path / "data")
    path = tmp_path / "data" / (TRAIN_IMAGES + ".gz")
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(DatasetFileError, match="truncated") as info:
        fashion_mnist.load_data(tmp_path / "data", verify=False)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, EOFError)
    assert "pass another `path`" in str(info.value)


def test_file_that_is_not_gzip_names_the_file(tmp_path):
    make_set(tmp_path / "data")
    path = tmp_path / "data" / (TEST_LABELS + ".gz")
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DatasetFileError, match="not a valid gzip file") as info:
        fashion_mnist.load_data(tmp_path / "data", verify=False)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("cut", [5, 16 + 28 * 28 * 3 + 100])
def test_raw_file_shorter_than_its_header_says(tmp_path, cut):
    arrays = make_set(tmp_path / "data", gz=False)
    path = tmp_path / "data" / TRAIN_IMAGES
    path.write_bytes(idx_bytes(arrays[TRAIN_IMAGES])[:cut])
    with pytest.raises(DatasetFileError, match="truncated") as info:
        fashion_mnist.load_data(tmp_path / "data", verify=False)
    assert str(path) in str(info.value)
    assert f"{cut} bytes long" in str(info.value)


def test_trailing_bytes_are_rejected(tmp_path):
    arrays = make_set(tmp_path / "data")
    path = write_file(
        tmp_path / "data", TEST_IMAGES, idx_bytes(arrays[TEST_IMAGES]) + b"\0" * 784, gz=True
    )
    with pytest.raises(DatasetFileError, match="corrupt") as info:
        fashion_mnist.load_data(tmp_path / "data", verify=False)
    assert path in str(info.value)


def test_wrong_magic_names_the_file(tmp_path):
    arrays = make_set(tmp_path / "data")
    path = write_file(
        tmp_path / "data", TRAIN_IMAGES, idx_bytes(arrays[TRAIN_IMAGES], magic=2049), gz=True
    )
    with pytest.raises(DatasetFileError, match="magic number must be 2051, got 2049") as info:
        fashion_mnist.load_data(tmp_path / "data", verify=False)
    assert path in str(info.value)


def test_wrong_image_size_names_the_file(tmp_path):
    make_set(tmp_path / "data")
    images = np.zeros((20, 27, 29), dtype=np.uint8)
    path = write_file(tmp_path / "data", TRAIN_IMAGES, idx_bytes(images), gz=True)
    with pytest.raises(DatasetFileError, match="27x29") as info:
        fashion_mnist.load_data(tmp_path / "data", verify=False)
    assert path in str(info.value)


def test_header_count_larger_than_the_data(tmp_path):
    arrays = make_set(tmp_path / "data")
    path = write_file(
        tmp_path / "data", TRAIN_LABELS, idx_bytes(arrays[TRAIN_LABELS], count=21), gz=True
    )
    with pytest.raises(DatasetFileError, match="promises 21 labels") as info:
        fashion_mnist.load_data(tmp_path / "data", verify=False)
    assert path in str(info.value)


def test_image_and_label_counts_must_agree(tmp_path):
    make_set(tmp_path / "data", n_train=20)
    labels = (np.arange(19) % 10).astype(np.uint8)
    labels_path = write_file(tmp_path / "data", TRAIN_LABELS, idx_bytes(labels), gz=True)
    with pytest.raises(DatasetFileError, match="20 images but") as info:
        fashion_mnist.load_data(tmp_path / "data", verify=False)
    assert labels_path in str(info.value)
    assert str(tmp_path / "data" / (TRAIN_IMAGES + ".gz")) in str(info.value)


def test_label_out_of_range_names_the_file_and_the_label(tmp_path):
    arrays = make_set(tmp_path / "data")
    labels = arrays[TEST_LABELS].copy()
    labels[3] = 10
    path = write_file(tmp_path / "data", TEST_LABELS, idx_bytes(labels), gz=True)
    with pytest.raises(DatasetFileError, match="label 3 is 10") as info:
        fashion_mnist.load_data(tmp_path / "data", verify=False)
    assert path in str(info.value)


def test_missing_file_names_it_and_does_not_fall_back(tmp_path):
    make_set(tmp_path / "debian")  # a good copy elsewhere must not be used instead
    make_set(tmp_path / "data")
    os.remove(tmp_path / "data" / (TEST_IMAGES + ".gz"))
    with pytest.raises(FileNotFoundError, match="does not hold") as info:
        fashion_mnist.load_data(tmp_path / "data", verify=False)
    message = str(info.value)
    assert os.path.join(str(tmp_path / "data"), TEST_IMAGES) in message
    assert TRAIN_IMAGES not in message  # only the missing file is listed
    with pytest.raises(FileNotFoundError):
        fashion_mnist.find_data_dir(tmp_path / "data")


def test_path_that_is_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory") as info:
        fashion_mnist.load_data(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"path": 3}, "`path` must be a directory"), ({"verify": "yes"}, "`verify` must be")],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fashion_mnist.load_data(**kwargs)


def test_error_hint_depends_on_where_the_bad_file_is(tmp_path):
    arrays = make_set(tmp_path / "debian")
    write_file(tmp_path / "debian", TEST_LABELS, idx_bytes(arrays[TEST_LABELS], magic=7), gz=True)
    with pytest.raises(DatasetFileError, match="apt-get install --reinstall dataset-fashion-mnist"):
        fashion_mnist.load_data(verify=False)

    os.remove(tmp_path / "debian" / (TEST_LABELS + ".gz"))  # Debian copy incomplete: skipped
    arrays = make_set(cache_dir(tmp_path))
    write_file(cache_dir(tmp_path), TEST_LABELS, idx_bytes(arrays[TEST_LABELS], magic=7), gz=True)
    with pytest.raises(DatasetFileError, match="Delete it so that load_data") as info:
        fashion_mnist.load_data(verify=False)
    assert str(cache_dir(tmp_path)) in str(info.value)


# ---------------------------------------------------------------- search order


def test_search_order_path_then_env_then_debian_then_cache(tmp_path, monkeypatch):
    # Each place holds a set with its own number of training images, to tell them apart.
    places = {"path": 11, "env": 12, "debian": 13, "cache": 14}
    dirs = {name: tmp_path / name for name in places}
    dirs["cache"] = cache_dir(tmp_path)
    for name, n_train in places.items():
        make_set(dirs[name], n_train=n_train)
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(dirs["env"]))

    def train_size(path=None):
        (x_train, _), _ = fashion_mnist.load_data(path, verify=False)
        return len(x_train)

    assert fashion_mnist.find_data_dir(dirs["path"]) == str(dirs["path"])
    assert train_size(dirs["path"]) == 11
    assert fashion_mnist.find_data_dir() == str(dirs["env"])
    assert train_size() == 12
    monkeypatch.setenv(fashion_mnist.ENV_VAR, "")  # empty counts as unset
    assert fashion_mnist.find_data_dir() == str(dirs["debian"])
    assert train_size() == 13
    monkeypatch.delenv(fashion_mnist.ENV_VAR)
    assert train_size() == 13
    for f in os.listdir(dirs["debian"]):
        os.remove(dirs["debian"] / f)
    assert fashion_mnist.find_data_dir() == str(dirs["cache"])
    assert train_size() == 14


def test_env_var_without_the_files_is_an_error_not_a_fall_back(tmp_path, monkeypatch):
    make_set(tmp_path / "debian")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=fashion_mnist.ENV_VAR) as info:
        fashion_mnist.load_data(verify=False)
    assert str(tmp_path / "empty") in str(info.value)
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="is not a directory") as info:
        fashion_mnist.find_data_dir()
    assert str(tmp_path / "missing") in str(info.value)


def test_cache_dir_honours_keras_home(tmp_path, monkeypatch):
    assert fashion_mnist.find_data_dir() == str(cache_dir(tmp_path))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "other"))
    assert fashion_mnist.find_data_dir() == str(tmp_path / "other" / "datasets" / "fashion-mnist")


def test_download_only_when_no_local_copy(tmp_path, monkeypatch):
    calls = []

    def fake_get_file(fname, origin, cache_dir, cache_subdir):
        calls.append((fname, origin, cache_dir, cache_subdir))
        directory = os.path.join(cache_dir, cache_subdir)
        name = fname[: -len(".gz")]
        n = 20 if name.startswith("train") else 10
        array = (
            np.full((n, 28, 28), len(calls), dtype=np.uint8)
            if "images" in name
            else (np.arange(n) % 10).astype(np.uint8)
        )
        return write_file(pathlib.Path(directory), name, idx_bytes(array), gz=True)

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)

    # A complete local copy: no download.
    make_set(tmp_path / "debian")
    fashion_mnist.load_data(verify=False)
    assert calls == []

    # Nothing anywhere: the four files are fetched into the Keras cache, as Keras would.
    for f in os.listdir(tmp_path / "debian"):
        os.remove(tmp_path / "debian" / f)
    (x_train, y_train), (x_test, _) = fashion_mnist.load_data(verify=False)
    base = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
    assert [c[0] for c in calls] == [
        "train-labels-idx1-ubyte.gz",
        "train-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
    ]
    assert all(c[1] == base + c[0] for c in calls)
    assert all(c[2] == str(tmp_path / "keras_home") for c in calls)
    assert all(c[3] == os.path.join("datasets", "fashion-mnist") for c in calls)
    assert x_train.shape == (20, 28, 28) and x_test.shape == (10, 28, 28)
    assert np.all(x_train == 2) and np.all(x_test == 4)  # what the fake wrote
    np.testing.assert_array_equal(y_train, np.arange(20) % 10)

    # Now the cache has them: no second download.
    fashion_mnist.load_data(verify=False)
    assert len(calls) == 4


def test_failed_download_says_how_to_install(monkeypatch):
    def failing_get_file(fname, **kwargs):
        raise Exception(f"URL fetch failure on {fname}: no network")

    monkeypatch.setattr(keras.utils, "get_file", failing_get_file)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        fashion_mnist.load_data()
    assert "no network" in str(info.value)
    assert fashion_mnist.ENV_VAR in str(info.value)
    assert info.value.__cause__ is not None


# ---------------------------------------------------------------- the real files


def _real_files_present():
    return all(
        os.path.isfile(os.path.join(REAL_DIR, name + ".gz"))
        for name in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
    )


@pytest.mark.skipif(
    not _real_files_present(),
    reason=f"Fashion-MNIST is not in {REAL_DIR}: install it with "
    "`sudo apt-get install dataset-fashion-mnist`",
)
def test_real_files(monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", REAL_DIR)
    assert fashion_mnist.find_data_dir() == REAL_DIR
    (x_train, y_train), (x_test, y_test) = fashion_mnist.load_data()  # checksums enforced
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert {a.dtype for a in (x_train, y_train, x_test, y_test)} == {np.dtype(np.uint8)}
    np.testing.assert_array_equal(np.bincount(y_train, minlength=10), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(y_test, minlength=10), np.full(10, 1000))
    # Computed once from the Debian package's files.
    assert int(x_train.sum(dtype=np.int64)) == 3431114169
    assert int(x_test.sum(dtype=np.int64)) == 573469082
    assert int(x_train[0].sum()) == 76247
    assert y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert (
        hashlib.sha256(x_test.tobytes()).hexdigest()
        == "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a"
    )


# ------------------------------------------------------------ unreadable files
def _refuse_reading(monkeypatch, error):
    real_open = open

    def fake_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(TRAIN_IMAGES + ".gz"):
            raise error(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(fashion_mnist, "open", fake_open, raising=False)


def test_a_permission_denied_file_is_a_dataset_file_error_with_the_fix(tmp_path, monkeypatch):
    make_set(tmp_path / "data")
    _refuse_reading(monkeypatch, lambda f: PermissionError(13, "Permission denied", f))
    with pytest.raises(DatasetFileError) as info:
        fashion_mnist.load_data(tmp_path / "data", verify=False)
    path = str(tmp_path / "data" / (TRAIN_IMAGES + ".gz"))
    message = str(info.value)
    assert message.startswith(f"{path} cannot be read: permission denied.")
    assert f"`chmod a+r {path}`" in message and "--data-dir" in message
    assert isinstance(info.value.__cause__, PermissionError)


def test_a_read_error_is_a_dataset_file_error_with_the_fix(tmp_path, monkeypatch):
    make_set(tmp_path / "data")
    _refuse_reading(monkeypatch, lambda f: OSError(5, "Input/output error", f))
    with pytest.raises(DatasetFileError, match=r"cannot be read \(Input/output error\)\. Replace"):
        fashion_mnist.load_data(tmp_path / "data", verify=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_a_file_without_read_permission_is_a_dataset_file_error(tmp_path):
    make_set(tmp_path / "data")
    locked = tmp_path / "data" / (TRAIN_LABELS + ".gz")
    locked.chmod(0)
    try:
        with pytest.raises(DatasetFileError, match=r"cannot be read: permission denied"):
            fashion_mnist.load_data(tmp_path / "data", verify=False)
    finally:
        locked.chmod(0o644)
