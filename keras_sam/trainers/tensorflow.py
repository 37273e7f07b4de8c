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

Inside `tf.function`, a run-time error stops the step when the failing op feeds the
loss (`loss = tf.debugging.check_numerics(loss, ...)`). TensorFlow does not order an
assertion whose result feeds nothing before other ops, so such an assertion can fail
after the step was applied: make the loss depend on it.
"""

import typing

import keras
import tensorflow as tf


class _RecordingScope(keras.StatelessScope):
    """A stateless scope that remembers which variables were assigned, to commit them."""

    def __init__(self, state_mapping=None):
        super().__init__(state_mapping=state_mapping)
        self._assigned = {}

    def add_update(self, update):
        variable, _ = update
        self._assigned[id(variable)] = variable
        super().add_update(update)

    def commit(self):
        for variable in self._assigned.values():
            variable.assign(self.get_current_value(variable))


class PartResult(typing.NamedTuple):
    """What one SAM step (or one part of an m-sharpness step) produced."""

    outputs: object
    loss: object
    loss_sam: object  # the clean loss when the step took one pass
    gradients: list  # the gradients to descend with
    second_pass: object  # 1.0 when the perturbed pass ran, else 0.0 (float or tensor)
    state: list  # the method's new state values, one per `method.state_variables`


def sam_gradients(method, compute, variables):
    """Runs the passes of one step and returns the gradients to descend with.

    The method's state is read and assigned only inside stateless scopes: the new
    values are returned, and committed by the caller (`commit_state`) once the whole
    step (every part) has succeeded. The clean pass's own state updates (BatchNorm
    statistics, metrics) are committed here, after the perturbed pass.

    Args:
        method: a `keras_sam.SAM` (or variant) instance.
        compute: a callable with no arguments running the forward pass and returning
            `(outputs, loss, tape)`; the tape is not used, keras_sam differentiates
            with its own.
        variables: list of Keras variables to differentiate.

    Returns:
        A `PartResult`.
    """
    # The method's variables are created here, outside any control-flow block.
    method.build_once(variables)
    state = method.state_variables
    weights = [tf.identity(v.value) for v in variables]
    outputs, loss, gradients, clean_pass = _run_pass(compute, variables, weights)
    gradients = [_densify(g) for g in gradients]
    values = [v.value for v in state]

    decision, values = _hook(state, values, lambda: method.needs_second_pass(gradients, variables))
    present = [i for i, g in enumerate(gradients) if g is not None]

    def two_passes(values=values):
        perturbation, values = _hook(
            state, values, lambda: method.perturbation(gradients, variables)
        )
        perturbed = [w if e is None else w + e for w, e in zip(weights, perturbation)]
        _, loss_sam, perturbed_gradients, _ = _run_pass(compute, variables, perturbed)
        perturbed_gradients = [
            None if g is None else _densify(pg) for g, pg in zip(gradients, perturbed_gradients)
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

    # In a graph, make the commit wait for the perturbed pass, so that a run-time error
    # there (a NaN caught by `check_numerics`, say) also leaves the clean pass's state.
    with tf.control_dependencies([loss_sam] + list(descent) + list(values)):
        clean_pass.commit()
    gradients = [None] * len(gradients)
    for i, g in zip(present, descent):
        gradients[i] = g
    return PartResult(outputs, loss, loss_sam, gradients, second_pass, list(values))


def _hook(state, values, hook):
    """Calls a method hook with its state variables reading `values`.

    Returns the hook's result and the state's values after it (the hook's assignments
    are recorded, not written).
    """
    scope = _RecordingScope(state_mapping=list(zip(state, values)))
    with scope:
        result = hook()
    return result, [scope.get_current_value(v) for v in state]


def commit_state(method, values, dependencies):
    """Writes the method's new state, after `dependencies` (the step's gradients)."""
    if not values:
        return
    with tf.control_dependencies([d for d in dependencies if d is not None]):
        for variable, value in zip(method.state_variables, values):
            variable.assign(value)


def _run_pass(compute, variables, values):
    """Runs `compute` with `variables` reading `values`; no variable is written.

    Returns the outputs, the loss, the gradients with respect to `values`, and the
    scope holding the state updates the pass would have made.
    """
    scope = _RecordingScope(state_mapping=list(zip(variables, values)))
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(values)
        with scope:
            outputs, loss, _ = compute()
    return outputs, loss, tape.gradient(loss, values), scope


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

    result = sam_gradients(method, compute, variables)
    commit_state(method, result.state, result.gradients)
    _apply(method, result.gradients, variables)
    return result.outputs, result.loss, result.loss_sam


def _apply(method, gradients, variables):
    # In a graph, the optimizer's own updates (its step counter) would otherwise not
    # wait for the gradients, and could run although the step failed. Variables are
    # created first: XLA cannot lift their creation out of a control-dependency block.
    method.build_once(variables)
    with tf.control_dependencies([g for g in gradients if g is not None]):
        method.apply_descent_gradients(gradients, variables)


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


def _densify(gradient):
    # Sums duplicate indices, so the norm and the perturbation are the true ones.
    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


def train_step(sam_model, data):
    """`SAMModel.train_step` with a SAM optimizer: the m-sharpness loop around the passes."""
    method = sam_model.optimizer
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = sam_model.trainable_variables
    parts, weights = _split_batch((x, y, sample_weight), sam_model.num_batch_splits)

    if isinstance(method.perturb, tuple):
        method.bind(sam_model)
    results = []
    for x_part, y_part, weight_part in parts:

        def compute(x_part=x_part, y_part=y_part, weight_part=weight_part):
            with tf.GradientTape() as tape:
                y_pred = sam_model(x_part, training=True)
                loss = sam_model.compute_loss(
                    x=x_part, y=y_part, y_pred=y_pred, sample_weight=weight_part, training=True
                )
            return y_pred, loss, tape

        results.append(sam_gradients(method, compute, variables))

    if len(results) == 1:
        result = results[0]
        y_pred, loss, gradients, state = result.outputs, result.loss, result.gradients, result.state
        second_pass = result.second_pass
        sharpness = result.loss_sam - loss
    else:
        y_pred = keras.tree.map_structure(lambda *p: tf.concat(p, axis=0), *[r[0] for r in results])
        loss = _weighted_sum([r.loss for r in results], weights)
        second_pass = _weighted_sum([tf.cast(r.second_pass, "float32") for r in results], weights)
        # Sharpness is averaged over the parts that took the perturbed pass (one-pass
        # parts have loss_sam == loss, so they add nothing to the sum).
        sharpness = _weighted_sum([r.loss_sam - r.loss for r in results], weights)
        sharpness = sharpness / tf.cast(tf.maximum(second_pass, 1e-12), sharpness.dtype)
        gradients = [
            None if gs[0] is None else _weighted_sum(gs, weights)
            for gs in zip(*[r.gradients for r in results])
        ]
        # A method's state update is the size-weighted average of the parts' updates.
        state = [_weighted_sum(vs, weights) for vs in zip(*[r.state for r in results])]

    commit_state(method, state, gradients)
    _apply(method, gradients, variables)
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
    return tf.add_n([tf.cast(w, t.dtype) * t for t, w in zip(tensors, weights)])
