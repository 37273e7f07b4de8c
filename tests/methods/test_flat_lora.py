"""`FlatLoRA` (Li et al., ICML 2025): its noise against an independent uint32 NumPy generator
and the normal law; its scaling against the paper's formula on each kind of LoRA layer; its
trajectory against a float64 reference at `W + s A B + eps`, through `SAMModel.fit` in every
mode and through the custom loop; the frozen weights bitwise untouched; reproducible and
resumed runs bitwise; one pass a step; its config and checks.

Backend-neutral: it runs in every backend's pytest session (see tests/conftest.py).
"""

import math

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam.methods.flat_lora import standard_normal
from tests import custom_loop, harness, reference
from tests.methods.test_one_pass_steps import _Counter, _PassCounter

MODES = sorted(harness.MODES)
SIGMA, TOTAL, SEED, LR = 0.4, 4, 1234, 0.1


def _normal(shape, seed, step, index):
    return harness.to_numpy(standard_normal(shape, seed, step, index)).astype(np.float64)


# ------------------------------------------------------------------ the noise
def test_the_noise_is_the_reference_generator_and_standard_normal():
    for shape, seed, step, index in (((3, 5), 0, 0, 0), ((7,), 2**32 - 1, 123456, 3)):
        want = reference.flat_lora_standard_normal(shape, seed, step, index)
        np.testing.assert_allclose(_normal(shape, seed, step, index), want, rtol=1e-5, atol=1e-5)
    z = _normal((20001,), SEED, 7, 0)
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1.0) < 0.02
    assert abs(np.mean(z**4) - 3.0) < 0.2  # the normal's kurtosis
    assert abs(np.mean(np.abs(z) < 1.0) - math.erf(1 / math.sqrt(2))) < 0.015
    # Independent across steps, layers, seeds and neighbouring entries.
    for other in (_normal((20001,), SEED, 8, 0), _normal((20001,), SEED, 7, 1)):
        assert abs(np.corrcoef(z, other)[0, 1]) < 0.03
    assert abs(np.corrcoef(z, _normal((20001,), SEED + 1, 7, 0))[0, 1]) < 0.03
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.03


def test_the_noise_at_a_step_is_reproducible_and_changes_with_the_step():
    first = _normal((4, 6), SEED, 5, 2)
    np.testing.assert_array_equal(first, _normal((4, 6), SEED, 5, 2))
    np.testing.assert_array_equal(
        first, harness.to_numpy(standard_normal((4, 6), SEED, keras.ops.convert_to_tensor(5), 2))
    )
    assert not np.allclose(first, _normal((4, 6), SEED, 6, 2))


# ------------------------------------------------- the scaling, per kind of layer
def _dense():
    return keras.layers.Dense(4), (3, 6)


def _einsum():
    return keras.layers.EinsumDense("ab,bcd->acd", output_shape=(2, 3)), (3, 5)


def _embedding():
    return keras.layers.Embedding(9, 4), None


def _conv():
    return keras.layers.Conv1D(3, 2), (3, 5, 2)


# layer, the kernel axes a row norm runs over (the inputs of each output unit)
LAYERS = {"dense": (_dense, (0,)), "einsum": (_einsum, (0,)), "embedding": (_embedding, (0,))}
LAYERS["conv1d"] = (_conv, (0, 1))


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_the_noise_on_each_kind_of_lora_layer_is_the_papers_scaling(rng, kind):
    make, axes = LAYERS[kind]
    layer, input_shape = make()
    keras.utils.set_random_seed(1)
    if input_shape is None:
        model = keras.Sequential([keras.Input((3,), dtype="int32"), layer])
    else:
        model = keras.Sequential([keras.Input(input_shape[1:]), layer])
    frozen_name = "_embeddings" if kind == "embedding" else "_kernel"
    frozen = getattr(layer, frozen_name)
    frozen_before = harness.to_numpy(frozen)
    layer.enable_lora(2, lora_alpha=3)
    adapters = [v for v in layer.trainable_variables if "lora" in v.path]
    for v in adapters:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    optimizer = keras_sam.FlatLoRA("sgd", sigma=SIGMA, total_steps=TOTAL, seed=SEED).bind(model)
    optimizer.build(model.trainable_variables)
    optimizer.iterations.assign(3)
    [(variable, value)] = optimizer.pass_values(model.trainable_variables)
    assert variable is frozen
    a, b = (harness.to_numpy(v).astype(np.float64) for v in adapters)
    merged = frozen_before.astype(np.float64) + 1.5 * (a @ b)
    deviation = reference.flat_lora_deviation(
        merged, reference.flat_lora_strength(SIGMA, 3, TOTAL), axes
    )
    want = deviation * _normal(tuple(frozen.shape), SEED, 3, 0)
    got = harness.to_numpy(value).astype(np.float64) - frozen_before
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(harness.to_numpy(frozen), frozen_before)  # never written


# ----------------------------------------------------------- the trajectory
def _lora_mlp(rng, counted=True):
    """Dense(5, tanh) and Dense(2), both with LoRA (rank 2; s = 2 and 1), every adapter
    random (B too, so that A's gradient is not 0 at the first step); with `counted`, a
    layer counting the passes between them."""
    keras.utils.set_random_seed(2)
    hidden, head = keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)
    counter = _Counter() if counted else None
    middle = [_PassCounter(counter)] if counted else []
    model = keras.Sequential([keras.Input((3,)), hidden, *middle, head])
    hidden.enable_lora(2, lora_alpha=4)
    head.enable_lora(2)
    for layer in (hidden, head):
        for v in (layer._kernel, layer.bias, layer.lora_kernel_a, layer.lora_kernel_b):
            v.assign((0.6 * rng.normal(size=v.shape)).astype("float32"))
    return model, (hidden, head), counter


def _state(layers):
    return [
        [harness.to_numpy(v).astype(np.float64) for v in (y._kernel, y.bias, y.lora_kernel_a)]
        + [harness.to_numpy(y.lora_kernel_b).astype(np.float64), y.lora_alpha / y.lora_rank]
        for y in layers
    ]


def _reference_trajectory(params, batch_list):
    """SGD on the adapters and biases with the gradient at `W + s A B + eps`, float64."""
    params = [list(p) for p in params]
    for step, (x, t) in enumerate(batch_list):
        strength = reference.flat_lora_strength(SIGMA, step, TOTAL)
        noise = []
        for index, (w, _, a, b, s) in enumerate(params):
            deviation = reference.flat_lora_deviation(w + s * a @ b, strength, (0,))
            noise.append(deviation * _normal(w.shape, SEED, step, index))
        _, grads = reference.lora_mlp_loss_and_grads(
            [tuple(p) for p in params], np.asarray(x, np.float64), np.asarray(t, np.float64), noise
        )
        for p, g in zip(params, grads, strict=True):
            for i, gi in zip((1, 2, 3), g, strict=True):
                p[i] = p[i] - LR * gi
    return params


def _assert_trajectory(layers, start, batch_list):
    want = _reference_trajectory(start, batch_list)
    for got, ref, before in zip(_state(layers), want, start, strict=True):
        np.testing.assert_array_equal(got[0], before[0])  # the frozen kernel, bitwise
        harness.assert_weights_close(got[1:4], ref[1:4])


def _flat_lora():
    return keras_sam.FlatLoRA(keras.optimizers.SGD(LR), sigma=SIGMA, total_steps=TOTAL, seed=SEED)


@pytest.mark.parametrize("mode", MODES)
def test_fit_descends_with_the_float64_gradient_at_the_noisy_merged_weights(rng, mode):
    model, layers, counter = _lora_mlp(rng)
    start = _state(layers)
    batch_list = harness.batches(rng, 3)
    run = harness.train(_flat_lora(), model, batch_list, mode)
    _assert_trajectory(layers, start, batch_list)
    assert counter.count == 3  # one pass a step
    assert run.iterations == 3 and "sharpness" not in run.history


def test_the_custom_loop_descends_alike_once_bound(rng):
    model, layers, _ = _lora_mlp(rng, counted=False)
    start = _state(layers)
    batch_list = harness.batches(rng, 3)

    def forward(x, t):
        pred = model(x, training=True)
        return pred, keras.ops.mean((pred - t) ** 2)

    unbound = custom_loop.sam_step(_flat_lora(), model, forward, compiled=False)
    with pytest.raises(ValueError, match=r"call `optimizer.bind\(model\)`"):
        unbound(*batch_list[0])
    # Eager on TensorFlow: tracing the custom loop's tf.function takes about 10 s on this
    # CPU (for SAM alike); fit's graph and XLA steps are tested above.
    compiled = keras.backend.backend() != "tensorflow"
    step = custom_loop.sam_step(_flat_lora().bind(model), model, forward, compiled=compiled)
    for x, t in batch_list:
        step(x, t)
    _assert_trajectory(layers, start, batch_list)


def test_runs_with_one_seed_are_bitwise_alike_and_another_seed_differs(rng):
    def run(seed):
        model, layers, _ = _lora_mlp(np.random.default_rng(0))
        optimizer = keras_sam.FlatLoRA(keras.optimizers.SGD(LR), sigma=SIGMA, seed=seed)
        harness.train(optimizer, model, harness.batches(np.random.default_rng(1), 3), "eager")
        return [w for state in _state(layers) for w in state[1:4]]

    first = run(SEED)
    harness.assert_bitwise(run(SEED), first)
    assert not np.allclose(run(SEED + 1)[1], first[1])


def test_a_resumed_run_is_bitwise_the_uninterrupted_one():
    """The variables and the config are the whole state: a fresh model and optimizer (from
    the config) given the interrupted run's variables continue it bitwise, the noise
    included. (Through a checkpoint of the variables: a `.keras` file cannot resume LoRA
    training, as Keras saves a LoRA layer's merged kernel and zeroes its adapters.)"""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(24, 3)).astype("float32"), rng.normal(size=(24, 2)).astype("float32")

    def compiled(optimizer):
        model, _, _ = _lora_mlp(np.random.default_rng(0), counted=False)
        sam_model = keras_sam.SAMModel(model)
        sam_model.compile(optimizer=optimizer, loss="mse", run_eagerly=True)  # traced above
        return sam_model

    def fit(sam_model, epochs):
        sam_model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)

    straight = compiled(_flat_lora())
    fit(straight, 2)
    interrupted = compiled(_flat_lora())
    fit(interrupted, 1)
    config = interrupted.optimizer.get_config()
    resumed = compiled(keras_sam.FlatLoRA.from_config(config))
    resumed.optimizer.build(resumed.trainable_variables)
    for got, want in zip(
        resumed.variables + resumed.optimizer.variables,
        interrupted.variables + interrupted.optimizer.variables,
        strict=True,
    ):
        got.assign(want)
    fit(resumed, 1)
    harness.assert_bitwise(harness.full_state(resumed), harness.full_state(straight))


# ------------------------------------------------------------ config and checks
def test_config_round_trip_keeps_sigma_schedule_and_seed():
    sigma = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=5, decay_rate=0.5)
    for optimizer in (
        keras_sam.FlatLoRA(keras.optimizers.Adam(0.01), sigma=0.1, total_steps=50, seed=9),
        keras_sam.FlatLoRA("sgd", sigma=sigma, gradient_accumulation_steps=2),
    ):
        config = optimizer.get_config()
        assert keras_sam.FlatLoRA.from_config(config).get_config() == config
        assert "rho" not in config and "perturb" not in config
    assert config["seed"] == optimizer.seed and 0 <= optimizer.seed < 2**32  # drawn, kept


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sigma": -0.1}, r"`sigma` must be a finite number >= 0. Received: sigma=-0.1"),
        ({"sigma": "big"}, r"`sigma` must be a number or a"),
        ({"total_steps": 0}, r"`total_steps` must be None or an integer >= 1. Received: total_st"),
        ({"total_steps": 2.5}, r"`total_steps` must be None or an integer >= 1"),
        ({"seed": -1}, r"`seed` must be None or an integer in \[0, 2\*\*32\). Received: seed=-1"),
        ({"seed": 2**32}, r"`seed` must be None or an integer in \[0, 2\*\*32\)"),
        ({"seed": True}, r"`seed` must be None or an integer"),
        ({"rho": 0.05}, r"`FlatLoRA` does not take `rho`"),
        ({"adaptive": True}, r"`FlatLoRA` does not take `adaptive`"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_sam.FlatLoRA("sgd", **kwargs)


def test_a_model_without_lora_layers_is_refused(rng):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="`FlatLoRA` found no LoRA layer among the trained"):
        harness.train(_flat_lora(), model, harness.batches(rng, 1), harness.COMPILED)


def test_a_quantized_lora_layer_is_refused():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.layers[0].quantize("int8")
    model.layers[0].enable_lora(1)
    optimizer = keras_sam.FlatLoRA("sgd").bind(model)
    optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match="cannot perturb the quantized layer"):
        optimizer.pass_values(model.trainable_variables)
