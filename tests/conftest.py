"""One pytest session per Keras backend: `KERAS_BACKEND=jax pytest` runs the JAX session.

Keras picks its backend once, at import, so a session tests one backend. Where a module
runs is decided here, in three lists:

- the battery (every module not listed below) runs in every session: the step, the
  methods, `SAMModel`, the diagnostics, written once and run on each backend;
- `ONLY[backend]`: modules written for one backend's own API (the TensorFlow custom loop,
  `tf.distribute`, `tf.IndexedSlices`, JAX's stateless loop, `torch.distributed`);
- `NEUTRAL`: modules whose code under test is the same on every backend (the command line,
  the experiment runner, the data sets, the files, the models, the packaging, and the
  tests that start their own process per backend; not the maths, whose numbers are each
  backend's kernels). Each
  runs once, in the session named beside it: TensorFlow's for those that train the CNN
  (its graph runs the convolutions several times faster than PyTorch's eager step on
  this CPU; and the runner's resume is bitwise only where Keras checkpoints the dropout
  seeds, which PyTorch's unseeded dropout is not), PyTorch's for the rest (the cheapest
  per test: no graph to trace).

A test that runs the step "eagerly, compiled and under XLA" (`mode`, tests/harness.py's
`MODES`) runs in the modes that are different code on the session's backend: all three on
TensorFlow. On JAX and PyTorch Keras compiles only with `jit_compile=True`, so there
`run_eagerly=True` runs the same step as `jit_compile=False` (`SAME_MODE`): a test case
that differs from another only by that is deselected (tests/backends/test_modes.py checks
that Keras still treats them alike). PyTorch's `xla` (`jit_compile=True`, `torch.compile`)
is deselected there: dynamo traces the whole step once per model, about 25 s a case on a
CPU; tests/backends/test_torch_compile.py checks it (one graph, the eager trajectory, a
NaN batch skipped).
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
        "trainers/test_distribute.py",
        "trainers/test_multi_worker.py",
        "trainers/test_optimize.py",
        "trainers/test_sam_model.py",
        "step/test_clipping.py",
        "step/test_sparse.py",
        "diagnostics/test_tf_data.py",
        # Evaluating an uncompiled model raises Keras's ValueError here, an AttributeError
        # on PyTorch (as the README's quick start says for TensorFlow).
        "test_registration.py",
    ],
    "jax": [
        "backends/test_jax.py",
        "backends/test_jax_distribution.py",
        "backends/test_jax_model_parallel.py",
        "backends/test_jax_multi_process.py",
    ],
    "torch": [
        "backends/test_torch.py",
        "backends/test_torch_distribution.py",
        "backends/test_torch_dead_replica.py",
    ],
}
# Backend-neutral modules, each run once, in the session named (see above).
NEUTRAL = {
    "cli/test_commands.py": "tensorflow",
    "cli/test_training.py": "tensorflow",
    # The toy problems' step is compiled by the backend: under TensorFlow's AutoGraph its
    # lines run in a converted copy that coverage does not see.
    "cli/test_playground.py": "torch",
    "cli/test_inspect.py": "tensorflow",
    "datasets/test_fashion_mnist.py": "torch",
    "datasets/test_label_noise.py": "torch",
    "test_files.py": "torch",
    # The GPU benchmarks' scripts are written for JAX or PyTorch: one of them runs them.
    "test_gpu_benchmarks.py": "torch",
    "test_finetune_benchmark.py": "torch",
    "test_benchmark_timing.py": "torch",  # the benchmarks' timing harness
    "test_models.py": "torch",
    "test_packaging.py": "torch",
    "test_planted_defects.py": "torch",
    "test_imports.py": "torch",  # reads the source, runs none of it
    "test_wheel.py": "torch",  # installs the `tensorflow-cpu` extra into a fresh environment
    # Start a process per backend themselves.
    "test_cross_backend.py": "torch",
    "diagnostics/test_cross_backend.py": "torch",
    "test_keras_floor.py": "torch",  # the floor Keras in a process per backend
    "test_readme_logs.py": "torch",  # the README in a process per backend
}
for _path, _backend in NEUTRAL.items():
    ONLY[_backend] = ONLY[_backend] + [_path]
collect_ignore = [
    "backends/jax_distribution.py",
    "backends/torch_distribution.py",
    "backends/torch_dead_replica.py",
] + [path for backend, paths in ONLY.items() if backend != BACKEND for path in paths]

# The `mode`s that run the same step as another on this backend, and those it refuses.
SAME_MODE = {"jax": {"eager": "compiled"}, "torch": {"eager": "compiled"}}.get(BACKEND, {})
# Modes a session does not run (PyTorch's `torch.compile`: see the docstring above).
REFUSED_MODES = {"torch": {"xla"}}.get(BACKEND, set())

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

from tests import budget  # noqa: E402

keras.config.disable_interactive_logging()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "backends(*names): runs only in these backends' sessions (the others skip)"
    )


def _same_step_as_another(item, cases):
    """Whether `item` runs a `mode` this backend refuses, or the same step as a test case
    already in `cases` (which it joins)."""
    callspec = getattr(item, "callspec", None)
    mode = callspec.params.get("mode") if callspec is not None else None
    if not isinstance(mode, str):
        return False
    if mode in REFUSED_MODES:
        return True
    params = dict(callspec.params, mode=SAME_MODE.get(mode, mode))
    case = (item.nodeid.split("[")[0], repr(sorted(params.items())))
    if case in cases:
        return True
    cases.add(case)
    return False


def pytest_collection_modifyitems(config, items):
    kept, deselected, cases = [], [], set()
    for item in items:
        marker = item.get_closest_marker("backends")
        if marker is not None and BACKEND not in marker.args:
            item.add_marker(pytest.mark.skip(reason=f"written for {', '.join(marker.args)}"))
        if _same_step_as_another(item, cases):
            deselected.append(item)
        else:
            kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
    # The slow tests first, so that two workers do not finish on one long test each.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_terminal_summary(terminalreporter):
    budget.report(terminalreporter)


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts from the same seeds and a fresh Keras name space."""
    # Without the full garbage collection `clear_session` runs by default (0.1 to 0.4 s a
    # test with TensorFlow or JAX loaded): Python's own collector still runs as usual.
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)
    if BACKEND == "tensorflow":
        from tests import harness

        harness.fresh_collective_keys()
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
