"""A `tf.data.Dataset` of `(x, y)` batches as the diagnostics' data (TensorFlow only)."""

import numpy as np
import pytest
import tensorflow as tf

from keras_sam.diagnostics import (
    Objective,
    hessian_vector_product,
    loss_landscape,
    sharpness,
)
from tests.diagnostics.test_sharpness import _least_squares


def test_a_dataset_of_batches_gives_the_same_sharpness_as_the_arrays(rng):
    x, y, _, model = _least_squares(rng)
    x, y = x.astype("float32"), y.astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    assert sharpness(Objective(model, dataset, loss="mse"), m=10) == sharpness(
        Objective(model, x, y, loss="mse"), m=10
    )


def test_a_dataset_gives_the_same_hessian_product_and_landscape_as_the_arrays(rng):
    x, y, _, model = _least_squares(rng)
    x, y = x.astype("float32"), y.astype("float32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    vector = [rng.normal(size=v.shape).astype("float32") for v in model.trainable_variables]
    from_dataset = hessian_vector_product(Objective(model, dataset, None, loss="mse"), vector)
    from_arrays = hessian_vector_product(Objective(model, x, y, loss="mse"), vector)
    for a, b in zip(from_dataset, from_arrays):
        np.testing.assert_array_equal(a, b)
    # Least squares: H = 2/n X^T X, whatever the weights.
    expected = 2 / len(x) * x.astype(np.float64).T @ x.astype(np.float64) @ vector[0]
    np.testing.assert_allclose(from_dataset[0], expected, rtol=1e-5)
    line = loss_landscape(Objective(model, dataset, loss="mse"), coordinates=[-1.0, 0.0], verbose=0)
    np.testing.assert_array_equal(
        line["loss"],
        loss_landscape(Objective(model, x, y, loss="mse"), coordinates=[-1.0, 0.0], verbose=0)[
            "loss"
        ],
    )


def test_a_dataset_with_targets_given_twice_is_refused(rng):
    x, y, _, model = _least_squares(rng, n=8)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    with pytest.raises(ValueError, match=r"`y` must be None when `x` is a `tf.data.Dataset`"):
        sharpness(Objective(model, dataset, y, loss="mse"))


def test_a_dataset_of_inputs_alone_is_refused(rng):
    x, _, _, model = _least_squares(rng, n=8)
    dataset = tf.data.Dataset.from_tensor_slices(x.astype("float32")).batch(4)
    with pytest.raises(ValueError, match=r"must yield `\(x, y\)` batches"):
        sharpness(Objective(model, dataset, loss="mse"))


def test_an_empty_dataset_is_refused(rng):
    x, y, _, model = _least_squares(rng, n=8)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).take(0)
    with pytest.raises(ValueError, match=r"Received an empty dataset"):
        sharpness(Objective(model, dataset, loss="mse"))
