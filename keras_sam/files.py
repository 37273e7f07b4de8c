"""Files written whole or not at all.

Every file keras-sam writes (a run's `model.keras`, `config.json` and `history.json`, the
results tables, the pictures, the inspection reports) goes through `replace_atomically`:
the content is written to a new file in the same folder, flushed to disk, and moved over
the target with `os.replace`, which a kill cannot interrupt half-way. A kill at any moment
leaves either the previous file, intact, or the new one, complete; never a truncated file.
What a kill can leave is the temporary file itself, `.NAME.*.partial.EXT`, next to the
target (harmless; delete it at leisure).

```python
from keras_sam import files

files.write_json({"loss": [0.3, 0.2]}, "runs/a/history.json")
files.save_model(model, "runs/a/model.keras")       # model.save(...), atomically
files.save_figure(fig, "runs/a/plot.png", dpi=100)  # fig.savefig(...), atomically
```
"""

import contextlib
import json
import os
import secrets

_PARTIAL = ".partial"


@contextlib.contextmanager
def replace_atomically(path):
    """Yields a temporary path to write; moves it over `path` when the block succeeds.

    The temporary file is created (empty, with the permissions a new file gets) in the
    folder of `path`, named `.NAME.<random>.partial.EXT` so that writers that pick a
    format by extension (Keras's `.keras`, matplotlib's `.png`) still do. When the block
    ends without an exception the file is flushed to disk and renamed to `path` with
    `os.replace` (atomic on POSIX and Windows, within one file system); otherwise it is
    deleted and `path` is left as it was.

    Args:
        path: the file to write (a string or `os.PathLike`). Its folder must exist.

    Yields:
        The temporary path, a string.

    Raises:
        OSError: the folder is missing or not writable, or the disk is full; the error
            names the path.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    stem, extension = os.path.splitext(name)
    while True:
        temporary = os.path.join(folder, f".{stem}.{secrets.token_hex(4)}{_PARTIAL}{extension}")
        try:
            # 0o666 less the umask: the permissions `open(path, "w")` would give.
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
        except OSError as error:
            # Name the file asked for, not the temporary one.
            raise type(error)(error.errno, error.strerror, path) from None
    try:
        yield temporary
        _flush_to_disk(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    _flush_folder(folder)


def write_bytes(path, data):
    """Writes `data` (bytes) to `path` atomically."""
    with replace_atomically(path) as temporary, open(temporary, "wb") as f:
        f.write(data)


def write_text(path, text):
    """Writes `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path, value):
    """Writes `value` as indented JSON (and a final newline) to `path` atomically.

    The value is encoded before anything is written, so a value that JSON cannot encode
    raises `TypeError` and leaves `path` as it was.
    """
    write_text(path, json.dumps(value, indent=2) + "\n")


def save_model(model, path):
    """`model.save(path)` atomically: a kill during the save leaves the previous file."""
    with replace_atomically(path) as temporary:
        model.save(temporary)


def save_figure(figure, path, **kwargs):
    """`figure.savefig(path, **kwargs)` atomically (the format follows the extension)."""
    with replace_atomically(path) as temporary:
        figure.savefig(temporary, **kwargs)


def _flush_to_disk(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _flush_folder(folder):
    """Makes the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
