import keras
import numpy as np
import pytest

from keras_sam.diagnostics import Objective, sharpness
from tests.diagnostics import reference


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
    objective = Objective(
        model, x.astype("float32"), y.astype("float32"), loss="mse", batch_size=batch_size
    )
    result = sharpness(objective, rho=0.1)

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
        sharpness(Objective(model, x, y))
    model.compile(loss="mse")
    assert sharpness(Objective(model, x, y))["sharpness"] == pytest.approx(
        sharpness(Objective(model, x, y, loss="mse"))["sharpness"], rel=1e-6
    )


def _least_squares(rng, n=50, d=3):
    x = rng.normal(size=(n, d)).astype("float32").astype(np.float64)
    y = rng.normal(size=(n, 1)).astype("float32").astype(np.float64)
    w = rng.normal(size=(d, 1)).astype("float32").astype(np.float64)
    return x, y, w, _linear_model_d(w)


@pytest.mark.parametrize("m, batch_size", [(8, 256), (8, 3), (20, 7)])
def test_m_sharpness_of_least_squares_matches_the_closed_form(rng, m, batch_size):
    x, y, w, model = _least_squares(rng)
    objective = Objective(
        model, x.astype("float32"), y.astype("float32"), loss="mse", batch_size=batch_size
    )
    result = sharpness(objective, rho=0.1, m=m)
    clean = perturbed = 0.0
    for start in range(0, len(x), m):  # consecutive sub-batches; the last one is smaller
        xs, ys = x[start : start + m], y[start : start + m]
        g = reference.least_squares_gradient(xs, ys, w)
        e = 0.1 * g / np.linalg.norm(g)
        clean += reference.least_squares_loss(xs, ys, w) * len(xs) / len(x)
        perturbed += reference.least_squares_loss(xs, ys, w + e) * len(xs) / len(x)
    assert result["m"] == m and result["rho"] == 0.1 and result["ascent_steps"] == 1
    assert result["loss"] == pytest.approx(clean, rel=1e-5)
    assert result["perturbed_loss"] == pytest.approx(perturbed, rel=1e-5)
    assert result["sharpness"] == pytest.approx(perturbed - clean, rel=1e-3)
    full = sharpness(
        Objective(model, x.astype("float32"), y.astype("float32"), loss="mse"), rho=0.1
    )
    assert result["sharpness"] > full["sharpness"]  # each sub-batch climbs its own way


def test_m_sharpness_with_m_at_least_n_is_the_full_batch_estimate(rng):
    x, y, _, model = _least_squares(rng)
    x, y = x.astype("float32"), y.astype("float32")
    objective = Objective(model, x, y, loss="mse")
    full = sharpness(objective, rho=0.1)
    assert sharpness(objective, rho=0.1, m=50) == full | {"m": 50}


@pytest.mark.parametrize("steps, step_size", [(2, None), (5, None), (5, 0.03)])
def test_multi_step_sharpness_of_least_squares_matches_the_iteration(rng, steps, step_size):
    x, y, w, model = _least_squares(rng)
    rho = 0.5
    objective = Objective(
        model, x.astype("float32"), y.astype("float32"), loss="mse", batch_size=16
    )
    result = sharpness(objective, rho=rho, ascent_steps=steps, ascent_step_size=step_size)
    expected = reference.least_squares_ascent(
        x, y, w, rho, steps, rho if step_size is None else step_size
    )
    assert result["ascent_steps"] == steps
    assert result["perturbed_loss"] == pytest.approx(expected, rel=1e-5)
    assert result["sharpness"] == pytest.approx(
        expected - reference.least_squares_loss(x, y, w), rel=1e-4
    )


def test_multi_step_sharpness_is_at_least_the_first_order_one_and_nearly_the_maximum(rng):
    # Near the minimum of a quadratic, max_{||e|| <= rho} L(w + e) - L(w) is close to
    # rho^2 * lambda_max (L's Hessian is 2/n X^T X); the first step only follows g.
    x, y, _, _ = _least_squares(rng, d=4)
    w_star = np.linalg.lstsq(x, y, rcond=None)[0]
    w = w_star + 1e-3 * rng.normal(size=w_star.shape)
    model = _linear_model_d(w)
    x32, y32 = x.astype("float32"), y.astype("float32")
    rho = 0.3
    objective = Objective(model, x32, y32, loss="mse")
    first = sharpness(objective, rho=rho)["sharpness"]
    multi = sharpness(objective, rho=rho, ascent_steps=30)["sharpness"]
    lambda_max = np.linalg.eigvalsh(2 / len(x) * x.T @ x)[-1]
    assert first <= multi
    assert multi == pytest.approx(0.5 * lambda_max * rho**2, rel=0.05)


def test_adaptive_sharpness_of_least_squares_matches_the_closed_form(rng):
    x, y, w, model = _least_squares(rng)
    objective = Objective(model, x.astype("float32"), y.astype("float32"), loss="mse")
    result = sharpness(objective, rho=0.5, adaptive=True, eta=0.01)
    t = np.abs(w) + 0.01
    g = reference.least_squares_gradient(x, y, w)
    e = 0.5 * t**2 * g / np.linalg.norm(t * g)
    expected = reference.least_squares_loss(x, y, w + e) - reference.least_squares_loss(x, y, w)
    assert result["sharpness"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rho": -1}, r"`rho` must be a number >= 0. Received: rho=-1"),
        ({"m": 0}, r"`m` must be a positive integer. Received: m=0"),
        ({"m": 2.5}, r"`m` must be a positive integer. Received: m=2.5"),
        ({"ascent_steps": 0}, r"`ascent_steps` must be a positive integer. Received: ascent_st"),
        ({"ascent_step_size": 0}, r"`ascent_step_size` must be a number > 0"),
        ({"batch_size": 0}, r"`batch_size` must be a positive integer. Received: batch_size=0"),
        ({"verbose": 3}, r"`verbose` must be 0, 1 or 2. Received: verbose=3"),
    ],
)
def test_arguments_are_checked(rng, kwargs, message):
    x, y, _, model = _least_squares(rng, n=8)
    # `batch_size` is the objective's, the others sharpness's own.
    shared = {k: v for k, v in kwargs.items() if k == "batch_size"}
    own = {k: v for k, v in kwargs.items() if k != "batch_size"}
    with pytest.raises(ValueError, match=message):
        sharpness(
            Objective(model, x.astype("float32"), y.astype("float32"), loss="mse", **shared),
            **own,
        )


def _linear_model_d(w):
    model = keras.Sequential([keras.Input((len(w),)), keras.layers.Dense(1, use_bias=False)])
    model.set_weights([np.asarray(w, "float32").reshape(-1, 1)])
    return model
