"""What only the PyTorch backend has: the closure custom loop, autograd left clean, and no
TensorFlow import (`torch.compile`: tests/backends/test_torch_compile.py)."""

import sys

import keras
import numpy as np
import pytest
import torch

import keras_sam
from tests import harness, processes, reference


def _sam(rho=0.1):
    return keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=rho)


def test_closure_loop_matches_the_float64_reference(rng):
    """Three SAM steps of the closure loop against NumPy float64: weights, the clean loss
    and the perturbed loss of every step."""
    params = reference.mlp_init(rng)
    model = harness.mlp(params)
    optimizer = _sam(rho=0.05)
    loss_fn = keras.losses.MeanSquaredError()
    velocities = [np.zeros_like(p) for p in params]
    for x, t in harness.batches(rng, 3, size=8):

        def closure(x=x, t=t):
            pred = model(x.astype("float32"), training=True)
            return pred, loss_fn(t.astype("float32"), pred)

        pred, loss, loss_sam = optimizer.optimize(closure, model.trainable_variables)
        want_loss, want_loss_sam, grads = reference.mlp_sam_gradient(params, x, t, 0.05)
        params, velocities = reference.sgd_momentum(params, grads, velocities, 0.1, 0.9)
        assert tuple(pred.shape) == (8, 2)
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
        np.testing.assert_allclose(float(loss_sam), want_loss_sam, rtol=1e-5)
        assert want_loss_sam > want_loss  # a real ascent
    harness.assert_weights_close(harness.snapshot(model.trainable_variables), params)
    assert int(harness.to_numpy(optimizer.iterations)) == 3


def test_closure_loop_equals_fit_bitwise():
    """The closure loop gives SAMModel's weights, BatchNorm statistics and dropout seeds
    exactly (the same step), and leaves no `.grad` on the variables."""
    batches = harness.adapter_batches()
    model, optimizer = harness.adapter_model(), _sam()
    initial = model.get_weights()
    loss_fn = keras.losses.MeanSquaredError()
    losses = []
    for x, y in batches:

        def closure(x=x, y=y):
            pred = model(x, training=True)
            return pred, loss_fn(y, pred)

        _, loss, loss_sam = optimizer.optimize(closure, model.trainable_variables)
        losses.append((float(loss), float(loss_sam)))
    # The passes took their gradients with `torch.autograd.grad`: nothing accumulated.
    assert all(v.value.grad is None for v in model.trainable_variables)

    fit_model = harness.adapter_model()
    fit_model.set_weights(initial)
    sam_model = keras_sam.SAMModel(fit_model)
    sam_model.compile(optimizer=_sam(), loss=loss_fn)
    fit_logs = [sam_model.train_on_batch(x, y) for x, y in batches]
    for a, b in zip(model.variables, fit_model.variables, strict=True):
        np.testing.assert_array_equal(harness.to_numpy(a), harness.to_numpy(b), err_msg=a.path)
    # train_on_batch logs this step's clean loss, its sharpness and the skipped steps.
    np.testing.assert_allclose(
        np.array(fit_logs), [(loss, loss_sam - loss, 0.0) for loss, loss_sam in losses], rtol=1e-6
    )
    assert all(loss_sam > loss for loss, loss_sam in losses)


def _failing_closure(model, x, y, failure):
    """A closure whose second call (the perturbed pass) raises or returns an infinite loss."""
    calls = []
    loss_fn = keras.losses.MeanSquaredError()

    def closure():
        calls.append(None)
        pred = model(x, training=True)
        loss = loss_fn(y, pred)
        if len(calls) == 2:
            if failure == "raises":
                raise RuntimeError("the perturbed pass failed")
            loss = loss * float("inf")
        return pred, loss

    return closure


@pytest.mark.parametrize("failure", ["raises", "inf"])
def test_a_failing_perturbed_pass_leaves_everything_bitwise(failure):
    model, optimizer = harness.adapter_model(), _sam()
    x, y = harness.adapter_batches(1)[0]
    optimizer.build(model.trainable_variables)
    before = harness.snapshot(model.variables) + harness.snapshot(
        optimizer.inner_optimizer.variables
    )
    closure = _failing_closure(model, x, y, failure)
    if failure == "raises":
        with pytest.raises(RuntimeError, match="the perturbed pass failed"):
            optimizer.optimize(closure, model.trainable_variables)
        skipped = 0
    else:
        _, loss, loss_sam = optimizer.optimize(closure, model.trainable_variables)
        assert np.isfinite(float(loss)) and not np.isfinite(float(loss_sam))
        skipped = 1
    after = harness.snapshot(model.variables) + harness.snapshot(
        optimizer.inner_optimizer.variables
    )
    harness.assert_bitwise(after, before)  # weights, BatchNorm, seeds, slots, iterations
    assert int(harness.to_numpy(optimizer.skipped_steps)) == skipped


def test_closure_loop_checks_its_arguments():
    model, optimizer = harness.adapter_model(), _sam()
    with pytest.raises(ValueError, match="`closure` must be a callable"):
        optimizer.optimize(None, model.trainable_variables)
    with pytest.raises(ValueError, match=r"`closure` must return `\(predictions, loss\)`"):
        optimizer.optimize(lambda: 1.0, model.trainable_variables)
    with pytest.raises(ValueError, match="`variables` is empty"):
        optimizer.optimize(lambda: (None, None), [])
    with pytest.raises(ValueError, match="`variables` must be Keras variables"):
        optimizer.optimize(lambda: (None, None), [torch.zeros(2)])


class GradientTape:
    """Stands for `tf.GradientTape` (the check reads the type's name, never imports
    TensorFlow)."""


def test_the_tensorflow_grad_func_is_refused_with_the_pytorch_form():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    before = harness.snapshot(model.trainable_variables)
    optimizer = _sam()

    def grad_func():  # the README's TensorFlow loop, as written, run on PyTorch
        pred = model(np.ones((4, 3), "float32"), training=True)
        return pred, keras.ops.mean(pred**2), GradientTape()

    with pytest.raises(ValueError, match=r"returned `\(predictions, loss, tape\)`.*"
                       r"returns `\(predictions, loss\)`, with no tape"):  # fmt: skip
        optimizer.optimize(grad_func, model.trainable_variables)
    harness.assert_bitwise(harness.snapshot(model.trainable_variables), before)


def test_optimize_inside_a_tf_function_is_refused_with_the_pytorch_form(monkeypatch):
    class TensorFlow:  # a `tf.function` being traced, as `tf.inside_function()` says
        @staticmethod
        def inside_function():
            return True

    monkeypatch.setitem(sys.modules, "tensorflow", TensorFlow)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    calls = []

    def closure():
        calls.append(1)
        pred = model(np.ones((4, 3), "float32"), training=True)
        return pred, keras.ops.mean(pred**2)

    with pytest.raises(ValueError, match=r"inside a `tf.function`.*SAM.optimize\(closure"):
        _sam().optimize(closure, model.trainable_variables)
    assert calls == []  # refused before any pass


@pytest.mark.slow
def test_torch_never_imports_tensorflow():
    code = (
        "import sys, numpy as np, keras, keras_sam\n"
        "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])\n"
        "s = keras_sam.SAMModel(m)\n"
        "s.compile(optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1)), loss='mse')\n"
        "s.fit(np.ones((8, 3)), np.ones((8, 2)), verbose=0)\n"
        "o = keras_sam.SAM(keras.optimizers.SGD(0.1))\n"
        "o.optimize(lambda: (None, keras.ops.sum(m(np.ones((2, 3)), training=True))),"
        " m.trainable_variables)\n"
        "import keras_sam.diagnostics, keras_sam.datasets, keras_sam.models, keras_sam.cli\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    processes.run_code(code, backend="torch")


def _quadratic_loop(optimizer, steps, bad_steps=()):
    """Closure-loop steps on a small least-squares problem; `bad_steps` get a NaN target."""
    variable = keras.Variable(np.array([1.0, -2.0, 0.5], "float32"))
    a = np.arange(12, dtype="float32").reshape(4, 3) / 10
    b = np.array([1.0, 0.0, -1.0, 2.0], "float32")
    history = []
    for i in range(steps):
        target = b * np.nan if i in bad_steps else b

        def closure(target=target):
            return None, keras.ops.mean(
                keras.ops.square(
                    keras.ops.matmul(a, variable) - keras.ops.convert_to_tensor(target)
                )
            )

        loss = optimizer.optimize(closure, [variable])[1]
        history.append((float(loss), harness.to_numpy(variable)))
    return variable, history


def test_closure_loop_with_a_loss_scale_optimizer_inside_sam():
    harness.check_loss_scale_inside_sam(_quadratic_loop)


def test_closure_loop_accumulates_and_keeps_the_partial_sum_between_steps(rng):
    params = reference.mlp_init(rng)
    x, t = (a.astype("float32") for a in harness.batches(rng, 1, size=12)[0])
    model = harness.mlp(params)
    optimizer = keras_sam.SAM(
        keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1, gradient_accumulation_steps=3
    )

    def step(x_batch, t_batch):
        def closure():
            pred = model(x_batch, training=True)
            return pred, keras.ops.mean(
                keras.ops.square(pred - keras.ops.convert_to_tensor(t_batch))
            )

        return optimizer.optimize(closure, model.trainable_variables)[1]

    for start in range(0, 8, 4):  # two of the three micro-batches
        step(x[start : start + 4], t[start : start + 4])
    np.testing.assert_array_equal(model.get_weights()[0], params[0].astype("float32"))
    micro_steps, gradient_sums, _ = optimizer.accumulation_variables
    assert int(harness.to_numpy(micro_steps)) == 2
    assert np.any(harness.to_numpy(gradient_sums[0]))
    step(x[8:12], t[8:12])

    # The float64 reference: the average of the three micro-batches' SAM gradients.
    grads = None
    for start in range(0, 12, 4):
        batch = x[start : start + 4].astype("float64"), t[start : start + 4].astype("float64")
        _, _, g = reference.mlp_sam_gradient(params, *batch, 0.1)
        grads = g if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
    want, _ = reference.sgd_momentum(
        params, [g / 3 for g in grads], [np.zeros_like(p) for p in params], 0.1, 0.9
    )
    harness.assert_weights_close(model.get_weights(), want, rtol=1e-5, atol=1e-6)
    assert int(harness.to_numpy(optimizer.iterations)) == 1


def _unseeded_dropout_run(optimizer):
    """Two epochs of `fit` on a model whose Dropout has no seed: Keras's PyTorch dropout
    then draws its masks from torch's global generator."""
    keras.utils.set_random_seed(7)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, 64)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(3),
        ]
    )
    model.set_weights(
        [np.full(w.shape, 0.1, "float32") + 0.01 * i for i, w in enumerate(model.get_weights())]
    )
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    sam_model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return [w.numpy() for w in model.weights], torch.get_rng_state()


def test_unseeded_dropout_gives_both_passes_the_same_mask():
    # At rho = 1e-20, `w + e` rounds to `w` (the weights are about 0.1): the perturbed
    # pass is a second clean pass (rho = 0 itself would skip it). With the clean pass's
    # masks replayed it gives the clean gradient, and the step is plain SGD's bitwise;
    # the global generator then ends where plain training leaves it (one draw per step).
    plain, plain_rng = _unseeded_dropout_run(keras.optimizers.SGD(0.1))
    sam, sam_rng = _unseeded_dropout_run(keras_sam.SAM(keras.optimizers.SGD(0.1), rho=1e-20))
    for a, b in zip(plain, sam):
        np.testing.assert_array_equal(a, b)
    assert torch.equal(plain_rng, sam_rng)


def test_closure_loop_skips_a_step_that_overflows_adam():
    # A loss of about 1e30: its gradient is finite, Adam's second moment is not. Adam
    # updates its tensors in place; the step restores them and the weights.
    variable = keras.Variable(np.array([1.0, -2.0], "float32"))
    optimizer = keras_sam.SAM(keras.optimizers.Adam(0.1), rho=0.1)

    def step(scale):
        return optimizer.optimize(lambda: (None, scale * torch.sum(variable.value**2)), [variable])

    step(1.0)
    variables = [variable] + optimizer.variables
    before = harness.snapshot(variables)
    _, loss, _ = step(1e30)
    assert np.isfinite(float(loss))
    for a, v in zip(before, variables, strict=True):
        if v is not optimizer.skipped_steps:
            np.testing.assert_array_equal(a, harness.to_numpy(v), err_msg=v.path)
    assert int(optimizer.skipped_steps.numpy()) == 1
    assert int(optimizer.iterations.numpy()) == 1
