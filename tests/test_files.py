"""keras_sam.files: a file is replaced whole or not at all, also when the writer is killed."""

import os
import signal
import textwrap
import time

import keras
import numpy as np
import pytest

from keras_sam import files
from tests import processes


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


def test_write_json_text_and_bytes_write_the_content(tmp_path):
    files.write_json(tmp_path / "a.json", {"loss": [0.5, 0.25]})
    files.write_text(tmp_path / "b.md", "é | 1\n")
    files.write_bytes(tmp_path / "c.bin", b"\x00\xff")
    assert (tmp_path / "a.json").read_text() == '{\n  "loss": [\n    0.5,\n    0.25\n  ]\n}\n'
    assert (tmp_path / "b.md").read_text(encoding="utf-8") == "é | 1\n"
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\xff"
    assert _leftovers(tmp_path) == []


def test_a_new_file_gets_the_permissions_open_would_give(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    files.write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_a_failing_writer_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "history.json"
    files.write_json(path, {"epoch": [1]})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        files.write_json(path, {"epoch": object()})  # not JSON: fails before any byte
    with pytest.raises(RuntimeError, match="mid-write"):
        with files.replace_atomically(path) as temporary:
            with open(temporary, "w") as f:
                f.write('{"epoch": [1, 2')
            raise RuntimeError("mid-write")
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_the_temporary_file_keeps_the_extension_and_the_folder(tmp_path):
    with files.replace_atomically(tmp_path / "model.keras") as temporary:
        assert os.path.dirname(temporary) == str(tmp_path)
        assert temporary.endswith(".keras") and ".partial" in temporary
        assert os.path.exists(temporary) and not (tmp_path / "model.keras").exists()
        with open(temporary, "w") as f:
            f.write("new")
    assert (tmp_path / "model.keras").read_text() == "new"


def test_a_missing_folder_is_an_oserror_naming_the_target(tmp_path):
    target = tmp_path / "absent" / "report.json"
    with pytest.raises(FileNotFoundError) as info:
        files.write_json(target, {})
    assert info.value.filename == str(target)


def _model(value):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.set_weights([np.full((3, 2), value, "float32"), np.full((2,), value, "float32")])
    return model


def test_save_model_replaces_a_good_file_with_a_loadable_one(tmp_path):
    path = tmp_path / "model.keras"
    files.save_model(_model(1.0), path)
    files.save_model(_model(2.0), path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.get_weights()[0], np.full((3, 2), 2.0, "float32"))
    assert _leftovers(tmp_path) == []


def test_save_figure_writes_a_png(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")  # the `plots` extra
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    files.save_figure(fig, tmp_path / "plot.png", dpi=50)
    plt.close(fig)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# A process that saves a model with weights 2.0 over `model.keras` (weights 1.0) again and
# again, announcing each save; the test SIGKILLs it at a random moment.
_SAVER = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np
    from keras_sam import files
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256), keras.layers.Dense(64)])
    model.set_weights([np.full(w.shape, 2.0, "float32") for w in model.get_weights()])
    mode = sys.argv[2]
    if mode == "sam_model":  # SAMModel.save writes atomically by itself
        import keras_sam
        model = keras_sam.SAMModel(model)
    print("ready", flush=True)
    while True:
        if mode == "atomic":
            files.save_model(model, sys.argv[1])
        else:
            model.save(sys.argv[1])
    """
)


def _kill_while_saving(path, mode, rng):
    process = processes.start(["-c", _SAVER, path, mode], pipe=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 1.0))
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        process.stdout.close()
    return process.returncode


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["atomic", "sam_model"])
def test_sigkill_during_save_leaves_a_loadable_file(tmp_path, mode):
    # Each kill lands at a random moment of back-to-back saves (`keras_sam.files.save_model`,
    # or `SAMModel.save` itself); the file must then load, holding either the old weights
    # (1.0) or the new ones (2.0), every time.
    rng = np.random.default_rng(0)
    path = tmp_path / "model.keras"
    old = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256), keras.layers.Dense(64)])
    old.set_weights([np.full(w.shape, 1.0, "float32") for w in old.get_weights()])
    mid_save = 0
    for _ in range(4):
        old.save(path)
        assert _kill_while_saving(path, mode, rng) == -signal.SIGKILL
        loaded = keras.saving.load_model(path)
        values = {float(np.unique(w).item()) for w in loaded.get_weights()}
        assert values in ({1.0}, {2.0})
        partial = _leftovers(tmp_path)
        mid_save += bool(partial)
        for name in partial:  # what a kill mid-save leaves: the temporary file only
            (tmp_path / name).unlink()
    # The kills did land inside saves (else this test would prove nothing).
    assert mid_save >= 1


def test_files_module_imports_neither_keras_nor_a_backend():
    code = "import sys, keras_sam.files; print(sorted({'keras', 'tensorflow'} & set(sys.modules)))"
    out = processes.run_code(code)
    assert out.stdout.strip() == "[]"
