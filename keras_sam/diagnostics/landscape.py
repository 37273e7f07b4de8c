"""The loss landscape: the loss along random directions, or between two models."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from keras_sam import _validation
from keras_sam.diagnostics import _engine

if TYPE_CHECKING:
    import keras
    from numpy.typing import ArrayLike

    Loss = keras.losses.Loss | Callable[..., Any] | str


NORMALIZATIONS = ("filter", "layer")


def loss_landscape(
    model: keras.Model,
    x: Any,
    y: ArrayLike | None = None,
    *,
    loss: Loss | None = None,
    batch_size: int = 256,
    dimensions: int = 1,
    coordinates: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    to_model: keras.Model | None = None,
    seed: int = 0,
    normalization: str = "filter",
    include_biases: bool = False,
    verbose: int = 1,
) -> dict[str, Any]:
    """The loss (and accuracy) on a line or a plane of weights through the model's.

    Random directions (Li et al., 2018), one or two, each drawn from a seeded Gaussian and
    then filter-normalized: every filter of the direction (a convolution's output channel,
    a dense layer's output unit: a slice along the kernel's last axis) is rescaled to the
    norm of the same filter of the weights, so that the picture does not depend on the
    weights' scale (which ReLU networks and BatchNorm leave free):

    ```
    d[..., j] <- d[..., j] / ||d[..., j]|| * ||w[..., j]||     # every filter j
    d_b = 0 for biases and normalization parameters (1-D variables), as in the paper
    loss[i]    = L(w + a_i d_1)                                 # dimensions=1
    loss[i, j] = L(w + a_i d_1 + b_j d_2)                       # dimensions=2
    ```

    Between two models (`to_model=`), the line `w(t) = (1 - t) w_a + t w_b` through both
    (Goodfellow et al., 2015): `t = 0` is `model`, `t = 1` is `to_model`. Non-trainable
    float weights (BatchNorm moving statistics) are interpolated too.

    The same `seed` draws the same raw directions for any model of the same
    architecture, so two models' landscapes can be compared on the same axes. Each point
    is one forward pass over all of `(x, y)` in inference mode (`training=False`), inside
    compiled passes; the weights are never written.

    Args:
        model: a Keras model.
        x: inputs, or a `tf.data.Dataset` of `(x, y)` batches (then `y` is `None`).
        y: targets.
        loss: a Keras loss averaging over examples; defaults to the model's compiled loss.
        batch_size: int, examples per forward pass. Defaults to 256.
        dimensions: 1 or 2, random directions. Defaults to 1. Must be 1 with `to_model`.
        coordinates: the steps along each direction: a 1-D array, or for 2 dimensions a
            pair of arrays `(a, b)`. Defaults to 21 points in [-1, 1], or in [-0.5, 1.5]
            with `to_model`.
        to_model: a second model with the same variables, for the line between the two.
            Defaults to `None` (random directions).
        seed: int, seeds the random directions. Defaults to 0.
        normalization: `"filter"` (Li et al.) or `"layer"` (each variable as a whole
            rescaled to the norm of the weights). Defaults to `"filter"`.
        include_biases: bool, also move biases and normalization parameters (a 1-D
            variable is then normalized as one filter). Defaults to `False`.
        verbose: 0 (silent), 1 (progress bar) or 2 (one line at the end). Defaults to 1.

    Returns:
        A dict: `coordinates` (an array, or the pair of arrays for 2 dimensions), `loss`
        (shape `(len(a),)` or `(len(a), len(b))`: `loss[i, j]` at `(a[i], b[j])`),
        `accuracy` (same shape; `None` unless the model is a classifier), and
        `directions` (the normalized directions, each a list of arrays shaped like
        `model.trainable_variables`; `None` with `to_model`).

    Example:

    ```python
    plane = keras_sam.diagnostics.loss_landscape(model, x, y, dimensions=2,
                                                 coordinates=np.linspace(-1, 1, 21))
    plt.contour(*plane["coordinates"], plane["loss"].T)
    ```

    References:
        - Li et al., Visualizing the Loss Landscape of Neural Nets, NeurIPS 2018.
          https://arxiv.org/abs/1712.09913
        - Goodfellow, Vinyals and Saxe, Qualitatively Characterizing Neural Network
          Optimization Problems, ICLR 2015. https://arxiv.org/abs/1412.6544
    """
    batch_size = _validation.check_positive_int("batch_size", batch_size)
    if isinstance(dimensions, bool) or dimensions not in (1, 2):
        raise ValueError(f"`dimensions` must be 1 or 2. Received: dimensions={dimensions!r}")
    if to_model is not None and dimensions != 1:
        raise ValueError(
            "`dimensions` must be 1 with `to_model` (the line between two models). "
            f"Received: dimensions={dimensions!r}"
        )
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"`normalization` must be one of {NORMALIZATIONS}. "
            f"Received: normalization={normalization!r}"
        )
    _validation.check_integer("seed", seed, minimum=0)
    verbose = _validation.check_verbose(verbose)
    if coordinates is None:
        axis = np.linspace(-0.5, 1.5, 21) if to_model is not None else np.linspace(-1, 1, 21)
        axes = [axis] * dimensions
    else:
        axes = _check_coordinates(coordinates, dimensions)
    loss_fn = _engine.loss_function(model, loss)
    x, y = _engine.data_arrays(x, y)

    if to_model is not None:
        return _interpolation(model, to_model, loss_fn, x, y, batch_size, axes[0], verbose)

    passes = _engine.Passes(model, loss_fn, x, y, batch_size)
    weights = _engine.snapshot(passes.variables)
    numpy_weights = _engine.to_numpy(weights)
    rng = np.random.default_rng(seed)
    directions = []
    for _ in range(dimensions):
        raw = [rng.standard_normal(w.shape) for w in numpy_weights]
        directions.append(normalized_direction(raw, numpy_weights, normalization, include_biases))
    tensors = [
        [keras.ops.convert_to_tensor(d, dtype=w.dtype) for d, w in zip(dn, weights)]
        for dn in directions
    ]

    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, dimensions)
    losses = np.empty(len(grid))
    accuracies = np.empty(len(grid))
    bar = _engine.progress(len(grid), verbose, "point", shown=["loss"])
    for p, steps in enumerate(grid):
        point = list(weights)
        for step, direction in zip(steps, tensors):
            point = [w + keras.ops.cast(step, w.dtype) * d for w, d in zip(point, direction)]
        losses[p], accuracies[p] = passes.loss(point)
        if bar is not None:
            bar.update(p + 1, values=[("loss", losses[p])])
    shape = tuple(len(a) for a in axes)
    return {
        "coordinates": axes[0] if dimensions == 1 else tuple(axes),
        "loss": losses.reshape(shape),
        "accuracy": accuracies.reshape(shape) if passes.classifier else None,
        "directions": directions,
    }


def normalized_direction(
    direction: Sequence[ArrayLike],
    weights: Sequence[ArrayLike],
    normalization: str = "filter",
    include_biases: bool = False,
) -> list[np.ndarray]:
    """Rescales a random direction to the weights' scale (Li et al., 2018).

    `"filter"`: each slice along the last axis of a variable of rank >= 2 (a dense
    unit's or a convolution's output channel, in Keras's kernel layout) gets the norm of
    the same slice of the weights. `"layer"`: each variable as a whole gets the norm of
    the weights. Variables of rank <= 1 (biases, normalization parameters) are set to 0,
    or with `include_biases` normalized as one filter.

    Args:
        direction: list of arrays, one per variable.
        weights: list of arrays of the same shapes.
        normalization: `"filter"` or `"layer"`. Defaults to `"filter"`.
        include_biases: bool. Defaults to `False`.

    Returns:
        A list of float32 arrays, the normalized direction.
    """
    normalized = []
    for d, w in zip(direction, weights):
        d, w = np.asarray(d, np.float64), np.asarray(w, np.float64)
        if d.shape != w.shape:
            raise ValueError(
                "`direction` and `weights` must have the same shapes. "
                f"Received: {d.shape} and {w.shape}"
            )
        if w.ndim <= 1 and not include_biases:
            normalized.append(np.zeros(w.shape, np.float32))
            continue
        if w.ndim <= 1 or normalization == "layer":
            axes = None
        else:
            axes = tuple(range(w.ndim - 1))
        d_norm = np.sqrt(np.sum(d * d, axis=axes, keepdims=True))
        w_norm = np.sqrt(np.sum(w * w, axis=axes, keepdims=True))
        scale = np.divide(w_norm, d_norm, out=np.zeros_like(d_norm), where=d_norm > 0)
        normalized.append((d * scale).astype(np.float32))
    return normalized


def _interpolation(model, to_model, loss_fn, x, y, batch_size, axis, verbose):
    extra_a = [v for v in model.non_trainable_weights if _is_float(v)]
    passes = _engine.Passes(model, loss_fn, x, y, batch_size, extra_variables=extra_a)
    start = _engine.snapshot(passes.variables)
    start_extra = _engine.snapshot(extra_a)
    end = _matching(to_model.trainable_variables, passes.variables, "trainable")
    end_extra = _matching(
        [v for v in to_model.non_trainable_weights if _is_float(v)], extra_a, "non-trainable"
    )
    losses = np.empty(len(axis))
    accuracies = np.empty(len(axis))
    bar = _engine.progress(len(axis), verbose, "point", shown=["loss"])
    for p, t in enumerate(axis):
        point = [_mix(a, b, t) for a, b in zip(start, end)]
        extra = [_mix(a, b, t) for a, b in zip(start_extra, end_extra)]
        losses[p], accuracies[p] = passes.loss(point, extra_values=extra)
        if bar is not None:
            bar.update(p + 1, values=[("loss", losses[p])])
    return {
        "coordinates": axis,
        "loss": losses,
        "accuracy": accuracies if passes.classifier else None,
        "directions": None,
    }


def _mix(a, b, t):
    """`(1 - t) a + t b`, written as `a + t (b - a)` so that t = 0 gives `a` exactly."""
    return a + keras.ops.cast(t, a.dtype) * (b - a)


def _matching(variables, reference, kind):
    if len(variables) != len(reference) or any(
        tuple(v.shape) != tuple(r.shape) for v, r in zip(variables, reference)
    ):
        raise ValueError(
            f"`to_model` must have the same {kind} variables as `model` (shapes, in order). "
            f"Received: {[tuple(v.shape) for v in variables]} against "
            f"{[tuple(r.shape) for r in reference]}"
        )
    return _engine.snapshot(variables)


def _is_float(variable):
    return "float" in str(variable.dtype)


def _check_coordinates(coordinates, dimensions):
    axes = None
    if dimensions == 2 and isinstance(coordinates, (tuple, list)) and len(coordinates) == 2:
        candidates = [np.asarray(c, np.float64) for c in coordinates]
        if all(c.ndim == 1 for c in candidates):
            axes = candidates
    if axes is None:
        array = np.asarray(coordinates, np.float64)
        axes = [array] * dimensions if array.ndim == 1 else None
    if axes is None or any(a.size == 0 or not np.all(np.isfinite(a)) for a in axes):
        raise ValueError(
            "`coordinates` must be a non-empty 1-D array of finite numbers, or for "
            f"dimensions=2 a pair of them. Received: coordinates={coordinates!r}"
        )
    return axes
