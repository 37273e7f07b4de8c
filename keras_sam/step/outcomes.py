"""What a step does once its passes are done: commit and apply its result, or skip it
(`finish`); under gradient accumulation, add it to the sums and apply them every k-th
micro-batch. Each outcome is one method of `_Outcomes`."""

from keras import ops

from keras_sam.backends.base import is_floating, unique


def finish(backend, roles, variables, result):
    """Commits the step's `result` (its gradients, the method's new state, the clean
    passes' state updates) and applies it, or skips it, by its verdict (`finite`);
    alike on every replica."""
    update_variables = [v for v, _ in result.updates]
    outcomes = _Outcomes(backend, roles, variables, result.gradients, update_variables)
    args = (result.gradients, [value for _, value in result.updates], list(result.state))
    backend.decide(result.finite, outcomes.take, outcomes.skip, outcomes.tracked, args=args)


class _Outcomes:
    """What a step does once its passes are done, one method per outcome.

    The verdict (`finite`, see `passes.compute_step`): every loss finite, and every gradient,
    state update and method state tame (`passes.TAME_NORM`). Then:

    | outcome             | when                       | what it writes                     |
    |---------------------|----------------------------|------------------------------------|
    | `take`: `apply`     | verdict True               | the clean pass's state updates and |
    |                     |                            | the method's state; optimizer step |
    | `take`: `accumulate`| verdict True, under        | the state updates; adds gradients  |
    |                     | accumulation               | and state to the sums; micro step  |
    | `apply_accumulated` | the k-th micro-batch       | state and optimizer step from the  |
    |                     |                            | sums / k; sums and counter zeroed  |
    | `grow_loss_scale`   | after a take that stands   | the loss scale's counter (doubles  |
    |                     |                            | the scale every growth period)     |
    | `verified_take`     | `take` under               | a copy of `tracked`, then `take`'s |
    |                     | `verify_optimizer_step`    | writes, checked (`checked`)        |
    | `roll_back`         | a checked write is NaN/inf | `tracked` from the copy; `skip`    |
    | `skip`              | verdict False              | `skipped_steps + 1`; loss scale    |
    |                     |                            | halved and its counter zeroed      |

    A tame gradient has finite squares, so the wrapped optimizer's update from it is
    finite for Keras's optimizers (SGD, Adam's moments, ...): the step checks nothing
    after it, and keeps no copy, unless `verify_optimizer_step=True`.

    Where each part runs (the cross-replica rule): `take` and `skip` are called once
    for the step (`Backend.decide`; under `tf.distribute` from the cross-replica
    context, after the replicas' vote), and so are the counters they assign
    (`skipped_steps`, `micro_steps`, the loss scale) and the copy and check of a
    verified take. What reads a replica's own values (`apply`, `accumulate`,
    `apply_averages`: the gradients, updates and state) runs through
    `Backend.run_in_replicas`.
    """

    def __init__(self, backend, roles, variables, gradients, update_variables):
        method = roles.method
        self.backend, self.method = backend, method
        self.scaler, self.applier = roles.scaler, roles.applier
        self.variables = variables
        self.update_variables = update_variables
        self.steps = method.accumulation_steps
        self.present = [g is not None for g in gradients]
        # Every variable an outcome may assign (for backends whose decision needs them).
        self.tracked = unique(list(variables) + update_variables + list(roles.outer.variables))
        # What a verified take checks: what the wrapped optimizer writes (the weights,
        # its slots) and the sums.
        self.checked = []
        if method.verify_optimizer_step:
            written = list(variables) + list(roles.applier.variables) + _sums(method)
            self.checked = [v for v in unique(written) if is_floating(v)]
        self.snapshot = None  # the copy of `tracked` a verified take keeps

    # ------------------------------------------------------ once for the step
    def take(self, gradients, update_values, state_values):
        if self.method.verify_optimizer_step:
            self.verified_take(gradients, update_values, state_values)
            return
        self.apply_or_accumulate(gradients, update_values, state_values)
        self.grow_loss_scale()

    def skip(self, *results):
        """Counts the step as skipped; the step's `results` are not read."""
        del results
        skipped = self.method.skipped_steps
        skipped.assign(skipped.value + 1)
        scaler = self.scaler
        if scaler is not None:
            scaler.step_counter.assign(ops.zeros_like(scaler.step_counter.value))
            scaler.dynamic_scale.assign(scaler.dynamic_scale.value * 0.5)

    def verified_take(self, gradients, update_values, state_values):
        """`take`, checked: what the optimizer wrote (weights, slots, sums) is verified,
        and restored from a copy if any of it is NaN or infinite."""
        backend = self.backend
        self.snapshot = [ops.copy(v.value) for v in self.tracked]
        self.apply_or_accumulate(gradients, update_values, state_values)
        ok = backend.all_finite([v.value for v in self.checked])
        backend.decide(ok, self.grow_loss_scale, self.roll_back, self.tracked)
        self.snapshot = None

    def roll_back(self):
        for variable, value in zip(self.tracked, self.snapshot):
            variable.assign(value)
        self.skip()

    def apply_or_accumulate(self, gradients, update_values, state_values):
        backend = self.backend
        if self.steps == 1:
            backend.run_in_replicas(self.apply, gradients, update_values, state_values)
            return
        backend.run_in_replicas(self.accumulate, gradients, update_values, state_values)
        micro_steps = self.method.accumulation_variables[0]
        micro_steps.assign(micro_steps.value + 1)
        full = ops.equal(micro_steps.value, self.steps)
        backend.stateful_cond(full, self.apply_accumulated, no_change, self.tracked)

    def apply_accumulated(self):
        self.backend.run_in_replicas(self.apply_averages)
        micro_steps = self.method.accumulation_variables[0]
        micro_steps.assign(ops.zeros_like(micro_steps.value))

    def grow_loss_scale(self):
        """`LossScaleOptimizer`'s rule: double the scale after `dynamic_growth_steps`
        applied steps."""
        scaler = self.scaler
        if scaler is None:
            return
        counter = scaler.step_counter.value
        grow = ops.equal(counter, scaler.dynamic_growth_steps - 1)
        scaler.step_counter.assign(ops.where(grow, ops.zeros_like(counter), counter + 1))
        scale = scaler.dynamic_scale.value
        scaler.dynamic_scale.assign(ops.where(grow, scale * 2.0, scale))

    # ------------------------------------------------------------ in replicas
    def commit(self, update_values, state_values):
        for variable, value in zip(self.update_variables, update_values):
            variable.assign(value)
        for variable, value in zip(self.method.state_variables, state_values):
            variable.assign(value)

    def apply(self, gradients, update_values, state_values):
        self.commit(update_values, state_values)
        self.applier.apply(gradients, self.variables)

    def accumulate(self, gradients, update_values, state_values):
        self.commit(update_values, [])
        _, gradient_sums, state_sums = self.method.accumulation_variables
        for total, g in zip(gradient_sums, gradients):
            if g is not None:
                total.assign(total.value + ops.cast(self.backend.dense(g), total.dtype))
        for total, value in zip(state_sums, state_values):
            total.assign(total.value + value)

    def apply_averages(self):
        """The optimizer's step with the averages of the sums; the sums zeroed."""
        _, gradient_sums, state_sums = self.method.accumulation_variables
        averages = [
            total.value / self.steps if p else None for total, p in zip(gradient_sums, self.present)
        ]
        for variable, total in zip(self.method.state_variables, state_sums):
            variable.assign(total.value / self.steps)
        self.applier.apply(averages, self.variables)
        for total in gradient_sums + state_sums:
            total.assign(ops.zeros_like(total.value))


def no_change():
    """The outcome that writes nothing."""


def _sums(method):
    """The gradient and state sums of gradient accumulation (none without it)."""
    if method.accumulation_steps == 1:
        return []
    _, gradient_sums, state_sums = method.accumulation_variables
    return list(gradient_sums) + list(state_sums)
