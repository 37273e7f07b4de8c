"""What a diagnostic measures: one model's loss over one data set, given once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from keras_sam import _validation
from keras_sam.diagnostics import _engine

if TYPE_CHECKING:
    import keras
    from numpy.typing import ArrayLike

    Loss = keras.losses.Loss | Callable[..., Any] | str


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    """The loss `L(w)` every diagnostic measures: `model`'s mean `loss` over all of `(x, y)`.

    ```
    L(w) = 1/n sum_i loss(y_i, f(x_i; w))     # at the model's weights w, in batches
    ```

    The shared part of every diagnostic's call, checked once here: each diagnostic then
    takes the objective and only its own settings, as
    `sharpness(objective, rho=0.05)`. The model runs in inference mode
    (`training=False`), on the data loss without the model's regularization losses, and
    its weights are never written.

    Args:
        model: a Keras model.
        x: inputs (array, tensor or a structure of them), or a `tf.data.Dataset` yielding
            `(x, y)` batches (read into memory once; then `y` is `None`).
        y: targets (integer labels or one-hot, or regression targets).
        loss: a Keras loss (name, function or `keras.losses.Loss`) averaging over
            examples; defaults to the model's compiled loss.
        batch_size: int, examples per forward pass. Defaults to 256.

    After construction, `x` and `y` hold the data as backend tensors and `loss_fn` the
    loss function.

    Example:

    ```python
    objective = keras_sam.diagnostics.Objective(model, x_train[:2000], y_train[:2000])
    keras_sam.diagnostics.sharpness(objective, rho=0.05)["sharpness"]
    keras_sam.diagnostics.hessian_eigenvalues(objective, k=5)
    ```
    """

    model: keras.Model
    x: Any = dataclasses.field(repr=False)
    y: ArrayLike | None = dataclasses.field(default=None, repr=False)
    loss: Loss | None = None
    batch_size: int = 256
    loss_fn: Callable[..., Any] = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        # Frozen: the checked values are set once, here, and never again.
        batch_size = _validation.check_positive_int("batch_size", self.batch_size)
        object.__setattr__(self, "batch_size", batch_size)
        object.__setattr__(self, "loss_fn", _engine.loss_function(self.model, self.loss))
        x, y = _engine.data_arrays(self.x, self.y)
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
