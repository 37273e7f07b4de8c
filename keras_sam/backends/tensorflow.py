"""The TensorFlow adapter: what keras_sam needs of tensorflow and cannot write with `keras.ops`."""

import keras
import tensorflow as tf

from keras_sam import step
from keras_sam.backends import base

# ------------------------------------------------------------------------- the SAM step
# The tape, `tf.IndexedSlices` and `tf.distribute`; the step itself is `keras_sam.step`.
#
# Under `tf.distribute` the commit-or-skip decision is taken in the cross-replica context
# (a `merge_call`), because a strategy cannot synchronize inside a `tf.cond` taken per
# replica. Each replica's gradients are those of its loss divided by the number of
# replicas, as Keras's `compute_loss` or `tf.nn.compute_average_loss` give them: the step
# hands the method each replica's own mean gradient (or, in the synchronized mode, the
# all-reduced one), and the wrapped optimizer all-reduces the final gradients once, as in
# plain training.
#
# Inside `tf.function`, a run-time error stops the step when the failing op feeds the
# loss (`loss = tf.debugging.check_numerics(loss, ...)`). TensorFlow does not order an
# assertion whose result feeds nothing before other ops, so such an assertion can fail
# after the step was applied, and XLA drops assertions: the step has none.


class TensorFlow(base.Backend):
    def gradients(self, compute, variables, values, pending, scale):
        mapping = list(pending.values()) + list(zip(variables, values))
        scope = base.RecordingScope(state_mapping=mapping)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(values)
            with scope:
                outputs, loss, _ = compute()
            scaled = loss if scale is None else tf.cast(loss, "float32") * scale
        return outputs, loss, tape.gradient(scaled, values), scope.updates()

    def prepare(self, gradient, factor, sparse_ok):
        """A sparse gradient (an Embedding's `tf.IndexedSlices`) stays sparse when allowed.

        It is coalesced, its duplicate indices summed: the norm is then the true one, and
        so is the wrapped optimizer's step (Keras's Adam squares the rows it is given, so
        duplicates would add squares instead of squaring the sum). Or it is made dense
        when the method needs that.
        """
        if isinstance(gradient, tf.IndexedSlices):
            gradient = _coalesce(gradient) if sparse_ok else tf.convert_to_tensor(gradient)
        if gradient is None or factor is None:
            return gradient
        return self.scaled(gradient, factor)

    def rows(self, gradient):
        return gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient

    def perturb(self, weight, perturbation, gradient):
        """`w + e`; for a sparse gradient, `e` is given on its rows only."""
        if perturbation is None:
            return weight
        if isinstance(gradient, tf.IndexedSlices):
            rows = tf.expand_dims(gradient.indices, -1)
            return tf.tensor_scatter_nd_add(weight, rows, tf.cast(perturbation, weight.dtype))
        return weight + tf.cast(perturbation, weight.dtype)

    def scaled(self, gradient, factor):
        if isinstance(gradient, tf.IndexedSlices):
            values = gradient.values * tf.cast(factor, gradient.values.dtype)
            return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
        return gradient * tf.cast(factor, gradient.dtype)

    def weighted_sum(self, tensors, weights):
        if isinstance(tensors[0], tf.IndexedSlices):
            return _coalesce(
                tf.IndexedSlices(
                    tf.concat([self.scaled(t, w).values for t, w in zip(tensors, weights)], 0),
                    tf.concat([t.indices for t in tensors], axis=0),
                    tensors[0].dense_shape,
                )
            )
        return tf.add_n([tf.cast(w, t.dtype) * t for t, w in zip(tensors, weights)])

    def norms(self, tensors):
        """One fused kernel per tensor (`l2_loss`, the halved sum of squares), none
        materializing the squares; float32 tensors are not copied."""
        halves = tf.stack([tf.nn.l2_loss(tf.cast(self.rows(t), tf.float32)) for t in tensors])
        return tf.sqrt(2.0 * halves)  # one multiplication and one root for all

    def all_finite(self, tensors):
        checks = [tf.reduce_all(tf.math.is_finite(self.rows(t))) for t in tensors if t is not None]
        return tf.reduce_all(tf.stack(checks))

    def dense(self, gradient):
        return tf.convert_to_tensor(gradient)

    def cond(self, pred, true_fn, false_fn):
        return tf.cond(pred, true_fn, false_fn)

    def stateful_cond(self, pred, true_fn, false_fn, tracked):
        del tracked  # the branches assign the variables themselves

        def run(fn):
            def branch():
                fn()
                return tf.constant(0)  # an output, so that the branch's updates run

            return branch

        tf.cond(pred, run(true_fn), run(false_fn))

    def decide(self, ok, take_step, skip_step, tracked, args=()):
        del tracked  # stateful: the branches assign the variables themselves
        context = tf.distribute.get_replica_context()
        if context is None:  # already in the cross-replica context (a nested decision)
            tf.cond(ok, lambda: take_step(*args), lambda: skip_step(*args))
            return

        def merge(strategy, ok, args):
            # Every replica (and worker) takes the same branch: a replica skips only with
            # all the others.
            nonfinite = strategy.extended.call_for_each_replica(
                lambda f: tf.cast(tf.logical_not(f), tf.int32), args=(ok,)
            )
            ok = tf.equal(strategy.reduce(tf.distribute.ReduceOp.SUM, nonfinite, axis=None), 0)
            tf.cond(ok, lambda: take_step(*args), lambda: skip_step(*args))

        context.merge_call(merge, args=(ok, args))

    def run_in_replicas(self, fn, *args):
        return tf.distribute.get_strategy().extended.call_for_each_replica(fn, args=args)

    def num_replicas(self):
        return tf.distribute.get_replica_context().num_replicas_in_sync

    def all_reduce_mean(self, tensors):
        context = tf.distribute.get_replica_context()
        return context.all_reduce(tf.distribute.ReduceOp.MEAN, list(tensors))

    def check_context(self):
        if tf.distribute.get_replica_context() is None:
            raise ValueError(
                "A SAM step was called in a cross-replica context: under a "
                "`tf.distribute` strategy, call it inside `strategy.run(...)`."
            )

    def build(self, optimizer, variables):
        # The optimizers' variables are created here, outside any control-flow block.
        if not optimizer.built and tf.distribute.has_strategy():
            raise ValueError(
                f"Build `{type(optimizer).__name__}` in the strategy's scope before the "
                "first step: `with strategy.scope(): optimizer.build(model.trainable_variables)` "
                "(variables cannot be created inside `strategy.run`). `SAMModel.fit` "
                "does it by itself."
            )
        super().build(optimizer, variables)

    def dynamic_split(self, batch, num_splits):
        """`num_splits` parts, alike eagerly, in a graph and under XLA (no assertion).

        A batch smaller than `num_splits` gives empty parts, which read the batch's
        first example instead and are dropped by the step (`step.split_batch`). Each
        tensor is cut by its own size: when `x` and `y` differ, the parts' losses raise
        Keras's error for tensors of different sizes, which the commit depends on.
        """
        flat = keras.tree.flatten(batch)
        first = next(t for t in flat if t is not None)
        size = tf.shape(first)[0]
        sizes = [(size + i) // num_splits for i in range(num_splits)]
        weights = [tf.cast(s, "float32") / tf.cast(size, "float32") for s in sizes]

        def cut(t):
            own = tf.shape(t)[0]
            own_sizes = [(own + i) // num_splits for i in range(num_splits)]
            pieces, start = [], 0
            for part_size in own_sizes:
                begin = tf.where(part_size > 0, start, 0)
                pieces.append(t[begin : begin + tf.maximum(part_size, 1)])
                start = start + part_size
            return pieces

        pieces = [[None] * num_splits if t is None else cut(t) for t in flat]
        parts = [
            keras.tree.pack_sequence_as(batch, [p[i] for p in pieces]) for i in range(num_splits)
        ]
        return parts, weights, sizes

    def train_step(self, sam_model, data):
        """`SAMModel.train_step` on TensorFlow: Keras's trainer calls it inside its function."""
        return step.model_step(self, sam_model, data)

    def checkpointable(self, variables):
        """A `tf.Module` holding `variables`, so that `tf.train.Checkpoint` saves them."""
        module = tf.Module(name="rng_states")
        module.states = [v.value for v in variables]
        return module

    def optimize(self, method, grad_func, variables):
        """The custom-loop step: `pred, loss, loss_sam = method.optimize(grad_func, vars)`."""
        variables = step.check_variables(variables)
        compute = base.custom_loop_pass(
            grad_func,
            "grad_func",
            ("predictions", "loss", "tape"),
            ", with `tape` the `tf.GradientTape` that recorded the loss",
        )
        result = step.run_step(self, method, [compute], [1.0], variables)
        return result.outputs, result.loss, result.loss_sam


BACKEND = TensorFlow()


def _coalesce(gradient):
    """The same `tf.IndexedSlices` with each index once (its rows summed)."""
    unique, positions = tf.unique(gradient.indices)
    summed = tf.math.unsorted_segment_sum(gradient.values, positions, tf.size(unique))
    return tf.IndexedSlices(summed, unique, gradient.dense_shape)
