"""The lowest Keras that pyproject.toml declares runs the README's quick start and one step
of every method, on every backend.

The floor Keras is installed (from pip's cache or the index, without its dependencies,
which the tested Keras already brought) into a folder put on `PYTHONPATH`, ahead of the
environment's own Keras, and each backend runs the smoke script below in a fresh
interpreter against it, with the backends `constraints.txt` pins. Slow: pip, then one
process per backend that imports its framework and compiles a step per method.
"""

import re
import sys
import textwrap
from pathlib import Path

import pytest

from tests import processes

ROOT = Path(__file__).resolve().parent.parent

# One worker runs the whole module: the floor Keras is installed once, in a module fixture.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_keras_floor")]


def declared_floor():
    """The `x.y` of `keras>=x.y` in pyproject.toml's dependencies."""
    text = (ROOT / "pyproject.toml").read_text()
    (floor,) = re.findall(r'^\s*"keras>=([\d.]+)",?\s*$', text, flags=re.MULTILINE)
    return floor


SMOKE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import keras_sam

    rng = np.random.default_rng(0)
    x_train = rng.random((64, 28, 28, 1), dtype="float32")
    y_train = rng.integers(0, 10, 64)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def model(*extra):
        return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                 keras.layers.Dense(128, activation="relu"), *extra,
                                 keras.layers.Dense(10)])

    def fit(optimizer, *extra, jit_compile="auto", **kwargs):
        sam_model = keras_sam.SAMModel(model(*extra))
        sam_model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"],
                          jit_compile=jit_compile)
        return sam_model.fit(x_train, y_train, verbose=0, **kwargs).history

    sgd = lambda: keras.optimizers.SGD(0.01, momentum=0.9)
    report = {"keras": keras.__version__, "backend": keras.backend.backend()}
    # The README's quick start, as written (fewer epochs).
    report["quick start"] = fit(keras_sam.SAM(sgd(), rho=0.05), epochs=2, validation_split=0.1)
    # One step of each method, with its defaults; on JAX unjitted (the same step, and
    # an XLA compilation a method would cost more than the step).
    jit = "auto" if keras.backend.backend() != "jax" else False
    methods = {
        "ASAM": lambda: keras_sam.SAM(sgd(), rho=0.5, adaptive=True),
        "GSAM": lambda: keras_sam.GSAM(sgd()),
        "FriendlySAM": lambda: keras_sam.FriendlySAM(sgd()),
        "LookSAM": lambda: keras_sam.LookSAM(sgd()),
        "PeriodicSAM": lambda: keras_sam.PeriodicSAM(sgd()),
        "AESAM": lambda: keras_sam.AESAM(sgd()),
        "MomentumSAM": lambda: keras_sam.MomentumSAM(sgd()),
        "MESA": lambda: keras_sam.MESA(sgd()),
        "SAM-ON": lambda: keras_sam.SAM(sgd(), perturb=keras_sam.NORMALIZATION_LAYERS),
    }
    for name, make in methods.items():
        extra = [keras.layers.BatchNormalization()] if name == "SAM-ON" else []
        report[name] = fit(make(), *extra, jit_compile=jit, epochs=1, batch_size=64)
    print(json.dumps(report, default=float))
    """
)


@pytest.fixture(scope="module")
def floor_keras(tmp_path_factory):
    floor = declared_floor()
    target = tmp_path_factory.mktemp("keras-floor")
    processes.execute(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--target", str(target), f"keras=={floor}"],
        timeout=300,
    )  # fmt: skip
    return floor, target


def test_the_declared_floor_is_a_keras_3_version():
    floor = declared_floor()
    assert re.fullmatch(r"3\.\d+", floor), floor


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_quick_start_and_every_method_run_on_the_floor_keras(floor_keras, backend):
    import json

    floor, target = floor_keras
    env = processes.environment(backend)
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{target}"
    result = processes.run_code(SMOKE, env=env, timeout=300)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["keras"] == f"{floor}.0", report["keras"]  # x.y is x.y.0
    assert report["backend"] == backend
    for name, history in report.items():
        if name in ("keras", "backend"):
            continue
        assert all(value == value for values in history.values() for value in values), name
        assert history["skipped_steps"][-1] == 0, name
        if name not in ("MomentumSAM",):  # one pass a step: no second pass to measure
            assert "sharpness" in history, name
    assert len(report["quick start"]["loss"]) == 2
    assert "val_accuracy" in report["quick start"]
