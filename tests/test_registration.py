"""A `.keras` file of a SAMModel loads in a fresh process after `import keras, keras_sam`."""

import subprocess
import sys
import textwrap


def test_import_keras_then_keras_sam_registers_every_class(tmp_path):
    path = tmp_path / "m.keras"
    save = textwrap.dedent(
        f"""
        import keras, keras_sam
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        sam_model = keras_sam.SAMModel(model, num_batch_splits=2)
        sam_model.compile(optimizer=keras_sam.LookSAM(keras.optimizers.SGD(0.1), k=3),
                          loss="mse")
        sam_model.save({str(path)!r})
        """
    )
    load = textwrap.dedent(
        f"""
        import keras
        import keras_sam
        loaded = keras.saving.load_model({str(path)!r})
        print(type(loaded).__name__, type(loaded.optimizer).__name__, loaded.optimizer.k)
        """
    )
    for code in (save, load):
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["SAMModel", "LookSAM", "3"]


def test_keras_sam_alone_does_not_import_tensorflow():
    code = "import sys, keras_sam; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr[-2000:]
