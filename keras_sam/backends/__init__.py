"""One small adapter per Keras backend: the only modules that import TensorFlow, JAX or
PyTorch. Everything else in keras_sam is written with `keras.ops`.

Each adapter module (`tensorflow.py`, `jax.py`, `torch.py`) defines a subclass of
`base.Backend` and its one instance, `BACKEND`; `current()` picks it by Keras's backend.
The diagnostics' autodiff primitives are apart, in `autodiff/`.
"""

import sys

import keras

from keras_sam.backends import autodiff  # noqa: F401 (`backends.autodiff.current()`)
from keras_sam.backends.base import Backend

# The backends with an adapter module of their own.
_ADAPTERS = ("tensorflow", "jax", "torch")
# What any other Keras backend gets: the defaults, whose entry points say it is not supported.
_UNSUPPORTED = Backend()


def current():
    """The `Backend` of the backend Keras runs on (`keras.backend.backend()`): one
    instance per backend, made when its adapter module is first imported."""
    name = keras.backend.backend()
    if name not in _ADAPTERS:
        return _UNSUPPORTED
    # `__import__` and `sys.modules`, not `importlib.import_module`: this runs inside the
    # user's `tf.function` (the custom loop), where AutoGraph converts the Python functions
    # it calls and warns that it cannot convert importlib's frozen `_gcd_import`; it
    # leaves builtins alone.
    module = f"keras_sam.backends.{name}"
    if module not in sys.modules:
        __import__(module)
    return sys.modules[module].BACKEND
