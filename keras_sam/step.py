"""The SAM step, written once for every backend.

A step runs, for each part of the batch (one part, or `num_batch_splits` parts for
m-sharpness): the clean pass at `w` (at a point the method chose beforehand, for a method
with an `initial_perturbation` such as MomentumSAM); the method's decision whether to
take the perturbed pass; the perturbed pass at `w + e`; the method's final gradient. It
then takes one decision for the whole step: when a loss or a gradient of any pass, or a
state update it would commit, is NaN or infinite, the step is skipped (nothing changes
but `skipped_steps` and, under loss scaling, the loss scale); otherwise the clean pass's
state updates (BatchNorm statistics, seeds) and the method's state are committed and the
wrapped optimizer steps (under gradient accumulation: the SAM gradient is added to the
sums, and the optimizer steps every k-th micro-batch). What the optimizer wrote (weights,
slots, sums) is checked in turn: if any of it is NaN or infinite, every variable is
restored from a copy taken before the commit and the step is skipped all the same.

Nothing is written to a variable before that decision. Both passes run inside a
`keras.StatelessScope` whose state mapping gives the trained variables as tensors: the
clean pass reads `w` and its state updates are recorded; the perturbed pass reads
`w + e` and its updates are dropped. So the weights are never perturbed in place, a pass
that raises leaves every variable as it was, BatchNorm statistics come from the clean
pass alone, and both passes see the same dropout masks.

What differs between backends is small and lives in `keras_sam/backends/`: how the
gradient of one pass is taken (tape, `jax.grad`, autograd), sparse gradients, how the
replicas of a distribution agree, and how the commit-or-skip decision is taken (a
`tf.cond` in the cross-replica context, a functional `lax.cond`, a Python `if`). They
subclass `keras_sam.backends.base.Backend`. This module is written with `keras.ops` and
never imports a backend.
"""

import functools
import math
import typing

import keras
from keras import ops

from keras_sam.backends.base import RecordingScope, is_floating, unique
from keras_sam.methods.hooks import SYNCHRONIZED, GradientNorms, unwrap_loss_scale
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


class Part(typing.NamedTuple):
    """What one part of a step (the whole batch, or one m-sharpness part) produced."""

    outputs: object
    loss: object
    loss_sam: object  # the clean loss when the part took one pass
    gradients: list  # the part's final gradients (its own mean's), None where none
    second_pass: object  # 1.0 when the perturbed pass ran, else 0.0 (float or tensor)
    state: list  # the method's new state values, one per `method.state_variables`
    finite: object  # whether every loss and gradient of the part is finite
    updates: list  # the clean pass's state updates, `(variable, value)` pairs


def stateless_run(variables, values, fn):
    """Calls `fn()` with `variables` reading `values`.

    Returns its result and the variables' values after it (its assignments are
    recorded, not written).
    """
    scope = RecordingScope(state_mapping=list(zip(variables, values)))
    with scope:
        result = fn()
    return result, [scope.get_current_value(v) for v in variables]


def _part(backend, roles, compute, variables, weights, pending, factor, real=None):
    """Runs the passes of one part and returns what they produced (`Part`); writes
    nothing, and changes none of its arguments.

    The first pass is at `weights`, shifted by the method's `initial_perturbation` if
    it gives one; the perturbed pass, if taken, is relative to the first pass's point.
    The method's state is read and assigned only inside stateless scopes: the new
    values are returned. `pending` maps `id(variable)` to `(variable, value)`: the
    state updates of the earlier parts, which the passes read. The clean pass's own
    state updates (BatchNorm statistics, seed generators, metrics) are returned
    (`Part.updates`), for the next part to read and the step to commit.

    `factor` turns the raw gradients into the part's mean gradient: one over the loss
    scale, times `Backend.replica_loss_divisor`.

    `real` (a boolean tensor, or None for True) is False for a stand-in for an empty
    part (`Backend.dynamic_split`): its state updates are the values before it, so the
    next part reads the state as it was. Its other results need no mask: it runs on
    the batch's first example with the state the part holding that example reads, so
    it computes exactly what that part computes (finite when that one is), and it has
    weight 0.

    The part's verdict (`Part.finite`) costs no pass of its own over the clean
    gradients: their per-tensor norms, taken once, give both the perturbation's norm
    and the check (`_tame`). The final gradients take one reduction each, the losses
    join them, and the verdict is one comparison of all those norms.
    """
    run = _PartRun(backend, roles, compute, variables, pending, factor)
    values = [v.value for v in roles.method.state_variables]
    weights, values = run.start(weights, values)
    values = run.add_teacher(weights, values)
    outputs, loss, clean_updates = run.clean_pass(weights)
    loss_sam, descent, values, descent_norms, second_pass = run.final_gradients(
        weights, values, loss
    )
    finite = _tame(_concatenated([run.clean.norms, descent_norms]))
    updates = _kept_updates(clean_updates, pending, real)
    gradients = [None] * len(variables)
    for i, g in zip(run.present, descent):
        gradients[i] = g
    return Part(outputs, loss, loss_sam, gradients, second_pass, list(values), finite, updates)


def _concatenated(vectors):
    """The vectors that are not None, as one."""
    vectors = [v for v in vectors if v is not None]
    return vectors[0] if len(vectors) == 1 else ops.concatenate(vectors)


def _kept_updates(updates, pending, real):
    """The clean pass's `(variable, value)` state updates as the step keeps them: for a
    stand-in part (`real` False), the value each variable had before it."""
    if real is None:
        return list(updates)
    kept = []
    for variable, value in updates:
        before = pending[id(variable)][1] if id(variable) in pending else variable.value
        kept.append((variable, ops.where(real, value, before)))
    return kept


class _Clean(typing.NamedTuple):
    """The clean pass's gradients as the method reads them, and their norms."""

    gradients: list  # one per variable, None where none
    rows: list  # what a method reads of each (a sparse gradient's rows)
    norms: object  # float32 norm of each present gradient's rows, a vector (or None)


class _PartRun:
    """The passes of one part, as named steps: the starting point, the clean pass, then
    the final gradients (the perturbed pass or the one-pass gradient). Holds what they
    share; `clean` is dropped before the perturbed pass when the method's final
    gradient does not read it (SAM), so that a step holds one parameter-sized buffer
    beyond plain training's during that pass."""

    def __init__(self, backend, roles, compute, variables, pending, factor):
        method = roles.method
        self.backend, self.method, self.compute = backend, method, compute
        self.variables, self.pending, self.factor = variables, pending, factor
        self.state = method.state_variables
        self.synchronized = backend.num_replicas() > 1 and (
            method.distributed_perturbation == SYNCHRONIZED
        )
        self.sparse_ok = method.keeps_sparse_gradients and not self.synchronized
        self.scale = None if roles.scaler is None else roles.scaler.dynamic_scale
        self.clean = None
        self.present = []
        self.added = False  # whether `compute` adds the method's loss term (`add_teacher`)

    def stateless(self, values, fn):
        """`fn()` with the method's state reading `values`; returns its result and the
        state's new values."""
        return stateless_run(self.state, values, fn)

    def start(self, weights, values):
        """The first pass's point: `w`, or `w + e` for a method that shifts it
        (MomentumSAM's `initial_perturbation`). Returns it and the method's state.

        The method's `pass_values` (FlatLoRA's noisy frozen kernels) join what the
        passes read (`pending`), never written."""
        method = self.method
        (shift, reads), values = self.stateless(
            values,
            lambda: (
                method.initial_perturbation(self.variables),
                method.pass_values(self.variables),
            ),
        )
        if reads:
            self.pending = {**self.pending, **{id(v): (v, value) for v, value in reads}}
        if shift is not None:
            weights = self.backend.perturbed(weights, list(shift), [None] * len(weights))
        return weights, values

    def add_teacher(self, weights, values):
        """The method's added loss term (`teacher_values`, `added_loss`; MESA's).

        When the method gives teacher values, one forward pass at them (no gradient; its
        loss and state updates dropped) gives the teacher's outputs, and every pass of the
        part then differentiates `loss + method.added_loss(outputs, teacher_outputs)`.
        The loss it reports stays the task loss. Returns the method's state.
        """
        method = self.method
        teacher, values = self.stateless(values, lambda: method.teacher_values(self.variables))
        if teacher is None:
            return values
        teacher = [w if t is None else t for w, t in zip(weights, teacher)]
        scope = RecordingScope(
            state_mapping=list(self.pending.values()) + list(zip(self.variables, teacher))
        )
        with scope:
            teacher_outputs, _, _ = self.compute()
        teacher_outputs = keras.tree.map_structure(ops.stop_gradient, teacher_outputs)
        divisor = self.backend.replica_loss_divisor()
        self.compute = _with_added_loss(method, self.compute, teacher_outputs, divisor)
        self.added = True
        return values

    def pass_gradients(self, weights):
        """`Backend.gradients` of one pass at `weights`: the outputs, the task loss, the
        raw gradients (of the loss with the method's added term, if any) and the pass's
        state updates."""
        outputs, loss, gradients, updates = self.backend.gradients(
            self.compute, self.variables, weights, self.pending, self.scale
        )
        if self.added:
            outputs, loss, _ = outputs
        return outputs, loss, gradients, updates

    def clean_pass(self, weights):
        """The gradients at `weights` (`self.clean`); returns the outputs, the loss and
        the pass's state updates."""
        backend = self.backend
        outputs, loss, gradients, updates = self.pass_gradients(weights)
        gradients = [backend.prepare(g, self.factor, self.sparse_ok) for g in gradients]
        self.present = [i for i, g in enumerate(gradients) if g is not None]
        if self.synchronized:
            # Every replica perturbs with the gradient of the global batch.
            reduced = backend.all_reduce_mean([gradients[i] for i in self.present])
            for i, g in zip(self.present, reduced):
                gradients[i] = g
        rows = [backend.rows(g) for g in gradients]
        norms = _norms(backend, [rows[i] for i in self.present])
        self.clean = _Clean(gradients, rows, norms)
        return outputs, loss, updates

    def final_gradients(self, weights, values, loss):
        """The method's decision, then the perturbed pass or the one-pass gradient.

        Returns the perturbed loss, the final gradients of the present variables, the
        method's new state, the norms of those gradients (a vector, or None), and
        whether the perturbed pass ran (1.0 or 0.0, a tensor for a decision taken when
        the step runs).
        """
        decision, values = self.stateless(
            values, lambda: self.method.needs_second_pass(self.clean.rows, self.variables)
        )
        if not isinstance(decision, bool):
            taken = self.backend.cond(
                decision,
                lambda: self.two_passes(weights, values, loss),
                lambda: self._with_norms(self.one_pass(values, loss)),
            )
            return (*taken, ops.cast(decision, "float32"))
        if decision:
            return (*self.two_passes(weights, values, loss, release=True), 1.0)
        return (*self.one_pass(values, loss), 0.0)

    def two_passes(self, weights, values, loss, release=False):
        """The perturbed pass; returns its loss, the final gradients of the present
        variables, the method's new state and the norms of those gradients and of the
        two losses (`loss` the clean one).

        `release`: whether this is the only branch (a decision taken when the step is
        traced), so that the clean gradients may be let go once used.
        """
        backend, method, clean = self.backend, self.method, self.clean
        present_rows = [clean.rows[i] for i in self.present]
        method.gradient_norms = GradientNorms(present_rows, clean.norms)
        try:
            perturbation, values = self.stateless(
                values, lambda: method.perturbation(clean.rows, self.variables)
            )
        finally:
            method.gradient_norms = None
        del present_rows
        gradients = clean.gradients
        if release and not _reads_clean_gradients(method):
            # SAM descends with the perturbed gradient alone: the clean one goes as
            # `w + e` is formed, so that the step holds one more parameter-sized
            # buffer than plain training, not two.
            self.clean = clean._replace(gradients=None, rows=None)
            released = [clean.gradients, clean.rows]
            gradients = [None] * len(gradients)
        else:
            released = []
        perturbed = _perturbed_weights(backend, weights, perturbation, clean.gradients, released)
        clean = perturbation = None  # let them go (the lists are emptied already)
        with backend.same_randomness():
            _, loss_sam, perturbed_gradients, _ = self.pass_gradients(perturbed)
        del perturbed
        present = set(self.present)
        perturbed_gradients = [
            backend.prepare(pg, self.factor, self.sparse_ok) if i in present else None
            for i, pg in enumerate(perturbed_gradients)
        ]
        descent, values = self.stateless(
            values,
            lambda: method.descent_gradients(gradients, perturbed_gradients, self.variables),
        )
        descent = [descent[i] for i in self.present]
        return loss_sam, descent, values, self._norms_of(descent, [loss, loss_sam])

    def one_pass(self, values, loss):
        """The final gradients without the perturbed pass (the clean loss stands for the
        perturbed one)."""
        clean = self.clean
        descent, values = self.stateless(
            values, lambda: self.method.one_pass_gradients(clean.gradients, self.variables)
        )
        descent = [descent[i] for i in self.present]
        return loss, descent, values, self._norms_of(descent, [loss])

    def _with_norms(self, result):
        """`one_pass`'s result with norms of the shape `two_passes` gives (the final
        gradients' and two losses'), for the other branch of a conditional."""
        loss, descent, values, norms = result
        if self.clean.norms is not None and norms.shape[0] == 1:
            # Only the loss's: the final gradients are the clean ones.
            norms = ops.concatenate([self.clean.norms, norms])
        # The loss once more, where `two_passes` gives the perturbed loss.
        return loss, descent, values, ops.concatenate([norms, norms[-1:]])

    def _norms_of(self, descent, losses):
        """The norms of the final gradients (not taken again when they are the clean
        ones: those are in the verdict already) and the magnitudes of `losses`, in one
        vector: a loss of 2**63 or more has diverged as surely as an infinite one."""
        clean = self.clean
        losses = [ops.cast(v, "float32") for v in losses]
        if clean.gradients is not None and all(
            d is clean.gradients[i] for d, i in zip(descent, self.present)
        ):
            return _norms(self.backend, losses)
        return _norms(self.backend, [self.backend.rows(d) for d in descent] + losses)


def _with_added_loss(method, compute, teacher_outputs, divisor=1):
    """`compute` with the method's added term in the loss it returns; the outputs it
    returns carry the task loss and the term, `(outputs, loss, term)`.

    `divisor` (`Backend.replica_loss_divisor`): the term is divided as the loss is (under
    `tf.distribute` each replica's loss is its share of the global mean), so that the
    step's gradient factor brings both back to the replica's mean."""

    def compute_with_term():
        outputs, loss, extra = compute()
        term = method.added_loss(outputs, teacher_outputs)
        if divisor != 1:
            term = term / divisor
        loss_dtype = keras.backend.standardize_dtype(ops.convert_to_tensor(loss).dtype)
        total = loss + ops.cast(term, loss_dtype)
        return (outputs, loss, term), total, extra

    return compute_with_term


def _reads_clean_gradients(method):
    """Whether the method's final gradient after two passes reads the clean one (GSAM,
    LookSAM: yes; SAM: no)."""
    return type(method).descent_gradients is not SAM.descent_gradients


def _perturbed_weights(backend, weights, perturbation, gradients, released=()):
    """`w + e` for each variable (`Backend.perturbed`).

    Empties the lists in `released` first (the clean gradients and what the method read
    of them): the step then holds `e` and `w + e`, not the clean gradients beside them.
    `perturbation` is handed over (the backend may let each entry go once used).
    """
    # Only a sparse gradient is kept: its indices place `e`'s rows.
    gradients = [None if g is None or backend.rows(g) is g else g for g in gradients]
    for entries in released:
        entries[:] = [None] * len(entries)
    return backend.perturbed(weights, perturbation, gradients)


# A tensor whose float32 norm is below 2**63 has every square finite in float32 (each
# below 2**126): a tame gradient cannot overflow Adam's second moment, for one. NaN and
# inf are never below it.
TAME_NORM = 2.0**63


def _norms(backend, tensors):
    """The float32 norm of each tensor (`Backend.norms`), None for no tensor."""
    return backend.norms(tensors) if tensors else None


def _tame(norms):
    """Whether every norm is below `TAME_NORM` (True for none)."""
    if norms is None:
        return ops.convert_to_tensor(True)
    return ops.all(norms < TAME_NORM)


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
        The parts' `Part` results, and the step's final gradients.
    """
    roles = prepare_step(backend, optimizer, variables)
    parts, gradients, state, updates, finite = compute_step(
        backend, roles, computes, part_weights, variables
    )
    _finish(backend, roles, variables, gradients, state, updates, finite)
    return parts, gradients


def prepare_step(backend, optimizer, variables):
    """Checks where the step runs and builds the optimizers; returns the `Roles`."""
    roles = resolve(optimizer)
    backend.check_context()
    backend.build(roles.outer, variables)
    return roles


def compute_step(backend, roles, computes, part_weights, variables, real=None):
    """Runs the passes of every part; writes nothing.

    `real`: None, or one boolean tensor per part, False for a stand-in for an empty
    part (see `_part`).

    Returns the parts' `Part` results, the step's final gradients, the method's new
    state, the clean passes' state updates (`(variable, value)` pairs) and whether
    everything was finite.
    """
    factor = _gradient_factor(backend, roles)
    weights = [ops.convert_to_tensor(v.value) for v in variables]
    pending, parts = {}, []  # `pending`: the state updates of the parts so far, by id
    for compute, is_real in zip(computes, real or [None] * len(computes)):
        part = _part(backend, roles, compute, variables, weights, pending, factor, is_real)
        pending.update((id(variable), (variable, value)) for variable, value in part.updates)
        parts.append(part)
    gradients, state = _combined(backend, parts, part_weights)
    updates = list(pending.values())
    finite = _verdict(backend, parts, updates, state)
    if backend.num_replicas() > 1:
        gradients, state, updates, finite = backend.reduce_replicas(
            gradients, state, updates, finite
        )
    return parts, gradients, state, updates, finite


def _gradient_factor(backend, roles):
    """What turns a pass's raw gradients into its mean gradient (None: nothing): one
    over the loss scale, times `Backend.replica_loss_divisor` under replicas."""
    divisor = backend.replica_loss_divisor()
    if roles.scaler is not None:
        return divisor / roles.scaler.dynamic_scale
    if divisor > 1:
        return float(divisor)
    return None


def _combined(backend, parts, part_weights):
    """The step's final gradients and the method's new state: each the size-weighted
    average of the parts' (a method's state update too)."""
    if len(parts) == 1:
        return parts[0].gradients, parts[0].state
    gradients = [
        None if gs[0] is None else backend.weighted_sum(gs, part_weights)
        for gs in zip(*[p.gradients for p in parts])
    ]
    state = [backend.weighted_sum(vs, part_weights) for vs in zip(*[p.state for p in parts])]
    return gradients, state


def _verdict(backend, parts, updates, state):
    """Whether the step may be taken: every part finite, and what the step would commit
    tame too (an input of 1e20 can make a BatchNorm moving variance infinite while
    every loss and gradient is finite)."""
    finite = parts[0].finite if len(parts) == 1 else ops.all(ops.stack([p.finite for p in parts]))
    floating = [value for _, value in updates if is_floating(value)] + [
        value for value in state if is_floating(value)
    ]
    if floating:
        finite = ops.logical_and(finite, _tame(_norms(backend, floating)))
    return finite


def _finish(backend, roles, variables, gradients, state, updates, finite):
    """Commits the step and applies it, or skips it (alike on every replica)."""
    outcomes = _Outcomes(backend, roles, variables, gradients, [v for v, _ in updates])
    args = (gradients, [value for _, value in updates], list(state))
    backend.decide(finite, outcomes.take, outcomes.skip, outcomes.tracked, args=args)


class _Outcomes:
    """What a step does once its passes are done, one method per outcome.

    The verdict (`finite`, see `_verdict`): every loss finite, and every gradient,
    state update and method state tame (`TAME_NORM`). Then:

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
        backend.stateful_cond(full, self.apply_accumulated, _no_change, self.tracked)

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


def _no_change():
    """The outcome that writes nothing."""


def _sums(method):
    """The gradient and state sums of gradient accumulation (none without it)."""
    if method.accumulation_steps == 1:
        return []
    _, gradient_sums, state_sums = method.accumulation_variables
    return list(gradient_sums) + list(state_sums)


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
    _finish(
        backend, roles, variables, result.gradients, result.state, result.updates, result.finite
    )
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
    """The passes over this replica's batch (`StepResult`); writes nothing."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    parts, weights, sizes = split_batch(backend, (x, y, sample_weight), sam_model.num_batch_splits)
    computes = [functools.partial(_model_pass, sam_model, *part) for part in parts]
    real = None if sizes is None else [ops.greater(s, 0) for s in sizes]
    results, gradients, state, updates, finite = compute_step(
        backend, roles, computes, weights, variables, real
    )
    summary = _summary(backend, results, weights, sizes)
    return StepResult(gradients, state, updates, finite, *summary)


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
    backend.stateful_cond(result.finite, update, _no_change, list(sam_model.metrics_variables))


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


class StepResult(typing.NamedTuple):
    """What a replica's passes produced, for the commit-or-skip decision and the logs."""

    gradients: list
    state: list
    updates: list  # (variable, value) pairs
    finite: object
    outputs: object
    loss: object
    second_pass: object
    sharpness: object


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
