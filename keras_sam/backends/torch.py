"""The PyTorch adapter: what keras_sam needs of torch and cannot write with `keras.ops`."""

import contextlib
import sys

import keras
import torch

from keras_sam import maths, step
from keras_sam.backends import base
from keras_sam.methods import hooks, sam

# ------------------------------------------------------------------------- the SAM step
# PyTorch runs eagerly: the gradient of a pass is `torch.autograd.grad` of the loss with
# respect to fresh leaf tensors that the trained variables read (a `StatelessScope`), and
# the step's conditionals are Python `if`s on the tensors' values. The rest of the step
# runs under `torch.no_grad()`: only the passes build a graph, and the commit assigns
# the variables in place as Keras's own PyTorch trainer does.
#
# Data parallel. Keras 3.15 has no `keras.distribution` for PyTorch (its torch backend has
# no `distribution_lib`: `DataParallel()` cannot list devices, and with devices given it
# changes nothing), and its PyTorch trainer and optimizers never all-reduce: Keras's
# multi-GPU guide wraps the model in `torch.nn.parallel.DistributedDataParallel`, whose
# hooks average the gradients in `loss.backward()`, which the SAM step never calls. So
# the adapter does it with `torch.distributed`: when a process group is initialized, each
# of its processes is a replica running the step on its own batch, and the step ends with
# one all-reduce of one flat buffer: the final gradients, the method's state, the clean
# pass's floating state updates (BatchNorm statistics) and the processes' vote on whether
# every pass was finite. The synchronized mode averages the clean gradient first (one
# more all-reduce).


class Torch(base.Backend):
    # Keras's PyTorch dropout without a `seed` draws its mask from torch's global
    # generator, not from a Keras seed generator: each clean pass records that generator's
    # state before and after it, and the perturbed pass replays it (`same_randomness`).
    _before_clean = _after_clean = None
    _replaying = False

    #
    # Under `torch.compile` reading or setting a generator's state breaks the graph
    # (dynamo never traces `torch.get_rng_state`): a compiled step records and replays
    # it only for a model that may draw from that generator (`train_step`).
    _records_rng = True

    def gradients(self, compute, variables, values, pending, scale):
        if not self._records_rng:
            return self._gradients(compute, variables, values, pending, scale)
        if not self._replaying:
            self._before_clean = _rng_state()
        try:
            return self._gradients(compute, variables, values, pending, scale)
        finally:
            if not self._replaying:
                self._after_clean = _rng_state()

    @contextlib.contextmanager
    def same_randomness(self):
        if not self._records_rng:
            yield
            return
        _set_rng_state(self._before_clean)
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False
            _set_rng_state(self._after_clean)

    def _gradients(self, compute, variables, values, pending, scale):
        leaves = [_leaf(v) for v in values]
        scope = base.RecordingScope(
            state_mapping=list(pending.values()) + list(zip(variables, leaves))
        )
        with torch.enable_grad():
            with scope:
                outputs, loss, _ = compute()
            loss = keras.ops.convert_to_tensor(loss)
            scaled = loss if scale is None else loss.to(torch.float32) * _tensor(scale)
            if scaled.requires_grad:
                gradients = torch.autograd.grad(scaled, leaves, allow_unused=True)
            else:  # the loss depends on no variable
                gradients = [None] * len(leaves)
        updates = [(v, _detached(value)) for v, value in scope.updates()]
        outputs = keras.tree.map_structure(_detached, outputs)
        return outputs, loss.detach(), list(gradients), updates

    def perturbed(self, weights, perturbation, gradients):
        """`w + e` with one `torch._foreach_add` per dtype, each result a fresh leaf
        that the perturbed pass differentiates (no copy to detach it)."""
        del gradients  # dense: `e` covers every row
        result = list(weights)
        pairs = [i for i, e in enumerate(perturbation) if e is not None]
        for indices in _by_dtype(weights, pairs):
            sums = torch._foreach_add(
                [weights[i] for i in indices],
                [perturbation[i].to(weights[i].dtype) for i in indices],
            )
            for i, total in zip(indices, sums):
                result[i] = total.requires_grad_(True)
        perturbation[:] = [None] * len(perturbation)
        return result

    def cond(self, pred, true_fn, false_fn):
        return true_fn() if self._host_bool(pred) else false_fn()

    def norms(self, tensors):
        """`torch._foreach_norm` (`ListOps.norms`)."""
        return maths.list_ops.norms(tensors)

    # The step's decisions are Python `if`s on tensors: reading one from a GPU waits for
    # it (a host-device synchronization). The step reads its verdict twice (the commit,
    # the metrics): the value read the first time is kept for the same tensor.
    _last_read = (None, None)

    def _host_bool(self, pred):
        if isinstance(pred, bool):
            return pred
        tensor, value = self._last_read
        if tensor is not pred:
            value = bool(pred)
            self._last_read = (pred, value)
        return value

    def num_replicas(self):
        """The processes of `torch.distributed`'s default group (1 when none is set up)."""
        return world_size()

    def replica_loss_divisor(self):
        return 1  # each process's loss is the mean of its own batch

    def all_reduce_mean(self, tensors):
        """The mean over the processes: one all-reduce (SUM, then / processes) of one
        flat buffer per dtype."""
        tensors = [torch.as_tensor(t) for t in tensors]
        processes = world_size()
        if processes == 1 or not tensors:
            return tensors
        groups = {}
        for i, t in enumerate(tensors):
            groups.setdefault(t.dtype, []).append(i)
        means = [None] * len(tensors)
        for indices in groups.values():
            flat = torch.cat([tensors[i].reshape(-1) for i in indices])
            _all_reduce_sum(flat, processes)
            flat = flat / processes
            pieces = torch.split(flat, [tensors[i].numel() for i in indices])
            for i, piece in zip(indices, pieces):
                means[i] = piece.reshape(tensors[i].shape)
        return means

    def reduce_replicas(self, gradients, state, updates, finite):
        """One all-reduce: the mean gradients (the wrapped optimizer sees the mean over
        the processes), the mean of the method's state and of the floating updates (the
        rest, seed states and counters, is the same on every process), and the vote: a
        process whose passes were not all finite makes every process skip."""
        present = [i for i, g in enumerate(gradients) if g is not None]
        averaged_state = [i for i, value in enumerate(state) if base.is_floating(value)]
        averaged_updates = [i for i, (_, value) in enumerate(updates) if base.is_floating(value)]
        vote = torch.logical_not(torch.as_tensor(finite)).to(torch.float32).reshape(1)
        means = iter(
            self.all_reduce_mean(
                [gradients[i] for i in present]
                + [state[i] for i in averaged_state]
                + [updates[i][1] for i in averaged_updates]
                + [vote]
            )
        )
        gradients, state, updates = list(gradients), list(state), list(updates)
        for i in present:
            gradients[i] = next(means)
        for i in averaged_state:
            state[i] = next(means)
        for i in averaged_updates:
            updates[i] = (updates[i][0], next(means))
        finite = next(means)[0] == 0
        return gradients, state, updates, finite

    # How an eager step commits when its verdict is a tensor (`stateful_cond`): "read"
    # (the default) reads the verdict on the host and runs the outcome it names, one
    # host-device synchronization a step; "select" reads nothing on the host: the
    # outcome that would be taken runs in place, the other from a flat snapshot of the
    # state the outcomes write, and `torch.where` keeps one (`_flat_selected_outcome`: a
    # few kernels a dtype, and three passes over that state). Selection pays where a step
    # is bound by launches on an accelerator (a small model: a synchronization stalls
    # the launches queued behind it, and the passes are small); reading pays on the CPU
    # (a read there is no round trip) and for a large model (the passes cost more than
    # the synchronization). A `torch.compile`d step always selects. Set it on
    # `keras_sam.backends.current()`.
    commit = "read"

    def stateful_cond(self, pred, true_fn, false_fn, tracked):
        if not isinstance(pred, bool):
            if _compiling():
                _selected_outcome(pred, true_fn, false_fn, tracked)
                return
            if self._selects():
                _flat_selected_outcome(pred, true_fn, false_fn, tracked)
                return
        # The branch taken assigns the variables itself.
        if self._host_bool(pred):
            true_fn()
        else:
            false_fn()

    def _selects(self):
        """Whether an eager `stateful_cond` commits by selection (see `commit`)."""
        if self.commit not in ("read", "select"):
            raise ValueError(
                f'`commit` must be "read" or "select". Received: commit={self.commit!r}'
            )
        return self.commit == "select"

    def decide(self, ok, take_step, skip_step, tracked, args=()):
        self.stateful_cond(ok, lambda: take_step(*args), lambda: skip_step(*args), tracked)

    def check_compile(self, sam_model):
        """Notes, before Keras's trainer compiles a SAM step for `jit_compile=True`
        (`torch.compile`), whether the model may draw from torch's global generator (an
        unseeded `Dropout`): the compiled step records and replays that generator's
        state only then (called by `SAMModel.make_train_function`)."""
        if _compiles_sam(sam_model):
            sam_model._torch_global_randomness = _draws_from_global_generator(sam_model)

    def compiled_train_function(self, sam_model, function):
        """Keras's `torch.compile`d train function, traced with the two dynamo options
        the SAM step needs for one graph: `trace_autograd_ops` (the passes'
        `torch.autograd.grad`, else a graph break at each pass) and
        `capture_scalar_outputs` (Keras's optimizers pass a learning-rate tensor as a
        `_foreach_*` `alpha`, a `.item()`, else a graph break at each update). They are
        set while the step runs, not for the rest of the program."""
        if not _compiles_sam(sam_model) or function is None or hasattr(function, "dynamo_options"):
            return function

        def train_function(data):
            with torch._dynamo.config.patch(trace_autograd_ops=True, capture_scalar_outputs=True):
                return function(data)

        train_function.dynamo_options = True  # wrapped once
        return train_function

    def train_step(self, sam_model, data):
        """`SAMModel.train_step` on PyTorch: stateful, eager or under `torch.compile`
        (Keras's trainer compiles it for `jit_compile=True`)."""
        records = not _compiling() or getattr(sam_model, "_torch_global_randomness", True)
        self._records_rng = records
        try:
            with torch.no_grad():
                return step.model_step(self, sam_model, data)
        finally:
            self._records_rng = True

    def optimize(self, method, closure, variables):
        """The custom-loop step: `pred, loss, loss_sam = method.optimize(closure, variables)`.

        `closure()` runs the forward pass (the model reads its variables) and returns
        `(predictions, loss)`; it is called at `w` and at `w + e`, with no tape and no
        `loss.backward()`: the step takes the gradients itself.
        """
        _refuse_tensorflow_form(method, closure)
        variables = step.check_variables(variables)
        compute = base.custom_loop_pass(
            _no_tape(method, closure),
            "closure",
            ("predictions", "loss"),
            ", with `loss` a scalar tensor computed from the variables",
        )
        with torch.no_grad():
            result = step.run_step(self, method, [compute], [1.0], variables)
        return result.outputs, result.loss, result.loss_sam


class ListOps(maths.ListOps):
    """`maths.ListOps` with `torch._foreach_*`: one operation per dtype for a list."""

    def scale(self, tensors, factor):
        result = [None] * len(tensors)
        present = [i for i, t in enumerate(tensors) if t is not None]
        factor = torch.as_tensor(factor, dtype=torch.float32)
        for indices in _by_dtype(tensors, present):
            group = [tensors[i] for i in indices]
            if group[0].dtype == torch.float32:
                products = torch._foreach_mul(group, factor)
            else:
                products = [(factor * t.to(torch.float32)).to(t.dtype) for t in group]
            for i, product in zip(indices, products):
                result[i] = product
        return result

    def add_scaled(self, tensors, factor, others):
        result = list(tensors)
        pairs = [
            i for i, (t, o) in enumerate(zip(tensors, others)) if t is not None and o is not None
        ]
        factor = torch.as_tensor(factor, dtype=torch.float32)
        for indices in _by_dtype(tensors, pairs):
            group, scaled = [tensors[i] for i in indices], [others[i] for i in indices]
            if group[0].dtype == torch.float32 and all(o.dtype == torch.float32 for o in scaled):
                sums = torch._foreach_add(group, torch._foreach_mul(scaled, factor))
            else:
                sums = maths.ListOps.add_scaled(self, group, factor, scaled)
            for i, total in zip(indices, sums):
                result[i] = total
        return result

    def norms(self, tensors):
        """`torch._foreach_norm`: the multi-tensor kernel `clip_grad_norm_` uses (one
        launch for all float32 tensors on a GPU); other dtypes are reduced in float32."""
        tensors = [torch.as_tensor(t) for t in tensors]
        norms = [None] * len(tensors)
        single = [i for i, t in enumerate(tensors) if t.dtype == torch.float32]
        if single:
            for i, norm in zip(single, torch._foreach_norm([tensors[i] for i in single], 2)):
                norms[i] = norm
        for i, t in enumerate(tensors):
            if norms[i] is None:
                norms[i] = torch.linalg.vector_norm(t, dtype=torch.float32)
        return torch.stack(norms)

    def combined_norm(self, norms):
        # A divisor of the smallest normal float32 where every norm is 0: 0 / it is 0.
        divisor = torch.amax(norms).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.linalg.vector_norm(norms / divisor) * divisor

    def cond(self, pred, value, otherwise):
        """Eagerly a Python `if` (`otherwise` runs only when taken). Under
        `torch.compile` an `if` on a tensor breaks the graph: both are computed and
        `torch.where` selects (`global_norm`'s rescaled norm, ASAM's, then costs its
        pass over the tensors at every compiled step)."""
        if _compiling():
            return torch.where(torch.as_tensor(pred), value, otherwise())
        return maths.ListOps.cond(self, pred, value, otherwise)


BACKEND = Torch()
maths.use_list_ops(ListOps())


def _by_dtype(tensors, indices):
    """`indices` grouped by their tensors' dtype, in order (a `_foreach_*` kernel takes
    tensors of one dtype)."""
    groups = {}
    for i in indices:
        groups.setdefault(tensors[i].dtype, []).append(i)
    return list(groups.values())


def _leaf(value):
    """A tensor the pass differentiates: `value` itself when it is a leaf that requires
    its gradient (a trained variable's parameter, or a `w + e` made by `perturbed`),
    else a detached view of it."""
    if isinstance(value, torch.Tensor) and value.is_leaf and value.requires_grad:
        return value
    return torch.as_tensor(value).detach().requires_grad_(True)


_PYTORCH_FORM = (
    "On PyTorch, `{name}.optimize(closure, variables)` takes a closure that runs the "
    "forward pass and returns `(predictions, loss)`, with no tape and no `tf.function`: "
    "the step takes the gradients itself. Write `def closure(): pred = model(x, "
    "training=True); return pred, loss_fn(y, pred)` and call it eagerly; see the "
    "custom-loop guide (docs/custom-loops.md, 'PyTorch')."
)


def _refuse_tensorflow_form(method, closure):
    """The TensorFlow custom loop run on PyTorch: `optimize` inside a `tf.function`."""
    if _compiling():  # a `torch.compile`d step is no `tf.function`
        return
    tensorflow = sys.modules.get("tensorflow")  # never imported here, only looked at
    if callable(closure) and tensorflow is not None and tensorflow.inside_function():
        raise ValueError(
            "`optimize` was called inside a `tf.function`, the TensorFlow custom loop. "
            + _PYTORCH_FORM.format(name=type(method).__name__)
        )


def _no_tape(method, closure):
    """`closure`, refusing the TensorFlow form's `(predictions, loss, tape)` with the fix."""
    if not callable(closure):
        return closure  # `custom_loop_pass` says what it must be

    def checked():
        result = closure()
        if (
            isinstance(result, (tuple, list))
            and len(result) == 3
            and type(result[2]).__name__ == "GradientTape"
        ):
            raise ValueError(
                "`closure` returned `(predictions, loss, tape)`, the TensorFlow "
                "`grad_func`. " + _PYTORCH_FORM.format(name=type(method).__name__)
            )
        return result

    return checked


def _compiles_sam(sam_model):
    """Whether Keras's trainer compiles `sam_model`'s SAM step with `torch.compile`."""
    optimizer = hooks.unwrap_loss_scale(sam_model.optimizer)
    return bool(sam_model.jit_compile) and isinstance(optimizer, sam.SAM)


def _compiling():
    """Whether dynamo is tracing the step (`torch.compile`)."""
    return torch.compiler.is_compiling()


def _selected_outcome(pred, true_fn, false_fn, tracked):
    """`stateful_cond` under `torch.compile`, with no host read of `pred` (a Python `if`
    on it would break the graph): each outcome runs on copies of `tracked` in a
    recording scope (the wrapped optimizers update in place), and each variable is
    assigned `torch.where(pred, taken, other)`. A NaN written by the outcome not
    selected goes nowhere."""
    pred = torch.as_tensor(pred)
    outcomes = []
    for fn in (true_fn, false_fn):
        scope = base.RecordingScope(state_mapping=[(v, torch.clone(v.value)) for v in tracked])
        with scope:
            fn()
        outcomes.append([torch.as_tensor(scope.get_current_value(v)) for v in tracked])
    for variable, taken, other in zip(tracked, *outcomes):
        variable.assign(torch.where(pred, taken.to(other.dtype), other))


def _flat_selected_outcome(pred, true_fn, false_fn, tracked):
    """`stateful_cond` in an eager step with no host read of `pred`, in a few kernels per
    dtype rather than several per variable: the state of `tracked` is copied into one
    flat buffer per dtype, `true_fn` runs on the variables themselves (in place, as when
    it is taken), `false_fn` in a recording scope over views of that copy, and each
    buffer's `torch.where(pred, after_true, after_false)` is copied back with one
    `torch._foreach_copy_`. A NaN written by the outcome not selected goes nowhere."""
    pred = torch.as_tensor(pred)
    groups = _by_dtype([v.value for v in tracked], range(len(tracked)))
    before = {}
    for indices in groups:
        flat = torch.cat([tracked[i].value.reshape(-1) for i in indices])
        before.update(zip(indices, _views(flat, [tracked[i].value for i in indices])))
    true_fn()
    scope = base.RecordingScope(state_mapping=[(v, before[i]) for i, v in enumerate(tracked)])
    with scope:
        false_fn()
    for indices in groups:
        targets = [tracked[i].value for i in indices]
        taken = torch.cat([t.reshape(-1) for t in targets])
        other = torch.cat(
            [torch.as_tensor(scope.get_current_value(tracked[i])).reshape(-1) for i in indices]
        )
        selected = torch.where(pred, taken, other.to(taken.dtype))
        torch._foreach_copy_(targets, _views(selected, targets))


def _views(flat, like):
    """`flat` cut into views shaped as the tensors `like`."""
    pieces = torch.split(flat, [t.numel() for t in like])
    return [piece.view(t.shape) for piece, t in zip(pieces, like)]


def _draws_from_global_generator(model):
    """Whether a layer of `model` holds an unseeded Keras seed generator: Keras's
    PyTorch dropout then draws from torch's global generator (conservative: other
    layers with one draw from Keras's own seed state, which the passes record)."""
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for value in vars(layer).values():
            if isinstance(value, keras.random.SeedGenerator) and value._initial_seed is None:
                return True
    return False


def _rng_state():
    """torch's global generators' states: the CPU one, and CUDA's once it is in use."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state):
    if state is None:
        return
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _all_reduce_sum(flat, processes):
    """`all_reduce(SUM)` in place; a lost process (killed, out of memory, its host gone)
    fails it within the process group's `timeout` rather than hanging, and the error
    says what to do about it."""
    try:
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    except RuntimeError as error:
        raise RuntimeError(
            f"The SAM step's all-reduce over the {processes} processes of "
            "torch.distributed failed: a process was probably lost (killed, out of "
            "memory, or its host gone), so this one stops rather than wait for it. Restart "
            "every process from the last checkpoint (`keras.callbacks.BackupAndRestore` "
            f"resumes the epoch). The collective's error: {error}"
        ) from error


def world_size():
    """The number of processes of `torch.distributed`'s default group; 1 without one."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size()
    return 1


def _tensor(value):
    return value.value if isinstance(value, keras.Variable) else value


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value
