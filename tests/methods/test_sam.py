import json

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam.methods.hooks import _is_adaptive
from tests import custom_loop, harness

INNER_OPTIMIZERS = harness.INNER_OPTIMIZERS


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(2)]
    )


def _train(model, optimizer, steps, sam):
    """`steps` compiled steps on a fixed batch: SAM's custom-loop step (`optimize`, or
    `stateless_optimize` on JAX), or a plain `apply` of the loss's gradients."""
    x = np.random.default_rng(1).normal(size=(8, 4))
    y = np.random.default_rng(2).normal(size=(8, 2))

    def forward(x, y):
        pred = model(x, training=True)
        return pred, keras.ops.mean((pred - y) ** 2)

    step = (custom_loop.sam_step if sam else custom_loop.plain_step)(optimizer, model, forward)
    for _ in range(steps):
        step(x, y)


# --------------------------------------------------------------------------- rho = 0
@pytest.mark.parametrize("name", sorted(INNER_OPTIMIZERS))
def test_rho_zero_is_the_inner_optimizer_bitwise(name):
    plain_model, sam_model = _model(), _model()
    plain = INNER_OPTIMIZERS[name]()
    sam = keras_sam.SAM(INNER_OPTIMIZERS[name](), rho=0)
    _train(plain_model, plain, steps=5, sam=False)
    _train(sam_model, sam, steps=5, sam=True)
    for a, b in zip(plain_model.weights, sam_model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(plain.variables, sam.inner_optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(sam.iterations) == int(plain.iterations) == 5


@pytest.mark.parametrize("name", sorted(INNER_OPTIMIZERS))
def test_every_inner_optimizer_trains_under_sam(name):
    model = _model()
    before = [w.numpy().copy() for w in model.weights]
    sam = keras_sam.SAM(INNER_OPTIMIZERS[name](), rho=0.05)
    _train(model, sam, steps=3, sam=True)
    assert int(sam.iterations) == 3
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)
    assert any(np.any(a != w.numpy()) for a, w in zip(before, model.weights, strict=True))


# ------------------------------------------------------------------- delegation
def test_learning_rate_and_iterations_are_the_inner_optimizers():
    inner = keras.optimizers.SGD(0.1)
    sam = keras_sam.SAM(inner)
    assert float(sam.learning_rate) == pytest.approx(0.1)
    sam.learning_rate = 0.02
    assert float(inner.learning_rate) == pytest.approx(0.02)
    _train(_model(), sam, steps=2, sam=True)
    assert sam.iterations is inner.iterations
    assert int(sam.iterations) == 2


def test_learning_rate_schedule_is_followed():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    sam = keras_sam.SAM(keras.optimizers.SGD(schedule))
    _train(_model(), sam, steps=3, sam=True)
    assert float(sam.inner_optimizer._get_current_learning_rate()) == pytest.approx(0.1 / 8)


def test_variables_are_own_plus_inner():
    sam = keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9))
    _train(_model(), sam, steps=1, sam=True)
    inner_ids = {id(v) for v in sam.inner_optimizer.variables}
    assert inner_ids <= {id(v) for v in sam.variables}
    # SAM keeps no per-weight state of its own: the base class's two scalars and the
    # count of skipped (non-finite) steps.
    assert len(sam.variables) - len(sam.inner_optimizer.variables) == 3


# ----------------------------------------------------------- misuse is refused
def test_apply_gradients_names_sam_model():
    sam = keras_sam.SAM(keras.optimizers.SGD(0.1))
    v = keras.Variable(np.ones(3, "float32"))
    with pytest.raises(ValueError, match="SAMModel"):
        sam.apply_gradients([(keras.ops.ones(3), v)])


def test_plain_keras_model_with_sam_fails_at_first_step_naming_sam_model():
    model = _model()
    model.compile(optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1)), loss="mse")
    with pytest.raises(ValueError, match="SAMModel"):
        model.fit(np.zeros((4, 4)), np.zeros((4, 2)), verbose=0)


# ------------------------------------------------------------------- validation
_RHO_RULE = r"`rho` must be a number or a `keras.optimizers.schedules.LearningRateSchedule` .*"


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"rho": -1}, r"`rho` must be a finite number >= 0. Received: rho=-1"),
        ({"rho": float("nan")}, r"`rho` .* Received: rho=nan"),
        ({"rho": "0.05"}, _RHO_RULE + r"Received: rho='0.05'"),
        ({"rho": True}, _RHO_RULE + r"Received: rho=True"),
        ({"eta": -0.1}, r"`eta` must be a finite number >= 0. Received: eta=-0.1"),
        ({"epsilon": 0}, r"`epsilon` must be a finite number > 0. Received: epsilon=0"),
        ({"epsilon": -1e-12}, r"`epsilon` .* Received: epsilon=-1e-12"),
        ({"adaptive": 1}, r"`adaptive` must be True or False. Received: adaptive=1"),
        (
            {"verify_optimizer_step": "yes"},
            r"`verify_optimizer_step` must be True or False. Received: verify_optimizer_step=.yes.",
        ),
        ({"clipnorm": 1.0}, r"does not take `clipnorm`: it belongs on the wrapped optimizer"),
        ({"learning_rate": 0.1}, r"does not take `learning_rate`"),
        ({"weight_decay": 0.1}, r"does not take `weight_decay`"),
        ({"rh0": 0.1}, r"unexpected arguments: `rh0`"),
        (
            {"perturbation_norm": "per_layer"},
            r"`perturbation_norm` must be one of 'global', 'layerwise'. "
            r"Received: perturbation_norm='per_layer'",
        ),
    ],
)
def test_invalid_arguments_name_the_argument_and_the_value(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        keras_sam.SAM(keras.optimizers.SGD(0.1), **kwargs)


@pytest.mark.parametrize("bad", [None, keras.optimizers.SGD, 0.1, "not-an-optimizer"])
def test_optimizer_must_be_an_optimizer_instance(bad):
    with pytest.raises(ValueError):
        keras_sam.SAM(bad)


def test_sam_cannot_wrap_sam():
    with pytest.raises(ValueError, match="cannot wrap another SAM"):
        keras_sam.SAM(keras_sam.SAM(keras.optimizers.SGD(0.1)))


def test_ints_are_accepted_for_floats_and_string_optimizers_resolve():
    sam = keras_sam.SAM("adam", rho=1, eta=0, epsilon=1)
    assert isinstance(sam.inner_optimizer, keras.optimizers.Adam)
    assert (sam.rho, sam.eta, sam.epsilon) == (1.0, 0.0, 1.0)


# ------------------------------------------------------------ serialization
def test_config_round_trip_keeps_every_argument():
    inner = keras.optimizers.SGD(0.03, momentum=0.8, clipnorm=2.0)
    sam = keras_sam.SAM(
        inner,
        rho=0.2,
        adaptive=True,
        eta=0.03,
        epsilon=1e-9,
        perturbation_norm="layerwise",
        distributed_perturbation="synchronized",
        gradient_accumulation_steps=3,
        verify_optimizer_step=True,
        name="my_sam",
    )
    config = sam.get_config()
    assert set(config) == {
        "name",
        "optimizer",
        "rho",
        "adaptive",
        "eta",
        "epsilon",
        "perturb",
        "perturbation_norm",
        "distributed_perturbation",
        "gradient_accumulation_steps",
        "verify_optimizer_step",
    }
    assert config["verify_optimizer_step"] is True
    revived = keras_sam.SAM.from_config(json.loads(json.dumps(config)))
    assert json.dumps(revived.get_config(), sort_keys=True) == json.dumps(config, sort_keys=True)
    assert revived.inner_optimizer.get_config() == inner.get_config()

    serialized = keras.saving.serialize_keras_object(sam)
    assert serialized["registered_name"] == "keras_sam>SAM"
    again = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert isinstance(again, keras_sam.SAM)
    assert again.get_config() == config
    assert set(dir(again)) == set(dir(sam))


def test_config_with_default_base_arguments_is_accepted():
    # A config written with the base class's defaults (as Keras does) still loads.
    sam = keras_sam.SAM(keras.optimizers.SGD(0.1), clipnorm=None, use_ema=False)
    assert sam.rho == 0.05


# --------------------------------------------------------------- checkpoints
@pytest.mark.backends("tensorflow")  # `tf.train.Checkpoint` is TensorFlow's own format
def test_tf_checkpoint_restores_the_inner_state_exactly(tmp_path):
    import tensorflow as tf

    model = _model()
    sam = keras_sam.SAM(keras.optimizers.Adam(0.01))
    _train(model, sam, steps=2, sam=True)
    path = tf.train.Checkpoint(model=model, optimizer=sam).save(str(tmp_path / "ckpt"))
    saved = [np.asarray(v).copy() for v in sam.variables]

    model2 = _model(seed=5)
    sam2 = keras_sam.SAM(keras.optimizers.Adam(0.01))
    sam2.build(model2.trainable_variables)
    tf.train.Checkpoint(model=model2, optimizer=sam2).restore(path).assert_consumed()
    for a, b in zip(saved, sam2.variables, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    _train(model, sam, steps=2, sam=True)
    _train(model2, sam2, steps=2, sam=True)
    for a, b in zip(model.weights, model2.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_checkpoint_holds_no_copy_of_the_weights(tmp_path):
    model = _model()
    plain = keras.optimizers.SGD(0.1, momentum=0.9)
    sam = keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9))
    _train(model, sam, steps=1, sam=True)
    _train(_model(), plain, steps=1, sam=False)
    n_weights = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    sam_size = sum(int(np.prod(v.shape)) for v in sam.variables)
    plain_size = sum(int(np.prod(v.shape)) for v in plain.variables)
    assert plain_size == n_weights + 2  # momentum slots + iterations + learning rate
    # SAM's own two base-class scalars and its skipped-step count, nothing per weight.
    assert sam_size == plain_size + 3


# ------------------------------------------------------------------- ASAM scope
@pytest.mark.parametrize(
    "layer, expected",
    [
        (keras.layers.Dense(3), {"kernel": True, "bias": False}),
        (keras.layers.BatchNormalization(), {"gamma": True, "beta": False}),
        (keras.layers.LayerNormalization(), {"gamma": True, "beta": False}),
        (keras.layers.Embedding(5, 3), {"embeddings": True}),
        (keras.layers.Conv2D(2, 3), {"kernel": True, "bias": False}),
    ],
)
def test_asam_scales_weights_but_not_biases(layer, expected):
    shape = (None, 4, 4, 2) if isinstance(layer, keras.layers.Conv2D) else (None, 4)
    layer.build(shape)
    got = {v.name: _is_adaptive(v) for v in layer.trainable_variables}
    assert got == expected
