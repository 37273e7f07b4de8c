"""One small adapter per Keras backend: the only modules that import TensorFlow, JAX or
PyTorch. Everything else in keras_sam is written with `keras.ops`."""
