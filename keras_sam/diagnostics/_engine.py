"""What every diagnostic shares: the data, the loss, argument checks, and compiled passes.

A `_Passes` object holds one model, one loss and one data set, and runs compiled
(`tf.function`) passes over the whole data set, batch by batch inside the graph:

- `loss(values)`: the mean loss (and accuracy) with the trainable variables reading
  `values`;
- `loss_and_gradient(values)`: the mean loss and its gradient;
- `hessian_vector_product(values, vector)`: the Hessian of the mean loss times a vector,
  by double differentiation (the gradient of `g(w) . v`).

`values` is a list of tensors, one per trainable variable; the model reads them through
a `keras.StatelessScope`, so no variable is ever written.
"""

import functools
import numbers

import keras
import numpy as np
import tensorflow as tf


def loss_function(model, loss):
    """The loss to measure: `loss` when given, else the model's compiled loss."""
    if loss is not None:
        return keras.losses.get(loss)
    compiled = getattr(model, "loss", None)
    if compiled is None:
        raise ValueError(
            "`loss` is required when the model is not compiled with a loss. "
            f"Received: loss=None for the uncompiled model {model.name!r}"
        )
    if isinstance(compiled, (dict, list, tuple)):
        raise ValueError(
            "The diagnostics take one loss for one output; the model is compiled with "
            f"several. Pass `loss=` explicitly. Received: model.loss={compiled!r}"
        )
    return keras.losses.get(compiled)


def data_arrays(x, y):
    """`(x, y)` as tensors; a `tf.data.Dataset` of `(x, y)` batches is read into memory."""
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError(
                "`y` must be None when `x` is a `tf.data.Dataset` (it yields `(x, y)` "
                f"batches). Received: y of type {type(y).__name__}"
            )
        xs, ys = [], []
        for batch in x:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise ValueError(
                    "A `tf.data.Dataset` given as `x` must yield `(x, y)` batches. "
                    f"Received an element of type {type(batch).__name__}"
                )
            xs.append(batch[0])
            ys.append(batch[1])
        if not xs:
            raise ValueError("`x` must hold at least one example. Received an empty dataset")
        x = keras.tree.map_structure(lambda *t: tf.concat(t, axis=0), *xs)
        y = tf.concat(ys, axis=0)
    if y is None:
        raise ValueError("`y` is required: the diagnostics measure a loss against targets.")
    x = keras.tree.map_structure(tf.convert_to_tensor, x)
    y = tf.convert_to_tensor(y)
    sizes = {int(t.shape[0]) for t in keras.tree.flatten(x)}
    if len(sizes) != 1 or int(y.shape[0]) not in sizes:
        raise ValueError(
            "`x` and `y` must hold the same number of examples. "
            f"Received: {sorted(sizes)} inputs and {int(y.shape[0])} targets"
        )
    if int(y.shape[0]) == 0:
        raise ValueError("`x` must hold at least one example. Received 0 examples")
    return x, y


def num_examples(x):
    return int(keras.tree.flatten(x)[0].shape[0])


def take(x, start, stop):
    """Examples `start:stop` of every tensor in the structure `x`."""
    return keras.tree.map_structure(lambda t: t[start:stop], x)


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


def check_non_negative(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not np.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"`{name}` must be a number >= 0. Received: {name}={value!r}")
    return float(value)


def check_positive(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not np.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"`{name}` must be a number > 0. Received: {name}={value!r}")
    return float(value)


def check_verbose(value):
    if value not in (0, 1, 2) or isinstance(value, bool):
        raise ValueError(f"`verbose` must be 0, 1 or 2. Received: verbose={value!r}")
    return value


def progress(target, verbose, unit_name, shown=()):
    """A `keras.utils.Progbar`, or `None` when `verbose=0`; `shown`: values to show as is."""
    if not verbose:
        return None
    return keras.utils.Progbar(
        target, verbose=verbose, unit_name=unit_name, stateful_metrics=list(shown)
    )


def trainable_variables(model):
    variables = list(model.trainable_variables)
    if not variables:
        raise ValueError(
            f"The model {model.name!r} has no trainable variables: there is nothing to measure."
        )
    return variables


def snapshot(variables):
    """The current values of `variables`, as tensors that no later write can change."""
    return [tf.identity(v.value) for v in variables]


def to_numpy(tensors):
    return [np.asarray(t) for t in tensors]


def dot(a, b):
    """Sum over a list of tensor pairs of their elementwise products, in float32."""
    return tf.add_n(
        [tf.reduce_sum(tf.cast(p, "float32") * tf.cast(q, "float32")) for p, q in zip(a, b)]
    )


class Passes:
    """Compiled passes of `model` with `loss_fn` over all of `(x, y)`, in batches."""

    def __init__(self, model, loss_fn, x, y, batch_size, extra_variables=()):
        self.model = model
        self.loss_fn = loss_fn
        self.variables = trainable_variables(model)
        # More variables the loss pass may read from given values (the non-trainable
        # ones, when interpolating between two models).
        self.extra_variables = list(extra_variables)
        self.x, self.y = x, y
        self.batch_size = batch_size
        self._classifier = None
        # Each `Passes` traces its own graphs. TensorFlow counts traces per Python code
        # object and warns about "retracing" after a few; a `functools.partial` has no
        # code object, so it counts these functions one by one.
        self._loss = _compiled(self._loss_pass)
        self._gradient = _compiled(self._gradient_pass)
        self._hvp = _compiled(self._hvp_pass)

    def loss(self, values, x=None, y=None, extra_values=None):
        """Mean loss and accuracy (NaN when the model is not a classifier), Python floats.

        `extra_values`: values for `extra_variables`; their current values when `None`.
        """
        x, y = self._data(x, y)
        if extra_values is None:
            extra_values = snapshot(self.extra_variables)
        loss, accuracy = self._loss(list(values), x, y, list(extra_values))
        return float(loss), float(accuracy) if self.classifier else float("nan")

    @property
    def classifier(self):
        """Whether accuracy applies: decided from the output of one example."""
        if self._classifier is None:
            with keras.StatelessScope():
                prediction = self.model(take(self.x, 0, 1), training=False)
            self._classifier = isinstance(prediction, tf.Tensor) and is_classifier(
                prediction.shape, self.y.shape
            )
        return self._classifier

    def loss_and_gradient(self, values, x=None, y=None):
        x, y = self._data(x, y)
        loss, gradient = self._gradient(list(values), x, y)
        return float(loss), gradient

    def hessian_vector_product(self, values, vector, x=None, y=None):
        x, y = self._data(x, y)
        vector = [tf.cast(v, w.dtype) for v, w in zip(vector, values)]
        return self._hvp(list(values), vector, x, y)

    def _data(self, x, y):
        return (self.x, self.y) if x is None else (x, y)

    # The passes. Each walks through the data in batches inside the graph and returns
    # example-weighted means: a batch of b examples out of n counts b / n.

    def _forward(self, values, x, y, extra_values=()):
        mapping = list(zip(self.variables, values)) + list(zip(self.extra_variables, extra_values))
        with keras.StatelessScope(state_mapping=mapping):
            prediction = self.model(x, training=False)
            loss = keras.ops.mean(self.loss_fn(y, prediction))
        return tf.cast(loss, "float32"), prediction

    def _loss_pass(self, values, x, y, extra_values):
        n = tf.shape(keras.tree.flatten(x)[0])[0]
        total = tf.zeros((), "float32")
        correct = tf.zeros((), "float32")
        for start in tf.range(0, n, self.batch_size):
            xb, yb = take(x, start, start + self.batch_size), y[start : start + self.batch_size]
            loss, prediction = self._forward(values, xb, yb, extra_values)
            count = tf.cast(tf.shape(yb)[0], "float32")
            total += loss * count
            correct += _correct(prediction, yb)
        n = tf.cast(n, "float32")
        return total / n, correct / n

    def _gradient_pass(self, values, x, y):
        n = tf.shape(keras.tree.flatten(x)[0])[0]
        total = tf.zeros((), "float32")
        gradient = [tf.zeros_like(w) for w in values]
        for start in tf.range(0, n, self.batch_size):
            xb, yb = take(x, start, start + self.batch_size), y[start : start + self.batch_size]
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(values)
                loss, _ = self._forward(values, xb, yb)
            batch_gradient = tape.gradient(
                loss, values, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            count = tf.cast(tf.shape(yb)[0], "float32")
            total += loss * count
            gradient = [
                g + tf.convert_to_tensor(bg) * tf.cast(count, g.dtype)
                for g, bg in zip(gradient, batch_gradient)
            ]
        n = tf.cast(n, "float32")
        return total / n, [g / tf.cast(n, g.dtype) for g in gradient]

    def _hvp_pass(self, values, vector, x, y):
        n = tf.shape(keras.tree.flatten(x)[0])[0]
        product = [tf.zeros_like(w) for w in values]
        for start in tf.range(0, n, self.batch_size):
            xb, yb = take(x, start, start + self.batch_size), y[start : start + self.batch_size]
            # H v = d/dw (g(w) . v): the gradient of the directional derivative.
            with tf.GradientTape(watch_accessed_variables=False) as outer:
                outer.watch(values)
                with tf.GradientTape(watch_accessed_variables=False) as inner:
                    inner.watch(values)
                    loss, _ = self._forward(values, xb, yb)
                gradient = inner.gradient(
                    loss, values, unconnected_gradients=tf.UnconnectedGradients.ZERO
                )
                directional = dot([tf.convert_to_tensor(g) for g in gradient], vector)
            batch_product = outer.gradient(
                directional, values, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            count = tf.cast(tf.shape(yb)[0], "float32")
            product = [
                p + tf.convert_to_tensor(bp) * tf.cast(count, p.dtype)
                for p, bp in zip(product, batch_product)
            ]
        n = tf.cast(n, "float32")
        return [p / tf.cast(n, p.dtype) for p in product]


def _compiled(method):
    return tf.function(functools.partial(method), reduce_retracing=True)


def _correct(prediction, y):
    """How many predictions are right, for a classifier; 0 when accuracy does not apply.

    Accuracy applies to one output of shape `(batch, classes)` with `classes > 1`, against
    integer labels `(batch,)` / `(batch, 1)` or one-hot targets `(batch, classes)`.
    """
    if not isinstance(prediction, tf.Tensor) or not is_classifier(prediction.shape, y.shape):
        return tf.zeros((), "float32")
    predicted = tf.argmax(prediction, axis=-1)
    if y.shape.rank == 2 and y.shape[-1] == prediction.shape[-1]:
        labels = tf.argmax(y, axis=-1)
    else:
        labels = tf.reshape(y, [-1])
    return tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(labels, predicted.dtype)), "float32"))


def is_classifier(prediction_shape, y_shape):
    if len(prediction_shape) != 2 or prediction_shape[-1] is None or prediction_shape[-1] < 2:
        return False
    if len(y_shape) == 1 or (len(y_shape) == 2 and y_shape[-1] == 1):
        return True
    return len(y_shape) == 2 and y_shape[-1] == prediction_shape[-1]
