"""The passes of a step: for each part of the batch, the clean pass at `w` (or at the
point the method chose beforehand), the method's decision, the perturbed pass at
`w + e` and the method's final gradient (`run_part`); then the parts combined and the
step's verdict (`compute_step`). Nothing here writes a variable: the passes run in
stateless scopes, and what they produced (`StepResult`) goes to the commit
(`outcomes.finish`)."""

import typing

import keras
from keras import ops

from keras_sam.backends.base import RecordingScope, is_floating
from keras_sam.methods.hooks import SYNCHRONIZED, GradientNorms
from keras_sam.methods.sam import SAM
from keras_sam.step.records import StepResult, stateless_run

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


def compute_step(backend, roles, computes, part_weights, variables, real=None):
    """Runs the passes of every part; writes nothing.

    `real`: None, or one boolean tensor per part, False for a stand-in for an empty
    part (see `run_part`).

    Returns the parts' results and the step's (`StepResult`s): the step's final
    gradients, the method's new state and the clean passes' state updates, each the
    parts' combined, and its verdict (`_verdict`).
    """
    factor = _gradient_factor(backend, roles)
    weights = [ops.convert_to_tensor(v.value) for v in variables]
    pending, parts = {}, []  # `pending`: the state updates of the parts so far, by id
    for compute, is_real in zip(computes, real or [None] * len(computes)):
        part = run_part(backend, roles, compute, variables, weights, pending, factor, is_real)
        pending.update((id(variable), (variable, value)) for variable, value in part.updates)
        parts.append(part)
    gradients, state = _combined(backend, parts, part_weights)
    updates = list(pending.values())
    finite = _verdict(backend, parts, updates, state)
    if backend.num_replicas() > 1:
        gradients, state, updates, finite = backend.reduce_replicas(
            gradients, state, updates, finite
        )
    if len(parts) > 1:
        return parts, StepResult(gradients, state, updates, finite)
    # One part: its outputs and losses are the step's.
    return parts, parts[0]._replace(
        gradients=gradients, state=state, updates=updates, finite=finite
    )


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


def run_part(backend, roles, compute, variables, weights, pending, factor, real=None):
    """Runs the passes of one part and returns what they produced (a `StepResult`);
    writes nothing, and changes none of its arguments.

    The first pass is at `weights`, shifted by the method's `initial_perturbation` if
    it gives one; the perturbed pass, if taken, is relative to the first pass's point.
    The method's state is read and assigned only inside stateless scopes: the new
    values are returned. `pending` maps `id(variable)` to `(variable, value)`: the
    state updates of the earlier parts, which the passes read. The clean pass's own
    state updates (BatchNorm statistics, seed generators, metrics) are returned
    (`updates`), for the next part to read and the step to commit.

    `factor` turns the raw gradients into the part's mean gradient: one over the loss
    scale, times `Backend.replica_loss_divisor`.

    `real` (a boolean tensor, or None for True) is False for a stand-in for an empty
    part (`Backend.dynamic_split`): its state updates are the values before it, so the
    next part reads the state as it was. Its other results need no mask: it runs on
    the batch's first example with the state the part holding that example reads, so
    it computes exactly what that part computes (finite when that one is), and it has
    weight 0.

    The part's verdict (`finite`) costs no pass of its own over the clean
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
    return StepResult(
        gradients, list(values), updates, finite, outputs, loss, loss_sam, second_pass
    )


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
