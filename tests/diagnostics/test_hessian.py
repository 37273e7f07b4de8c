import keras
import numpy as np
import pytest

from keras_sam.diagnostics import (
    Objective,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
)
from tests import reference as core_reference
from tests.diagnostics import reference


def _float32(*arrays):
    """The arrays rounded to float32 (what the model computes with), back in float64."""
    return [np.asarray(a, np.float32).astype(np.float64) for a in arrays]


def _mlp(rng, n=40):
    params = _float32(*core_reference.mlp_init(rng))
    x, t = _float32(rng.normal(size=(n, 3)), rng.normal(size=(n, 2)))
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)]
    )
    model.set_weights([p.astype("float32") for p in params])
    return model, params, x.astype("float32"), t.astype("float32")


def _linear(x_design):
    model = keras.Sequential(
        [keras.Input((x_design.shape[1],)), keras.layers.Dense(1, use_bias=False)]
    )
    model.compile(loss="mse")
    return model


def test_the_reference_hessian_vector_product_is_the_derivative_of_the_reference_gradient(rng):
    # The hand-derived R-operator against central differences of the hand-derived
    # gradient, all in float64 (truncation error ~ h^2).
    params = core_reference.mlp_init(rng)
    x, t = rng.normal(size=(20, 3)), rng.normal(size=(20, 2))
    v = [rng.normal(size=p.shape) for p in params]
    h = 1e-5
    plus = core_reference.mlp_loss_and_grads([p + h * d for p, d in zip(params, v)], x, t)[1]
    minus = core_reference.mlp_loss_and_grads([p - h * d for p, d in zip(params, v)], x, t)[1]
    numeric = (reference.flatten(plus) - reference.flatten(minus)) / (2 * h)
    exact = reference.flatten(reference.mlp_hessian_vector_product(params, v, x, t))
    np.testing.assert_allclose(exact, numeric, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("batch_size", [7, 64])
def test_hessian_vector_product_matches_the_exact_hessian_of_a_tiny_mlp(rng, batch_size):
    model, params, x, t = _mlp(rng)
    hessian = reference.mlp_hessian(params, x.astype(np.float64), t.astype(np.float64))
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-12)  # the reference is a Hessian
    for _ in range(3):
        v = [rng.normal(size=p.shape).astype("float32") for p in params]
        hv = hessian_vector_product(Objective(model, x, t, loss="mse", batch_size=batch_size), v)
        assert [a.shape for a in hv] == [tuple(w.shape) for w in model.trainable_variables]
        expected = hessian @ reference.flatten(v)
        np.testing.assert_allclose(reference.flatten(hv), expected, rtol=1e-5, atol=1e-5)


def test_all_eigenvalues_of_a_tiny_mlp_come_in_decreasing_order_negative_ones_last(rng):
    model, params, x, t = _mlp(rng)
    hessian = reference.mlp_hessian(params, x.astype(np.float64), t.astype(np.float64))
    exact = np.sort(np.linalg.eigvalsh(hessian))[::-1]
    assert exact[-1] < 0  # not a minimum: the "largest" eigenvalues are algebraic ones
    values = hessian_eigenvalues(Objective(model, x, t, loss="mse"), k=len(exact), verbose=0)
    assert values.dtype == np.float64 and values.shape == exact.shape
    np.testing.assert_allclose(values, exact, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "spectrum",
    [
        [10.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.1],
        [4.0, 3.9, 0.3, 0.2, 0.2, 0.1, 0.05, 0.01],  # a small gap at the top
    ],
)
def test_top_eigenvalues_and_eigenvectors_of_a_quadratic_with_a_known_spectrum(rng, spectrum):
    # Least squares: L(w) = mean((X w - y)^2) has the constant Hessian 2/n X^T X.
    design, eigenvectors = reference.design_with_spectrum(rng, 64, spectrum)
    x = design.astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    exact = np.sort(np.linalg.eigvalsh(2 / 64 * x.astype(np.float64).T @ x))[::-1]
    np.testing.assert_allclose(exact, sorted(spectrum, reverse=True), rtol=1e-5)
    model = _linear(x)
    values, vectors = hessian_eigenvalues(
        Objective(model, x, y, batch_size=16), k=3, tol=1e-6, return_eigenvectors=True, verbose=0
    )
    np.testing.assert_allclose(values, exact[:3], rtol=1e-5)
    for i, vector in enumerate(vectors):
        (kernel,) = vector
        assert kernel.shape == (8, 1)
        assert np.linalg.norm(kernel) == pytest.approx(1.0, abs=1e-6)
        # eigenvectors[:, i] belongs to spectrum[i] (design_with_spectrum's order)
        assert abs(float(kernel[:, 0] @ eigenvectors[:, i])) == pytest.approx(1.0, abs=1e-4)


def test_an_eigenvalue_of_multiplicity_two_is_found_twice(rng):
    # In exact arithmetic a Krylov space holds one vector of each eigenspace; the second
    # copy comes from the restart and from rounding. 40 weights, so Lanczos stops early.
    spectrum = [5.0, 5.0, 2.0, *np.geomspace(1.0, 0.01, 37)]
    design, _ = reference.design_with_spectrum(rng, 128, spectrum)
    x = design.astype("float32")
    y = rng.normal(size=(128, 1)).astype("float32")
    values = hessian_eigenvalues(Objective(_linear(x), x, y), k=3, verbose=0)
    np.testing.assert_allclose(values, [5.0, 5.0, 2.0], rtol=1e-5)


def test_a_rank_deficient_hessian_exhausts_the_krylov_space_and_gives_zeros(rng):
    design, _ = reference.design_with_spectrum(rng, 64, [3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    x = design.astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    values = hessian_eigenvalues(Objective(_linear(x), x, y), k=4, tol=1e-6, verbose=0)
    np.testing.assert_allclose(values, [3.0, 1.0, 0.0, 0.0], rtol=1e-5, atol=1e-5)


def test_eigenvalues_are_seeded_and_warn_when_they_do_not_converge(rng):
    design, _ = reference.design_with_spectrum(rng, 64, np.geomspace(10, 0.01, 12))
    x = design.astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    model = _linear(x)
    first = hessian_eigenvalues(Objective(model, x, y), k=2, seed=3, verbose=0)
    again = hessian_eigenvalues(Objective(model, x, y), k=2, seed=3, verbose=0)
    np.testing.assert_array_equal(first, again)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        hessian_eigenvalues(Objective(model, x, y), k=2, max_iterations=2, tol=1e-9, verbose=0)


def test_hutchinson_trace_is_within_its_standard_error_of_the_exact_trace(rng):
    design, _ = reference.design_with_spectrum(rng, 64, [6.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    x = design.astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    hessian = 2 / 64 * x.astype(np.float64).T @ x
    off_diagonal = hessian - np.diag(np.diag(hessian))
    probes = 400
    result = hessian_trace(Objective(_linear(x), x, y), num_probes=probes, seed=1, verbose=0)
    assert result["num_probes"] == probes and result["samples"].shape == (probes,)
    assert abs(result["trace"] - np.trace(hessian)) < 3 * result["standard_error"]
    # The estimator's own variance: Var(v^T H v) = 2 sum_{i != j} H_ij^2 for Rademacher v.
    expected_error = np.sqrt(2 * np.sum(off_diagonal**2) / probes)
    assert result["standard_error"] == pytest.approx(expected_error, rel=0.2)


def test_hutchinson_trace_is_exact_for_a_diagonal_hessian(rng):
    # Orthogonal columns: 2/n X^T X is diagonal, and every probe gives the trace.
    q, _ = np.linalg.qr(rng.normal(size=(64, 5)))
    x = (q * np.sqrt(np.array([3.0, 2.0, 1.0, 0.5, 0.25]) * 32)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    hessian = 2 / 64 * x.astype(np.float64).T @ x
    result = hessian_trace(Objective(_linear(x), x, y), num_probes=5, verbose=0)
    np.testing.assert_allclose(result["samples"], np.trace(hessian), rtol=1e-5)
    assert result["standard_error"] < 1e-5 * np.trace(hessian)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m, x, y: hessian_eigenvalues(Objective(m, x, y), k=0),
            "`k` must be a positive integer",
        ),
        (
            lambda m, x, y: hessian_eigenvalues(Objective(m, x, y), k=4),
            "`k` must be at most the number",
        ),
        (
            lambda m, x, y: hessian_eigenvalues(Objective(m, x, y), k=2, max_iterations=1),
            "`max_iterations` must be >= k",
        ),
        (
            lambda m, x, y: hessian_eigenvalues(Objective(m, x, y), tol=0),
            "`tol` must be a number > 0",
        ),
        (
            lambda m, x, y: hessian_eigenvalues(Objective(m, x, y), seed=-1),
            "`seed` must be an integer",
        ),
        (
            lambda m, x, y: hessian_trace(Objective(m, x, y), num_probes=1),
            "`num_probes` must be >= 2",
        ),
        (
            lambda m, x, y: hessian_trace(Objective(m, x, y, batch_size=0)),
            "`batch_size` must be a positive",
        ),
        (
            lambda m, x, y: hessian_vector_product(Objective(m, x, y), [np.ones((3, 1))] * 2),
            "`vector` must be a list with one array per trainable variable",
        ),
        (
            lambda m, x, y: hessian_vector_product(Objective(m, x, y), [np.ones((2, 1))]),
            r"`vector\[0\]` must have the shape",
        ),
        (
            lambda m, x, y: hessian_trace(Objective(m, x, y[:5])),
            "`x` and `y` must hold the same number",
        ),
    ],
)
def test_arguments_are_checked(rng, call, message):
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    model = _linear(x)
    with pytest.raises(ValueError, match=message):
        call(model, x, y)


def test_the_k_error_echoes_the_value(rng):
    x = rng.normal(size=(8, 3)).astype("float32")
    with pytest.raises(ValueError) as error:
        hessian_eigenvalues(Objective(_linear(x), x, x[:, :1]), k=0)
    assert str(error.value) == "`k` must be a positive integer. Received: k=0"
