"""The SAM variants against independent NumPy float64 implementations of their papers'
update rules, over several steps with their state, eagerly, in a graph and under XLA."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from tests import reference

LR, MOMENTUM, STEPS = 0.1, 0.9, 7


def _model(params):
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(5, activation="tanh", name="hidden"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    model.set_weights([p.astype("float32") for p in params])
    return model


def _batches(rng, steps=STEPS, size=16):
    # A different batch each step, so that AESAM's decisions vary.
    return [(rng.normal(size=(size, 3)), rng.normal(size=(size, 2))) for _ in range(steps)]


def _run_keras(optimizer, params, batches, mode):
    model = _model(params)

    def step(x, t):
        def grad_func():
            with tf.GradientTape() as tape:
                pred = model(x, training=True)
                loss = tf.reduce_mean((pred - t) ** 2)
            return pred, loss, tape

        return optimizer.optimize(grad_func, model.trainable_variables)

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    for x, t in batches:
        step(tf.constant(x, "float32"), tf.constant(t, "float32"))
    return model


def _run_reference(step_fn, params, batches, lr=lambda step: LR):
    state, velocities, passes = {}, [np.zeros_like(p) for p in params], 0
    for step, (x, t) in enumerate(batches):
        grads, state, two_pass = step_fn(params, x, t, state, step)
        params, velocities = reference.sgd_momentum(params, grads, velocities, lr(step), MOMENTUM)
        passes += two_pass
    return params, state, passes


def _sgd():
    return keras.optimizers.SGD(LR, momentum=MOMENTUM)


CASES = {
    "gsam": (
        lambda: keras_sam.GSAM(_sgd(), rho=0.1, alpha=0.3),
        functools.partial(reference.gsam_step, rho=0.1, alpha=0.3),
    ),
    "friendly_sam": (
        lambda: keras_sam.FriendlySAM(_sgd(), rho=0.1, sigma=0.8, lmbda=0.6),
        functools.partial(reference.friendly_sam_step, rho=0.1, sigma=0.8, lmbda=0.6),
    ),
    "looksam": (
        lambda: keras_sam.LookSAM(_sgd(), rho=0.1, k=3, alpha=0.7),
        functools.partial(reference.looksam_step, rho=0.1, k=3, alpha=0.7),
    ),
    "periodic_sam": (
        lambda: keras_sam.PeriodicSAM(_sgd(), rho=0.1, k=3),
        functools.partial(reference.periodic_sam_step, rho=0.1, k=3),
    ),
    "aesam": (
        lambda: keras_sam.AESAM(_sgd(), rho=0.1, margin=0.2, decay=0.5),
        functools.partial(reference.aesam_step, rho=0.1, margin=0.2, decay=0.5),
    ),
    "sam_on_head": (
        lambda: keras_sam.SAM(_sgd(), rho=0.3, perturb=r"/head/"),
        functools.partial(reference.masked_sam_step, rho=0.3, mask=[False, False, True, True]),
    ),
}


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_matches_the_float64_reference(rng, case, mode):
    make_optimizer, step_fn = CASES[case]
    params = reference.mlp_init(rng)
    batches = _batches(rng)
    optimizer = make_optimizer()
    model = _run_keras(optimizer, params, batches, mode)
    want, state, passes = _run_reference(step_fn, params, batches)

    for got, expected in zip(model.get_weights(), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=5e-5, atol=5e-6)
    if optimizer.skips_second_pass:
        assert float(optimizer.second_passes.numpy()) == passes
    if case == "friendly_sam":
        for v, m in zip(model.trainable_variables, state["m"], strict=True):
            np.testing.assert_allclose(optimizer._averages[id(v)].numpy(), m, rtol=5e-5, atol=1e-7)
    if case == "looksam":
        for v, g_v in zip(model.trainable_variables, state["g_v"], strict=True):
            np.testing.assert_allclose(
                optimizer._orthogonal[id(v)].numpy(), g_v, rtol=5e-4, atol=1e-6
            )
    if case == "aesam":
        assert 0 < passes < STEPS  # the reference took both kinds of steps
        assert float(optimizer._mean.numpy()) == pytest.approx(state["mean"], rel=1e-5)
        assert float(optimizer._variance.numpy()) == pytest.approx(state["var"], rel=1e-4)


def test_proportional_rho_follows_a_cosine_learning_rate(rng):
    # GSAM's schedule: rho_t = rho_min + (rho_max - rho_min) * lr_t / lr_max.
    params, batches = reference.mlp_init(rng), _batches(rng)
    lr = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=5)
    optimizer = keras_sam.GSAM(
        keras.optimizers.SGD(lr, momentum=MOMENTUM),
        rho=keras_sam.ProportionalRho(lr, rho_max=0.2, rho_min=0.02),
        alpha=0.2,
    )
    model = _run_keras(optimizer, params, batches, "graph")

    def lr_at(step):
        return reference.cosine_decay(step, 0.1, 5)

    def step_fn(params, x, t, state, step):
        rho = 0.02 + 0.18 * lr_at(step) / 0.1
        return reference.gsam_step(params, x, t, state, step, rho=rho, alpha=0.2)

    want, _, _ = _run_reference(step_fn, params, batches, lr=lr_at)
    for got, expected in zip(model.get_weights(), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=5e-5, atol=5e-6)


def test_a_rho_schedule_does_not_retrace(rng):
    params = reference.mlp_init(rng)
    model = _model(params)
    rho = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5)
    optimizer = keras_sam.LookSAM(keras.optimizers.SGD(0.01), rho=rho, k=2)
    x, t = tf.constant(rng.normal(size=(8, 3)), "float32"), tf.constant(rng.normal(size=(8, 2)))

    @tf.function
    def step():
        def grad_func():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(x) - tf.cast(t, "float32")) ** 2)
            return None, loss, tape

        return optimizer.optimize(grad_func, model.trainable_variables)

    step()
    traced = step.experimental_get_tracing_count()  # 2 when the first call creates variables
    for _ in range(5):
        step()
    assert step.experimental_get_tracing_count() == traced <= 2
    assert float(optimizer.second_passes.numpy()) == 3.0


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("name", ["LookSAM", "PeriodicSAM"])
def test_skipping_methods_really_evaluate_one_gradient_between_sam_steps(rng, mode, name):
    # The cost claim: 10 steps with k=5 take 12 forward-backward passes, not 20.
    model = _model(reference.mlp_init(rng))
    optimizer = getattr(keras_sam, name)(keras.optimizers.SGD(0.01), rho=0.05, k=5)
    calls = tf.Variable(0, dtype=tf.int64)  # a tf.Variable: not captured by SAM's scopes
    x, t = tf.constant(rng.normal(size=(8, 3)), "float32"), tf.constant(rng.normal(size=(8, 2)))

    def step():
        def grad_func():
            calls.assign_add(1)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(x) - tf.cast(t, "float32")) ** 2)
            return None, loss, tape

        return optimizer.optimize(grad_func, model.trainable_variables)

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    for _ in range(10):
        step()
    assert int(calls.numpy()) == 12
    assert float(optimizer.second_passes.numpy()) == 2.0


def test_samodel_logs_the_second_pass_rate(rng):
    model = _model(reference.mlp_init(rng))
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(optimizer=keras_sam.PeriodicSAM(keras.optimizers.SGD(0.01), k=4), loss="mse")
    x, t = rng.normal(size=(64, 3)), rng.normal(size=(64, 2))
    history = sam_model.fit(x, t, batch_size=8, epochs=1, verbose=0)
    assert history.history["second_pass_rate"] == [pytest.approx(0.25)]
    # Sharpness is the mean over the two-pass steps only: positive, not diluted by zeros.
    assert history.history["sharpness"][0] > 0
    plain = keras_sam.SAMModel(_model(reference.mlp_init(rng)))
    plain.compile(optimizer=keras_sam.SAM(keras.optimizers.SGD(0.01)), loss="mse")
    assert "second_pass_rate" not in plain.fit(x, t, batch_size=8, verbose=0).history


def test_friendly_sam_state_under_m_sharpness_is_the_ema_of_the_batch_gradient(rng):
    # With m_0 = 0 and a mean loss, one step sets m = (1 - lmbda) * mean of the parts'
    # gradients = (1 - lmbda) * the whole batch's gradient (the parts are equal).
    params = reference.mlp_init(rng)
    x, t = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
    sam_model = keras_sam.SAMModel(_model(params), num_batch_splits=4)
    optimizer = keras_sam.FriendlySAM(keras.optimizers.SGD(0.01), rho=0.1, lmbda=0.7)
    sam_model.compile(optimizer=optimizer, loss="mse")
    sam_model.fit(x, t, batch_size=16, epochs=1, verbose=0)
    _, g = reference.mlp_loss_and_grads(params, x, t)
    for v, gi in zip(sam_model.trainable_variables, g, strict=True):
        np.testing.assert_allclose(optimizer._averages[id(v)].numpy(), 0.3 * gi, rtol=1e-4)


def test_method_state_is_untouched_when_the_perturbed_pass_fails(rng):
    model = _model(reference.mlp_init(rng))
    optimizer = keras_sam.FriendlySAM(keras.optimizers.SGD(0.1), rho=0.1)
    x, t = tf.constant(rng.normal(size=(8, 3)), "float32"), tf.constant(rng.normal(size=(8, 2)))
    calls = []

    def grad_func():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the perturbed pass failed")
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - tf.cast(t, "float32")) ** 2)
        return None, loss, tape

    weights = [w.copy() for w in model.get_weights()]
    with pytest.raises(RuntimeError, match="perturbed pass failed"):
        optimizer.optimize(grad_func, model.trainable_variables)
    for v in optimizer.state_variables:
        assert not np.any(v.numpy())
    for got, want in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(got, want)


@keras.saving.register_keras_serializable(package="keras_sam_tests")
def _in_layer_normalization(variable):
    return "/layer_normalization" in variable.path


def test_sam_on_perturbs_only_normalization_layers(rng):
    # Layer classes resolve, through SAMModel, to exactly the normalization variables:
    # the same step as a predicate naming them, and a different one from plain SAM.
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 3, 32)

    def train(perturb_fn):
        keras.utils.set_random_seed(3)
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(6),
                keras.layers.LayerNormalization(),
                keras.layers.Dense(3),
            ]
        )
        sam_model = keras_sam.SAMModel(model)
        optimizer = keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.5, perturb=perturb_fn(model))
        sam_model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        sam_model.fit(x, y, batch_size=32, epochs=3, verbose=0)
        return model.get_weights()

    by_layers = train(lambda model: keras_sam.NORMALIZATION_LAYERS)
    # A predicate must be registered (so that a saved model can hold it).
    by_predicate = train(lambda model: _in_layer_normalization)
    everything = train(lambda model: None)
    for a, b in zip(by_layers, by_predicate, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(by_layers, everything, strict=True))


def test_layer_classes_in_a_custom_loop_need_bind(rng):
    model = _model(reference.mlp_init(rng))
    optimizer = keras_sam.SAM(keras.optimizers.SGD(0.1), perturb=(keras.layers.Dense,))
    x = tf.constant(rng.normal(size=(4, 3)), "float32")

    def grad_func():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(x) ** 2)
        return None, loss, tape

    with pytest.raises(ValueError, match=r"call `optimizer.bind\(model\)`"):
        optimizer.optimize(grad_func, model.trainable_variables)
    optimizer.bind(model).optimize(grad_func, model.trainable_variables)


def test_a_filter_that_selects_nothing_is_an_error(rng):
    model = _model(reference.mlp_init(rng))
    optimizer = keras_sam.SAM(keras.optimizers.SGD(0.1), perturb="no_such_layer")
    x = tf.constant(rng.normal(size=(4, 3)), "float32")

    def grad_func():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(x) ** 2)
        return None, loss, tape

    with pytest.raises(ValueError, match=r"`perturb` selects none of the 4 variables"):
        optimizer.optimize(grad_func, model.trainable_variables)


# ------------------------------------------------------------- config and checks
def _variants():
    lr = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=100)
    return [
        keras_sam.GSAM(
            keras.optimizers.SGD(lr),
            rho=keras_sam.ProportionalRho(lr, rho_max=0.2, rho_min=0.01),
            alpha=0.2,
            adaptive=True,
        ),
        keras_sam.FriendlySAM(keras.optimizers.Adam(), rho=0.2, sigma=0.5, lmbda=0.8),
        keras_sam.LookSAM(keras.optimizers.SGD(0.1), rho=0.1, k=4, alpha=0.5, perturb="head"),
        keras_sam.PeriodicSAM(keras.optimizers.SGD(0.1), k=3, perturb=(keras.layers.Dense,)),
        keras_sam.AESAM(
            keras.optimizers.SGD(0.1),
            margin=keras.optimizers.schedules.PolynomialDecay(-1.0, 100, 1.0),
            decay=0.8,
            epsilon=1e-9,
        ),
    ]


@pytest.mark.parametrize("index", range(5))
def test_config_round_trip_keeps_every_argument(index):
    optimizer = _variants()[index]
    config = optimizer.get_config()
    restored = type(optimizer).from_config(config)
    assert restored.get_config() == config
    serialized = keras.saving.serialize_keras_object(optimizer)
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is type(optimizer) and again.get_config() == config


def test_saved_model_keeps_the_variant_and_its_state(rng, tmp_path):
    x, t = rng.normal(size=(32, 3)), rng.normal(size=(32, 2))
    sam_model = keras_sam.SAMModel(_model(reference.mlp_init(rng)))
    sam_model.compile(optimizer=keras_sam.LookSAM(keras.optimizers.SGD(0.05), k=3), loss="mse")
    sam_model.fit(x, t, batch_size=8, epochs=1, verbose=0)
    sam_model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, keras_sam.LookSAM) and loaded.optimizer.k == 3
    saved, restored = sam_model.optimizer.variables, loaded.optimizer.variables
    # own, skipped steps, pass counter, g_v slots, SGD's
    assert len(saved) == len(restored) == 2 + 1 + 1 + 4 + 2
    assert float(loaded.optimizer.second_passes.numpy()) == 2  # steps 0 and 3 of 4
    assert np.any(loaded.optimizer.state_variables[1].numpy())
    for a, b in zip(saved, restored, strict=True):
        np.testing.assert_array_equal(b.numpy(), a.numpy())


@pytest.mark.parametrize(
    "build, pattern",
    [
        (lambda: keras_sam.GSAM("sgd", alpha=-0.1), r"`alpha` must be a finite number >= 0"),
        (lambda: keras_sam.LookSAM("sgd", k=0), r"`k` must be an integer >= 1. Received: k=0"),
        (lambda: keras_sam.PeriodicSAM("sgd", k=2.5), r"`k` must be an integer >= 1"),
        (lambda: keras_sam.FriendlySAM("sgd", lmbda=1.0), r"`lmbda` must be in \[0, 1\)"),
        (lambda: keras_sam.FriendlySAM("sgd", sigma=-1), r"`sigma` must be a finite number"),
        (lambda: keras_sam.AESAM("sgd", decay=1), r"`decay` must be in \[0, 1\)"),
        (lambda: keras_sam.AESAM("sgd", margin="1"), r"`margin` must be a finite number or"),
        (lambda: keras_sam.SAM("sgd", perturb="("), r"`perturb` is not a valid regular"),
        (lambda: keras_sam.SAM("sgd", perturb=3), r"`perturb` must be None, a regular"),
        (lambda: keras_sam.SAM("sgd", perturb=(int,)), r"`perturb` must be None"),
        (
            lambda: keras_sam.ProportionalRho(0.1, rho_max=0.1),
            r"`learning_rate` must be a `keras.optimizers.schedules",
        ),
        (
            lambda: keras_sam.ProportionalRho(
                keras.optimizers.schedules.CosineDecay(0.1, 10), rho_max=0.1, rho_min=0.2
            ),
            r"`rho_min` must be <= `rho_max`",
        ),
        (
            lambda: keras_sam.ProportionalRho(
                keras.optimizers.schedules.CosineDecay(0.0, 10, warmup_target=0.1, warmup_steps=5),
                rho_max=0.1,
            ),
            r"`lr_min` must be < `lr_max` \(give `lr_max`",
        ),
    ],
)
def test_invalid_arguments_name_the_argument_and_the_value(build, pattern):
    with pytest.raises(ValueError, match=pattern):
        build()
