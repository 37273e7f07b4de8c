"""One small adapter per Keras backend: the only modules that import TensorFlow, JAX or
PyTorch. Everything else in keras_sam is written with `keras.ops`."""

import importlib

import keras

from keras_sam.backends import autodiff  # noqa: F401 (`backends.autodiff.current()`)


def current():
    """The adapter module of the backend Keras runs on (`keras.backend.backend()`)."""
    return importlib.import_module(f"keras_sam.backends.{keras.backend.backend()}")
