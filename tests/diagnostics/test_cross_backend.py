"""The same weights and data give the same diagnostics on every backend (1e-5 relative).

Keras picks its backend at import, so each backend runs in its own process
(`tests/diagnostics/cross_backend.py`, and `keras-sam inspect`); this module runs once,
from one session (tests/conftest.py's `NEUTRAL`), and compares each installed backend
with TensorFlow. The backends that are not TensorFlow must not import it.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from tests import processes
from tests.cli.test_inspect import FAST, _tiny_classifier, needs_data
from tests.diagnostics import cross_backend

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OTHERS = [b for b in ("jax", "torch") if importlib.util.find_spec(b) is not None]
RTOL = 1e-5

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not OTHERS, reason="neither JAX nor PyTorch is installed"),
]


def _run(backend, argv):
    return processes.run(argv, backend=backend, timeout=900)


def _assert_close(name, actual, expected, scale=None):
    """Relative to the size of the whole quantity, `||a - e|| <= RTOL ||e||`, or to `scale`
    for a difference of two measured numbers (sharpness: a perturbed loss minus the loss)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, name
    error = np.linalg.norm(actual - expected)
    size = np.linalg.norm(expected) if scale is None else scale
    assert error <= RTOL * size, (name, error, actual, expected)


def test_every_diagnostic_gives_the_same_numbers_on_every_backend(tmp_path):
    rng = np.random.default_rng(0)
    model = cross_backend.build_model()
    inputs = {
        "x": rng.normal(size=(40, 6, 6, 1)).astype("float32"),
        "y": rng.integers(0, 4, size=40),
    }
    for prefix in ("weights", "other"):
        for i, w in enumerate(cross_backend.weights_like(model, rng)):
            inputs[f"{prefix}_{i}"] = w
    for i, v in enumerate(model.trainable_variables):
        inputs[f"vector_{i}"] = rng.normal(size=v.shape).astype("float32")
    np.savez(tmp_path / "inputs.npz", **inputs)

    results = {}
    for backend in ["tensorflow", *OTHERS]:
        path = tmp_path / f"{backend}.npz"
        _run(
            backend,
            ["-m", "tests.diagnostics.cross_backend", str(tmp_path / "inputs.npz"), str(path)],
        )
        results[backend] = dict(np.load(path))
        assert str(results[backend]["backend"]) == backend
        assert bool(results[backend]["tensorflow_imported"]) == (backend == "tensorflow")

    reference = results["tensorflow"]
    # Sanity of the reference itself: a real perturbation raises the loss, the trace
    # samples differ from probe to probe, and the plane's centre is the model's loss.
    assert reference["first_order_perturbed_loss"] > reference["first_order_loss"] + 0.1
    assert np.ptp(reference["trace_samples"]) > 0.1
    assert reference["plane_loss"][1, 1] == pytest.approx(
        float(reference["first_order_loss"]), rel=1e-6
    )
    for backend in OTHERS:
        for name, expected in reference.items():
            if name in ("backend", "tensorflow_imported"):
                continue
            _assert_close(f"{backend}: {name}", results[backend][name], expected)


@needs_data
def test_keras_sam_inspect_reports_the_same_numbers_on_every_backend(tmp_path):
    path = tmp_path / "model.keras"
    _tiny_classifier().save(path)
    reports = {}
    for backend in ["tensorflow", *OTHERS]:
        out = tmp_path / backend
        argv = ["inspect", str(path), *FAST, "--split", "test", "--out", str(out)]
        code = f"import sys; from keras_sam.cli import main; sys.exit(main({argv!r}))"
        _run(backend, ["-c", code])
        reports[backend] = json.loads((out / "report.json").read_text())

    reference = reports["tensorflow"]
    numbers = {
        "loss": lambda r: r["loss"],
        "accuracy": lambda r: r["accuracy"],
        "sharpness": lambda r: [
            r["sharpness"][k] for k in ("first_order", "m_sharpness", "multi_step")
        ],
        "top eigenvalues": lambda r: r["hessian"]["top_eigenvalues"],
        "trace": lambda r: r["hessian"]["trace"],
        "line": lambda r: r["landscape"]["line"]["loss"],
        "plane": lambda r: r["landscape"]["plane"]["loss"],
    }
    assert reference["sharpness"]["first_order"] > 0
    for backend in OTHERS:
        for name, get in numbers.items():
            scale = reference["loss"] if name == "sharpness" else None
            _assert_close(f"{backend}: {name}", get(reports[backend]), get(reference), scale)


@pytest.mark.parametrize("backend", OTHERS)
def test_the_tools_do_not_import_tensorflow_on_other_backends_and_seed_alike(backend):
    code = """if True:
        import sys
        import numpy as np
        import keras_sam.diagnostics, keras_sam.cli.inspection, keras_sam.cli.playground
        from keras_sam.datasets import fashion_mnist, label_noise
        from keras_sam.models import build_model

        model = build_model("resnet", seed=0)
        build_model("cnn", seed=0, batch_norm=True)
        labels = label_noise.corrupt_labels(np.arange(100) % 10, 0.4, seed=0).labels
        try:
            fashion_mnist.load_data()
        except (FileNotFoundError, OSError, ValueError):
            pass  # not installed: the loader's own imports are what counts here
        x = np.zeros((4, 28, 28, 1), "float32")
        loss = "sparse_categorical_crossentropy"
        keras_sam.diagnostics.sharpness(
            keras_sam.diagnostics.Objective(model, x, labels[:4], loss=loss)
        )
        assert "tensorflow" not in sys.modules, [m for m in sys.modules if "tensorflow" in m][:5]
        # The seed gives the initial weights Keras's own seeding gives.
        import keras
        keras.utils.set_random_seed(0)
        again = keras_sam.models.resnet()
        for a, b in zip(model.weights, again.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
        print("no tensorflow")
    """
    assert _run(backend, ["-c", code]).stdout.split()[-2:] == ["no", "tensorflow"]
