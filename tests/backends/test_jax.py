"""What only the JAX backend has: the stateless custom loop, and no TensorFlow import."""

import jax
import keras
import numpy as np
import pytest

import keras_sam
from tests import harness, processes


def _sam():
    return keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1)


def test_stateless_loop_equals_fit_bitwise_and_traces_once():
    """The jitted pure step gives SAMModel's weights, BatchNorm statistics and dropout
    masks exactly, and is traced once for all steps."""
    batches = harness.adapter_batches()
    model, optimizer = harness.adapter_model(), _sam()
    initial = model.get_weights()
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.MeanSquaredError()
    traces = []

    @jax.jit
    def train_step(state, x, y):
        traces.append(None)

        def compute():
            pred = model(x, training=True)
            return pred, loss_fn(y, pred)

        return optimizer.stateless_optimize(
            state, compute, model.trainable_variables, model.non_trainable_variables
        )

    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )
    losses = []
    for x, y in batches:
        state, (_, loss, loss_sam) = train_step(state, x, y)
        losses.append((float(loss), float(loss_sam)))
    assert len(traces) == 1
    # Nothing was written: the variables still hold the initial weights.
    for a, b in zip(model.get_weights(), initial):
        np.testing.assert_array_equal(a, b)
    for group, values in zip(
        (model.trainable_variables, model.non_trainable_variables, optimizer.variables), state
    ):
        for variable, value in zip(group, values):
            variable.assign(value)

    fit_model = harness.adapter_model()
    fit_model.set_weights(initial)
    sam_model = keras_sam.SAMModel(fit_model)
    sam_model.compile(optimizer=_sam(), loss=loss_fn)
    fit_losses = [sam_model.train_on_batch(x, y) for x, y in batches]
    for a, b in zip(model.weights, fit_model.weights):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=a.path)
    # train_on_batch logs this step's clean loss and sharpness (loss_sam - loss), and the
    # count of skipped steps.
    np.testing.assert_allclose(
        np.array(fit_losses),
        [(loss, loss_sam - loss, 0.0) for loss, loss_sam in losses],
        rtol=1e-5,
    )
    assert all(loss_sam > loss for loss, loss_sam in losses)


def test_stateless_loop_checks_its_arguments():
    model, optimizer = harness.adapter_model(), _sam()
    state = ([v.value for v in model.trainable_variables], [], [])
    with pytest.raises(ValueError, match="Build `SAM` before the first step"):
        optimizer.stateless_optimize(state, lambda: None, model.trainable_variables)
    optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="one value per variable"):
        optimizer.stateless_optimize(state, lambda: None, model.trainable_variables)


def test_optimize_names_the_jax_form():
    model = harness.adapter_model()
    with pytest.raises(ValueError, match="stateless_optimize"):
        _sam().optimize(lambda: None, model.trainable_variables)


@pytest.mark.slow
def test_jax_never_imports_tensorflow():
    code = (
        "import sys, numpy as np, keras, keras_sam\n"
        "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])\n"
        "s = keras_sam.SAMModel(m)\n"
        "s.compile(optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1)), loss='mse')\n"
        "s.fit(np.ones((8, 3)), np.ones((8, 2)), verbose=0)\n"
        "import keras_sam.diagnostics, keras_sam.datasets, keras_sam.models, keras_sam.cli\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    processes.run_code(code, backend="jax")


def test_stateless_loop_skips_a_step_that_overflows_adam():
    # A loss of about 1e30: its gradient is finite, Adam's second moment is not. The
    # jitted step returns the state it was given, but for `skipped_steps`.
    variable = keras.Variable(np.array([1.0, -2.0], "float32"))
    optimizer = keras_sam.SAM(keras.optimizers.Adam(0.1), rho=0.1)
    optimizer.build([variable])

    @jax.jit
    def train_step(state, scale):
        def compute():
            return None, scale * keras.ops.sum(variable.value**2)

        return optimizer.stateless_optimize(state, compute, [variable], [])

    state = ([variable.value], [], [v.value for v in optimizer.variables])
    state, _ = train_step(state, 1.0)
    new_state, (_, loss, _) = train_step(state, 1e30)
    assert np.isfinite(float(loss))
    skipped = [id(v) for v in optimizer.variables].index(id(optimizer.skipped_steps))
    for group, new_group in zip(state, new_state, strict=True):
        for i, (a, b) in enumerate(zip(group, new_group, strict=True)):
            if group is state[2] and i == skipped:
                assert int(b) == int(a) + 1
            else:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
