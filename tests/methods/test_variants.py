"""The SAM variants in a custom loop (`optimize`, `stateless_optimize` on JAX): the
trajectories, retracing and the passes a skipping method really runs (TensorFlow), a failing
pass, `perturb=`; and their configs and checks.

Their trajectories against the float64 references, through `SAMModel.fit` on every backend,
are in tests/methods/test_reference_battery.py."""

import keras
import numpy as np
import pytest

import keras_sam
from tests import custom_loop, harness, reference
from tests.methods.test_reference_battery import CASES, STEPS


def _custom_loop(optimizer, model, batch_list):
    def forward(x, t):
        pred = model(x, training=True)
        return pred, keras.ops.mean((pred - t) ** 2)

    step = custom_loop.sam_step(optimizer, model, forward)
    for x, t in batch_list:
        step(x, t)


@pytest.mark.parametrize("case", [name for name, c in CASES.items() if c.splits is None])
def test_custom_loop_trajectory_matches_the_float64_reference(rng, case):
    # The battery's cases (SAMModel.fit, every backend and mode) through the custom loop,
    # compiled (tf.function, jax.jit; PyTorch eager); on TensorFlow, eager, graph and XLA
    # agree in test_optimize.py.
    spec = CASES[case]
    params = reference.mlp_init(rng)
    batch_list = harness.batches(rng, STEPS)
    model = harness.mlp(params, **spec.model)
    optimizer = spec.optimizer().bind(model)
    _custom_loop(optimizer, model, batch_list)
    want, state, passes = reference.trajectory(spec.step, params, batch_list, spec.update)
    harness.assert_weights_close(model.get_weights(), want)
    if optimizer.skips_second_pass:
        assert float(optimizer.second_passes.numpy()) == passes
    for slot, (key, rtol) in spec.state.items():
        got = [v.numpy() for v in optimizer.state_variables if v.name.endswith(slot)]
        if isinstance(state[key], list):
            harness.assert_weights_close(got, state[key], rtol=rtol, atol=1e-6)
        else:
            assert got[0] == pytest.approx(state[key], rel=rtol)


@pytest.mark.backends("tensorflow")  # counts tf.function's traces (JAX: test_jax.py)
def test_a_rho_schedule_does_not_retrace(rng):
    import tensorflow as tf

    params = reference.mlp_init(rng)
    model = harness.mlp(params)
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


# TensorFlow: a tf.Variable counts the passes the graph runs (in a jitted JAX step, Python
# code runs once, at the trace).
@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("name", ["LookSAM", "PeriodicSAM"])
def test_skipping_methods_really_evaluate_one_gradient_between_sam_steps(rng, mode, name):
    import tensorflow as tf

    # The cost claim: 10 steps with k=5 take 12 forward-backward passes, not 20.
    model = harness.mlp(reference.mlp_init(rng))
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


def test_method_state_is_untouched_when_the_perturbed_pass_fails(rng):
    model = harness.mlp(reference.mlp_init(rng))
    optimizer = keras_sam.FriendlySAM(keras.optimizers.SGD(0.1), rho=0.1)
    x, t = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    calls = []

    def forward(x, t):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the perturbed pass failed")
        return None, keras.ops.mean((model(x) - t) ** 2)

    weights = [w.copy() for w in model.get_weights()]
    with pytest.raises(RuntimeError, match="perturbed pass failed"):
        custom_loop.sam_step(optimizer, model, forward, compiled=False)(x, t)
    for v in optimizer.state_variables:
        assert not np.any(v.numpy())
    for got, want in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(got, want)


def test_layer_classes_in_a_custom_loop_need_bind(rng):
    model = harness.mlp(reference.mlp_init(rng))
    optimizer = keras_sam.SAM(keras.optimizers.SGD(0.1), perturb=(keras.layers.Dense,))
    x = rng.normal(size=(4, 3))

    def forward(x):
        return None, keras.ops.mean(model(x) ** 2)

    with pytest.raises(ValueError, match=r"call `optimizer.bind\(model\)`"):
        custom_loop.sam_step(optimizer, model, forward, compiled=False)(x)
    custom_loop.sam_step(optimizer.bind(model), model, forward, compiled=False)(x)


def test_a_filter_that_selects_nothing_is_an_error(rng):
    model = harness.mlp(reference.mlp_init(rng))
    optimizer = keras_sam.SAM(keras.optimizers.SGD(0.1), perturb="no_such_layer")
    x = rng.normal(size=(4, 3))

    def forward(x):
        return None, keras.ops.mean(model(x) ** 2)

    with pytest.raises(ValueError, match=r"`perturb` selects none of the 4 variables"):
        custom_loop.sam_step(optimizer, model, forward, compiled=False)(x)


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
        keras_sam.MomentumSAM(
            keras.optimizers.SGD(0.1, momentum=0.9), rho=1.5, momentum=0.8, adaptive=True
        ),
        keras_sam.SAM(keras.optimizers.SGD(0.1), rho=keras_sam.LatePhaseRho(0.1, start_step=7)),
    ]


@pytest.mark.parametrize("index", range(7))
def test_config_round_trip_keeps_every_argument(index):
    optimizer = _variants()[index]
    config = optimizer.get_config()
    restored = type(optimizer).from_config(config)
    assert restored.get_config() == config
    serialized = keras.saving.serialize_keras_object(optimizer)
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is type(optimizer) and again.get_config() == config


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
        (lambda: keras_sam.MomentumSAM("sgd", momentum=1), r"`momentum` must be in \[0, 1\)"),
        (
            lambda: keras_sam.MomentumSAM("sgd", momentum=-0.1),
            r"`momentum` must be a finite number >= 0. Received: momentum=-0.1",
        ),
        (
            lambda: keras_sam.LatePhaseRho(0.1, start_step=-1),
            r"`start_step` must be an integer >= 0. Received: start_step=-1",
        ),
        (
            lambda: keras_sam.LatePhaseRho(0.1, start_step=2.5),
            r"`start_step` must be an integer >= 0",
        ),
        (lambda: keras_sam.LatePhaseRho(-0.1, start_step=5), r"`rho` must be a finite number"),
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
