"""The JAX adapter: what keras_sam needs of jax and cannot write with `keras.ops`."""

import jax
import keras
from keras import ops

from keras_sam import step
from keras_sam.backends import base
from keras_sam.methods import sam

# ------------------------------------------------------------------------- the SAM step
# JAX is functional: Keras's JAX trainer calls the stateless `train_step(state, data)`.
# The step (`keras_sam.step`) is written statefully, so it runs here inside one
# `StatelessScope` that maps every variable of the step to its value in `state`; its
# assignments are recorded there and returned as the new state. Its conditionals are
# `lax.cond`s of pure functions (the default `Backend.decide`), and the gradient of a
# pass is `jax.grad` of the pass as a function of the weights' values.


class JAX(base.Backend):
    def gradients(self, compute, variables, values, pending, scale):
        mapping = list(pending.values())
        assigned = []

        def loss_of(values):
            scope = base.RecordingScope(state_mapping=mapping + list(zip(variables, values)))
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

    def per_replica(self, replica_step, data, method, variables):
        """Under `keras.distribution.DataParallel` with `distributed_perturbation=
        "per_replica"`, each device runs the passes on its own shard of the batch (a
        `shard_map`): it perturbs with its own gradient, and the devices' results are
        averaged once, at the end (one gradient all-reduce, as in plain training).

        Otherwise the step is one global computation (XLA partitions it over the
        devices): every device perturbs with the gradient of the global batch, which
        is the synchronized mode.
        """
        distribution = keras.distribution.distribution()
        if (
            method.distributed_perturbation != sam.PER_REPLICA
            or not isinstance(distribution, keras.distribution.DataParallel)
            or len(distribution.device_mesh.devices.flatten()) < 2
        ):
            return replica_step(data)
        return _shard_map_step(replica_step, data, distribution, variables)

    def build(self, optimizer, variables):
        if not optimizer.built and isinstance(variables[0].value, jax.core.Tracer):
            raise ValueError(
                f"Build `{type(optimizer).__name__}` before the first step: "
                "`optimizer.build(model.trainable_variables)` outside `jax.jit` (variables "
                "cannot be created inside a traced function). `SAMModel.fit` does it by itself."
            )
        super().build(optimizer, variables)

    def train_step(self, sam_model, state, data):
        """`SAMModel.train_step(state, data)` on JAX: the step as a pure function of `state`."""
        groups = (
            sam_model.trainable_variables,
            sam_model.non_trainable_variables,
            sam_model.optimizer.variables,
            sam_model.metrics_variables,
        )
        return _run_on_state(groups, state, lambda: step.model_step(self, sam_model, data))

    def logs_of(self, result):
        logs, _ = result  # Keras's stateless `(logs, state)`
        return logs

    def optimize(self, method, *args, **kwargs):
        raise ValueError(
            f"`{type(method).__name__}.optimize(grad_func, variables)` is the TensorFlow custom "
            "loop. On JAX, write the step as a pure function of the state, as in Keras's JAX "
            "custom-loop guide: `state, (predictions, loss, loss_sam) = "
            "optimizer.stateless_optimize(state, compute, trainable_variables, "
            "non_trainable_variables)`, with `compute()` returning `(predictions, loss)`; see "
            "the custom-loop guide."
        )

    def stateless_optimize(
        self, method, state, compute, trainable_variables, non_trainable_variables
    ):
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
        pass_ = base.custom_loop_pass(compute, "compute", ("predictions", "loss"))
        non_trainable_variables = list(non_trainable_variables)
        if not method.built:
            raise ValueError(
                f"Build `{type(method).__name__}` before the first step: "
                "`optimizer.build(model.trainable_variables)`, then take its `variables` "
                "into the state."
            )
        trainable_values, non_trainable_values, optimizer_values = state
        groups = (trainable_variables, non_trainable_variables, method.variables)
        if any(len(values) != len(group) for values, group in zip(state, groups)):
            raise ValueError(
                "`state` must hold one value per variable: "
                f"{len(trainable_variables)} trainable, {len(non_trainable_variables)} "
                f"non-trainable and {len(method.variables)} optimizer variables. Received "
                f"{len(trainable_values)}, {len(non_trainable_values)} and {len(optimizer_values)}."
            )

        def run():
            result = step.run_step(self, method, [pass_], [1.0], trainable_variables)
            return result.outputs, result.loss, result.loss_sam

        outputs, new_state = _run_on_state(groups, state, run)
        return new_state, outputs


BACKEND = JAX()


def _run_on_state(groups, state, fn):
    """`fn()` with each group of variables reading its group of values in `state`.

    Returns its result and the new state, grouped alike (a tuple of lists): the step's
    assignments are recorded, not written.
    """
    variables = [v for group in groups for v in group]
    values = [x for group_values in state for x in group_values]
    result, new_values = step.stateless_run(variables, values, fn)
    new_state, start = [], 0
    for group in groups:
        new_state.append(new_values[start : start + len(group)])
        start += len(group)
    return result, tuple(new_state)


def _shard_map_step(replica_step, data, distribution, variables):
    """Runs `replica_step` on each device's shard of `data`; averages the results."""
    from jax.sharding import PartitionSpec

    mesh = distribution.device_mesh.backend_mesh
    axis = distribution.batch_dim_name
    # Every variable the passes read, handed in whole (replicated) to each device.
    values = [v.value for v in variables]
    structure = {}

    def local(values, data):
        result, _ = step.stateless_run(variables, values, lambda: replica_step(data))
        structure["updates"] = [v for v, _ in result.updates]
        structure["present"] = [g is not None for g in result.gradients]
        gradients = [jax.lax.pmean(g, axis) for g in result.gradients if g is not None]
        state = [jax.lax.pmean(v, axis) for v in result.state]
        updates = [_replica_mean(value, axis) for _, value in result.updates]
        finite = jax.lax.pmin(ops.cast(result.finite, "int32"), axis) > 0
        loss, second_pass, sharpness = (
            jax.lax.pmean(ops.cast(t, "float32"), axis)
            for t in (result.loss, result.second_pass, result.sharpness)
        )
        return gradients, state, updates, finite, result.outputs, loss, second_pass, sharpness

    batch = PartitionSpec(axis)
    replicated = PartitionSpec()
    outputs = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(replicated, batch),
        out_specs=(replicated,) * 4 + (batch,) + (replicated,) * 3,
        check_vma=False,
    )(values, data)
    gradients, state, updates, finite, predictions, loss, second_pass, sharpness = outputs
    present = iter(gradients)
    gradients = [next(present) if p else None for p in structure["present"]]
    return step.StepResult(
        gradients=gradients,
        state=state,
        updates=list(zip(structure["updates"], updates)),
        finite=finite,
        outputs=predictions,
        loss=loss,
        second_pass=second_pass,
        sharpness=sharpness,
    )


def _replica_mean(value, axis):
    """Floating state (BatchNorm statistics) averaged over the devices; the rest (seed
    states, counters) is the same on every device."""
    if base.is_floating(value):
        return jax.lax.pmean(value, axis)
    return value
