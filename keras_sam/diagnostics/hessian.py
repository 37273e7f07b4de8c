"""Curvature: Hessian-vector products, the top Hessian eigenvalues, and the trace."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_sam import _validation
from keras_sam.diagnostics import _engine

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from keras_sam.diagnostics.objective import Objective


def hessian_vector_product(objective: Objective, vector: Sequence[ArrayLike]) -> list[np.ndarray]:
    """The Hessian of the mean loss times a vector, exactly, by double differentiation.

    ```
    L(w) = 1/n sum_i loss(y_i, f(x_i; w))     # over all of (x, y), in batches
    H v  = grad_w (grad_w L(w) . v)           # two nested gradient tapes
    ```

    No finite differences: the product is exact up to floating-point rounding. Each batch
    costs a forward pass, a backward pass, and the backward pass of that backward pass
    (about 2.8 gradient evaluations; see `benchmarks/diagnostics.py`). The model runs in
    inference mode (`training=False`), on the data loss without regularization losses,
    and its weights are never written.

    Args:
        objective: the `Objective`: the model, the data, the loss and the batch size.
        vector: list of arrays, one per trainable variable of the model, of their shapes.

    Returns:
        A list of NumPy arrays shaped like the model's `trainable_variables`: `H v`.

    Example:

    ```python
    v = [np.ones(w.shape, "float32") for w in model.trainable_variables]
    objective = keras_sam.diagnostics.Objective(model, x, y)
    hv = keras_sam.diagnostics.hessian_vector_product(objective, v)
    ```

    References:
        - Pearlmutter, Fast Exact Multiplication by the Hessian, Neural Computation 1994.
    """
    passes = _engine.Passes(objective)
    vector = _check_vector(vector, passes.variables)
    weights = _engine.snapshot(passes.variables)
    return _engine.to_numpy(passes.hessian_vector_product(weights, vector))


def hessian_eigenvalues(
    objective: Objective,
    *,
    k: int = 1,
    max_iterations: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    return_eigenvectors: bool = False,
    verbose: int = 1,
) -> np.ndarray | tuple[np.ndarray, list[list[np.ndarray]]]:
    """The `k` largest eigenvalues of the Hessian of the loss, by the Lanczos method.

    Lanczos builds an orthonormal basis `q_1, q_2, ...` of the Krylov space
    `span(q_1, H q_1, H^2 q_1, ...)` from a seeded random start, one Hessian-vector product
    per iteration, in which `H` is the tridiagonal matrix `T`:

    ```
    r = H q_j - alpha_j q_j - beta_{j-1} q_{j-1},   alpha_j = q_j . H q_j
    beta_j = ||r||,  q_{j+1} = r / beta_j           # r re-orthogonalized against all q
    eigenvalues of T (Ritz values) -> the extreme eigenvalues of H
    ```

    It stops when each of the `k` largest Ritz values `theta` has the residual
    `||H y - theta y|| = beta_j |s_j|` below `tol` times the largest `|theta|` (`y = Q s`,
    its Ritz vector), or after `max_iterations`. The basis is re-orthogonalized in full at
    each step, and when the Krylov space is exhausted (an eigenvalue of multiplicity > 1,
    or a small model) the iteration continues from a new random vector orthogonal to it.
    "Largest" is algebraic: away from a minimum the Hessian has negative eigenvalues, and
    they come last.

    Cost: one Hessian-vector product over all of the data per iteration, usually 10 to
    40 iterations for `k=1`; memory: one float32 copy of the weights per iteration.

    Args:
        objective: the `Objective`: the model, the data, the loss and the batch size.
        k: int >= 1, how many eigenvalues. Defaults to 1.
        max_iterations: int >= k, the most Lanczos iterations (Hessian-vector products).
            Defaults to 100.
        tol: float > 0, the relative residual at which an eigenvalue counts as found.
            Defaults to `1e-3`.
        seed: int, seeds the starting vector. Defaults to 0.
        return_eigenvectors: bool, also return the eigenvectors. Defaults to `False`.
        verbose: 0 (silent), 1 (progress bar) or 2 (one line at the end). Defaults to 1.

    Returns:
        A NumPy float64 array of the `k` largest eigenvalues, in decreasing order. With
        `return_eigenvectors=True`, a pair `(eigenvalues, eigenvectors)`, where
        `eigenvectors[i]` is a list of arrays shaped like the model's `trainable_variables`, of
        unit norm over all of them. A `RuntimeWarning` says when `max_iterations` ran out
        before `tol` was met (the values are then the best found).

    Example:

    ```python
    objective = keras_sam.diagnostics.Objective(model, x_train[:2000], y_train[:2000])
    top = keras_sam.diagnostics.hessian_eigenvalues(objective, k=5)
    ```

    References:
        - Lanczos, An Iteration Method for the Solution of the Eigenvalue Problem of Linear
          Differential and Integral Operators, J. Res. Nat. Bur. Standards 1950.
        - Ghorbani, Krishnan and Xiao, An Investigation into Neural Net Optimization via
          Hessian Eigenvalue Density, ICML 2019. https://arxiv.org/abs/1901.10159
    """
    k = _validation.check_positive_int("k", k)
    max_iterations = _validation.check_positive_int("max_iterations", max_iterations)
    tol = _validation.check_positive("tol", tol)
    seed = _check_seed(seed)
    verbose = _validation.check_verbose(verbose)
    if max_iterations < k:
        raise ValueError(
            "`max_iterations` must be >= k: each iteration finds at most one more "
            f"eigenvalue. Received: max_iterations={max_iterations}, k={k}"
        )
    passes = _engine.Passes(objective)
    weights = _engine.snapshot(passes.variables)
    shapes = [tuple(w.shape) for w in weights]
    dim = int(sum(np.prod(s, dtype=np.int64) for s in shapes))
    if k > dim:
        raise ValueError(
            f"`k` must be at most the number of trainable weights ({dim}). Received: k={k}"
        )

    def matvec(flat):
        product = passes.hessian_vector_product(weights, _unflatten(flat, shapes))
        return _flatten(_engine.to_numpy(product))

    values, vectors, converged = _lanczos(
        matvec, dim, k, min(max_iterations, dim), tol, np.random.default_rng(seed), verbose
    )
    if not converged:
        _warn_not_converged(k, tol, max_iterations)
    if return_eigenvectors:
        return values, [_unflatten(v, shapes) for v in vectors]
    return values


def _warn_not_converged(k, tol, max_iterations):
    warnings.warn(
        f"hessian_eigenvalues: the {k} largest eigenvalues did not reach the relative "
        f"residual tol={tol:g} within max_iterations={max_iterations}; returning the best "
        "estimates. Raise `max_iterations` or `tol`.",
        RuntimeWarning,
        stacklevel=3,  # the caller of hessian_eigenvalues
    )


def hessian_trace(
    objective: Objective,
    *,
    num_probes: int = 100,
    seed: int = 0,
    verbose: int = 1,
) -> dict[str, Any]:
    """The trace of the Hessian of the loss, by Hutchinson's estimator, with its error.

    For random vectors `v` with independent entries +1 or -1 (Rademacher), `E[v^T H v] =
    tr(H)`, so the mean over `num_probes` probes estimates the trace without forming `H`:

    ```
    trace = 1/P sum_p v_p^T H v_p            # one Hessian-vector product per probe
    standard_error = std(v_p^T H v_p) / sqrt(P)
    ```

    The estimator's variance is `2 sum_{i != j} H_ij^2` per probe: it is exact for a
    diagonal Hessian, and the standard error shrinks as `1/sqrt(P)`.

    Args:
        objective: the `Objective`: the model, the data, the loss and the batch size.
        num_probes: int >= 2, the number of random probes (Hessian-vector products over
            all of the data). Defaults to 100.
        seed: int, seeds the probes. Defaults to 0.
        verbose: 0 (silent), 1 (progress bar) or 2 (one line at the end). Defaults to 1.

    Returns:
        A dict: `trace` and `standard_error` (Python floats), `num_probes`, and `samples`,
        the NumPy array of the `v_p^T H v_p`.

    Example:

    ```python
    objective = keras_sam.diagnostics.Objective(model, x, y)
    result = keras_sam.diagnostics.hessian_trace(objective, num_probes=50)
    print(f"{result['trace']:.1f} +- {result['standard_error']:.1f}")
    ```

    References:
        - Hutchinson, A Stochastic Estimator of the Trace of the Influence Matrix for
          Laplacian Smoothing Splines, Comm. Statist. Simulation Comput. 1990.
        - Yao et al., PyHessian: Neural Networks Through the Lens of the Hessian, 2020.
          https://arxiv.org/abs/1912.07145
    """
    num_probes = _validation.check_positive_int("num_probes", num_probes)
    if num_probes < 2:
        raise ValueError(
            "`num_probes` must be >= 2 (the standard error needs two samples). "
            f"Received: num_probes={num_probes}"
        )
    seed = _check_seed(seed)
    verbose = _validation.check_verbose(verbose)
    passes = _engine.Passes(objective)
    weights = _engine.snapshot(passes.variables)
    rng = np.random.default_rng(seed)
    bar = _engine.progress(num_probes, verbose, "probe", shown=["trace"])
    samples = np.empty(num_probes)
    for p in range(num_probes):
        probe = [(2 * rng.integers(0, 2, size=w.shape) - 1).astype("float32") for w in weights]
        product = _engine.to_numpy(passes.hessian_vector_product(weights, probe))
        samples[p] = sum(
            np.dot(a.ravel(), b.ravel().astype(np.float64)) for a, b in zip(probe, product)
        )
        if bar is not None:
            bar.update(p + 1, values=[("trace", float(np.mean(samples[: p + 1])))])
    return {
        "trace": float(np.mean(samples)),
        "standard_error": float(np.std(samples, ddof=1) / np.sqrt(num_probes)),
        "num_probes": num_probes,
        "samples": samples,
    }


def _lanczos(matvec, dim, k, iterations, tol, rng, verbose):
    """Lanczos with full re-orthogonalization; returns (values, vectors, converged)."""
    basis = []  # float32 rows, one per iteration: memory grows only as far as it runs
    alphas, betas = [], []
    start = rng.standard_normal(dim)
    q = start / np.linalg.norm(start)
    bar = _engine.progress(iterations, verbose, "iteration", shown=["largest"])
    converged = False
    for j in range(iterations):
        basis.append(q.astype(np.float32))
        r = matvec(q)
        alpha = float(q @ r)
        r -= alpha * q
        if j > 0:
            r -= betas[-1] * basis[j - 1]
        r = _orthogonalize(r, basis)
        beta = float(np.linalg.norm(r))
        alphas.append(alpha)
        theta, s = np.linalg.eigh(_tridiagonal(alphas, betas))
        order = np.argsort(theta)[::-1][:k]
        scale = max(float(np.max(np.abs(theta))), np.finfo(np.float64).tiny)
        residuals = beta * np.abs(s[-1, order])
        if bar is not None:
            bar.update(j + 1, values=[("largest", float(theta[order[0]]))])
        if len(alphas) >= k and np.all(residuals <= tol * scale):
            converged = True
            break
        if j + 1 == iterations:
            break
        if beta <= 1e-6 * scale:
            # The Krylov space is exhausted: H maps it into itself. Go on from a new
            # random direction orthogonal to it (T gets a zero off-diagonal there).
            r = _orthogonalize(rng.standard_normal(dim), basis)
            betas.append(0.0)
            q = r / np.linalg.norm(r)
        else:
            betas.append(beta)
            q = r / beta
    if bar is not None:
        bar.update(len(alphas), finalize=True)
    values = theta[order]
    vectors = _ritz_vectors(s[:, order], basis, dim)
    return values.astype(np.float64), vectors, converged or len(alphas) == dim


def _ritz_vectors(coefficients, basis, dim):
    """`Q s / ||Q s||` for each column `s` of `coefficients` (`Q`: the rows of `basis`)."""
    vectors = []
    for column in coefficients.T:
        vector = np.zeros(dim)
        for coefficient, row in zip(column, basis):
            vector += coefficient * row
        vectors.append(vector / np.linalg.norm(vector))
    return vectors


def _orthogonalize(r, basis):
    """`r` minus its projections on `basis`, by modified Gram-Schmidt, twice ("twice is
    enough": one pass leaves errors of the order of rounding times the condition)."""
    for _ in range(2):
        for row in basis:
            r = r - float(row @ r.astype(np.float32)) * row
    return r.astype(np.float64)


def _tridiagonal(alphas, betas):
    size = len(alphas)
    t = np.diag(np.asarray(alphas, np.float64))
    if size > 1:
        off = np.asarray(betas[: size - 1], np.float64)
        t += np.diag(off, 1) + np.diag(off, -1)
    return t


def _flatten(arrays):
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def _unflatten(flat, shapes):
    arrays, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        arrays.append(np.asarray(flat[start : start + size], np.float32).reshape(shape))
        start += size
    return arrays


def _check_vector(vector, variables):
    vector = list(vector) if isinstance(vector, (list, tuple)) else None
    if vector is None or len(vector) != len(variables):
        raise ValueError(
            "`vector` must be a list with one array per trainable variable "
            f"({len(variables)}). Received: "
            + ("a non-list" if vector is None else f"a list of {len(vector)}")
        )
    arrays = []
    for i, (v, variable) in enumerate(zip(vector, variables)):
        array = np.asarray(v, np.float32)
        if array.shape != tuple(variable.shape):
            raise ValueError(
                f"`vector[{i}]` must have the shape of the variable {variable.path!r}, "
                f"{tuple(variable.shape)}. Received: shape {array.shape}"
            )
        arrays.append(array)
    return arrays


def _check_seed(seed):
    return _validation.check_integer("seed", seed, minimum=0)
