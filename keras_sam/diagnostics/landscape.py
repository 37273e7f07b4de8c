"""The loss landscape: the loss along random directions, or between two models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from keras_sam import _validation
from keras_sam.diagnostics import _engine

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from keras_sam.diagnostics.objective import Objective


NORMALIZATIONS = ("filter", "layer")


def loss_landscape(
    objective: Objective,
    *,
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
    (Goodfellow et al., 2015): `t = 0` is the objective's model, `t = 1` is `to_model`.
    Non-trainable float weights (BatchNorm moving statistics) are interpolated too.

    The same `seed` draws the same raw directions for any model of the same
    architecture, so two models' landscapes can be compared on the same axes. Each point
    is one forward pass over all of the data in inference mode (`training=False`), inside
    compiled passes; the weights are never written.

    Args:
        objective: the `Objective`: the model (`t = 0`), the data, the loss and the batch
            size.
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
        the model's `trainable_variables`; `None` with `to_model`).

    Example:

    ```python
    objective = keras_sam.diagnostics.Objective(model, x, y)
    plane = keras_sam.diagnostics.loss_landscape(objective, dimensions=2,
                                                 coordinates=np.linspace(-1, 1, 21))
    plt.contour(*plane["coordinates"], plane["loss"].T)
    ```

    References:
        - Li et al., Visualizing the Loss Landscape of Neural Nets, NeurIPS 2018.
          https://arxiv.org/abs/1712.09913
        - Goodfellow, Vinyals and Saxe, Qualitatively Characterizing Neural Network
          Optimization Problems, ICLR 2015. https://arxiv.org/abs/1412.6544
    """
    _check_options(dimensions, to_model, normalization)
    _validation.check_integer("seed", seed, minimum=0)
    verbose = _validation.check_verbose(verbose)
    axes = _axes(coordinates, dimensions, to_model)
    if to_model is not None:
        return _interpolation(objective, to_model, axes[0], verbose)
    passes = _engine.Passes(objective)
    weights = _engine.snapshot(passes.variables)
    directions = _random_directions(weights, dimensions, seed, normalization, include_biases)
    shape = tuple(len(a) for a in axes)
    points = _grid_points(weights, directions, axes)
    losses, accuracies = _losses(passes, points, int(np.prod(shape)), verbose)
    return {
        "coordinates": axes[0] if dimensions == 1 else tuple(axes),
        "loss": losses.reshape(shape),
        "accuracy": None if accuracies is None else accuracies.reshape(shape),
        "directions": directions,
    }


def _check_options(dimensions, to_model, normalization):
    """`dimensions` 1 or 2 (1 with `to_model`), and a known `normalization`."""
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


def _axes(coordinates, dimensions, to_model):
    """The steps along each direction: `coordinates` checked, or the default axes."""
    if coordinates is not None:
        return _check_coordinates(coordinates, dimensions)
    axis = np.linspace(-0.5, 1.5, 21) if to_model is not None else np.linspace(-1, 1, 21)
    return [axis] * dimensions


def _random_directions(weights, dimensions, seed, normalization, include_biases):
    """`dimensions` seeded Gaussian directions, normalized: float32 NumPy arrays."""
    numpy_weights = _engine.to_numpy(weights)
    rng = np.random.default_rng(seed)
    directions = []
    for _ in range(dimensions):
        raw = [rng.standard_normal(w.shape) for w in numpy_weights]
        directions.append(normalized_direction(raw, numpy_weights, normalization, include_biases))
    return directions


def _grid_points(weights, directions, axes):
    """`(w + a_i d_1 (+ b_j d_2), None)` for every point of the grid, row by row (made one
    at a time, so that the grid's weights are never all in memory)."""
    tensors = [
        [keras.ops.convert_to_tensor(d, dtype=w.dtype) for d, w in zip(dn, weights)]
        for dn in directions
    ]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(directions))
    for steps in grid:
        point = list(weights)
        for step, direction in zip(steps, tensors):
            point = [w + keras.ops.cast(step, w.dtype) * d for w, d in zip(point, direction)]
        yield point, None


def _losses(passes, points, count, verbose):
    """The loss and accuracy at each of `count` points `(values, extra_values)`, as NumPy
    arrays; the accuracy is `None` unless the model is a classifier."""
    losses = np.empty(count)
    accuracies = np.empty(count)
    bar = _engine.progress(count, verbose, "point", shown=["loss"])
    for p, (values, extra_values) in enumerate(points):
        losses[p], accuracies[p] = passes.loss(values, extra_values=extra_values)
        if bar is not None:
            bar.update(p + 1, values=[("loss", losses[p])])
    return losses, accuracies if passes.classifier else None


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


def _interpolation(objective, to_model, axis, verbose):
    """The line `(1 - t) w_a + t w_b` from the objective's model to `to_model`."""
    model = objective.model
    extra_a = [v for v in model.non_trainable_weights if _is_float(v)]
    passes = _engine.Passes(objective, extra_variables=extra_a)
    start = _engine.snapshot(passes.variables)
    start_extra = _engine.snapshot(extra_a)
    end = _matching(to_model.trainable_variables, passes.variables, "trainable")
    end_extra = _matching(
        [v for v in to_model.non_trainable_weights if _is_float(v)], extra_a, "non-trainable"
    )
    points = (
        (
            [_mix(a, b, t) for a, b in zip(start, end)],
            [_mix(a, b, t) for a, b in zip(start_extra, end_extra)],
        )
        for t in axis
    )
    losses, accuracies = _losses(passes, points, len(axis), verbose)
    return {"coordinates": axis, "loss": losses, "accuracy": accuracies, "directions": None}


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
