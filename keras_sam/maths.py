"""The mathematics of SAM: pure functions on lists of tensors.

Everything here is written with `keras.ops`, holds no state, and knows nothing about
models, optimizers or backends. Gradient lists may contain `None` (a variable the loss
does not depend on): such entries are skipped by the norm and give `None` back.

Sparse gradients (`tf.IndexedSlices`) are a backend type: the trainer hands them here
densified, so duplicate indices are already summed and the norm is the true one.
"""

from keras import ops


def global_norm(tensors):
    """Euclidean norm of a list of tensors taken as one vector, in float32.

    `None` entries and empty tensors are skipped. The sum of squares is taken after
    dividing by the largest magnitude, so gradients of size 1e-30 or 1e+30 neither
    underflow to 0 nor overflow to inf (a plain `sqrt(sum(g**2))` does both in float32).

    Args:
        tensors: list of tensors (any float dtype) or `None`.

    Returns:
        A float32 scalar; 0 when there is no entry or every entry is zero.
    """
    present = [ops.cast(t, "float32") for t in tensors if t is not None and _size(t) != 0]
    if not present:
        return ops.zeros((), "float32")
    largest = ops.max(ops.stack([ops.max(ops.abs(t)) for t in present]))
    # Divide by 1 when everything is zero: the norm is then exactly 0, never NaN.
    divisor = ops.where(largest > 0, largest, ops.ones_like(largest))
    sum_of_squares = ops.sum(ops.stack([ops.sum(ops.square(t / divisor)) for t in present]))
    return divisor * ops.sqrt(sum_of_squares)


def sam_perturbation(gradients, rho, epsilon=1e-12, scales=None):
    """The weight perturbation `e(w)` of SAM, or of ASAM when `scales` are given.

    ```
    SAM:   e = rho * g / (||g|| + epsilon)
    ASAM:  e = rho * T**2 * g / (||T * g|| + epsilon),   T = scales (elementwise)
    ```

    The norm is global (over all gradients) and computed in float32, so a zero gradient
    gives `e = 0`, never NaN. The perturbation has the dtype of its gradient.

    Args:
        gradients: list of tensors or `None`.
        rho: float or scalar tensor, the radius of the neighbourhood (>= 0).
        epsilon: float, added to the norm. Defaults to `1e-12`.
        scales: optional list, one entry per gradient: a tensor `T` of the gradient's
            shape, or `None` for `T = 1`. Defaults to `None` (plain SAM).

    Returns:
        A list like `gradients`: one tensor per gradient, `None` where it was `None`.
    """
    if scales is None:
        scales = [None] * len(gradients)
    if len(scales) != len(gradients):
        raise ValueError(
            "`scales` must have one entry per gradient. "
            f"Received: len(scales)={len(scales)}, len(gradients)={len(gradients)}"
        )
    scaled = [_times(s, g) for g, s in zip(gradients, scales)]
    factor = ops.cast(rho, "float32") / (global_norm(scaled) + epsilon)
    perturbation = []
    for g, s, sg in zip(gradients, scales, scaled):
        if g is None:
            perturbation.append(None)
            continue
        e = factor * _times(s, ops.cast(sg, "float32"))
        perturbation.append(ops.cast(e, g.dtype))
    return perturbation


def adaptive_scale(variable_value, eta):
    """ASAM's normalization operator for one weight tensor: `T_w = |w| + eta`."""
    return ops.abs(variable_value) + ops.cast(eta, variable_value.dtype)


def _times(scale, tensor):
    if tensor is None or scale is None:
        return tensor
    return ops.cast(scale, tensor.dtype) * tensor


def _size(tensor):
    size = 1
    for dim in tensor.shape:
        if dim is None:
            return None
        size *= dim
    return size
