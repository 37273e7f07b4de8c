"""One small adapter per Keras backend: the only modules that import TensorFlow, JAX or
PyTorch. Everything else in keras_sam is written with `keras.ops`."""

BACKENDS = ("tensorflow", "jax", "torch")


def current():
    """The adapter module of the backend Keras runs on (`keras.backend.backend()`)."""
    import importlib

    import keras

    name = keras.backend.backend()
    if name not in BACKENDS:
        raise ValueError(
            f"keras_sam runs on the Keras backends {', '.join(BACKENDS)}. "
            f"Received: KERAS_BACKEND={name!r}"
        )
    return importlib.import_module(f"keras_sam.backends.{name}")
