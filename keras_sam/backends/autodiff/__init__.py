"""The autodiff primitives the diagnostics (and the playground) are written with.

One module per backend, each with the same three functions:

- `compile_function(function)`: `function` compiled the backend's way (`tf.function`,
  `jax.jit`; PyTorch runs it eagerly);
- `value_and_gradient(function, values)`: a scalar function of a list of tensors and its
  gradient (zeros where unconnected);
- `hessian_vector_product(function, values, vector)`: the Hessian at `values` times
  `vector`, by double differentiation.

The SAM step does not use them: it takes its gradients through `Backend.gradients`.
"""

import importlib

import keras


def current():
    """The autodiff module of the backend Keras runs on (`keras.backend.backend()`)."""
    return importlib.import_module(f"keras_sam.backends.autodiff.{keras.backend.backend()}")
