"""Diagnostics: how sharp is a model's minimum, and what does the loss look like around it.

- `sharpness`: the loss increase at the worst point within a radius (first-order,
  m-sharpness, multi-step ascent);
- `hessian_vector_product`, `hessian_eigenvalues`, `hessian_trace`: the curvature, exactly
  (double differentiation), by the Lanczos method, and by Hutchinson's estimator;
- `loss_landscape`: the loss along filter-normalized random directions, or between two
  models.

Each is called as `(model, x, y, *, loss=None, batch_size=..., ...)`, with `loss`
defaulting to the model's compiled loss; the model runs in inference mode, in batches,
and its weights are left exactly (bitwise) as they were: perturbed weights are only ever
read through a `keras.StatelessScope`.
"""

from keras_sam.diagnostics.hessian import (
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
)
from keras_sam.diagnostics.landscape import loss_landscape, normalized_direction
from keras_sam.diagnostics.sharpness import sharpness

__all__ = [
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "loss_landscape",
    "normalized_direction",
    "sharpness",
]
