"""The JAX adapter: what keras_sam needs of jax and cannot write with `keras.ops`."""

import sys

import jax
from keras import ops

from keras_sam import step
from keras_sam.methods import sam

# ------------------------------------------------------------------ autodiff primitives
# (used by the diagnostics; the SAM step may share them)


# ------------------------------------------------------------------------- the SAM step
# JAX is functional: Keras's JAX trainer calls the stateless `train_step(state, data)`.
# The step (`keras_sam.step`) is written statefully, so it runs here inside one
# `StatelessScope` that maps every variable of the step to its value in `state`; its
# assignments are recorded there and returned as the new state. Its conditionals are
# `lax.cond`s of pure functions (the default `Backend.decide`), and the gradient of a
# pass is `jax.grad` of the pass as a function of the weights' values.


class JAX(step.Backend):
    def gradients(self, compute, variables, values, pending, scale):
        mapping = list(pending.values())
        assigned = []

        def loss_of(values):
            scope = step.RecordingScope(state_mapping=mapping + list(zip(variables, values)))
            with scope:
                outputs, loss, _ = compute()
            scaled = ops.cast(loss, "float32")
            if scale is not None:
                scaled = scaled * ops.convert_to_tensor(scale)
            updates = scope.updates()
            assigned[:] = [v for v, _ in updates]
            return scaled, (outputs, loss, [value for _, value in updates])

        gradients, (outputs, loss, update_values) = jax.grad(loss_of, has_aux=True)(list(values))
        return outputs, loss, list(gradients), list(zip(assigned, update_values))

    def build(self, optimizer, variables):
        if not optimizer.built and isinstance(variables[0].value, jax.core.Tracer):
            raise ValueError(
                f"Build `{type(optimizer).__name__}` before the first step: "
                "`optimizer.build(model.trainable_variables)` outside `jax.jit` (variables "
                "cannot be created inside a traced function). `SAMModel.fit` does it by itself."
            )
        super().build(optimizer, variables)


BACKEND = JAX()


def train_step(sam_model, state, data):
    """`SAMModel.train_step(state, data)` on JAX: the step as a pure function of `state`."""
    groups = (
        sam_model.trainable_variables,
        sam_model.non_trainable_variables,
        sam_model.optimizer.variables,
        sam_model.metrics_variables,
    )
    variables = [v for group in groups for v in group]
    values = [x for group in state for x in group]
    logs, new_values = step.stateless_run(
        variables, values, lambda: step.model_step(BACKEND, sam_model, data)
    )
    new_state, start = [], 0
    for group in groups:
        new_state.append(new_values[start : start + len(group)])
        start += len(group)
    return logs, tuple(new_state)


def optimize(method, *args, **kwargs):
    raise ValueError(
        f"`{type(method).__name__}.optimize(grad_func, variables)` is the TensorFlow custom "
        "loop. On JAX, write the step as a pure function of the state, as in Keras's JAX "
        "custom-loop guide: `state, (predictions, loss, loss_sam) = "
        "optimizer.stateless_optimize(state, compute, trainable_variables, "
        "non_trainable_variables)`, with `compute()` returning `(predictions, loss)`; see "
        "the custom-loop guide."
    )


def stateless_optimize(method, state, compute, trainable_variables, non_trainable_variables):
    """One SAM step as a pure function of `state`, usable inside `jax.jit`.

    Args:
        state: `(trainable_values, non_trainable_values, optimizer_values)`, the values
            of `trainable_variables`, `non_trainable_variables` and `method.variables`.
        compute: a callable with no arguments running the forward pass statefully (the
            model reads its variables) and returning `(predictions, loss)`.

    Returns:
        `(new_state, (predictions, loss, loss_sam))`.
    """
    trainable_variables = step.check_variables(trainable_variables)
    non_trainable_variables = list(non_trainable_variables)
    if not method.built:
        raise ValueError(
            f"Build `{type(method).__name__}` before the first step: "
            "`optimizer.build(model.trainable_variables)`, then take its `variables` "
            "into the state."
        )
    trainable_values, non_trainable_values, optimizer_values = state
    groups = (trainable_variables, non_trainable_variables, method.variables)
    variables = [v for group in groups for v in group]
    values = list(trainable_values) + list(non_trainable_values) + list(optimizer_values)
    if len(values) != len(variables):
        raise ValueError(
            "`state` must hold one value per variable: "
            f"{len(trainable_variables)} trainable, {len(non_trainable_variables)} "
            f"non-trainable and {len(method.variables)} optimizer variables. Received "
            f"{len(trainable_values)}, {len(non_trainable_values)} and {len(optimizer_values)}."
        )

    def run():
        def pass_():
            result = compute()
            if not (isinstance(result, (tuple, list)) and len(result) == 2):
                raise ValueError(
                    f"`compute` must return `(predictions, loss)`. Received: {result!r}"
                )
            return result[0], result[1], None

        (part,), _ = step.run_step(BACKEND, method, [pass_], [1.0], trainable_variables)
        return part.outputs, part.loss, part.loss_sam

    outputs, new_values = step.stateless_run(variables, values, run)
    new_state, start = [], 0
    for group in groups:
        new_state.append(new_values[start : start + len(group)])
        start += len(group)
    return tuple(new_state), outputs


sam.register_custom_loop("jax", sys.modules[__name__])
