"""A `.keras` file of a SAMModel loads in a fresh process after `import keras, keras_sam`;
what `dir(keras_sam)` lists; the saved inner model, as the quick start describes it."""

import textwrap

import keras
import numpy as np
import pytest

import keras_sam
from tests import processes


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
        result = processes.run_code(code)
    assert result.stdout.split()[-3:] == ["SAMModel", "LookSAM", "3"]


def test_keras_sam_alone_does_not_import_tensorflow():
    code = "import sys, keras_sam; print('tensorflow' in sys.modules)"
    result = processes.run_code(code)
    assert result.stdout.strip() == "False"


def test_dir_lists_the_public_subpackages_and_each_resolves():
    names = dir(keras_sam)
    assert {"datasets", "diagnostics", "models"} <= set(names)
    assert {"SAM", "SAMModel", "__version__"} <= set(names)
    for name in ("datasets", "diagnostics", "models"):
        assert getattr(keras_sam, name).__name__ == f"keras_sam.{name}"
    assert "datasets" not in keras_sam.__all__  # `import *` stays the classes


def test_the_saved_inner_model_is_uncompiled_and_evaluates_once_compiled(tmp_path, rng):
    """What the README's quick start says: `model.save` writes the inner model without a
    loss; compiling the reloaded model evaluates it as `sam_model.evaluate` did."""
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, 64)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    sam_model = keras_sam.SAMModel(model)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.01, momentum=0.9), rho=0.05),
        loss=loss,
        metrics=["accuracy"],
    )
    sam_model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    want = sam_model.evaluate(x, y, verbose=0)
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    assert not reloaded.compiled
    with pytest.raises(ValueError, match="compile"):
        reloaded.evaluate(x, y, verbose=0)
    reloaded.compile(loss=loss, metrics=["accuracy"])
    np.testing.assert_allclose(reloaded.evaluate(x, y, verbose=0), want, rtol=1e-5)
