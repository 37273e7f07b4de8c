"""The step's entry points: `run_step` (the custom loops' one step over the parts of a
batch) and `model_step` (`SAMModel.train_step`: the m-sharpness parts of a batch, the
step, and its logs), with what they share (`prepare_step`, `split_batch`,
`check_variables`)."""

import functools
import math

import keras
from keras import ops

from keras_sam.backends.base import is_floating, unique
from keras_sam.step.outcomes import finish, no_change
from keras_sam.step.passes import compute_step
from keras_sam.step.records import resolve


def run_step(backend, optimizer, computes, part_weights, variables):
    """One SAM step over the parts of a batch; commits and applies it, or skips it.

    Args:
        backend: the `Backend` adapter.
        optimizer: the optimizer as handed over (see `resolve`).
        computes: one callable per part, running the forward pass and returning
            `(outputs, loss, anything)`.
        part_weights: one weight per part (its share of the batch), summing to 1.
        variables: the Keras variables to train.

    Returns:
        The step's `StepResult` (for one part, its outputs, loss and `loss_sam` too).
    """
    roles = prepare_step(backend, optimizer, variables)
    _, result = compute_step(backend, roles, computes, part_weights, variables)
    finish(backend, roles, variables, result)
    return result


def prepare_step(backend, optimizer, variables):
    """Checks where the step runs and builds the optimizers; returns the `Roles`."""
    roles = resolve(optimizer)
    backend.check_context()
    backend.build(roles.outer, variables)
    return roles


def check_variables(variables):
    """The custom loop's `variables`: a non-empty list of Keras variables."""
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


# ------------------------------------------------------------------------ model.fit
def model_step(backend, sam_model, data):
    """`SAMModel.train_step` with a SAM optimizer: the m-sharpness parts around the step.

    Stateful: reads and assigns Keras variables (the JAX trainer runs it inside a
    stateless scope holding the step's state). Returns the logs.
    """
    variables = sam_model.trainable_variables
    roles = prepare_step(backend, sam_model.optimizer, variables)
    method = roles.method
    if method.binds_model:
        method.bind(sam_model)
    replica_step = functools.partial(_replica_step, backend, sam_model, roles, variables)
    readable = unique(
        sam_model.trainable_variables
        + sam_model.non_trainable_variables
        + list(roles.outer.variables)
    )
    result = backend.per_replica(replica_step, data, method, readable)
    finish(backend, roles, variables, result)
    _update_metrics(backend, sam_model, data, result)
    return _logs(sam_model, method)


def _logs(sam_model, method):
    """The step's logs: the model's metrics, `skipped_steps`, and `sharpness` and
    `second_pass_rate` where the method gives them (`measures_sharpness`,
    `may_skip_second_pass`); NaN for the loss and metrics while no step of the epoch
    has been applied.

    The step adds a skipped step to no metric, so an epoch of skipped steps would log
    Keras's mean of nothing, 0: a perfect loss. The loss tracker counts the examples of
    the applied steps; while it is 0 every metric but `skipped_steps` logs NaN, as
    plain Keras's would on NaN data. A tensor operation, no synchronization: it runs
    inside the compiled step.
    """
    logs = sam_model.get_metrics_result()
    logs["skipped_steps"] = ops.copy(method.skipped_steps.value)  # a tensor, not the variable
    drop = () if method.may_skip_second_pass else ("second_pass_rate",)
    if not method.measures_sharpness:  # MomentumSAM: no pass at `w`
        drop += ("sharpness",)
    for name in drop:
        logs.pop(name, None)
    applied = sam_model._loss_tracker.count > 0
    nan = None
    for name, value in logs.items():
        if isinstance(value, float):  # Keras < 3.14 on PyTorch logs some as Python floats
            value = ops.convert_to_tensor(value)
        if name != "skipped_steps" and is_floating(value):
            if nan is None:
                nan = ops.convert_to_tensor(math.nan, "float32")
            logs[name] = ops.where(applied, value, nan)
    return logs


def _replica_step(backend, sam_model, roles, variables, data):
    """The passes over this replica's batch, with its logs (a `StepResult`); writes
    nothing."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    parts, weights, sizes = split_batch(backend, (x, y, sample_weight), sam_model.num_batch_splits)
    computes = [functools.partial(_model_pass, sam_model, *part) for part in parts]
    real = None if sizes is None else [ops.greater(s, 0) for s in sizes]
    parts, result = compute_step(backend, roles, computes, weights, variables, real)
    outputs, loss, second_pass, sharpness = _summary(backend, parts, weights, sizes)
    return result._replace(outputs=outputs, loss=loss, second_pass=second_pass, sharpness=sharpness)


def _model_pass(sam_model, x, y, sample_weight):
    """The model's forward pass and loss on one part: `(predictions, loss, None)`."""
    y_pred = sam_model(x, training=True)
    loss = sam_model.compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )
    return y_pred, loss, None


def _update_metrics(backend, sam_model, data, result):
    """Adds the step to the logs if it was taken.

    The logs average over the steps that were applied: a skipped step (a NaN batch)
    adds nothing to `loss`, the metrics or `sharpness`, and shows in `skipped_steps`.
    `compute_loss` divides by the replica count under `tf.distribute`: the logs are
    per replica.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    divisor = backend.replica_loss_divisor()
    batch_size = ops.shape(next(t for t in keras.tree.flatten(x) if t is not None))[0]
    update = functools.partial(
        _update_trackers, sam_model, result, divisor, batch_size, x, y, sample_weight
    )
    backend.stateful_cond(result.finite, update, no_change, list(sam_model.metrics_variables))


def _update_trackers(sam_model, result, divisor, batch_size, x, y, sample_weight):
    loss, sharpness = result.loss, result.sharpness
    if divisor != 1:
        loss, sharpness = loss * divisor, sharpness * divisor
    sam_model._loss_tracker.update_state(loss, sample_weight=batch_size)
    sam_model.step_statistics.update_state(sharpness, result.second_pass)
    _update_compiled_metrics(sam_model, x, y, result.outputs, sample_weight)


def _update_compiled_metrics(sam_model, x, y, y_pred, sample_weight):
    """`compute_metrics`'s updates, without the results it computes along (the step
    reads them once, after the decision). A subclass's own `compute_metrics` is
    called as it is."""
    if type(sam_model).compute_metrics is not keras.Model.compute_metrics:
        sam_model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    elif sam_model._compile_metrics is not None:
        sam_model._compile_metrics.update_state(y, y_pred, sample_weight=sample_weight)


def _summary(backend, results, weights, sizes=None):
    """The predictions, clean loss, two-pass fraction and sharpness of a step's parts.

    `sizes` (tensors, or None): each part's number of examples; a stand-in for an empty
    part adds no predictions.
    """
    if len(results) == 1:
        result = results[0]
        second_pass = ops.cast(result.second_pass, "float32")
        return result.outputs, result.loss, second_pass, result.loss_sam - result.loss
    outputs = [r.outputs for r in results]
    if sizes is not None:
        outputs = [
            keras.tree.map_structure(lambda t, size=size: t[:size], o)
            for o, size in zip(outputs, sizes)
        ]
    outputs = keras.tree.map_structure(lambda *p: backend.concatenate(p), *outputs)
    loss = backend.weighted_sum([r.loss for r in results], weights)
    second_pass = backend.weighted_sum(
        [ops.cast(r.second_pass, "float32") for r in results], weights
    )
    # Sharpness is averaged over the parts that took the perturbed pass (one-pass parts
    # have loss_sam == loss, so they add nothing to the sum).
    sharpness = backend.weighted_sum([r.loss_sam - r.loss for r in results], weights)
    sharpness = sharpness / ops.cast(ops.maximum(second_pass, 1e-12), sharpness.dtype)
    return outputs, loss, second_pass, sharpness


def split_batch(backend, batch, num_splits):
    """Splits every tensor of `batch` along axis 0 into `num_splits` nearly equal parts.

    Returns the parts, their weights (part size over batch size) and, for a batch whose
    size is known only when the step runs, the parts' sizes as tensors (else None).
    Sizes differ by at most one when the split is uneven. A batch smaller than
    `num_splits` (the last batch of an epoch, say) is split into as many parts of one
    example as it has examples: statically, that many parts; at run time, `num_splits`
    parts of which the empty ones take no part in the step (see `dynamic_split`).

    Tensors of different sizes (an `x` batch of 8 and a `y` batch of 7) get Keras's own
    error for arrays of different sizes, before anything changes.
    """
    if not num_splits or num_splits == 1:
        return [batch], [1.0], None
    flat = keras.tree.flatten(batch)
    static_sizes = [t.shape[0] for t in flat if t is not None]
    if any(size is None for size in static_sizes):
        return backend.dynamic_split(batch, num_splits)
    if len(set(static_sizes)) > 1:
        _raise_cardinality_error(batch)
    static_size = static_sizes[0]
    num_splits = min(num_splits, static_size)
    if num_splits <= 1:
        return [batch], [1.0], None
    sizes = [(static_size + i) // num_splits for i in range(num_splits)]
    weights = [s / static_size for s in sizes]
    ends = [sum(sizes[: i + 1]) for i in range(num_splits)]
    starts = [0] + ends[:-1]

    pieces = [
        [None] * num_splits if t is None else [t[a:b] for a, b in zip(starts, ends)] for t in flat
    ]
    parts = [keras.tree.pack_sequence_as(batch, [p[i] for p in pieces]) for i in range(num_splits)]
    return parts, weights, None


def _raise_cardinality_error(batch):
    """Keras's `fit` error for arrays of different sizes, for one batch."""
    message = (
        "Data cardinality is ambiguous. Make sure all arrays contain the same number of samples."
    )
    for label, data in zip(["x", "y", "sample_weight"], batch):
        if data is None:
            continue
        sizes = ", ".join(str(t.shape[0]) for t in keras.tree.flatten(data) if t is not None)
        message += f"'{label}' sizes: {sizes}\n"
    raise ValueError(message)
