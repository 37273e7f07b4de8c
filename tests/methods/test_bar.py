"""BAR (balancedness-aware regularization) on LoRA adapters: the gradients the wrapped
optimizer receives against the float64 reference of the paper's Algorithms 2 and 3
(tests/reference.py), through `SAMModel.fit` on every backend; the pairing of Keras's
LoRA factors; its checks and its config."""

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam.methods import bar
from tests import harness, reference

RANK = 2
STEPS = 4
LR = 0.1


def _params(rng, scale_a, scale_b):
    """[A, B, b1, W2, b2] and the frozen kernel K, of a 3 -> 4 -> 2 LoRA MLP."""
    kernel = rng.normal(size=(3, 4)) * 0.5
    params = [
        rng.normal(size=(3, RANK)) * scale_a,
        rng.normal(size=(RANK, 4)) * scale_b,
        rng.normal(size=(4,)) * 0.1,
        rng.normal(size=(4, 2)) * 0.7,
        rng.normal(size=(2,)) * 0.1,
    ]
    return params, kernel


def _lora_mlp(params, kernel):
    """The reference's model in Keras: Dense(4, tanh) `adapted` with LoRA (scale
    `lora_alpha / rank` = 1), Dense(2) `head`."""
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh", name="adapted"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    adapted, head = model.layers
    adapted.kernel.assign(kernel)
    adapted.enable_lora(RANK, lora_alpha=RANK)
    a, b, b1, w2, b2 = params
    adapted.lora_kernel_a.assign(a)
    adapted.lora_kernel_b.assign(b)
    adapted.bias.assign(b1)
    head.kernel.assign(w2)
    head.bias.assign(b2)
    return model


def _trained(model):
    """The reference's parameters, read from the trained model."""
    adapted, head = model.layers
    variables = [adapted.lora_kernel_a, adapted.lora_kernel_b, adapted.bias, head.kernel]
    return [harness.to_numpy(v) for v in [*variables, head.bias]]


def _decay(step):
    """The schedule `alpha` below, `PolynomialDecay(1.0, 3, 0.2)`, at `step`."""
    return 0.2 + (1.0 - 0.2) * (1 - min(step, 3) / 3)


# (variant, |A| and |B| scales at the start, alpha): the factors imbalanced either way, so
# that both signs of the balancing term occur.
CASES = {
    "nbar-a-large": ("nbar", 1.5, 0.1, 0.5),
    "nbar-b-large": ("nbar", 0.1, 1.5, 0.5),
    "obar-a-large": ("obar", 1.5, 0.1, 0.5),
    "obar-b-large": ("obar", 0.1, 1.5, 0.5),
    "nbar-schedule": ("nbar", 0.1, 1.5, "decay"),
}


@pytest.mark.parametrize("case, mode", harness.modes_for(list(CASES), ["nbar-schedule"]))
def test_bar_matches_the_float64_reference(rng, case, mode):
    variant, scale_a, scale_b, alpha = CASES[case]
    params, kernel = _params(rng, scale_a, scale_b)
    batch_list = harness.batches(rng, STEPS, d_in=3, d_out=2)
    if alpha == "decay":
        keras_alpha = keras.optimizers.schedules.PolynomialDecay(1.0, 3, 0.2)
        alpha = _decay
    else:
        keras_alpha = alpha
    model = _lora_mlp(params, kernel)
    optimizer = keras_sam.BAR(keras.optimizers.SGD(LR), alpha=keras_alpha, variant=variant)
    run = harness.train(optimizer, model, batch_list, mode)

    def step(p, x, t, state, i):
        return reference.bar_step(p, x, t, state, i, kernel, alpha, variant)

    want, state, passes = reference.trajectory(step, params, batch_list, reference.sgd(LR))
    harness.assert_weights_close(_trained(model), want)
    assert passes == 0 and run.iterations == STEPS and run.skipped_steps == 0
    # The term matters: without it (plain SGD) the trajectory is far from this one.
    plain, _, _ = reference.trajectory(
        lambda p, x, t, s, i: (reference.lora_head_loss_and_grads(p, kernel, x, t)[1], s, False),
        params,
        batch_list,
        reference.sgd(LR),
    )
    assert max(np.max(np.abs(w - p)) for w, p in zip(want[:2], plain[:2])) > 1e-2
    # Which factor grows: the reference's signs, as the imbalance says they should be.
    expected = {"nbar": -1.0 if scale_a > scale_b else 1.0, "obar": -1.0 if scale_a > 1 else 1.0}
    assert state["signs"][0] == expected[variant], state["signs"]


def test_the_inner_optimizer_receives_the_balanced_gradients_once_per_step(rng):
    # SGD(1.0): the weights move by minus the gradient the wrapped optimizer received;
    # one step, so that A and B's changes are exactly the gradients of the reference.
    params, kernel = _params(rng, 1.0, 0.3)
    (x, t) = harness.batches(rng, 1, d_in=3, d_out=2)[0]
    model = _lora_mlp(params, kernel)
    optimizer = keras_sam.BAR(keras.optimizers.SGD(1.0), alpha=0.3)
    assert optimizer.needs_second_pass(None, None) is False
    harness.train(optimizer, model, [(x, t)], harness.COMPILED)
    _, grads = reference.lora_head_loss_and_grads(params, kernel, x, t)
    g_a, g_b, _ = reference.bar_gradients(grads[:2], params[0], params[1], 0.3, "nbar")
    received = [p - w for p, w in zip(params, _trained(model))]
    harness.assert_weights_close(received, [g_a, g_b, *grads[2:]])


def test_the_lora_factors_of_dense_einsum_and_embedding_layers_are_paired():
    inputs = keras.Input((3,), dtype="int32")
    embedded = keras.layers.Embedding(10, 4, name="tokens")(inputs)
    mixed = keras.layers.EinsumDense("abc,cd->abd", (3, 5), name="mix")(embedded)
    outputs = keras.layers.Dense(2, name="out")(mixed)
    model = keras.Model(inputs, outputs)
    for name in ("tokens", "mix"):
        model.get_layer(name).enable_lora(2)
    variables = model.trainable_variables
    pairs = {(variables[i].path, variables[j].path) for i, j in bar.lora_pairs(variables)}
    assert pairs == {
        ("tokens/lora_embeddings_a", "tokens/lora_embeddings_b"),
        ("mix/lora_kernel_a", "mix/lora_kernel_b"),
    }


def test_a_model_without_lora_adapters_is_refused(rng):
    model = harness.mlp(reference.mlp_init(rng))
    optimizer = keras_sam.BAR(keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match=r"`BAR` regularizes LoRA adapters, and none of the 4"):
        harness.train(optimizer, model, harness.batches(rng, 1), harness.COMPILED)


@pytest.mark.parametrize(
    "build, pattern",
    [
        (lambda: keras_sam.BAR("sgd", alpha=-0.1), r"`alpha` must be a finite number >= 0"),
        (lambda: keras_sam.BAR("sgd", alpha="big"), r"`alpha` must be a number or a"),
        (lambda: keras_sam.BAR("sgd", variant="sam"), r"`variant` must be one of 'nbar', 'obar'"),
        (lambda: keras_sam.BAR("sgd", rho=0.05), r"`BAR` takes no perturbed pass, so it has no"),
        (lambda: keras_sam.BAR("sgd", learning_rate=0.1), r"it belongs on the wrapped optimizer"),
        (lambda: keras_sam.BAR(3), r"`optimizer` must be a `keras.optimizers.Optimizer`"),
    ],
)
def test_invalid_arguments_name_the_argument_and_the_value(build, pattern):
    with pytest.raises(ValueError, match=pattern):
        build()


@pytest.mark.parametrize(
    "alpha", [0.05, keras.optimizers.schedules.CosineDecay(0.2, decay_steps=100)]
)
def test_config_round_trip_keeps_every_argument(alpha):
    optimizer = keras_sam.BAR(
        keras.optimizers.Adam(1e-3), alpha=alpha, variant="obar", gradient_accumulation_steps=2
    )
    config = optimizer.get_config()
    assert config["variant"] == "obar" and "rho" not in config
    restored = keras_sam.BAR.from_config(config)
    assert restored.get_config() == config
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(optimizer))
    assert type(again) is keras_sam.BAR and again.get_config() == config


def test_a_lora_model_trained_with_bar_saves_and_loads(rng, tmp_path):
    params, kernel = _params(rng, 1.0, 0.3)
    model = _lora_mlp(params, kernel)
    schedule = keras.optimizers.schedules.CosineDecay(0.5, decay_steps=10)
    optimizer = keras_sam.BAR(keras.optimizers.Adam(0.01), alpha=schedule, variant="obar")
    run = harness.train(optimizer, model, harness.batches(rng, 2), harness.COMPILED)
    path = tmp_path / "bar.keras"
    run.sam_model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.optimizer) is keras_sam.BAR
    assert loaded.optimizer.get_config() == optimizer.get_config()
    assert int(harness.to_numpy(loaded.optimizer.iterations)) == 2
    # Keras writes an adapted kernel merged (`kernel + a @ b`): the same function.
    x = rng.normal(size=(5, 3)).astype("float32")
    np.testing.assert_allclose(
        harness.to_numpy(loaded.predict(x, verbose=0)),
        harness.to_numpy(run.sam_model.predict(x, verbose=0)),
        rtol=1e-5,
        atol=1e-6,
    )
