"""A method's config: the forms its arguments take in `get_config` and `.keras` files.

For a method author: `serialize_rate` (a number or a schedule), and, for a method that
never perturbs (BAR, FlatLoRA), `refuse_perturbation_arguments` and
`without_perturbation_arguments`. `check_perturb` refuses, at construction, a `perturb`
that a saved model could not hold.
"""

from __future__ import annotations

import copy
import functools
import re
import types

import keras

from keras_sam.methods.hooks import GLOBAL_NORM, PER_REPLICA

# SAM's arguments that shape the perturbed pass, with the values that mean "not given": a
# method that never perturbs (BAR, FlatLoRA) refuses any other value and leaves them out
# of its config (`refuse_perturbation_arguments`, `without_perturbation_arguments`).
PERTURBATION_ARGUMENTS = {
    "rho": None,
    "adaptive": False,
    "eta": 0.01,
    "epsilon": 1e-12,
    "perturb": None,
    "perturbation_norm": GLOBAL_NORM,
    "distributed_perturbation": PER_REPLICA,
}


def serialize_rate(value):
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return keras.saving.serialize_keras_object(value)
    return value


def refuse_perturbation_arguments(kwargs, message):
    """Pops SAM's perturbation arguments (`PERTURBATION_ARGUMENTS`) from `kwargs`, for a
    method that never perturbs; raises `ValueError(message)` for any value but the one
    meaning "not given" (`message` may name `{name}` and `{value}`)."""
    for name, default in PERTURBATION_ARGUMENTS.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if value != default:
                raise ValueError(message.format(name=name, value=value))


def without_perturbation_arguments(config):
    """`config` without SAM's perturbation arguments (a method that never perturbs)."""
    return {key: value for key, value in config.items() if key not in PERTURBATION_ARGUMENTS}


def deserialize(cls, config, custom_objects=None):
    """A method of class `cls` from its `get_config` (`SAM.from_config`)."""
    config = copy.deepcopy(config)  # Keras's deserialization edits nested configs
    optimizer = keras.saving.deserialize_keras_object(
        config.pop("optimizer"), custom_objects=custom_objects
    )
    # `perturb` has its own forms; taken out first, so that it is deserialized once.
    perturb = deserialize_perturb(config.pop("perturb", None), custom_objects)
    for key, value in config.items():
        if isinstance(value, dict) and "class_name" in value:
            config[key] = keras.saving.deserialize_keras_object(
                value, custom_objects=custom_objects
            )
    return cls(optimizer, perturb=perturb, **config)


def serialize_perturb(perturb):
    """`perturb` as a config holds it: None, a regular expression, `{"layers": [...]}` (the
    layer classes' registered names), or a registered callable's Keras config."""
    if perturb is None or isinstance(perturb, str):
        return perturb
    if isinstance(perturb, tuple):
        return {"layers": [keras.saving.get_registered_name(c) for c in perturb]}
    return keras.saving.serialize_keras_object(perturb)


def deserialize_perturb(config, custom_objects):
    """The inverse of `serialize_perturb`; each form is deserialized exactly once."""
    if config is None or isinstance(config, str):
        return config
    if isinstance(config, dict) and set(config) == {"layers"}:
        classes = []
        for name in config["layers"]:
            cls = keras.saving.get_registered_object(name, custom_objects=custom_objects)
            cls = cls or getattr(keras.layers, name, None)
            if cls is None:
                raise ValueError(
                    f"`perturb` names the layer class {name!r}, which is neither a Keras "
                    "layer nor a registered custom object: pass it in `custom_objects`."
                )
            classes.append(cls)
        return tuple(classes)
    if isinstance(config, dict) and config.get("class_name") != "function":
        # A registered callable class: its `from_config`, or its constructor.
        name = config.get("registered_name") or config.get("class_name")
        cls = keras.saving.get_registered_object(name, custom_objects=custom_objects)
        if isinstance(cls, type) and not hasattr(cls, "from_config"):
            return cls(**config.get("config", {}))
    return keras.saving.deserialize_keras_object(config, custom_objects=custom_objects)


def check_perturb(perturb):
    """`perturb` in one of its documented forms, each of which a `.keras` file can hold.

    A form that could be used but not saved (a lambda, a `functools.partial`, an
    unregistered function, object or layer class) is refused here, at construction:
    refused later, by `get_config` inside `model.save`, it would leave the file being
    replaced truncated (Keras opens it before asking for the config).
    """
    if perturb is None:
        return perturb
    if isinstance(perturb, str):
        try:
            re.compile(perturb)
        except re.error as error:
            raise ValueError(
                f"`perturb` is not a valid regular expression ({error}). "
                f"Received: perturb={perturb!r}"
            ) from None
        return perturb
    if callable(perturb) and not isinstance(perturb, type):
        _check_saveable_callable(perturb)
        return perturb
    classes = tuple(perturb) if isinstance(perturb, (list, tuple)) else (perturb,)
    if classes and all(isinstance(c, type) and issubclass(c, keras.layers.Layer) for c in classes):
        for layer_class in classes:
            if getattr(keras.layers, layer_class.__name__, None) is not layer_class:
                what = f"the layer class `{layer_class.__name__}`"
                _check_registered(layer_class, what, perturb)
        return classes
    raise ValueError(
        "`perturb` must be None, a regular expression (matched against "
        "`variable.path`), a tuple of Keras layer classes, or a callable "
        f"`variable -> bool` registered with `@keras.saving.register_keras_serializable()`. "
        f"Received: perturb={perturb!r}"
    )


def _check_saveable_callable(perturb):
    if isinstance(perturb, types.FunctionType):
        if perturb.__name__ == "<lambda>":
            raise ValueError(
                "`perturb` is a lambda, which a saved model cannot hold (Keras refuses to "
                "load lambdas by default). Define a named function and register it with "
                "`@keras.saving.register_keras_serializable()`, or pass a regular "
                f"expression or a tuple of layer classes. Received: perturb={perturb!r}"
            )
        _check_registered(perturb, f"the function `{perturb.__qualname__}`", perturb)
        return
    if isinstance(perturb, functools.partial):
        raise ValueError(
            "`perturb` is a `functools.partial`, which a saved model cannot hold. Write a "
            "callable class with `__call__` and `get_config` (its arguments) and register "
            "it with `@keras.saving.register_keras_serializable()`. "
            f"Received: perturb={perturb!r}"
        )
    kind = type(perturb)
    if isinstance(perturb, (types.BuiltinFunctionType, types.MethodType)):
        raise ValueError(
            "`perturb` must be a registered function or an instance of a registered class "
            "(`@keras.saving.register_keras_serializable()`), so that a saved model can "
            f"hold it; a {kind.__name__} cannot be saved. Received: perturb={perturb!r}"
        )
    # Keras registers only classes with `get_config`, so a registered one can be saved.
    _check_registered(kind, f"the class `{kind.__qualname__}` of the callable object", perturb)


def _check_registered(obj, what, perturb):
    if keras.saving.get_registered_object(keras.saving.get_registered_name(obj)) is not obj:
        raise ValueError(
            f"`perturb` uses {what}, which is not registered with Keras, so a saved model "
            "could not be loaded. Decorate it with "
            "`@keras.saving.register_keras_serializable()` (or pass a regular expression). "
            f"Received: perturb={perturb!r}"
        )
