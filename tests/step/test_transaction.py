"""A step is a transaction, on every backend: a step whose gradients would overflow the
wrapped optimizer's state (or, with `verify_optimizer_step=True`, that would write a NaN
or an infinity) changes nothing but `skipped_steps`; a batch whose arrays differ in size
is refused before anything changes; the library holds no assertion that could fail after
a step was applied.

Backend-neutral: it runs in every backend's pytest session (see tests/conftest.py).
"""

import ast
import pathlib

import keras
import numpy as np
import pytest

import keras_sam
from tests import harness

MODES = sorted(harness.MODES)


def _xent():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fit(x, y, sample_weight, mode, accumulation):
    model = harness.bn_dropout_model()
    optimizer = keras_sam.SAM(
        keras.optimizers.Adam(0.01), rho=0.1, gradient_accumulation_steps=accumulation
    )
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(optimizer=optimizer, loss=_xent(), **harness.MODES[mode])
    sam_model.fit(
        x, y, sample_weight=sample_weight, batch_size=8, shuffle=False, epochs=1, verbose=0
    )
    return model, sam_model


@pytest.mark.parametrize("accumulation", [None, 2])
@pytest.mark.parametrize("mode", MODES)
def test_an_optimizer_slot_overflow_skips_the_step_with_every_variable_intact(
    rng, mode, accumulation
):
    # The second batch's loss is weighted by 1e30: its losses and gradients are finite
    # (about 1e30), but Adam's second moment, 0.001 * g**2, overflows float32. The step
    # is skipped: every variable is bitwise as after the first batch alone.
    x, y = rng.normal(size=(16, 4)).astype("float32"), rng.integers(0, 3, 16)
    weights = np.r_[np.ones(8), np.full(8, 1e30)].astype("float32")
    model, sam_model = _fit(x, y, weights, mode, accumulation)
    reference_model, reference = _fit(x[:8], y[:8], weights[:8], mode, accumulation)

    assert int(sam_model.optimizer.skipped_steps.numpy()) == 1
    assert int(reference.optimizer.skipped_steps.numpy()) == 0
    assert int(sam_model.optimizer.iterations.numpy()) == (0 if accumulation else 1)
    for got, want in zip(model.variables, reference_model.variables, strict=True):
        np.testing.assert_array_equal(harness.to_numpy(got), harness.to_numpy(want), got.path)
    for got, want in zip(sam_model.optimizer.variables, reference.optimizer.variables, strict=True):
        if got is not sam_model.optimizer.skipped_steps:
            np.testing.assert_array_equal(harness.to_numpy(got), harness.to_numpy(want), got.path)
    slots = [harness.to_numpy(v) for v in sam_model.optimizer.inner_optimizer.variables]
    assert all(np.all(np.isfinite(s)) for s in slots)


class _Overflowing(keras.optimizers.Optimizer):
    """An optimizer whose update overflows float32 from any nonzero gradient: a tame
    gradient (about 1) times 1e30 twice."""

    def __init__(self):
        super().__init__(learning_rate=1.0)

    def update_step(self, gradient, variable, learning_rate):
        huge = keras.ops.cast(1e30, variable.dtype)
        self.assign_sub(variable, gradient * huge * huge)


def _overflowing_fit(x, y, mode, verify):
    model = harness.bn_dropout_model()
    optimizer = keras_sam.SAM(_Overflowing(), rho=0.1, verify_optimizer_step=verify)
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(optimizer=optimizer, loss=_xent(), **harness.MODES[mode])
    sam_model.optimizer.build(model.trainable_variables)
    before = harness.snapshot(model.variables + sam_model.optimizer.variables)
    sam_model.fit(x, y, batch_size=8, shuffle=False, epochs=1, verbose=0)
    return model, sam_model, before


@pytest.mark.parametrize("mode", MODES)
def test_verify_optimizer_step_rolls_back_what_a_tame_gradient_overflows(rng, mode):
    # The default step trusts a tame gradient: this optimizer writes infinite weights.
    # `verify_optimizer_step=True` checks what it wrote, restores it, and skips.
    x, y = rng.normal(size=(8, 4)).astype("float32"), rng.integers(0, 3, 8)
    model, sam_model, _ = _overflowing_fit(x, y, mode, verify=False)
    assert int(sam_model.optimizer.skipped_steps.numpy()) == 0
    kernels = [harness.to_numpy(v) for v in model.trainable_variables]
    assert not all(np.all(np.isfinite(k)) for k in kernels)

    model, sam_model, before = _overflowing_fit(x, y, mode, verify=True)
    assert int(sam_model.optimizer.skipped_steps.numpy()) == 1
    after = model.variables + sam_model.optimizer.variables
    for variable, want in zip(after, before, strict=True):
        if variable is not sam_model.optimizer.skipped_steps:
            np.testing.assert_array_equal(harness.to_numpy(variable), want, variable.path)


class _Batches(keras.utils.PyDataset):
    """Batches whose `x` holds 8 examples and whose `y` holds 7."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return 2

    def __getitem__(self, index):
        return self.x[8 * index : 8 * index + 8], self.y[7 * index : 7 * index + 7]


def _error(model, batches):
    with pytest.raises(Exception) as error:  # noqa: B017 - compared with Keras's below
        model.fit(batches, epochs=1, verbose=0)
    return error.value


@pytest.mark.parametrize("mode", MODES)
def test_a_batch_whose_arrays_differ_in_size_gets_keras_error_before_anything_changes(rng, mode):
    x, y = rng.normal(size=(16, 4)).astype("float32"), rng.integers(0, 3, 14)
    model = harness.bn_dropout_model()
    sam_model = keras_sam.SAMModel(model, num_batch_splits=2)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.Adam(0.01), rho=0.1),
        loss=_xent(),
        **harness.MODES[mode],
    )
    sam_model.optimizer.build(model.trainable_variables)
    before = harness.snapshot(model.variables + sam_model.optimizer.variables)
    wrapped = _error(sam_model, _Batches(x, y))

    plain_model = harness.bn_dropout_model()
    plain_model.compile(optimizer=keras.optimizers.Adam(0.01), loss=_xent(), **harness.MODES[mode])
    plain = _error(plain_model, _Batches(x, y))

    # Keras's own message for arrays of different sizes where the step sees the sizes;
    # else (a TensorFlow graph, or Keras's build of the loss on the first batch) the
    # error the loss raises, as in plain Keras. Never a split's internal error.
    if "Data cardinality is ambiguous" in str(wrapped):
        assert isinstance(wrapped, ValueError)
        assert "'x' sizes: 8" in str(wrapped) and "'y' sizes: 7" in str(wrapped)
    else:
        assert type(wrapped) is type(plain), (str(plain), str(wrapped))
        key = str(plain).strip().splitlines()[0].split("'")[0].split('"')[0][:40]
        assert key in str(wrapped), (str(plain), str(wrapped))
        assert "split" not in str(wrapped).lower()
    assert "keras_sam" not in str(wrapped).splitlines()[0]
    after = harness.snapshot(model.variables + sam_model.optimizer.variables)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def _assertions(tree):
    """The assertions in a module: `assert` statements outside docstrings, and calls
    of `*.assert_*`, `*.Assert` or `*.debugging.*` (TensorFlow's, which a graph runs in
    no order with the step's writes, and XLA drops)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            yield node.lineno
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            owner = node.func.value
            if (
                name.startswith("assert_")
                or name == "Assert"
                or (isinstance(owner, ast.Attribute) and owner.attr == "debugging")
            ):
                yield node.lineno


def test_the_library_holds_no_assertion():
    root = pathlib.Path(keras_sam.__file__).parent
    found = [
        f"{path.relative_to(root)}:{line}"
        for path in sorted(root.rglob("*.py"))
        for line in _assertions(ast.parse(path.read_text(), str(path)))
    ]
    assert found == []
    # The check finds what it looks for.
    assert sorted(_assertions(ast.parse("tf.debugging.assert_equal(a, b)\nassert x\n"))) == [1, 2]


def _batchnorm_model():
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, use_bias=False),  # a bias before BatchNorm is noise
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ]
    )


@pytest.mark.slow
def test_a_last_batch_smaller_than_the_number_of_splits_is_trained_alike_in_every_mode(rng):
    # 18 examples in batches of 8 with num_batch_splits=4: a last batch of 2, trained as
    # two parts of one example. Every mode applies it (three steps an epoch) and ends
    # with the same weights and BatchNorm statistics: on TensorFlow, compiled and under
    # XLA, the step sees a batch of unknown size and runs four parts, two of them
    # stand-ins whose BatchNorm updates would show here if they were not dropped.
    x, y = rng.normal(size=(18, 4)).astype("float32"), rng.integers(0, 3, 18)
    results = {}
    for mode in MODES:
        if keras.backend.backend() == "torch" and mode == "xla":
            continue  # refused on PyTorch (tests/backends/test_torch.py)
        model = _batchnorm_model()
        sam_model = keras_sam.SAMModel(model, num_batch_splits=4)
        sam_model.compile(
            optimizer=keras_sam.SAM(keras.optimizers.Adam(0.01), rho=0.1),
            loss=_xent(),
            **harness.MODES[mode],
        )
        history = sam_model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        assert int(sam_model.optimizer.iterations.numpy()) == 6, mode
        assert history.history["skipped_steps"] == [0.0, 0.0], mode
        results[mode] = harness.snapshot(model.variables), history.history["loss"]
    eager, eager_loss = results.pop("eager")
    for mode, (variables, loss) in results.items():
        harness.assert_weights_close(variables, eager, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(loss, eager_loss, rtol=1e-5, err_msg=mode)
