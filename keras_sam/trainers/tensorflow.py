"""The TensorFlow trainer: runs the clean and the perturbed pass of a SAM step.

Nothing is written to a variable until the step has succeeded. Both passes run inside
a `keras.StatelessScope` whose state mapping gives the trained variables as tensors, and
keras_sam differentiates with its own tape watching those tensors:

- the clean pass reads `w`; the state it updates (BatchNorm moving statistics, dropout
  seeds, metrics) is recorded, and committed at the end;
- the perturbed pass reads `w + e`, and everything it would update is dropped.

So the weights are never perturbed in place: they are bitwise the pre-step weights if
either pass raises (eagerly or inside `tf.function`), BatchNorm statistics come from
the clean pass alone, and both passes see the same dropout masks.

The end of a step is one decision, taken alike by every replica: when a loss or a
gradient of either pass is NaN or infinite, the step is skipped (nothing changes but
`skipped_steps` and, under loss scaling, the loss scale); otherwise the recorded state
is committed and the wrapped optimizer steps (or, under gradient accumulation, the SAM
gradient is added to the sums, and the optimizer steps every k-th micro-batch).

Under `tf.distribute` the decision is taken in the cross-replica context (a
`merge_call`), because a strategy cannot synchronize inside a `tf.cond` taken per
replica. Each replica's gradients are those of its loss divided by the number of
replicas, as Keras's `compute_loss` or `tf.nn.compute_average_loss` give them: the
trainer hands the method each replica's own mean gradient (or, in the synchronized
mode, the all-reduced one), and the wrapped optimizer all-reduces the final gradients
once, as in plain training.

Inside `tf.function`, a run-time error stops the step when the failing op feeds the
loss (`loss = tf.debugging.check_numerics(loss, ...)`). TensorFlow does not order an
assertion whose result feeds nothing before other ops, so such an assertion can fail
after the step was applied: make the loss depend on it.
"""

import typing

import keras
import tensorflow as tf

from keras_sam.methods.sam import SAM, SYNCHRONIZED


class _RecordingScope(keras.StatelessScope):
    """A stateless scope that remembers which variables were assigned, to commit them."""

    def __init__(self, state_mapping=None):
        super().__init__(state_mapping=state_mapping)
        self._assigned = {}

    def add_update(self, update):
        variable, _ = update
        self._assigned[id(variable)] = variable
        super().add_update(update)

    def updates(self):
        """The `(variable, new value)` pairs, in the order of first assignment."""
        return [(v, self.get_current_value(v)) for v in self._assigned.values()]


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
    lso = keras.optimizers.LossScaleOptimizer
    if isinstance(optimizer, lso) and isinstance(optimizer.inner_optimizer, SAM):
        method, scaler = optimizer.inner_optimizer, optimizer
        if isinstance(method.inner_optimizer, lso):
            raise ValueError(
                "The loss would be scaled twice: a `LossScaleOptimizer` wraps "
                f"`{type(method).__name__}`, which wraps another one. Under the "
                "`mixed_float16` policy `compile` adds the outer one by itself: give "
                f"`{type(method).__name__}` the plain optimizer."
            )
        return Roles(method, scaler, method.inner_optimizer, optimizer)
    if not isinstance(optimizer, SAM):
        raise ValueError(
            "Expected a keras_sam method (`keras_sam.SAM` or a variant), possibly in a "
            f"`keras.optimizers.LossScaleOptimizer`. Received: optimizer={optimizer!r}"
        )
    inner = optimizer.inner_optimizer
    if isinstance(inner, lso):
        return Roles(optimizer, inner, inner.inner_optimizer, optimizer)
    return Roles(optimizer, None, inner, optimizer)


class _Part(typing.NamedTuple):
    """What one part of a step (the whole batch, or one m-sharpness part) produced."""

    outputs: object
    loss: object
    loss_sam: object  # the clean loss when the part took one pass
    gradients: list  # the part's final gradients (its own mean's), None where none
    second_pass: object  # 1.0 when the perturbed pass ran, else 0.0 (float or tensor)
    state: list  # the method's new state values, one per `method.state_variables`
    finite: object  # whether every loss and gradient of the part is finite


def _part(roles, compute, variables, weights, pending, factor):
    """Runs the passes of one part and returns its final gradients (`_Part`).

    The method's state is read and assigned only inside stateless scopes: the new
    values are returned. The clean pass's own state updates (BatchNorm statistics,
    seed generators, metrics) are added to `pending`, so that the next part reads them
    and the step commits them at the end.

    `factor` turns the raw gradients into the part's mean gradient: one over the loss
    scale, times the number of replicas.
    """
    method = roles.method
    state = method.state_variables
    context = tf.distribute.get_replica_context()
    synchronized = context.num_replicas_in_sync > 1 and (
        method.distributed_perturbation == SYNCHRONIZED
    )
    sparse_ok = method.sparse_gradients_supported and not synchronized
    scale = None if roles.scaler is None else roles.scaler.dynamic_scale

    outputs, loss, gradients, clean_pass = _run_pass(compute, variables, weights, pending, scale)
    gradients = [_prepare(g, factor, sparse_ok) for g in gradients]
    if synchronized:
        # Every replica perturbs with the gradient of the global batch.
        present = [i for i, g in enumerate(gradients) if g is not None]
        reduced = context.all_reduce(tf.distribute.ReduceOp.MEAN, [gradients[i] for i in present])
        for i, g in zip(present, reduced):
            gradients[i] = g
    # The method reads the rows of a sparse gradient (duplicates summed) as a tensor.
    rows = [g.values if isinstance(g, tf.IndexedSlices) else g for g in gradients]
    values = [v.value for v in state]
    present = [i for i, g in enumerate(gradients) if g is not None]

    decision, values = _hook(state, values, lambda: method.needs_second_pass(rows, variables))

    def two_passes(values=values):
        perturbation, values = _hook(state, values, lambda: method.perturbation(rows, variables))
        perturbed = [_perturb(w, e, g) for w, e, g in zip(weights, perturbation, gradients)]
        _, loss_sam, perturbed_gradients, _ = _run_pass(
            compute, variables, perturbed, pending, scale
        )
        perturbed_gradients = [
            None if g is None else _prepare(pg, factor, sparse_ok)
            for g, pg in zip(gradients, perturbed_gradients)
        ]
        descent, values = _hook(
            state,
            values,
            lambda: method.descent_gradients(gradients, perturbed_gradients, variables),
        )
        return loss_sam, [descent[i] for i in present], values

    def one_pass(values=values):
        descent, values = _hook(
            state, values, lambda: method.one_pass_gradients(gradients, variables)
        )
        return loss, [descent[i] for i in present], values

    if isinstance(decision, bool):
        loss_sam, descent, values = two_passes() if decision else one_pass()
        second_pass = 1.0 if decision else 0.0
    else:
        loss_sam, descent, values = tf.cond(decision, two_passes, one_pass)
        second_pass = tf.cast(decision, "float32")

    finite = _all_finite([loss, loss_sam] + [gradients[i] for i in present] + list(descent))
    for variable, value in clean_pass.updates():
        pending[id(variable)] = (variable, value)
    final = [None] * len(gradients)
    for i, g in zip(present, descent):
        final[i] = g
    return _Part(outputs, loss, loss_sam, final, second_pass, list(values), finite)


def _hook(state, values, hook):
    """Calls a method hook with its state variables reading `values`.

    Returns the hook's result and the state's values after it (the hook's assignments
    are recorded, not written).
    """
    scope = _RecordingScope(state_mapping=list(zip(state, values)))
    with scope:
        result = hook()
    return result, [scope.get_current_value(v) for v in state]


def _run_pass(compute, variables, values, pending, scale):
    """Runs `compute` with `variables` reading `values`; no variable is written.

    `pending` holds state updates of earlier parts of the step, which this pass reads.
    With a loss scale, the gradients are those of the scaled loss.

    Returns the outputs, the loss, the gradients with respect to `values`, and the
    scope holding the state updates the pass would have made.
    """
    mapping = list(pending.values()) + list(zip(variables, values))
    scope = _RecordingScope(state_mapping=mapping)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(values)
        with scope:
            outputs, loss, _ = compute()
        scaled = loss if scale is None else tf.cast(loss, "float32") * scale
    return outputs, loss, tape.gradient(scaled, values), scope


def _prepare(gradient, factor, sparse_ok):
    """Rescales a raw gradient by `factor`; a sparse one stays sparse when allowed.

    A sparse gradient (an Embedding's `tf.IndexedSlices`) is coalesced, its duplicate
    indices summed: the norm is then the true one, and so is the wrapped optimizer's
    step (Keras's Adam squares the rows it is given, so duplicates would add squares
    instead of squaring the sum). Or it is made dense when the method needs that.
    """
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        if not sparse_ok:
            gradient = tf.convert_to_tensor(gradient)
        else:
            gradient = _coalesce(gradient)
    if factor is None:
        return gradient
    return _scaled(gradient, factor)


def _coalesce(gradient):
    """The same `tf.IndexedSlices` with each index once (its rows summed)."""
    unique, positions = tf.unique(gradient.indices)
    summed = tf.math.unsorted_segment_sum(gradient.values, positions, tf.size(unique))
    return tf.IndexedSlices(summed, unique, gradient.dense_shape)


def _scaled(gradient, factor):
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values * tf.cast(factor, gradient.values.dtype)
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return gradient * tf.cast(factor, gradient.dtype)


def _perturb(weight, perturbation, gradient):
    """`w + e`; for a sparse gradient, `e` is given on its rows only."""
    if perturbation is None:
        return weight
    if isinstance(gradient, tf.IndexedSlices):
        rows = tf.expand_dims(gradient.indices, -1)
        return tf.tensor_scatter_nd_add(weight, rows, tf.cast(perturbation, weight.dtype))
    return weight + perturbation


def _all_finite(tensors):
    checks = []
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, tf.IndexedSlices):
            t = t.values
        checks.append(tf.reduce_all(tf.math.is_finite(t)))
    return tf.reduce_all(tf.stack(checks))


def run_step(optimizer, computes, part_weights, variables):
    """One SAM step over the parts of a batch; commits and applies it, or skips it.

    Args:
        optimizer: the optimizer as handed over (see `resolve`).
        computes: one callable per part, running the forward pass and returning
            `(outputs, loss, tape)`; the tape is not used.
        part_weights: one weight per part (its share of the batch), summing to 1.
        variables: the Keras variables to train.

    Returns:
        The parts' `_Part` results, and the step's final gradients.
    """
    roles = resolve(optimizer)
    context = tf.distribute.get_replica_context()
    if context is None:
        raise ValueError(
            "A SAM step was called in a cross-replica context: under a "
            "`tf.distribute` strategy, call it inside `strategy.run(...)`."
        )
    _build(roles, variables)
    replicas = context.num_replicas_in_sync
    factor = None
    if roles.scaler is not None:
        factor = replicas / roles.scaler.dynamic_scale
    elif replicas > 1:
        factor = float(replicas)

    weights = [tf.identity(v.value) for v in variables]
    pending = {}
    parts = [_part(roles, c, variables, weights, pending, factor) for c in computes]
    if len(parts) == 1:
        gradients, state = parts[0].gradients, parts[0].state
    else:
        gradients = [
            None if gs[0] is None else _weighted_sum(gs, part_weights)
            for gs in zip(*[p.gradients for p in parts])
        ]
        # A method's state update is the size-weighted average of the parts' updates.
        state = [_weighted_sum(vs, part_weights) for vs in zip(*[p.state for p in parts])]
    finite = tf.reduce_all(tf.stack([p.finite for p in parts]))
    if replicas > 1:
        if state:  # the replicas keep one state: the average of their updates
            state = context.all_reduce(tf.distribute.ReduceOp.MEAN, state)
        # The wrapped optimizer sums the replicas' gradients.
        gradients = [None if g is None else _scaled(g, 1.0 / replicas) for g in gradients]
    _finish(roles, variables, gradients, state, list(pending.values()), finite)
    return parts, gradients


def _build(roles, variables):
    # The optimizers' variables are created here, outside any control-flow block.
    outer = roles.outer
    if not outer.built:
        if tf.distribute.has_strategy():
            raise ValueError(
                f"Build `{type(outer).__name__}` in the strategy's scope before the first "
                "step: `with strategy.scope(): optimizer.build(model.trainable_variables)` "
                "(variables cannot be created inside `strategy.run`). `SAMModel.fit` "
                "does it by itself."
            )
        with keras.name_scope(outer.name, caller=outer):
            outer.build(variables)
        outer.built = True


def _finish(roles, variables, gradients, state, updates, finite):
    """Commits the step and applies it, or skips it, alike on every replica."""
    method, scaler, applier = roles.method, roles.scaler, roles.applier
    state_variables = method.state_variables
    update_variables = [v for v, _ in updates]
    steps = method.accumulation_steps
    present = [g is not None for g in gradients]

    def commit(update_values, state_values):
        for variable, value in zip(update_variables, update_values):
            variable.assign(value)
        for variable, value in zip(state_variables, state_values):
            variable.assign(value)

    def apply_now(gradients, update_values, state_values):
        commit(update_values, state_values)
        applier.apply(gradients, variables)

    def accumulate(gradients, update_values, state_values):
        commit(update_values, [])
        _, gradient_sums, state_sums = method.accumulation_variables
        for total, g in zip(gradient_sums, gradients):
            if g is not None:
                total.assign_add(tf.convert_to_tensor(g))
        for total, value in zip(state_sums, state_values):
            total.assign_add(value)

    def apply_accumulated():
        _, gradient_sums, state_sums = method.accumulation_variables
        averages = [total.value / steps if p else None for total, p in zip(gradient_sums, present)]
        for variable, total in zip(state_variables, state_sums):
            variable.assign(total.value / steps)
        applier.apply(averages, variables)
        for total in gradient_sums + state_sums:
            total.assign(tf.zeros_like(total.value))

    def merge(strategy, finite, gradients, update_values, state_values):
        args = (gradients, update_values, state_values)
        # Every replica (and worker) takes the same branch: a replica skips only with
        # all the others.
        nonfinite = strategy.extended.call_for_each_replica(
            lambda f: tf.cast(tf.logical_not(f), tf.int32), args=(finite,)
        )
        ok = tf.equal(strategy.reduce(tf.distribute.ReduceOp.SUM, nonfinite, axis=None), 0)

        def take_step():
            if steps == 1:
                strategy.extended.call_for_each_replica(apply_now, args=args)
            else:
                strategy.extended.call_for_each_replica(accumulate, args=args)
                micro_steps = method.accumulation_variables[0]
                micro_steps.assign_add(1)

                def step_with_the_sums():
                    strategy.extended.call_for_each_replica(apply_accumulated)
                    micro_steps.assign(0)

                tf.cond(tf.equal(micro_steps.value, steps), step_with_the_sums, lambda: None)
            if scaler is not None:
                _grow_loss_scale(scaler)

        def skip_step():
            method.skipped_steps.assign_add(1)
            if scaler is not None:
                scaler.step_counter.assign(0)
                scaler.dynamic_scale.assign(scaler.dynamic_scale.value * 0.5)

        tf.cond(ok, take_step, skip_step)

    tf.distribute.get_replica_context().merge_call(
        merge, args=(finite, gradients, [value for _, value in updates], list(state))
    )


def _grow_loss_scale(scaler):
    """`LossScaleOptimizer`'s rule: double the scale after `dynamic_growth_steps` steps."""
    counter = scaler.step_counter.value
    grow = tf.equal(counter, scaler.dynamic_growth_steps - 1)
    scaler.step_counter.assign(tf.where(grow, tf.zeros_like(counter), counter + 1))
    scale = scaler.dynamic_scale.value
    scaler.dynamic_scale.assign(tf.where(grow, scale * 2.0, scale))


def optimize(method, grad_func, variables):
    """The custom-loop step: `pred, loss, loss_sam = method.optimize(grad_func, vars)`."""
    variables = _check_variables(variables)
    if not callable(grad_func):
        raise ValueError(
            "`grad_func` must be a callable returning `(predictions, loss, tape)`. "
            f"Received: grad_func={grad_func!r}"
        )

    def compute():
        result = grad_func()
        if not (isinstance(result, (tuple, list)) and len(result) == 3):
            raise ValueError(
                "`grad_func` must return `(predictions, loss, tape)`, with `tape` the "
                f"`tf.GradientTape` that recorded the loss. Received: {result!r}"
            )
        return result

    (part,), _ = run_step(method, [compute], [1.0], variables)
    return part.outputs, part.loss, part.loss_sam


def _check_variables(variables):
    variables = list(variables)
    if not variables:
        raise ValueError("`variables` is empty: there is nothing to train.")
    for i, v in enumerate(variables):
        if not isinstance(v, keras.Variable):
            raise ValueError(
                "`variables` must be Keras variables, such as "
                "`model.trainable_variables` or `keras.Variable(...)`. "
                f"Received at position {i}: {v!r}"
            )
    return variables


def checkpointable(variables):
    """A `tf.Module` holding `variables`, so that `tf.train.Checkpoint` saves them."""
    module = tf.Module(name="rng_states")
    module.states = [v.value for v in variables]
    return module


def train_step(sam_model, data):
    """`SAMModel.train_step` with a SAM optimizer: the m-sharpness loop around the passes."""
    method = resolve(sam_model.optimizer).method
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = sam_model.trainable_variables
    parts, weights = _split_batch((x, y, sample_weight), sam_model.num_batch_splits)

    if isinstance(method.perturb, tuple):
        method.bind(sam_model)
    computes = []
    for x_part, y_part, weight_part in parts:

        def compute(x_part=x_part, y_part=y_part, weight_part=weight_part):
            y_pred = sam_model(x_part, training=True)
            loss = sam_model.compute_loss(
                x=x_part, y=y_part, y_pred=y_pred, sample_weight=weight_part, training=True
            )
            return y_pred, loss, None

        computes.append(compute)

    results, _ = run_step(sam_model.optimizer, computes, weights, variables)

    if len(results) == 1:
        result = results[0]
        y_pred, loss, second_pass = result.outputs, result.loss, result.second_pass
        sharpness = result.loss_sam - loss
    else:
        y_pred = keras.tree.map_structure(
            lambda *p: tf.concat(p, axis=0), *[r.outputs for r in results]
        )
        loss = _weighted_sum([r.loss for r in results], weights)
        second_pass = _weighted_sum([tf.cast(r.second_pass, "float32") for r in results], weights)
        # Sharpness is averaged over the parts that took the perturbed pass (one-pass
        # parts have loss_sam == loss, so they add nothing to the sum).
        sharpness = _weighted_sum([r.loss_sam - r.loss for r in results], weights)
        sharpness = sharpness / tf.cast(tf.maximum(second_pass, 1e-12), sharpness.dtype)

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    batch_size = tf.shape(next(t for t in keras.tree.flatten(x) if t is not None))[0]
    # `compute_loss` divides by the replica count under tf.distribute; report per replica.
    sam_model._loss_tracker.update_state(loss * replicas, sample_weight=batch_size)
    sam_model.sharpness_tracker.update_state(sharpness * replicas, sample_weight=second_pass)
    sam_model.second_pass_tracker.update_state(second_pass)
    return sam_model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _split_batch(batch, num_splits):
    """Splits every tensor of `batch` along axis 0 into `num_splits` nearly equal parts.

    Returns the parts and their weights (part size over batch size). Sizes differ by at
    most one when the split is uneven.
    """
    if not num_splits or num_splits == 1:
        return [batch], [1.0]
    first = next(t for t in keras.tree.flatten(batch) if t is not None)
    static_size = first.shape[0]
    if static_size is not None:
        if static_size < num_splits:
            raise ValueError(
                f"A batch of {static_size} examples cannot be split into "
                f"num_batch_splits={num_splits} parts: use a batch of at least "
                f"{num_splits} examples or fewer splits."
            )
        sizes = [(static_size + i) // num_splits for i in range(num_splits)]
        weights = [s / static_size for s in sizes]
    else:
        size = tf.shape(first)[0]
        tf.debugging.assert_greater_equal(
            size,
            num_splits,
            message=f"num_batch_splits={num_splits} needs batches of at least {num_splits}",
        )
        sizes = [(size + i) // num_splits for i in range(num_splits)]
        weights = [tf.cast(s, "float32") / tf.cast(size, "float32") for s in sizes]

    flat = keras.tree.flatten(batch)
    pieces = [[None] * num_splits if t is None else tf.split(t, sizes) for t in flat]
    parts = [keras.tree.pack_sequence_as(batch, [p[i] for p in pieces]) for i in range(num_splits)]
    return parts, weights


def _weighted_sum(tensors, weights):
    if isinstance(tensors[0], tf.IndexedSlices):
        return _coalesce(
            tf.IndexedSlices(
                tf.concat([_scaled(t, w).values for t, w in zip(tensors, weights)], axis=0),
                tf.concat([t.indices for t in tensors], axis=0),
                tensors[0].dense_shape,
            )
        )
    return tf.add_n([tf.cast(w, t.dtype) * t for t, w in zip(tensors, weights)])
