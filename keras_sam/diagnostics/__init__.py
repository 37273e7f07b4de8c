"""Diagnostics: how sharp is a model's minimum, and what does the loss look like around it.

- `sharpness`: the loss increase at the worst point within a radius (first-order,
  m-sharpness, multi-step ascent);
- `hessian_vector_product`, `hessian_eigenvalues`, `hessian_trace`: the curvature, exactly
  (double differentiation), by the Lanczos method, and by Hutchinson's estimator;
- `loss_landscape`: the loss along filter-normalized random directions, or between two
  models.

What is measured is given once, as an `Objective(model, x, y, loss=None,
batch_size=256)` (`loss` defaults to the model's compiled loss), and each diagnostic takes
it and only its own settings:

```python
objective = Objective(model, x, y)
sharpness(objective, rho=0.05)
hessian_eigenvalues(objective, k=5)
```

The model runs in inference mode, in batches, and its weights are left exactly (bitwise)
as they were: perturbed weights are only ever read through a `keras.StatelessScope`.
"""

from keras_sam.diagnostics.hessian import (
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
)
from keras_sam.diagnostics.landscape import loss_landscape, normalized_direction
from keras_sam.diagnostics.objective import Objective
from keras_sam.diagnostics.sharpness import sharpness

__all__ = [
    "Objective",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "loss_landscape",
    "normalized_direction",
    "sharpness",
]
