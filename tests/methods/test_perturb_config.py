"""Every documented `perturb` form survives `get_config` and a `.keras` file; a form that
could not is refused when the optimizer is built. `rho` and `epsilon` fit float32."""

import functools
import json

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam import maths
from keras_sam.methods.sam import FLOAT32_MAX, FLOAT32_SMALLEST_NORMAL


@keras.saving.register_keras_serializable(package="keras_sam_tests")
def in_the_head(variable):
    return "head" in variable.path


@keras.saving.register_keras_serializable(package="keras_sam_tests")
class PathContains:
    """A registered callable class with `get_config` and no `from_config`."""

    def __init__(self, word):
        self.word = word

    def __call__(self, variable):
        return self.word in variable.path

    def get_config(self):
        return {"word": self.word}


@keras.saving.register_keras_serializable(package="keras_sam_tests")
class Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.gain = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="gain")

    def call(self, x):
        return x * self.gain


class Unregistered:
    def __call__(self, variable):
        return True

    def get_config(self):
        return {}


def _unregistered_function(variable):
    return True


def _model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, name="body")(inputs)
    hidden = Scale(name="scale")(hidden)
    outputs = keras.layers.Dense(2, name="head")(hidden)
    return keras.Model(inputs, outputs)


FORMS = {
    "none": None,
    "regex": r"head|scale",
    "builtin_layer_classes": (keras.layers.Dense,),
    "custom_layer_class": (Scale, keras.layers.LayerNormalization),
    "registered_function": in_the_head,
    "registered_callable_class": PathContains("body"),
}


def _mask(optimizer, model):
    return optimizer.bind(model)._perturbed_mask(model.trainable_variables)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cls", [keras_sam.SAM, keras_sam.LookSAM])
def test_get_config_round_trip_selects_the_same_variables(form, cls):
    model = _model()
    optimizer = cls(keras.optimizers.SGD(0.1), rho=0.1, perturb=FORMS[form])
    config = json.loads(json.dumps(optimizer.get_config()))  # JSON-ready
    revived = cls.from_config(config)
    assert json.dumps(revived.get_config(), sort_keys=True) == json.dumps(config, sort_keys=True)
    assert _mask(revived, model) == _mask(optimizer, model)
    if form == "registered_function":
        assert revived.perturb is in_the_head  # deserialized once, to the function itself
    if form == "registered_callable_class":
        assert isinstance(revived.perturb, PathContains) and revived.perturb.word == "body"


@pytest.mark.parametrize("form", FORMS)
def test_a_keras_file_round_trip_keeps_the_form(tmp_path, form):
    model = _model()
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1), perturb=FORMS[form]), loss="mse"
    )
    sam_model.save(tmp_path / "run.keras")
    loaded = keras.saving.load_model(tmp_path / "run.keras")
    optimizer = loaded.optimizer
    assert isinstance(optimizer, keras_sam.SAM)
    assert optimizer.get_config() == sam_model.optimizer.get_config()
    assert _mask(optimizer, loaded.model) == _mask(sam_model.optimizer, model)


@pytest.mark.parametrize(
    "perturb, message",
    [
        (lambda v: True, r"`perturb` is a lambda"),
        (functools.partial(in_the_head), r"`perturb` is a `functools.partial`"),
        (_unregistered_function, r"the function `_unregistered_function`, which is not regis"),
        (Unregistered(), r"the class `Unregistered` of the callable object, which is not"),
        (print, r"a builtin_function_or_method cannot be saved"),
        (PathContains("x").__call__, r"a method cannot be saved"),
    ],
)
@pytest.mark.parametrize("cls", [keras_sam.SAM, keras_sam.GSAM])
def test_a_form_that_cannot_be_saved_is_refused_at_construction(perturb, message, cls):
    with pytest.raises(ValueError, match=message) as info:
        cls(keras.optimizers.SGD(0.1), perturb=perturb)
    assert "register_keras_serializable" in str(info.value) or "partial" in message


def test_an_unregistered_layer_class_is_refused_at_construction():
    class Local(keras.layers.Layer):
        pass

    with pytest.raises(ValueError, match=r"the layer class `Local`, which is not registered"):
        keras_sam.SAM("sgd", perturb=(keras.layers.Dense, Local))


# ------------------------------------------------------ float32-representable numbers
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rho": 1e39}, r"`rho` must be finite in float32, in which the step uses it: at most "),
        ({"epsilon": 1e-45}, r"`epsilon` must be at least the smallest normal float32, 1.17549"),
        ({"epsilon": 1e-38}, r"`epsilon` must be at least the smallest normal float32"),
        ({"epsilon": 1e39}, r"`epsilon` must be finite in float32"),
    ],
)
def test_rho_and_epsilon_must_be_representable_in_float32(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        keras_sam.SAM("sgd", **kwargs)
    name, value = next(iter(kwargs.items()))
    assert str(info.value).endswith(f"Received: {name}={value!r}")


def test_the_float32_limits_themselves_are_accepted():
    sam = keras_sam.SAM("sgd", rho=FLOAT32_MAX, epsilon=FLOAT32_SMALLEST_NORMAL)
    assert (sam.rho, sam.epsilon) == (FLOAT32_MAX, FLOAT32_SMALLEST_NORMAL)
    assert np.float32(FLOAT32_MAX) == FLOAT32_MAX and np.isfinite(np.float32(FLOAT32_MAX))


def test_proportional_rho_bounds_must_be_finite_in_float32():
    lr = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=10)
    with pytest.raises(ValueError, match=r"`rho_max` must be finite in float32"):
        keras_sam.ProportionalRho(lr, rho_max=1e39)


def test_the_smallest_epsilon_keeps_a_zero_gradient_finite():
    # The promise the bound protects: a zero gradient gives e = 0, never 0/0.
    zeros = [keras.ops.zeros((3, 2)), keras.ops.zeros((2,))]
    e = maths.sam_perturbation(zeros, 0.05, FLOAT32_SMALLEST_NORMAL)
    for part in e:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(part), 0.0)
