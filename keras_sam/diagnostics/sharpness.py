"""Sharpness: how much the loss rises in the worst direction within a radius `rho`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras

from keras_sam import _validation, maths
from keras_sam.diagnostics import _engine
from keras_sam.methods.hooks import adaptive_scales

if TYPE_CHECKING:
    from keras_sam.diagnostics.objective import Objective


def sharpness(
    objective: Objective,
    *,
    rho: float = 0.05,
    m: int | None = None,
    ascent_steps: int = 1,
    ascent_step_size: float | None = None,
    adaptive: bool = False,
    eta: float = 0.01,
    verbose: int = 0,
) -> dict[str, Any]:
    """The loss increase at the worst point of radius `rho` that gradient ascent finds.

    First-order (the default, SAM's own estimate), over all of `(x, y)`:

    ```
    g = grad L(w)                  # L: the mean loss over all of (x, y), in batches
    e = rho * g / ||g||            # ASAM: rho * T^2 g / ||T g||, T = |w| + eta
    sharpness = L(w + e) - L(w)
    ```

    m-sharpness (`m=...`, Foret et al., Section 4.1): the data, in the order given, are
    cut into consecutive sub-batches `B_1, B_2, ...` of `m` examples (the last may be
    smaller), each gets its own perturbation from its own gradient, and the increases are
    averaged, weighted by sub-batch size:

    ```
    e_k = rho * grad L_Bk(w) / ||grad L_Bk(w)||
    sharpness = sum_k |B_k| / n * (L_Bk(w + e_k) - L_Bk(w))
    ```

    Multi-step ascent (`ascent_steps=K > 1`): projected, normalized gradient ascent in
    the ball `||e|| <= rho` (`||e / T|| <= rho` for ASAM), starting from `e_0 = 0`, and the
    largest loss met on the way. The first step of size `rho` is SAM's point, so the
    estimate is never below the first-order one:

    ```
    e_t = P(e_{t-1} + a * g_{t-1} / ||g_{t-1}||),  g_t = grad L(w + e_t),  t = 1..K
    sharpness = max_t L(w + e_t) - L(w)    # P: projection onto the ball, a: step size
    ```

    The model runs in inference mode (`training=False`: BatchNorm uses its moving
    statistics, dropout is off) and the loss is the data loss, without the model's
    regularization losses. The weights are never written: perturbed weights are read
    through a `keras.StatelessScope`.

    Cost: `K` gradient passes and one forward pass over the data (first-order: one of
    each), in batches of the objective's `batch_size`; with `m`, the same per sub-batch.

    Args:
        objective: the `Objective`: the model, the data, the loss and the batch size.
        rho: float >= 0, the radius. Defaults to 0.05.
        m: int or `None`, the sub-batch size of m-sharpness; `None` for one perturbation
            over the whole data. Defaults to `None`.
        ascent_steps: int >= 1, gradient-ascent steps. Defaults to 1 (first-order).
        ascent_step_size: float > 0, the length `a` of each ascent step (before the
            projection). Defaults to `rho`.
        adaptive: bool, ASAM's scale-invariant neighbourhood. Defaults to `False`.
        eta: float, ASAM's offset. Defaults to 0.01.
        verbose: 0 (silent), 1 (progress bar) or 2 (one line at the end). Defaults to 0.

    Returns:
        A dict: `loss` L(w), `perturbed_loss` (L(w + e), or the average of the sub-batch
        values with `m`), `sharpness` (their difference), Python floats, and the settings
        `rho`, `m` and `ascent_steps`.

    Example:

    ```python
    objective = keras_sam.diagnostics.Objective(model, x, y)
    keras_sam.diagnostics.sharpness(objective, rho=0.05)["sharpness"]
    keras_sam.diagnostics.sharpness(objective, rho=0.05, m=32)         # m-sharpness
    keras_sam.diagnostics.sharpness(objective, rho=0.05, ascent_steps=5)
    ```

    References:
        - Foret et al., Sharpness-Aware Minimization for Efficiently Improving
          Generalization, ICLR 2021 (m-sharpness: Section 4.1).
          https://arxiv.org/abs/2010.01412
        - Keskar et al., On Large-Batch Training for Deep Learning: Generalization Gap
          and Sharp Minima, ICLR 2017. https://arxiv.org/abs/1609.04836
    """
    rho = _validation.check_non_negative("rho", rho)
    if m is not None:
        m = _validation.check_positive_int("m", m)
    ascent_steps = _validation.check_positive_int("ascent_steps", ascent_steps)
    step_size = rho if ascent_step_size is None else _check_step_size(ascent_step_size)
    eta = _validation.check_non_negative("eta", eta)
    verbose = _validation.check_verbose(verbose)
    passes = _engine.Passes(objective)
    weights = _engine.snapshot(passes.variables)
    scales = _scales(passes, adaptive, eta)
    x, y = objective.x, objective.y
    n = _engine.num_examples(x)
    parts = _sub_batches(n, m)
    bar = _engine.progress(len(parts), verbose, "sub-batch" if m else "pass")
    clean = perturbed = 0.0
    for i, (start, stop) in enumerate(parts):
        part_x, part_y = _engine.take(x, start, stop), y[start:stop]
        part_clean, part_perturbed = _ascent(
            passes, weights, scales, part_x, part_y, rho, ascent_steps, step_size
        )
        weight = (stop - start) / n
        clean += part_clean * weight
        perturbed += part_perturbed * weight
        if bar is not None:
            bar.update(i + 1)
    return {
        "loss": clean,
        "perturbed_loss": perturbed,
        "sharpness": perturbed - clean,
        "rho": rho,
        "m": m,
        "ascent_steps": ascent_steps,
    }


def _scales(passes, adaptive, eta):
    """ASAM's `T = |w| + eta` per variable (`None` where it does not apply), or `None`."""
    if not adaptive:
        return None
    # Constants: T is taken at w, never differentiated.
    return [
        None if s is None else keras.ops.stop_gradient(s)
        for s in adaptive_scales(passes.variables, eta)
    ]


def _sub_batches(n, m):
    """`(start, stop)` of the consecutive sub-batches of `m` examples (all `n` for `None`)."""
    size = n if m is None else m
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _ascent(passes, weights, scales, x, y, rho, steps, step_size):
    """`(L(w), max_t L(w + e_t))` on `(x, y)`, by `steps` projected ascent steps."""
    clean, gradient = passes.loss_and_gradient(weights, x, y)
    perturbation = [keras.ops.zeros_like(w) for w in weights]
    largest = -float("inf")
    for t in range(steps):
        step = maths.sam_perturbation(gradient, step_size, scales=scales)
        perturbation = _project([e + s for e, s in zip(perturbation, step)], rho, scales)
        point = [w + e for w, e in zip(weights, perturbation)]
        if t + 1 < steps:
            value, gradient = passes.loss_and_gradient(point, x, y)
        else:
            value, _ = passes.loss(point, x, y)
        largest = max(largest, value)
    return clean, largest


def _project(perturbation, rho, scales):
    """Scales `e` back onto the ball `||e / T|| <= rho` when it left it."""
    if scales is None:
        scales = [None] * len(perturbation)
    scaled = [
        e if s is None else e / keras.ops.cast(s, e.dtype) for e, s in zip(perturbation, scales)
    ]
    norm = float(maths.global_norm(scaled))
    if norm <= rho or norm == 0.0:
        return perturbation
    return [e * keras.ops.cast(rho / norm, e.dtype) for e in perturbation]


def _check_step_size(value):
    return _validation.check_number(
        "ascent_step_size", value, minimum=0.0, strict=True, rule="a number > 0 (or None for rho)"
    )
