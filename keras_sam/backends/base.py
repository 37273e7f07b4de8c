"""`Backend`: everything keras_sam asks of a Keras backend, with the `keras.ops` defaults.

One subclass per backend (`keras_sam/backends/<backend>.py`), one instance of it
(`keras_sam.backends.current()`), chosen once when Keras's backend is known. It answers
three callers:

- the SAM step (`keras_sam.step`): the gradient of one pass, sparse gradients, the
  conditionals, the replicas and how the commit-or-skip decision is taken;
- `keras_sam.SAMModel`: its `train_step` on this backend, what a checkpoint must hold
  besides Keras's variables, and which compile options it refuses;
- the custom loops (`SAM.optimize`, `SAM.stateless_optimize`), in the backend's own form.

This module imports no backend: the defaults are `keras.ops`, and a method that has no
default here raises, saying which backend lacks it.
"""

import contextlib

import keras
from keras import ops

from keras_sam import maths
from keras_sam.methods.hooks import unwrap_loss_scale


class RecordingScope(keras.StatelessScope):
    """A stateless scope that remembers which variables were assigned, to commit them.

    A variable it does not map is read from the enclosing scope, if any (the JAX
    trainer runs the whole step in a scope holding the step's state).
    """

    def __init__(self, state_mapping=None):
        super().__init__(state_mapping=state_mapping)
        self._assigned = {}

    def add_update(self, update):
        variable, _ = update
        self._assigned[id(variable)] = variable
        super().add_update(update)

    def get_current_value(self, variable):
        value = super().get_current_value(variable)
        outer = getattr(self, "original_scope", None)
        if value is None and outer is not None:
            value = outer.get_current_value(variable)
        return value

    def updates(self):
        """The `(variable, new value)` pairs, in the order of first assignment."""
        return [(v, self.state_mapping[id(v)]) for v in self._assigned.values()]


class Backend:
    """What keras_sam needs of a backend. The defaults are `keras.ops`; adapters override.

    - for `SAMModel`: `train_step`, `logs_of`, `checkpointable`, `check_compile`,
      `compiled_train_function`;
    - for `SAM`'s custom loops: `optimize`, `stateless_optimize`;
    - for the step: one pass (`gradients`, `same_randomness`); gradients (`prepare`,
      `rows`, `perturb`, `scaled`, `weighted_sum`, `norms`, `all_finite`, `dense`,
      `concatenate`); control flow (`cond`, `stateful_cond`, `decide`: below); distribution
      (`num_replicas`, `replica_loss_divisor`, `all_reduce_mean`, `reduce_replicas`,
      `check_context`, `build`, `per_replica`, `run_in_replicas`, `dynamic_split`: below).

    `tensors` passed around are dense unless an adapter keeps its own sparse type
    (TensorFlow's `IndexedSlices`), in which case it overrides every method that sees
    a gradient.

    The three conditionals, side by side (a predicate, then two branches):

    - `cond(pred, true_fn, false_fn)`: pure branches that return tensors, which it
      returns (in the passes: a method's decision taken when the step runs);
    - `stateful_cond(pred, true_fn, false_fn, tracked)`: branches that assign variables
      among `tracked` and return nothing (the k-th micro-batch's step, the metrics);
    - `decide(ok, take_step, skip_step, tracked, args=())`: a `stateful_cond` between
      the step's two outcomes, taken once for the step after the replicas agree on `ok`
      (TensorFlow's vote in the cross-replica context; elsewhere `stateful_cond`).

    The replica verbs, in the order a step calls them:

    - `num_replicas()`, `replica_loss_divisor()`: how many replicas, and what each
      replica's loss is divided by;
    - `per_replica(replica_step, data, method, variables)`: the passes run per replica
      (JAX's `shard_map`) and their `StepResult` averaged, or run once;
    - `all_reduce_mean(tensors)`: the mean of tensors over the replicas (within the
      passes: the synchronized perturbation's gradients);
    - `reduce_replicas(gradients, state, updates, finite)`: the step's results made the
      same on every replica, after the passes;
    - `run_in_replicas(fn, *args)`: from `decide`'s branches, `fn` in each replica (the
      commit, the optimizer's step).
    """

    # --------------------------------------------------------------- SAMModel
    def train_step(self, sam_model, *args):
        """`SAMModel.train_step` with a SAM optimizer on this backend.

        Stateful backends (TensorFlow, PyTorch) take `(data)` and return the logs; JAX
        takes Keras's stateless `(state, data)` and returns `(logs, state)`.
        """
        del args
        method = unwrap_loss_scale(sam_model.optimizer)
        raise NotImplementedError(
            f"`SAMModel.fit` with `{type(method).__name__}` is not available on the "
            f"{keras.backend.backend()} backend yet. It runs on TensorFlow, JAX and "
            "PyTorch (set `KERAS_BACKEND`)."
        )

    def logs_of(self, result):
        """The logs in what Keras's `train_step` or `test_step` returns on this backend:
        the result itself (TensorFlow, PyTorch); JAX's stateless steps return
        `(logs, state)`."""
        return result

    def checkpointable(self, variables):
        """An object that the backend's own checkpoints (`tf.train.Checkpoint`) track,
        holding `variables` (the seed generators' states, which they do not follow); or
        None where Keras's files are the only checkpoints."""
        del variables
        return None

    def check_compile(self, sam_model):
        """Refuses, before any step, a compile option the SAM step cannot run under."""
        del sam_model

    def compiled_train_function(self, sam_model, function):
        """Keras's train function for `sam_model` as the trainer runs it (PyTorch wraps
        its `torch.compile`d one in the dynamo options the SAM step needs)."""
        del sam_model
        return function

    # ------------------------------------------------------------ the custom loops
    def optimize(self, method, *args, **kwargs):
        """`method.optimize(...)`: one SAM step in a custom loop, in this backend's form
        (TensorFlow: `(grad_func, variables)`; PyTorch: `(closure, variables)`)."""
        del method, args, kwargs
        raise _no_custom_loop("optimize")

    def stateless_optimize(
        self, method, state, compute, trainable_variables, non_trainable_variables
    ):
        """`method.stateless_optimize(...)`: one SAM step as a pure function of the state
        (JAX)."""
        del method, state, compute, trainable_variables, non_trainable_variables
        raise _no_custom_loop("stateless_optimize")

    # ------------------------------------------------------------------ one pass
    def gradients(self, compute, variables, values, pending, scale):
        """Runs `compute` with `variables` reading `values`; no variable is written.

        `pending` maps `id(variable)` to `(variable, value)`: state updates of earlier
        parts of the step, which this pass reads. With a loss scale, the gradients are
        those of the scaled loss.

        Returns the outputs, the loss, the gradients with respect to `values` (None
        where the loss does not depend on a value, if the backend can tell), and the
        `(variable, value)` state updates the pass would have made.
        """
        raise NotImplementedError

    def same_randomness(self):
        """A context in which a pass draws the random numbers of the last clean pass.

        The perturbed pass runs in it, so that it sees the clean pass's dropout masks,
        and the random state after the step is the one after the clean passes (a rho=0
        step draws what a plain step draws). Keras's seed generators are variables that
        the stateless scope already rewinds; a backend with a global generator of its
        own (PyTorch's unseeded dropout) overrides this.
        """
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- gradients
    def prepare(self, gradient, factor, sparse_ok):
        """A raw gradient, times `factor` (None: unchanged)."""
        del sparse_ok
        if gradient is None or factor is None:
            return gradient
        return gradient * ops.cast(factor, gradient.dtype)

    def rows(self, gradient):
        """What a method reads of a gradient (a sparse one's rows)."""
        return gradient

    def perturbed(self, weights, perturbation, gradients):
        """`w + e` for each weight (`w` where `e` is None).

        `gradients` are the clean gradients (None where unknown): a sparse one says
        which rows `e` covers. `perturbation` is consumed (a list, emptied in place):
        each `e` is let go once its `w + e` exists, so that run eagerly the step holds
        both together for one tensor at a time.
        """
        result = []
        for i, weight in enumerate(weights):
            e, perturbation[i] = perturbation[i], None
            result.append(self.perturb(weight, e, gradients[i]))
            del e
        return result

    def perturb(self, weight, perturbation, gradient):
        """`w + e` for one weight."""
        del gradient
        if perturbation is None:
            return weight
        return weight + ops.cast(perturbation, weight.dtype)

    def scaled(self, gradient, factor):
        return gradient * ops.cast(factor, gradient.dtype)

    def weighted_sum(self, tensors, weights):
        total = None
        for t, w in zip(tensors, weights):
            term = ops.cast(w, t.dtype) * t
            total = term if total is None else total + term
        return total

    def norms(self, tensors):
        """The float32 Euclidean norm of each tensor, as a float32 vector: one reduction
        per tensor. The step's finite check and SAM's norm both read them."""
        return maths.tensor_norms(tensors)

    def all_finite(self, tensors):
        """Whether every entry of every tensor is finite (element by element: the exact
        check of `verify_optimizer_step`, not on the step's usual path)."""
        checks = [ops.all(ops.isfinite(t)) for t in tensors if t is not None]
        return ops.all(ops.stack(checks))

    def dense(self, gradient):
        return gradient

    def concatenate(self, tensors):
        return ops.concatenate(tensors, axis=0)

    # ------------------------------------------------------------ control flow
    def cond(self, pred, true_fn, false_fn):
        """A conditional of pure functions returning tensors (`ops.cond`)."""
        return ops.cond(pred, true_fn, false_fn)

    def decide(self, ok, take_step, skip_step, tracked, args=()):
        """Runs `take_step(*args)` if `ok`, else `skip_step(*args)`; both assign variables.

        `ok` is this replica's verdict; under a distribution every replica must take
        the same branch (TensorFlow overrides this with a cross-replica decision).
        `take_step` and `skip_step` run once for the step (under `tf.distribute`, in
        the cross-replica context, after every replica's vote); what they do per
        replica goes through `run_in_replicas`.

        The default, for a functional backend (JAX), is a `stateful_cond`: one
        conditional whose branches return the new values of `tracked`. (Computing
        both outcomes and selecting each variable's value with `where` instead, as
        optax's `apply_if_finite` does, was measured to keep every new weight and
        slot in a temporary buffer: 2 to 3 parameter copies of compiled memory more
        than the conditional, which XLA runs in place.)
        """
        self.stateful_cond(ok, lambda: take_step(*args), lambda: skip_step(*args), tracked)

    def stateful_cond(self, pred, true_fn, false_fn, tracked):
        """Runs `true_fn()` if `pred`, else `false_fn()`; both may assign `tracked`.

        Functional: each branch runs in a recording scope over `tracked` (every
        variable either branch may assign) and returns their new values, which are
        assigned after an `ops.cond`. Stateful backends override it.
        """

        def branch(fn):
            def run():
                scope = RecordingScope(state_mapping=[(v, v.value) for v in tracked])
                with scope:
                    fn()
                return [ops.cast(scope.get_current_value(v), v.dtype) for v in tracked]

            return run

        values = ops.cond(pred, branch(true_fn), branch(false_fn))
        for variable, value in zip(tracked, values):
            variable.assign(value)

    # ------------------------------------------------------------ distribution
    def num_replicas(self):
        """Replicas that each run the step on their own share of the global batch (1:
        none, or one global SPMD program)."""
        return 1

    def replica_loss_divisor(self):
        """What each replica's loss is divided by: the number of replicas where the loss
        is a share of the global batch's mean (Keras's `compute_loss` and
        `tf.nn.compute_average_loss` under `tf.distribute`), 1 where it is the mean of
        the replica's own batch. Its gradient times this is the replica's own mean
        gradient.

        Always 1 without replicas (`num_replicas() == 1`): the one factor the step and
        its logs multiply by, with no guard of their own. An adapter that overrides it
        keeps that."""
        return self.num_replicas()

    def all_reduce_mean(self, tensors):
        """The mean over the replicas of each tensor (identity without replicas)."""
        return tensors

    def reduce_replicas(self, gradients, state, updates, finite):
        """The step's results made the same on every replica (several replicas only).

        `gradients` are this replica's final (mean) gradients, None where none; `state`
        the method's new state values; `updates` the clean passes' `(variable, value)`
        state updates; `finite` this replica's verdict. Returns the four as the step
        commits them. The default is `tf.distribute`'s: the method's state is averaged;
        the gradients are divided by the number of replicas, as the wrapped optimizer
        sums them; the strategy aggregates the updates; `decide` takes the vote.
        """
        replicas = self.num_replicas()
        if state:  # the replicas keep one state: the average of their updates
            state = self.all_reduce_mean(state)
        gradients = [None if g is None else self.scaled(g, 1.0 / replicas) for g in gradients]
        return gradients, state, updates, finite

    def check_context(self):
        """Raises if a step cannot run here (TensorFlow: outside `strategy.run`)."""

    def build(self, optimizer, variables):
        """Creates the optimizers' variables before the first step."""
        if not optimizer.built:
            with keras.name_scope(optimizer.name, caller=optimizer):
                optimizer.build(variables)
            optimizer.built = True

    def per_replica(self, replica_step, data, method, variables):
        """Runs `replica_step(data)` (a `StepResult`) per replica, reduced over them.

        `variables` are all those the passes may read. The default runs it once:
        replicas, if any, are the backend's own (TensorFlow's `strategy.run` calls the
        whole step per replica).
        """
        del method, variables
        return replica_step(data)

    def run_in_replicas(self, fn, *args):
        """Runs `fn(*args)` in each replica (from the decision's context).

        The step's outcomes call it for what reads a replica's own values: committing
        the state updates and the method's state, applying or accumulating the
        gradients, applying the sums. `decide`'s branches themselves, and the counters
        they assign (`skipped_steps`, the micro-step count, the loss scale), run once
        for the step."""
        return fn(*args)

    def dynamic_split(self, batch, num_splits):
        """Splits a batch whose size is known only when the step runs.

        Returns `num_splits` parts, their weights and their sizes (tensors). A part
        that would be empty (a batch smaller than `num_splits`) reads the batch's first
        example instead, with weight 0 and size 0: the step drops its state updates
        and outputs, so it changes nothing (see `split_batch`).
        """
        raise ValueError(
            f"num_batch_splits={num_splits} needs batches of a known size on the "
            f"{keras.backend.backend()} backend."
        )


def _no_custom_loop(name):
    return ValueError(
        f"`{name}` is not available on the {keras.backend.backend()} backend: see the "
        "custom-loop guide for this backend's form."
    )


# ---------------------------------------------------------------- shared helpers
def is_floating(tensor):
    """Whether a tensor (or variable) has a floating dtype (bfloat16 included)."""
    return "float" in keras.backend.standardize_dtype(tensor.dtype)


def unique(variables):
    """`variables` in order, each once (by identity: Keras variables do not hash by it)."""
    seen, result = set(), []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            result.append(v)
    return result


def custom_loop_pass(function, name, returns, detail=""):
    """The step's pass (`compute() -> (outputs, loss, None)`) from a custom loop's
    `function`, which returns `returns` (their names: the predictions and the loss
    first). Checks that `function` is callable, and at each call what it returns."""
    form = f"({', '.join(returns)})"
    if not callable(function):
        raise ValueError(
            f"`{name}` must be a callable returning `{form}`. Received: {name}={function!r}"
        )

    def compute():
        result = function()
        if not (isinstance(result, (tuple, list)) and len(result) == len(returns)):
            raise ValueError(f"`{name}` must return `{form}`{detail}. Received: {result!r}")
        return result[0], result[1], None

    return compute
