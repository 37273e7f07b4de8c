"""Gradient accumulation: k micro-batches, one step, equal to m-sharpness with k parts."""

import keras
import numpy as np
import pytest

import keras_sam

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf
from tests import harness, reference


def _data(rng, n=24):
    return rng.normal(size=(n, 3)).astype("float32"), rng.normal(size=(n, 2)).astype("float32")


class _WeightRecorder(keras.callbacks.Callback):
    def __init__(self, variables):
        super().__init__()
        self.variables = variables
        self.after_batch = []

    def on_train_batch_end(self, batch, logs=None):
        self.model  # noqa: B018  (on JAX, reading `model` writes the step's state back)
        self.after_batch.append([np.array(v.numpy(), copy=True) for v in self.variables])


@pytest.mark.parametrize(
    "method, kwargs",
    [
        (keras_sam.SAM, {}),
        (keras_sam.SAM, {"adaptive": True}),
        (keras_sam.LookSAM, {"k": 2}),
        (keras_sam.FriendlySAM, {}),
    ],
)
@pytest.mark.parametrize("k", [2, 3])
def test_k_micro_batches_make_the_m_sharpness_step_with_k_parts(rng, method, kwargs, k):
    params = reference.mlp_init(rng)
    x, t = _data(rng)
    micro_batch = 4

    def optimizer(**extra):
        return method(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1, **kwargs, **extra)

    model = harness.mlp(params)
    accumulating = keras_sam.SAMModel(model)
    accumulating.compile(optimizer=optimizer(gradient_accumulation_steps=k), loss="mse")
    recorder = _WeightRecorder(model.trainable_variables)
    accumulating.fit(
        x, t, batch_size=micro_batch, epochs=1, shuffle=False, verbose=0, callbacks=[recorder]
    )

    reference_model = harness.mlp(params)
    splitting = keras_sam.SAMModel(reference_model, num_batch_splits=k)
    splitting.compile(optimizer=optimizer(), loss="mse")
    splitting.fit(x, t, batch_size=k * micro_batch, epochs=1, shuffle=False, verbose=0)

    for got, want in zip(model.get_weights(), reference_model.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for got, want in zip(
        accumulating.optimizer.state_variables, splitting.optimizer.state_variables, strict=True
    ):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    # The weights move on every k-th micro-batch only, bitwise still on the others.
    previous = [p.astype("float32") for p in params]
    for i, weights in enumerate(recorder.after_batch):
        moved = any(not np.array_equal(a, b) for a, b in zip(previous, weights, strict=True))
        assert moved == ((i + 1) % k == 0), i
        previous = weights
    steps = len(x) // (k * micro_batch)
    assert int(accumulating.optimizer.iterations.numpy()) == steps
    micro_steps, gradient_sums, state_sums = accumulating.optimizer.accumulation_variables
    assert int(micro_steps.numpy()) == 0
    assert all(not np.any(s.numpy()) for s in gradient_sums + state_sums)


@pytest.mark.backends("tensorflow")  # the TensorFlow custom loop
def test_custom_loop_accumulates_and_keeps_the_partial_sum_between_steps(rng):
    params = reference.mlp_init(rng)
    x, t = _data(rng, n=12)
    model = harness.mlp(params)
    optimizer = keras_sam.SAM(
        keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1, gradient_accumulation_steps=3
    )

    @tf.function
    def step(x_batch, t_batch):
        def grad_func():
            with tf.GradientTape() as tape:
                pred = model(x_batch, training=True)
                loss = tf.reduce_mean((pred - t_batch) ** 2)
            return pred, loss, tape

        return optimizer.optimize(grad_func, model.trainable_variables)[1]

    for start in range(0, 8, 4):  # two of the three micro-batches
        step(x[start : start + 4], t[start : start + 4])
    np.testing.assert_array_equal(model.get_weights()[0], params[0].astype("float32"))
    micro_steps, gradient_sums, _ = optimizer.accumulation_variables
    assert int(micro_steps.numpy()) == 2 and np.any(gradient_sums[0].numpy())
    step(x[8:12], t[8:12])

    # The float64 reference: the average of the three micro-batches' SAM gradients.
    grads = None
    for start in range(0, 12, 4):
        batch = x[start : start + 4], t[start : start + 4]
        _, _, g = reference.mlp_sam_gradient(params, *batch, 0.1)
        grads = g if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
    want, _ = reference.sgd_momentum(
        params, [g / 3 for g in grads], [np.zeros_like(p) for p in params], 0.1, 0.9
    )
    for got, expected in zip(model.get_weights(), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert int(optimizer.iterations.numpy()) == 1


def test_a_skipped_micro_batch_is_not_accumulated(rng):
    params = reference.mlp_init(rng)
    x, t = _data(rng, n=12)
    bad_t = t.copy()
    bad_t[5, 0] = np.nan  # the second of three micro-batches of 4
    x_with_bad = np.concatenate([x[:4], x[4:8], x[4:8], x[8:]])
    t_with_bad = np.concatenate([t[:4], bad_t[4:8], t[4:8], t[8:]])

    def run(xs, ts):
        model = harness.mlp(params)
        sam_model = keras_sam.SAMModel(model)
        sam_model.compile(
            optimizer=keras_sam.SAM(
                keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1, gradient_accumulation_steps=3
            ),
            loss="mse",
        )
        sam_model.fit(xs, ts, batch_size=4, epochs=1, shuffle=False, verbose=0)
        return model.get_weights(), sam_model.optimizer

    got, optimizer = run(x_with_bad, t_with_bad)
    want, _ = run(x, t)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(optimizer.skipped_steps.numpy()) == 1
    assert int(optimizer.iterations.numpy()) == 1


def test_accumulation_on_the_wrapped_optimizer_is_refused():
    inner = keras.optimizers.SGD(0.1, gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match=r"Set `gradient_accumulation_steps` on `SAM`"):
        keras_sam.SAM(inner)
    with pytest.raises(ValueError, match=r"on `LookSAM`, not on the wrapped"):
        keras_sam.LookSAM(keras.optimizers.LossScaleOptimizer(inner))


@pytest.mark.parametrize("steps", [0, -2, 1.5, True, "2"])
def test_invalid_accumulation_steps(steps):
    with pytest.raises(ValueError, match=f"Received: gradient_accumulation_steps={steps!r}"):
        keras_sam.SAM(keras.optimizers.SGD(0.1), gradient_accumulation_steps=steps)
