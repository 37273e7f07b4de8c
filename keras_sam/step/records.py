"""The records every file of the step reads: who does what in a step (`Roles`, from
`resolve`) and what the passes give the commit (`StepResult`); and the stateless scope
the passes run in (`stateless_run`)."""

import typing

from keras_sam.backends.base import RecordingScope
from keras_sam.methods.hooks import unwrap_loss_scale
from keras_sam.methods.sam import SAM


class Roles(typing.NamedTuple):
    """Who does what in a step: the optimizer a user compiles may nest three deep."""

    method: SAM  # the SAM method, asked for the perturbation and the final gradient
    scaler: object  # the `LossScaleOptimizer` whose scale the passes use, or None
    applier: object  # the Keras optimizer that takes the step
    outer: object  # the optimizer the user handed over (built first)


def resolve(optimizer):
    """Splits `optimizer` into its roles.

    Accepted: a SAM method around a Keras optimizer; a SAM method around a
    `LossScaleOptimizer` (the custom loop under `mixed_float16`); and a
    `LossScaleOptimizer` around a SAM method (what Keras's `compile` makes of a SAM
    optimizer under the `mixed_float16` policy).
    """
    method = unwrap_loss_scale(optimizer)
    if not isinstance(method, SAM):
        raise ValueError(
            "Expected a keras_sam method (`keras_sam.SAM` or a variant), possibly in a "
            f"`keras.optimizers.LossScaleOptimizer`. Received: optimizer={optimizer!r}"
        )
    outer_scaler = None if method is optimizer else optimizer
    applier = unwrap_loss_scale(method.inner_optimizer)
    inner_scaler = None if applier is method.inner_optimizer else method.inner_optimizer
    if outer_scaler is not None and inner_scaler is not None:
        raise ValueError(
            "The loss would be scaled twice: a `LossScaleOptimizer` wraps "
            f"`{type(method).__name__}`, which wraps another one. Under the "
            "`mixed_float16` policy `compile` adds the outer one by itself: give "
            f"`{type(method).__name__}` the plain optimizer."
        )
    scaler = inner_scaler if outer_scaler is None else outer_scaler
    return Roles(method, scaler, applier, optimizer)


class StepResult(typing.NamedTuple):
    """What the passes produced, the one record a reader follows from them to the
    commit (`outcomes.finish`) and the logs.

    A part's (`passes.run_part`), then the step's: its parts combined, its verdict
    taken and, under replicas, reduced over them (`passes.compute_step`). The step's
    first four fields are what `finish` commits or skips; a step of one part keeps the
    part's outputs and losses, and `SAMModel`'s step fills in its logs' (`entry`'s
    summary, `sharpness` included).
    """

    gradients: list  # the final (mean) gradients, None where none
    state: list  # the method's new state values, one per `method.state_variables`
    updates: list  # the clean passes' state updates, `(variable, value)` pairs
    finite: object  # the verdict: whether the part, or the step, may be taken
    outputs: object = None
    loss: object = None  # the clean loss
    loss_sam: object = None  # a part's perturbed loss (its clean loss after one pass)
    second_pass: object = None  # 1.0 when the perturbed pass ran, else 0.0 (float or
    # tensor); the step's: the fraction of it, by part size
    sharpness: object = None  # the step's logged `loss_sam - loss` (`SAMModel` only)


def stateless_run(variables, values, fn):
    """Calls `fn()` with `variables` reading `values`.

    Returns its result and the variables' values after it (its assignments are
    recorded, not written).
    """
    scope = RecordingScope(state_mapping=list(zip(variables, values)))
    with scope:
        result = fn()
    return result, [scope.get_current_value(v) for v in variables]
