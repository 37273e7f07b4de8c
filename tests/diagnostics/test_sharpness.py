import keras
import numpy as np
import pytest

from keras_sam.diagnostics import sharpness


def _linear_model(w):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    model.set_weights([np.asarray(w, "float32").reshape(3, 1)])
    return model


@pytest.mark.parametrize("batch_size", [7, 64])
def test_sharpness_of_a_least_squares_model_matches_the_closed_form(rng, batch_size):
    # L(w) = mean((x w - y)^2): g = 2/n X^T (X w - y); L(w + e) in closed form.
    x = rng.normal(size=(50, 3))
    y = rng.normal(size=(50, 1))
    w = rng.normal(size=(3, 1))
    model = _linear_model(w)
    before = [v.numpy().copy() for v in model.weights]
    result = sharpness(
        model, x.astype("float32"), y.astype("float32"), loss="mse", batch_size=batch_size, rho=0.1
    )

    def loss(v):
        return float(np.mean((x @ v - y) ** 2))

    g = 2 / len(x) * x.T @ (x @ w - y)
    e = 0.1 * g / np.linalg.norm(g)
    assert result["loss"] == pytest.approx(loss(w), rel=1e-5)
    assert result["perturbed_loss"] == pytest.approx(loss(w + e), rel=1e-5)
    assert result["sharpness"] == pytest.approx(loss(w + e) - loss(w), rel=1e-3)
    for a, b in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy())  # the weights are untouched


def test_loss_defaults_to_the_compiled_one_and_is_required_otherwise(rng):
    model = _linear_model([1.0, 2.0, 3.0])
    x, y = rng.normal(size=(8, 3)).astype("float32"), rng.normal(size=(8, 1)).astype("float32")
    with pytest.raises(ValueError, match="`loss` is required"):
        sharpness(model, x, y)
    model.compile(loss="mse")
    assert sharpness(model, x, y)["sharpness"] == pytest.approx(
        sharpness(model, x, y, loss="mse")["sharpness"], rel=1e-6
    )
