"""Mixed precision: `mixed_float16` with loss scaling, and `mixed_bfloat16`."""

import keras
import numpy as np
import pytest

import keras_sam
from tests import harness
from tests.harness import fragile_model, snapshot

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf


def _classifier(seed=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ]
    )


def _data(rng, n=32):
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n)


def _xent():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fit_once(policy, x, y, **compile_kwargs):
    """One SAM step of `fit` under `policy`; returns the weight change and the model."""
    keras.config.set_dtype_policy(policy)
    try:
        model = _classifier()
        sam_model = keras_sam.SAMModel(model)
        sam_model.compile(
            optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1),
            loss=_xent(),
            **compile_kwargs,
        )
        before = [w.copy() for w in model.get_weights()]
        sam_model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    return [a - b for a, b in zip(model.get_weights(), before, strict=True)], sam_model


def _relative_difference(got, want):
    """`||got - want|| / ||want||` over all the weight changes taken as one vector."""
    error = sum(float(np.sum((a - b) ** 2)) for a, b in zip(got, want, strict=True))
    return np.sqrt(error / sum(float(np.sum(b**2)) for b in want))


@pytest.mark.parametrize("policy, tolerance", [("mixed_float16", 1e-3), ("mixed_bfloat16", 2e-2)])
def test_a_mixed_precision_step_agrees_with_float32(rng, policy, tolerance):
    x, y = _data(rng)
    want, _ = _fit_once("float32", x, y)
    got, sam_model = _fit_once(policy, x, y)
    assert _relative_difference(got, want) < tolerance
    assert all(v.dtype == "float32" for v in sam_model.model.weights)
    optimizer = sam_model.optimizer
    if policy == "mixed_float16":
        # `compile` wrapped SAM in a LossScaleOptimizer; the step was taken, not skipped.
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        assert isinstance(optimizer.inner_optimizer, keras_sam.SAM)
        assert int(optimizer.step_counter.numpy()) == 1
        assert float(optimizer.dynamic_scale.numpy()) == 2.0**15
        optimizer = optimizer.inner_optimizer
    assert int(optimizer.iterations.numpy()) == 1
    assert int(optimizer.skipped_steps.numpy()) == 0


def test_without_loss_scaling_float16_gradients_underflow_and_with_it_they_do_not(rng):
    # Keras's own guard (`test_loss_scaling_prevents_underflow`): through 15 sigmoids the
    # first kernel's gradient is about 1e-9, below float16's smallest number. SAM scales
    # both passes: were the perturbed pass unscaled, its gradient would underflow too.
    def deep():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [keras.Input((4,))] + [keras.layers.Dense(4, activation="sigmoid") for _ in range(15)]
        )

    x, y = rng.normal(size=(8, 4)).astype("float32"), rng.uniform(size=(8, 4)).astype("float32")
    changes = {}
    keras.config.set_dtype_policy("mixed_float16")
    for scaled in (True, False):
        model = deep()
        sam_model = keras_sam.SAMModel(model)
        sam_model.compile(
            optimizer=keras_sam.SAM(keras.optimizers.SGD(1e9), rho=0.05),
            loss="mse",
            auto_scale_loss=scaled,
        )
        before = model.layers[0].kernel.numpy().copy()
        sam_model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        changes[scaled] = np.max(np.abs(model.layers[0].kernel.numpy() - before))
    assert changes[False] == 0.0
    assert changes[True] > 0.0


@pytest.mark.parametrize("failing_pass", ["clean", "perturbed"])
def test_a_non_finite_pass_skips_the_step_and_halves_the_loss_scale(rng, failing_pass):
    x, y = _data(rng)
    keras.config.set_dtype_policy("mixed_float16")
    model = fragile_model()
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1),
        loss=_xent(),
    )
    sam_model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # a good step: slots not zero

    scaler = sam_model.optimizer
    slots = scaler.inner_optimizer.inner_optimizer.variables
    bad_x = x.copy()
    if failing_pass == "clean":
        bad_x[3, 2] = np.inf
    else:
        model.layers[-1].arm()
    model_state = snapshot(model.variables)  # weights, BatchNorm statistics, dropout seed
    optimizer_state = snapshot(slots)
    scale = float(scaler.dynamic_scale.numpy())
    logs = sam_model.fit(bad_x, y, batch_size=32, epochs=1, verbose=0).history

    for before, after in zip(model_state, model.variables, strict=True):
        np.testing.assert_array_equal(before, after.numpy(), err_msg=after.path)
    for before, after in zip(optimizer_state, slots, strict=True):
        np.testing.assert_array_equal(before, after.numpy(), err_msg=after.path)
    assert float(scaler.dynamic_scale.numpy()) == scale / 2
    assert int(scaler.step_counter.numpy()) == 0
    assert int(scaler.iterations.numpy()) == 1
    assert int(scaler.inner_optimizer.skipped_steps.numpy()) == 1
    # A skipped step adds nothing to the logged averages, and is counted: the epoch's
    # only step was skipped, so it logs NaN, not a loss of 0.
    assert logs["skipped_steps"] == [1.0]
    assert np.isnan(logs["loss"][0]) and np.isnan(logs["sharpness"][0])


def _quadratic_loop(optimizer, steps, bad_steps=()):
    """Custom-loop steps on a small least-squares problem; `bad_steps` get a NaN target."""
    variable = keras.Variable(np.array([1.0, -2.0, 0.5], "float32"))
    a = tf.constant(np.arange(12, dtype="float32").reshape(4, 3) / 10)
    b = tf.constant([1.0, 0.0, -1.0, 2.0])

    @tf.function
    def step(target):
        def grad_func():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((tf.linalg.matvec(a, variable) - target) ** 2)
            return None, loss, tape

        return optimizer.optimize(grad_func, [variable])[1]

    history = []
    for i in range(steps):
        target = b * np.nan if i in bad_steps else b
        history.append((float(step(target)), variable.numpy().copy()))
    return variable, history


@pytest.mark.backends("tensorflow")  # the TensorFlow custom loop
def test_custom_loop_with_a_loss_scale_optimizer_inside_sam():
    harness.check_loss_scale_inside_sam(_quadratic_loop)


def test_zero_gradient_under_mixed_float16_gives_no_nan(rng):
    keras.config.set_dtype_policy("mixed_float16")
    model = _classifier()
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.1),
        loss=lambda y_true, y_pred: 0.0 * keras.ops.sum(y_pred),
    )
    x, _ = _data(rng)
    before = snapshot(model.trainable_variables)
    sam_model.fit(x, np.zeros(32), batch_size=32, epochs=1, verbose=0)
    for a, b in zip(before, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    assert int(sam_model.optimizer.inner_optimizer.skipped_steps.numpy()) == 0


def test_loss_scaled_twice_is_refused():
    keras.config.set_dtype_policy("mixed_float16")
    sam_model = keras_sam.SAMModel(_classifier())
    inner = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    sam_model.compile(optimizer=keras_sam.SAM(inner), loss=_xent())
    with pytest.raises(ValueError, match="scaled twice"):
        sam_model.fit(np.zeros((4, 6)), np.zeros(4), verbose=0)
