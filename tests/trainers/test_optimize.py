"""The custom-loop API: `pred, loss, loss_sam = opt.optimize(grad_func, variables)`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from tests import harness, reference


def _quadratic(rng, n=5, condition=10.0):
    """L(w) = 1/2 w^T A w + b^T w with A symmetric positive definite of this condition."""
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = q @ np.diag(np.geomspace(1.0, condition, n)) @ q.T
    return a, rng.normal(size=n), rng.normal(size=n)


def _quadratic_step(a, b, w0, rho, lr, adaptive=False, eta=0.01, name="kernel", compiled=None):
    w = keras.Variable(w0.astype("float32"), name=name)
    a32, b32 = tf.constant(a, "float32"), tf.constant(b, "float32")
    opt = keras_sam.SAM(keras.optimizers.SGD(lr), rho=rho, adaptive=adaptive, eta=eta)

    def grad_func():
        with tf.GradientTape() as tape:
            v = tf.reshape(w.value, (-1, 1))
            loss = 0.5 * tf.reduce_sum(v * (a32 @ v)) + tf.reduce_sum(b32 * w.value)
        return w.value, loss, tape

    def step():
        return opt.optimize(grad_func, [w])

    if compiled is not None:
        step = tf.function(step, jit_compile=compiled == "xla")
    _, loss, loss_sam = step()
    return w.numpy(), float(loss), float(loss_sam)


@pytest.mark.parametrize("condition", [1.0, 10.0, 1e4])
def test_sam_step_on_a_quadratic_matches_the_closed_form(rng, condition):
    a, b, w0 = _quadratic(rng, condition=condition)
    rho, lr = 0.1, 0.01
    g = a @ w0 + b
    e = rho * g / np.linalg.norm(g)
    expected = w0 - lr * (a @ (w0 + e) + b)
    got, loss, loss_sam = _quadratic_step(a, b, w0, rho, lr)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert loss == pytest.approx(0.5 * w0 @ a @ w0 + b @ w0, rel=1e-5)
    we = w0 + e
    assert loss_sam == pytest.approx(0.5 * we @ a @ we + b @ we, rel=1e-5)
    # The SAM gradient is not the plain gradient: the step differs from SGD's.
    assert np.max(np.abs(got - (w0 - lr * g))) > 1e-4


@pytest.mark.parametrize("name, adaptive_weight", [("kernel", True), ("bias", False)])
def test_asam_step_on_a_quadratic_matches_the_closed_form(rng, name, adaptive_weight):
    a, b, w0 = _quadratic(rng)
    rho, lr, eta = 0.5, 0.01, 0.01
    g = a @ w0 + b
    t = np.abs(w0) + eta if adaptive_weight else np.ones_like(w0)
    e = rho * t * t * g / np.linalg.norm(t * g)
    expected = w0 - lr * (a @ (w0 + e) + b)
    got, _, _ = _quadratic_step(a, b, w0, rho, lr, adaptive=True, eta=eta, name=name)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_asam_with_eta_zero_is_the_abs_w_form(rng):
    # With eta = 0 and no biases, T = |w|: the form of the popular PyTorch implementation.
    a, b, w0 = _quadratic(rng)
    g = a @ w0 + b
    e = 0.5 * w0**2 * g / np.linalg.norm(np.abs(w0) * g)
    expected = w0 - 0.01 * (a @ (w0 + e) + b)
    got, _, _ = _quadratic_step(a, b, w0, 0.5, 0.01, adaptive=True, eta=0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (True, 0.5)])
def test_mlp_trajectory_with_momentum_matches_the_float64_reference(rng, adaptive, rho):
    params = reference.mlp_init(rng)
    x = rng.normal(size=(16, 3))
    t = rng.normal(size=(16, 2))
    lr, momentum, steps = 0.1, 0.9, 5

    model = harness.mlp(params)
    opt = keras_sam.SAM(keras.optimizers.SGD(lr, momentum=momentum), rho=rho, adaptive=adaptive)
    x32, t32 = tf.constant(x, "float32"), tf.constant(t, "float32")

    @tf.function
    def step():
        def grad_func():
            with tf.GradientTape() as tape:
                pred = model(x32, training=True)
                loss = tf.reduce_mean((pred - t32) ** 2)
            return pred, loss, tape

        return opt.optimize(grad_func, model.trainable_variables)

    velocities = [np.zeros_like(p) for p in params]
    for _ in range(steps):
        _, loss, loss_sam = step()
        ref_loss, ref_loss_sam, grads = reference.mlp_sam_gradient(
            params, x, t, rho, adaptive=adaptive
        )
        params, velocities = reference.sgd_momentum(params, grads, velocities, lr, momentum)
        assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
        assert float(loss_sam) == pytest.approx(ref_loss_sam, rel=1e-5)
    for got, want in zip(model.get_weights(), params, strict=True):
        np.testing.assert_allclose(got, want, rtol=5e-5, atol=5e-6)


def test_eager_graph_and_xla_agree(rng):
    a, b, w0 = _quadratic(rng)
    results = [
        _quadratic_step(a, b, w0, 0.1, 0.01, compiled=mode)[0] for mode in (None, "graph", "xla")
    ]
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[2], results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_no_retracing_from_step_to_step(jit_compile):
    model = harness.mlp(reference.mlp_init(np.random.default_rng(0)))
    opt = keras_sam.SAM(keras.optimizers.Adam(0.01))
    x, y = tf.ones((4, 3)), tf.zeros((4, 2))

    @tf.function(jit_compile=jit_compile)
    def step(x, y):
        def grad_func():
            with tf.GradientTape() as tape:
                pred = model(x, training=True)
                loss = tf.reduce_mean((pred - y) ** 2)
            return pred, loss, tape

        return opt.optimize(grad_func, model.trainable_variables)

    step(x, y)
    traced = step.experimental_get_tracing_count()
    for _ in range(5):
        step(x + 1.0, y)
    assert step.experimental_get_tracing_count() == traced <= 2


def test_a_variable_without_gradient_is_untouched_and_out_of_the_norm():
    used = keras.Variable(np.array([3.0, 4.0], "float32"), name="kernel")
    unused = keras.Variable(np.array([1.0, -1.0], "float32"), name="unused")
    opt = keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.5)

    def grad_func():
        with tf.GradientTape() as tape:
            loss = 0.5 * tf.reduce_sum(used.value**2)
        return None, loss, tape

    with pytest.warns(UserWarning, match="Gradients do not exist"):
        opt.optimize(grad_func, [used, unused])
    np.testing.assert_array_equal(unused.numpy(), [1.0, -1.0])
    # Perturbed point: w + 0.5 w/|w| = 1.1 w, so the SAM gradient is 1.1 w.
    np.testing.assert_allclose(used.numpy(), np.array([3.0, 4.0]) * (1 - 0.1 * 1.1), rtol=1e-6)


def test_zero_gradient_gives_no_nan_and_no_change():
    w = keras.Variable(np.array([1.0, 2.0], "float32"))
    opt = keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.05)

    def grad_func():
        with tf.GradientTape() as tape:
            loss = 0.0 * tf.reduce_sum(w.value)
        return None, loss, tape

    _, loss, loss_sam = opt.optimize(grad_func, [w])
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])
    assert float(loss_sam) == 0.0 and np.isfinite(float(loss))


def _bn_dropout_model():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5, seed=3),
            keras.layers.Dense(1),
        ]
    )
    return model


def _snapshot(model):
    return [np.asarray(v).copy() for v in model.variables]


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_weights_are_exactly_back_when_the_second_pass_raises(mode):
    model = _bn_dropout_model()
    opt = keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9))
    x, y = tf.random.normal((8, 4)), tf.random.normal((8, 1))
    calls = []

    def grad_func():
        calls.append(1)
        if len(calls) % 2 == 0:
            raise RuntimeError("second pass failed")
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = tf.reduce_mean((pred - y) ** 2)
        return pred, loss, tape

    step = lambda: opt.optimize(grad_func, model.trainable_variables)  # noqa: E731
    if mode == "graph":
        step = tf.function(step)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="second pass failed"):
        step()
    for a, b in zip(before, _snapshot(model), strict=True):
        np.testing.assert_array_equal(a, b)  # weights, BatchNorm statistics, dropout seed


def test_nothing_changes_when_the_second_pass_fails_at_run_time_in_a_graph(rng):
    # A run-time error inside a compiled step (a NaN caught by `check_numerics` at
    # w + e only): the weights were never written, and the clean pass's state updates
    # (here a metric) are not committed either.
    a, b, w0 = _quadratic(rng)
    w = keras.Variable(w0.astype("float32"), name="kernel")
    a32, b32 = tf.constant(a, "float32"), tf.constant(b, "float32")
    threshold = tf.constant(0.5 * w0 @ a @ w0 + b @ w0 + 1e-3, "float32")
    seen = keras.metrics.Mean()
    opt = keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.5)

    @tf.function
    def step():
        def grad_func():
            with tf.GradientTape() as tape:
                v = tf.reshape(w.value, (-1, 1))
                loss = 0.5 * tf.reduce_sum(v * (a32 @ v)) + tf.reduce_sum(b32 * w.value)
                # log of a negative number, NaN, only where the loss passes the threshold.
                loss = tf.debugging.check_numerics(
                    loss + 0.0 * tf.math.log(threshold - loss), "perturbed loss"
                )
            seen.update_state(loss)
            return w.value, loss, tape

        return opt.optimize(grad_func, [w])

    with pytest.raises(tf.errors.InvalidArgumentError, match="perturbed loss"):
        step()
    np.testing.assert_array_equal(w.numpy(), w0.astype("float32"))
    assert int(opt.iterations) == 0
    assert float(seen.count) == 0.0
    assert all(float(tf.reduce_sum(tf.abs(v))) == 0.0 for v in opt.inner_optimizer.variables[2:])


def test_batchnorm_statistics_come_from_the_clean_pass_and_dropout_masks_match():
    model = _bn_dropout_model()
    reference_model = _bn_dropout_model()
    reference_model.set_weights(model.get_weights())
    x, y = tf.random.normal((16, 4)), tf.random.normal((16, 1))
    predictions = []
    opt = keras_sam.SAM(keras.optimizers.SGD(0.0), rho=1e-4)  # lr 0: only the state moves

    def grad_func():
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = tf.reduce_mean((pred - y) ** 2)
        predictions.append(pred.numpy())
        return pred, loss, tape

    opt.optimize(grad_func, model.trainable_variables)
    reference_model(x, training=True)  # one plain training-mode forward pass
    for a, b in zip(
        model.non_trainable_variables, reference_model.non_trainable_variables, strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Same dropout mask in both passes: the outputs differ only by the tiny perturbation.
    assert len(predictions) == 2
    np.testing.assert_allclose(predictions[1], predictions[0], atol=1e-2)
    other_mask = reference_model(x, training=True).numpy()
    assert np.max(np.abs(other_mask - predictions[0])) > 0.1


def test_variables_must_be_keras_variables():
    opt = keras_sam.SAM(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="position 0"):
        opt.optimize(lambda: None, [tf.Variable(1.0)])
    with pytest.raises(ValueError, match="empty"):
        opt.optimize(lambda: None, [])


def test_grad_func_must_return_predictions_loss_and_tape():
    opt = keras_sam.SAM(keras.optimizers.SGD(0.1))
    w = keras.Variable(1.0)
    with pytest.raises(ValueError, match=r"\(predictions, loss, tape\)"):
        opt.optimize(lambda: w.value * 2, [w])
    with pytest.raises(ValueError, match="callable"):
        opt.optimize("not callable", [w])


def test_sparse_embedding_gradient_with_duplicate_indices_matches_the_dense_one(rng):
    table = rng.normal(size=(6, 3)).astype("float32")
    ids = tf.constant([[1, 1, 2], [1, 5, 5]])  # duplicates: the sparse gradient repeats rows
    target = tf.constant(rng.normal(size=(2, 3, 3)), "float32")

    def run(dense):
        embeddings = keras.Variable(table, name="embeddings")
        opt = keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.2)

        def grad_func():
            with tf.GradientTape() as tape:
                if dense:
                    vectors = tf.one_hot(ids, 6) @ embeddings.value
                else:
                    vectors = tf.gather(embeddings.value, ids)
                loss = tf.reduce_mean((vectors - target) ** 2)
            return vectors, loss, tape

        for _ in range(3):
            opt.optimize(grad_func, [embeddings])
        return embeddings.numpy()

    np.testing.assert_allclose(run(dense=False), run(dense=True), rtol=1e-6, atol=1e-7)
