"""One pytest session per Keras backend: `KERAS_BACKEND=jax pytest` runs the JAX session.

Keras picks its backend once, at import, so a session tests one backend. The battery is
shared: a test module runs on every backend unless it is listed below as written for one
backend (the TensorFlow custom loop, `tf.distribute`, `tf.IndexedSlices`, ...). The
backend-neutral battery (tests/harness.py runs `SAMModel` eagerly, compiled and under XLA):
methods/test_reference_battery.py and trainers/test_contract.py.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
BACKEND = os.environ["KERAS_BACKEND"]

# Test modules that exercise one backend's own API; the other sessions do not collect them.
ONLY = {
    "tensorflow": [
        "trainers/test_bad_input.py",
        "trainers/test_checkpoints.py",
        "trainers/test_clipping.py",
        "trainers/test_distribute.py",
        "trainers/test_multi_worker.py",
        "trainers/test_optimize.py",
        "trainers/test_sam_model.py",
        "trainers/test_sparse.py",
        "diagnostics/test_tf_data.py",
        "diagnostics/test_cross_backend.py",  # every backend, in subprocesses: run once
        "datasets/test_fashion_mnist.py",
        "datasets/test_label_noise.py",
        "test_cli.py",
        "test_models.py",
        "test_registration.py",
        "test_training.py",
        "test_maths.py",
        "test_wheel.py",  # installs the `tensorflow-cpu` extra; other backends can follow
        # Starts a process per backend itself: one session runs it.
        "test_cross_backend.py",
    ],
}
ONLY["jax"] = ["backends/test_jax.py", "backends/test_jax_distribution.py"]
ONLY["torch"] = [
    "backends/test_torch.py",
    "backends/test_torch_distribution.py",
    "backends/test_torch_dead_replica.py",
]
collect_ignore = [
    "backends/jax_distribution.py",
    "backends/torch_distribution.py",
    "backends/torch_dead_replica.py",
] + [path for backend, paths in ONLY.items() if backend != BACKEND for path in paths]

if BACKEND == "tensorflow":
    import tensorflow as tf

    # Two logical CPU devices for the tf.distribute tests (tests/trainers/test_distribute.py).
    # They must be configured before TensorFlow initializes its devices, so here, once for
    # the session; tests without a strategy run on the first one, as before.
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras.config.disable_interactive_logging()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "backends(*names): runs only in these backends' sessions (the others skip)"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("backends")
        if marker is not None and BACKEND not in marker.args:
            item.add_marker(pytest.mark.skip(reason=f"written for {', '.join(marker.args)}"))
        callspec = getattr(item, "callspec", None)
        if BACKEND == "torch" and callspec is not None and callspec.params.get("mode") == "xla":
            # tests/backends/test_torch.py checks the refusal itself.
            item.add_marker(pytest.mark.skip(reason=TORCH_NO_JIT))


TORCH_NO_JIT = (
    "jit_compile=True: SAMModel.fit refuses torch.compile for a SAM step on PyTorch "
    "(its commit-or-skip and two-pass decisions are Python ifs on tensor values)"
)


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts from the same seeds and a fresh Keras name space."""
    # Without the full garbage collection `clear_session` runs by default: on PyTorch it
    # cost up to 2 s a test on a busy 2-core machine (TensorFlow and torch loaded).
    keras.backend.clear_session(free_memory=BACKEND != "torch")
    keras.utils.set_random_seed(1234)
    if BACKEND == "tensorflow":
        from tests import harness

        harness.fresh_collective_keys()
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
