"""The same initial weights and batches through `SAMModel.fit` on every Keras backend give
the same weights and method state (1e-5): a subprocess per backend, since Keras picks its
backend at import. Run from one session only (tests/conftest.py's `NEUTRAL`)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests import processes, reference

STEPS, BATCH = 5, 16
ROOT = Path(__file__).parents[1]

# Each backend's process runs this: the cases below, through `fit`, compiled as `compile`'s
# defaults compile on that backend; every weight and state variable goes to an .npz.
SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import keras
import numpy as np
import keras_sam
from tests import harness

inputs = np.load({inputs!r})
params = [inputs[f"param_{{i}}"] for i in range(4)]
bn_weights = [inputs[f"bn_weight_{{i}}"] for i in range({n_bn})]
batch_list = [(inputs[f"x_{{i}}"], inputs[f"t_{{i}}"]) for i in range({steps})]


def sgd():
    return keras.optimizers.SGD(0.1, momentum=0.9)


def bn_model():
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.BatchNormalization(momentum=0.5),
            keras.layers.Dense(2),
        ]
    )
    model.set_weights(bn_weights)
    return model


cases = {{
    "sam": (lambda: keras_sam.SAM(sgd(), rho=0.05), lambda: harness.mlp(params), None),
    "asam": (
        lambda: keras_sam.SAM(sgd(), rho=0.5, adaptive=True),
        lambda: harness.mlp(params),
        None,
    ),
    "looksam": (
        lambda: keras_sam.LookSAM(sgd(), rho=0.1, k=2, alpha=0.7),
        lambda: harness.mlp(params),
        None,
    ),
    "m_sharpness": (lambda: keras_sam.SAM(sgd(), rho=0.1), lambda: harness.mlp(params), 4),
    "batchnorm": (lambda: keras_sam.SAM(keras.optimizers.Adam(0.01), rho=0.1), bn_model, None),
}}
out = {{}}
for name, (optimizer, model, splits) in cases.items():
    sam_model = keras_sam.SAMModel(model(), num_batch_splits=splits)
    sam_model.compile(optimizer=optimizer(), loss="mse")
    x, y = harness.stack(batch_list)
    sam_model.fit(x, y, batch_size={batch}, epochs=1, shuffle=False, verbose=0)
    for i, value in enumerate(harness.snapshot(sam_model.model.weights)):
        out[f"{{name}}/weight_{{i}}"] = value
    for i, value in enumerate(harness.snapshot(sam_model.optimizer.variables)):
        out[f"{{name}}/optimizer_{{i}}"] = value
np.savez({output!r}, backend=keras.config.backend(), **out)
"""


def _backends():
    """The backends installed whose adapter has `SAMModel`'s train step."""
    backends = ["tensorflow", "jax"]
    if importlib.util.find_spec("torch") is not None:
        if "train_step" in vars(type(importlib.import_module("keras_sam.backends.torch").BACKEND)):
            backends.append("torch")
    return backends


def _run(backend, inputs, output):
    script = SCRIPT.format(
        root=str(ROOT),
        inputs=str(inputs),
        output=str(output),
        n_bn=8,
        steps=STEPS,
        batch=BATCH,
    )
    processes.run_code(script, backend=backend, timeout=900)
    saved = np.load(output)
    assert str(saved["backend"]) == backend
    return {key: saved[key] for key in saved.files if key != "backend"}


@pytest.mark.slow
def test_every_backend_trains_the_same_weights(tmp_path):
    rng = np.random.default_rng(11)
    params = reference.mlp_init(rng)
    bn_weights = [
        rng.normal(size=(3, 6)) * 0.7,
        rng.normal(size=6) * 0.1,
        1 + 0.1 * rng.normal(size=6),  # gamma
        0.1 * rng.normal(size=6),  # beta
        np.zeros(6),  # moving mean
        np.ones(6),  # moving variance
        rng.normal(size=(6, 2)) * 0.7,
        rng.normal(size=2) * 0.1,
    ]
    arrays = {f"param_{i}": p.astype("float32") for i, p in enumerate(params)}
    arrays.update({f"bn_weight_{i}": w.astype("float32") for i, w in enumerate(bn_weights)})
    for i in range(STEPS):
        arrays[f"x_{i}"] = rng.normal(size=(BATCH, 3)).astype("float32")
        arrays[f"t_{i}"] = rng.normal(size=(BATCH, 2)).astype("float32")
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **arrays)

    results = {b: _run(b, inputs, tmp_path / f"{b}.npz") for b in _backends()}

    want = results["tensorflow"]
    # Not vacuous: every case trained, and SAM's weights are the float64 reference's.
    for case in ("sam", "asam", "looksam", "m_sharpness", "batchnorm"):
        moved = [k for k in want if k.startswith(f"{case}/weight_")]
        initial = params if case != "batchnorm" else bn_weights
        assert len(moved) == len(initial)
        gap = max(np.max(np.abs(want[k] - w)) for k, w in zip(moved, initial, strict=True))
        assert gap > 1e-3, case
    batch_list = [(arrays[f"x_{i}"], arrays[f"t_{i}"]) for i in range(STEPS)]
    sam, _, _ = reference.trajectory(
        lambda *args: reference.sam_step(*args, rho=0.05),
        params,
        [(x.astype("float64"), t.astype("float64")) for x, t in batch_list],
        reference.sgd(0.1, 0.9),
    )
    for i, w in enumerate(sam):
        np.testing.assert_allclose(want[f"sam/weight_{i}"], w, rtol=5e-5, atol=5e-6)

    for backend, got in results.items():
        assert set(got) == set(want), backend
        for key in sorted(want):
            np.testing.assert_allclose(
                got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=f"{backend}: {key}"
            )
