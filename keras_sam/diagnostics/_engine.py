"""What every diagnostic shares: reading the data and the loss, and compiled passes.

A `Passes` object holds one `Objective` (a model, a loss and a data set, checked once
in `objective.py`) and runs passes over the whole data set, one compiled call per batch
(`tf.function` on TensorFlow, `jax.jit` on JAX, eager on PyTorch) adding to running sums
that stay on the device:

- `loss(values)`: the mean loss (and accuracy) with the trainable variables reading
  `values`;
- `loss_and_gradient(values)`: the mean loss and its gradient;
- `hessian_vector_product(values, vector)`: the Hessian of the mean loss times a vector,
  by double differentiation (the gradient of `g(w) . v`).

`values` is a list of tensors, one per trainable variable; the model reads them through
a `keras.StatelessScope`, so no variable is ever written. The code is `keras.ops`; the
differentiation and the compilation are the backend's (`keras_sam.backends.autodiff`).
"""

import sys

import keras
import numpy as np

from keras_sam.backends import autodiff


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
    """`(x, y)` as backend tensors; a `tf.data.Dataset` of `(x, y)` batches is read into memory."""
    if _is_tf_dataset(x):
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
            xs.append(keras.tree.map_structure(np.asarray, batch[0]))
            ys.append(np.asarray(batch[1]))
        if not xs:
            raise ValueError("`x` must hold at least one example. Received an empty dataset")
        x = keras.tree.map_structure(lambda *t: np.concatenate(t, axis=0), *xs)
        y = np.concatenate(ys, axis=0)
    if y is None:
        raise ValueError("`y` is required: the diagnostics measure a loss against targets.")
    x = keras.tree.map_structure(keras.ops.convert_to_tensor, x)
    y = keras.ops.convert_to_tensor(y)
    sizes = {int(t.shape[0]) for t in keras.tree.flatten(x)}
    if len(sizes) != 1 or int(y.shape[0]) not in sizes:
        raise ValueError(
            "`x` and `y` must hold the same number of examples. "
            f"Received: {sorted(sizes)} inputs and {int(y.shape[0])} targets"
        )
    if int(y.shape[0]) == 0:
        raise ValueError("`x` must hold at least one example. Received 0 examples")
    return x, y


def _is_tf_dataset(x):
    """Whether `x` is a `tf.data.Dataset`, without importing TensorFlow: if TensorFlow is not
    loaded, nothing can be one."""
    tf = sys.modules.get("tensorflow")
    data = getattr(tf, "data", None)
    return data is not None and isinstance(x, data.Dataset)


def num_examples(x):
    return int(keras.tree.flatten(x)[0].shape[0])


def take(x, start, stop):
    """Examples `start:stop` of every tensor in the structure `x`."""
    return keras.tree.map_structure(lambda t: t[start:stop], x)


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
    return [keras.ops.stop_gradient(keras.ops.copy(v.value)) for v in variables]


def to_numpy(tensors):
    return [keras.ops.convert_to_numpy(t) for t in tensors]


class Passes:
    """Compiled passes of an `Objective`: its model and loss over all of its data, in
    batches of its `batch_size`."""

    def __init__(self, objective, extra_variables=()):
        self.model = objective.model
        self.loss_fn = objective.loss_fn
        self.variables = trainable_variables(self.model)
        # More variables the loss pass may read from given values (the non-trainable
        # ones, when interpolating between two models).
        self.extra_variables = list(extra_variables)
        self.x, self.y = objective.x, objective.y
        self.batch_size = objective.batch_size
        self._classifier = None
        # One compiled function per kind of pass, called once per batch: it adds the
        # batch's share to running sums, which stay on the device between batches.
        self._autodiff = autodiff.current()
        self._loss = self._autodiff.compile_function(self._loss_batch)
        self._gradient = self._autodiff.compile_function(self._gradient_batch)
        self._hvp = self._autodiff.compile_function(self._hvp_batch)

    def loss(self, values, x=None, y=None, extra_values=None):
        """Mean loss and accuracy (NaN when the model is not a classifier), Python floats.

        `extra_values`: values for `extra_variables`; their current values when `None`.
        """
        x, y = self._data(x, y)
        if extra_values is None:
            extra_values = snapshot(self.extra_variables)
        values, extra_values = list(values), list(extra_values)
        total = correct = keras.ops.zeros((), "float32")
        for xb, yb in self._batches(x, y):
            total, correct = self._loss(values, extra_values, xb, yb, total, correct)
        n = num_examples(x)
        return float(total / n), float(correct / n) if self.classifier else float("nan")

    @property
    def classifier(self):
        """Whether accuracy applies: decided from the output of one example."""
        if self._classifier is None:
            with keras.StatelessScope():
                prediction = self.model(take(self.x, 0, 1), training=False)
            self._classifier = not keras.tree.is_nested(prediction) and is_classifier(
                prediction.shape, self.y.shape
            )
        return self._classifier

    def loss_and_gradient(self, values, x=None, y=None):
        x, y = self._data(x, y)
        values = list(values)
        total = keras.ops.zeros((), "float32")
        gradient = [keras.ops.zeros_like(w) for w in values]
        for xb, yb in self._batches(x, y):
            total, gradient = self._gradient(values, xb, yb, total, gradient)
        n = num_examples(x)
        return float(total / n), [g / keras.ops.cast(n, g.dtype) for g in gradient]

    def hessian_vector_product(self, values, vector, x=None, y=None):
        x, y = self._data(x, y)
        values = list(values)
        vector = [keras.ops.cast(v, w.dtype) for v, w in zip(vector, values)]
        product = [keras.ops.zeros_like(w) for w in values]
        for xb, yb in self._batches(x, y):
            product = self._hvp(values, vector, xb, yb, product)
        n = num_examples(x)
        return [p / keras.ops.cast(n, p.dtype) for p in product]

    def _data(self, x, y):
        return (self.x, self.y) if x is None else (x, y)

    def _batches(self, x, y):
        n = num_examples(x)
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            yield take(x, start, stop), y[start:stop]

    # The compiled functions, one batch each. The passes return example-weighted means:
    # a batch of b examples out of n counts b / n.

    def _forward(self, values, x, y, extra_values=()):
        mapping = list(zip(self.variables, values)) + list(zip(self.extra_variables, extra_values))
        with keras.StatelessScope(state_mapping=mapping):
            prediction = self.model(x, training=False)
            loss = keras.ops.mean(self.loss_fn(y, prediction))
        return keras.ops.cast(loss, "float32"), prediction

    def _loss_batch(self, values, extra_values, x, y, total, correct):
        loss, prediction = self._forward(values, x, y, extra_values)
        return total + loss * _count(y), correct + _correct(prediction, y)

    def _gradient_batch(self, values, x, y, total, gradient):
        loss, batch_gradient = self._autodiff.value_and_gradient(
            lambda w: self._forward(w, x, y)[0], values
        )
        count = _count(y)
        return total + loss * count, [
            g + bg * keras.ops.cast(count, g.dtype) for g, bg in zip(gradient, batch_gradient)
        ]

    def _hvp_batch(self, values, vector, x, y, product):
        # H v = d/dw (g(w) . v): the gradient of the directional derivative.
        batch_product = self._autodiff.hessian_vector_product(
            lambda w: self._forward(w, x, y)[0], values, vector
        )
        count = _count(y)
        return [p + bp * keras.ops.cast(count, p.dtype) for p, bp in zip(product, batch_product)]


def _count(y):
    """The number of examples in the batch `y`, as a float32 scalar."""
    return keras.ops.cast(keras.ops.shape(y)[0], "float32")


def _correct(prediction, y):
    """How many predictions are right, for a classifier; 0 when accuracy does not apply.

    Accuracy applies to one output of shape `(batch, classes)` with `classes > 1`, against
    integer labels `(batch,)` / `(batch, 1)` or one-hot targets `(batch, classes)`.
    """
    if keras.tree.is_nested(prediction) or not is_classifier(prediction.shape, y.shape):
        return keras.ops.zeros((), "float32")
    predicted = keras.ops.argmax(prediction, axis=-1)
    if len(y.shape) == 2 and y.shape[-1] == prediction.shape[-1]:
        labels = keras.ops.argmax(y, axis=-1)
    else:
        labels = keras.ops.reshape(y, [-1])
    right = keras.ops.equal(predicted, keras.ops.cast(labels, predicted.dtype))
    return keras.ops.sum(keras.ops.cast(right, "float32"))


def is_classifier(prediction_shape, y_shape):
    if len(prediction_shape) != 2 or prediction_shape[-1] is None or prediction_shape[-1] < 2:
        return False
    if len(y_shape) == 1 or (len(y_shape) == 2 and y_shape[-1] == 1):
        return True
    return len(y_shape) == 2 and y_shape[-1] == prediction_shape[-1]
