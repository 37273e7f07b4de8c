"""SAM under `tf.distribute.MirroredStrategy` on the two logical CPUs of conftest.py.

Every result is compared with a single-device computation on the same global batch:
the synchronized mode with one perturbation for the whole batch, the per-replica mode
with `SAMModel(num_batch_splits=2)`, which splits the batch as the strategy does (first
half to the first replica). The replicas must end bitwise equal.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from tests import harness, reference

GLOBAL_BATCH = 8

# One worker runs the whole module: its tests share the module's strategy.
pytestmark = pytest.mark.xdist_group("test_distribute")


@pytest.fixture(scope="module")
def strategy():
    # One strategy for the module, with collective keys of its own.
    harness.fresh_collective_keys()
    devices = tf.config.list_logical_devices("CPU")
    assert len(devices) >= 2, "conftest.py configures two logical CPU devices"
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])


def _data(rng, n=16):
    return rng.normal(size=(n, 3)).astype("float32"), rng.normal(size=(n, 2)).astype("float32")


def _fit(params, x, t, optimizer, strategy=None, splits=None, epochs=2):
    """Trains a SAMModel (built under `strategy` when given); returns it and its logs."""
    scope = strategy.scope() if strategy is not None else _nullcontext()
    with scope:
        sam_model = keras_sam.SAMModel(harness.mlp(params), num_batch_splits=splits)
        sam_model.compile(optimizer=optimizer(), loss="mse")
    history = sam_model.fit(
        x, t, batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False, verbose=0
    ).history
    return sam_model, history


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _sam(mode, method=keras_sam.SAM, inner=None, **kwargs):
    def make():
        sgd = keras.optimizers.SGD(0.1, momentum=0.9, **(inner or {}))
        return method(sgd, rho=0.1, distributed_perturbation=mode, **kwargs)

    return make


def _assert_close(got, want, tolerance=1e-5):
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)


def _assert_replicas_identical(strategy, variables):
    for variable in variables:
        local = strategy.experimental_local_results(variable.value)
        assert len(local) == 2
        np.testing.assert_array_equal(local[0].numpy(), local[1].numpy(), err_msg=variable.path)


def _max_difference(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize(
    "method, kwargs",
    [
        (keras_sam.SAM, {}),
        (keras_sam.LookSAM, {"k": 2}),
        (keras_sam.FriendlySAM, {}),
        # MESA (with SAM's pass: rho=0.1): the moving average and the KL term per replica.
        (keras_sam.MESA, {"decay": 0.5, "lmbda": 0.5, "temperature": 2.0}),
    ],
)
def test_per_replica_mode_equals_splitting_the_batch_on_one_device(strategy, rng, method, kwargs):
    params = reference.mlp_init(rng)
    x, t = _data(rng)
    distributed, logs = _fit(params, x, t, _sam("per_replica", method, **kwargs), strategy)
    single, single_logs = _fit(params, x, t, _sam("per_replica", method, **kwargs), splits=2)
    _assert_close(distributed.get_weights(), single.get_weights())
    np.testing.assert_allclose(logs["loss"], single_logs["loss"], rtol=1e-5)
    np.testing.assert_allclose(logs["sharpness"], single_logs["sharpness"], rtol=1e-4)
    _assert_replicas_identical(strategy, distributed.weights)
    # The method's state (LookSAM's stored direction, F-SAM's gradient average) is the
    # same on both replicas, the average of their updates.
    _assert_replicas_identical(strategy, distributed.optimizer.variables)


def test_synchronized_mode_equals_one_device_on_the_global_batch(strategy, rng):
    params = reference.mlp_init(rng)
    x, t = _data(rng)
    distributed, logs = _fit(params, x, t, _sam("synchronized"), strategy)
    single, single_logs = _fit(params, x, t, _sam("synchronized"))
    _assert_close(distributed.get_weights(), single.get_weights())
    np.testing.assert_allclose(logs["loss"], single_logs["loss"], rtol=1e-5)
    np.testing.assert_allclose(logs["sharpness"], single_logs["sharpness"], rtol=1e-4)
    _assert_replicas_identical(strategy, distributed.weights + distributed.optimizer.variables)
    # The float64 reference too (one perturbation for each batch of 8).
    want = params
    velocities = [np.zeros_like(p) for p in params]
    for _ in range(2):
        for start in range(0, len(x), GLOBAL_BATCH):
            batch = x[start : start + GLOBAL_BATCH], t[start : start + GLOBAL_BATCH]
            _, _, grads = reference.mlp_sam_gradient(want, *batch, 0.1)
            want, velocities = reference.sgd_momentum(want, grads, velocities, 0.1, 0.9)
    for a, b in zip(distributed.get_weights(), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=5e-5, atol=5e-6)
    # The two modes really differ.
    per_replica, _ = _fit(params, x, t, _sam("per_replica"), strategy)
    assert _max_difference(per_replica.get_weights(), distributed.get_weights()) > 1e-4


def _custom_loop(strategy, params, x, t, mode, steps):
    """`optimize` inside `strategy.run`, the loss averaged over the global batch."""
    with strategy.scope():
        model = harness.mlp(params)
        optimizer = keras_sam.SAM(
            keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1, distributed_perturbation=mode
        )
        optimizer.build(model.trainable_variables)
    squared_error = keras.losses.MeanSquaredError(reduction=None)
    dataset = tf.data.Dataset.from_tensor_slices((x, t)).batch(GLOBAL_BATCH)

    @tf.function
    def step(x_batch, t_batch):
        def replica_step(x_part, t_part):
            def grad_func():
                with tf.GradientTape() as tape:
                    pred = model(x_part, training=True)
                    loss = tf.nn.compute_average_loss(
                        squared_error(t_part, pred), global_batch_size=GLOBAL_BATCH
                    )
                return pred, loss, tape

            return optimizer.optimize(grad_func, model.trainable_variables)[1]

        losses = strategy.run(replica_step, args=(x_batch, t_batch))
        return strategy.reduce("SUM", losses, axis=None)

    losses = []
    for _ in range(steps // 2):
        for batch in strategy.experimental_distribute_dataset(dataset):
            losses.append(float(step(*batch)))
    return model, optimizer, losses


@pytest.mark.parametrize("mode, splits", [("per_replica", 2), ("synchronized", None)])
def test_custom_loop_under_strategy_run(strategy, rng, mode, splits):
    params = reference.mlp_init(rng)
    x, t = _data(rng)
    model, optimizer, losses = _custom_loop(strategy, params, x, t, mode, steps=4)
    single, logs = _fit(params, x, t, _sam(mode), splits=splits)
    _assert_close(model.get_weights(), single.get_weights())
    np.testing.assert_allclose(np.mean(np.reshape(losses, (2, 2)), axis=1), logs["loss"], 1e-5)
    _assert_replicas_identical(strategy, model.weights + optimizer.variables)
    assert int(optimizer.iterations.numpy()) == 4


def test_custom_loop_outside_strategy_run_is_refused(strategy):
    with strategy.scope():
        variable = keras.Variable(np.ones(2, "float32"))
        optimizer = keras_sam.SAM(keras.optimizers.SGD(0.1))

        def grad_func():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(variable * variable)
            return None, loss, tape

        with pytest.raises(ValueError, match=r"inside `strategy.run\(...\)`"):
            optimizer.optimize(grad_func, [variable])

    @tf.function
    def step():
        return strategy.run(lambda: optimizer.optimize(grad_func, [variable])[1])

    with pytest.raises(ValueError, match=r"Build `SAM` in the strategy's scope"):
        step()


def test_a_nan_on_one_replica_skips_the_step_on_both(strategy, rng):
    params = reference.mlp_init(rng)
    x, t = _data(rng, n=8)
    with strategy.scope():
        sam_model = keras_sam.SAMModel(harness.mlp(params))
        sam_model.compile(optimizer=_sam("per_replica")(), loss="mse")
    sam_model.fit(x, t, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)  # a good step first
    before = [np.array(v.numpy(), copy=True) for v in sam_model.weights]
    slots = sam_model.optimizer.inner_optimizer.variables
    slot_values = [np.array(v.numpy(), copy=True) for v in slots]
    bad_t = t.copy()
    bad_t[-1, 0] = np.nan  # in the second replica's half only
    sam_model.fit(x, bad_t, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    for a, b in zip(before, sam_model.weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    for a, b in zip(slot_values, slots, strict=True):
        np.testing.assert_array_equal(a, b.numpy())
    _assert_replicas_identical(strategy, sam_model.weights + sam_model.optimizer.variables)
    assert int(sam_model.optimizer.skipped_steps.numpy()) == 1
    assert int(sam_model.optimizer.iterations.numpy()) == 1


def test_an_adam_overflow_on_one_replica_skips_the_step_on_both(strategy, rng):
    # The second replica's examples weigh 1e30: every loss and gradient is finite, but
    # Adam's second moment overflows once the optimizer has all-reduced the gradients.
    # The decision, taken after the optimizer wrote, restores every replica's copy.
    params = reference.mlp_init(rng)
    x, t = _data(rng, n=8)
    with strategy.scope():
        sam_model = keras_sam.SAMModel(harness.mlp(params))
        sam_model.compile(optimizer=keras_sam.SAM(keras.optimizers.Adam(0.01), rho=0.1), loss="mse")
    sam_model.fit(x, t, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)  # a good step first
    variables = sam_model.weights + sam_model.optimizer.inner_optimizer.variables
    before = [np.array(v.numpy(), copy=True) for v in variables]
    weights = np.r_[np.ones(4), np.full(4, 1e30)].astype("float32")
    sam_model.fit(x, t, sample_weight=weights, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    for a, v in zip(before, variables, strict=True):
        np.testing.assert_array_equal(a, v.numpy(), err_msg=v.path)
    _assert_replicas_identical(strategy, sam_model.weights + sam_model.optimizer.variables)
    assert int(sam_model.optimizer.skipped_steps.numpy()) == 1
    assert int(sam_model.optimizer.iterations.numpy()) == 1


def test_mixed_float16_on_two_replicas_equals_splitting_the_batch_on_one_device(strategy, rng):
    params = reference.mlp_init(rng)
    x, t = _data(rng)
    keras.config.set_dtype_policy("mixed_float16")
    distributed, logs = _fit(params, x, t, _sam("per_replica"), strategy)
    single, single_logs = _fit(params, x, t, _sam("per_replica"), splits=2)
    assert isinstance(distributed.optimizer, keras.optimizers.LossScaleOptimizer)
    _assert_close(distributed.get_weights(), single.get_weights())
    np.testing.assert_allclose(logs["loss"], single_logs["loss"], rtol=1e-5)
    _assert_replicas_identical(strategy, distributed.weights + distributed.optimizer.variables)
    assert int(distributed.optimizer.step_counter.numpy()) == 4


def test_accumulation_on_two_replicas_equals_four_parts_on_one_device(strategy, rng):
    params = reference.mlp_init(rng)
    x, t = _data(rng)
    # Two micro-batches of 8 on two replicas: four parts of 4, in batch order.
    distributed, _ = _fit(
        params, x, t, _sam("per_replica", gradient_accumulation_steps=2), strategy, epochs=1
    )
    single = keras_sam.SAMModel(harness.mlp(params), num_batch_splits=4)
    single.compile(optimizer=_sam("per_replica")(), loss="mse")
    single.fit(x, t, batch_size=16, epochs=1, shuffle=False, verbose=0)
    _assert_close(distributed.get_weights(), single.get_weights())
    _assert_replicas_identical(strategy, distributed.weights + distributed.optimizer.variables)
    assert int(distributed.optimizer.iterations.numpy()) == 1


@pytest.mark.parametrize(
    "clipping", [{"clipnorm": 0.05}, {"global_clipnorm": 0.08}], ids=lambda c: next(iter(c))
)
def test_clipping_on_two_replicas_is_keras_per_replica_clipping(strategy, rng, clipping):
    # Keras's TensorFlow optimizer clips each replica's gradient (that of its loss over
    # the number of replicas) before it all-reduces them; SAM keeps that placement.
    params = reference.mlp_init(rng)
    x, t = _data(rng, n=8)
    distributed, _ = _fit(params, x, t, _sam("per_replica", inner=clipping), strategy, epochs=3)
    want, velocities = params, [np.zeros_like(p) for p in params]
    for _ in range(3):
        total = None
        for half in (slice(0, 4), slice(4, 8)):
            _, _, g_sam = reference.mlp_sam_gradient(want, x[half], t[half], 0.1)
            clipped = reference.clip([g / 2 for g in g_sam], **clipping)
            total = clipped if total is None else [a + b for a, b in zip(total, clipped)]
        want, velocities = reference.sgd_momentum(want, total, velocities, 0.1, 0.9)
    for got, expected in zip(distributed.get_weights(), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    _assert_replicas_identical(strategy, distributed.weights)

    # With rho=0 the step is plain Keras's, clipping included.
    with strategy.scope():
        sam_zero = keras_sam.SAMModel(harness.mlp(params))
        sam_zero.compile(
            optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9, **clipping), rho=0),
            loss="mse",
        )
        plain = harness.mlp(params)
        plain.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, **clipping), loss="mse")
    for model in (sam_zero, plain):
        model.fit(x, t, batch_size=GLOBAL_BATCH, epochs=3, shuffle=False, verbose=0)
    for a, b in zip(sam_zero.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
