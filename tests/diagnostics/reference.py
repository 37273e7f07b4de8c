"""NumPy float64 references for the diagnostics, sharing no code with keras_sam.

- The exact Hessian-vector product of the two-layer tanh MLP of `tests/reference.py`,
  by Pearlmutter's R-operator written out by hand, and its full Hessian (one product per
  basis vector).
- Least squares, `L(w) = mean((X w - y)^2)`: gradient `2/n X^T (X w - y)`, Hessian
  `2/n X^T X`, and SAM's ascent on it, step by step.
"""

import numpy as np


def mlp_hessian_vector_product(params, direction, x, t):
    """H v for `mean((tanh(x W1 + b1) W2 + b2 - t)^2)` with respect to (W1, b1, W2, b2).

    R{f} is the directional derivative of f along `direction`; the gradients of
    `tests.reference.mlp_loss_and_grads` are differentiated once more, term by term.
    """
    w1, b1, w2, b2 = params
    v1, c1, v2, c2 = direction
    h = np.tanh(x @ w1 + b1)
    y = h @ w2 + b2
    size = y.size
    dy = 2.0 * (y - t) / size
    # Forward R-pass.
    r_h_pre = x @ v1 + c1
    r_h = (1 - h**2) * r_h_pre
    r_y = r_h @ w2 + h @ v2 + c2
    r_dy = 2.0 * r_y / size
    # Backward pass of the gradients, differentiated.
    r_g_w2 = r_h.T @ dy + h.T @ r_dy
    r_g_b2 = r_dy.sum(0)
    back = dy @ w2.T  # dL/dh
    r_back = r_dy @ w2.T + dy @ v2.T
    r_dh = r_back * (1 - h**2) + back * (-2 * h * r_h)
    r_g_w1 = x.T @ r_dh
    r_g_b1 = r_dh.sum(0)
    return [r_g_w1, r_g_b1, r_g_w2, r_g_b2]


def mlp_hessian(params, x, t):
    """The full Hessian over the flattened (W1, b1, W2, b2), one R-product per column."""
    shapes = [p.shape for p in params]
    sizes = [p.size for p in params]
    dim = sum(sizes)
    columns = []
    for i in range(dim):
        basis = np.zeros(dim)
        basis[i] = 1.0
        columns.append(flatten(mlp_hessian_vector_product(params, unflatten(basis, shapes), x, t)))
    return np.stack(columns, axis=1)


def flatten(arrays):
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def unflatten(flat, shapes):
    arrays, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        arrays.append(np.asarray(flat[start : start + size]).reshape(shape))
        start += size
    return arrays


def least_squares_loss(x, y, w):
    return float(np.mean((x @ w - y) ** 2))


def least_squares_gradient(x, y, w):
    return 2.0 / len(x) * x.T @ (x @ w - y)


def least_squares_ascent(x, y, w, rho, steps, step_size):
    """`max_t L(w + e_t)` of projected, normalized gradient ascent from e_0 = 0."""
    e = np.zeros_like(w)
    largest = -np.inf
    for _ in range(steps):
        g = least_squares_gradient(x, y, w + e)
        e = e + step_size * g / np.linalg.norm(g)
        norm = np.linalg.norm(e)
        if norm > rho:
            e = e * rho / norm
        largest = max(largest, least_squares_loss(x, y, w + e))
    return largest


def design_with_spectrum(rng, n, eigenvalues):
    """X (n x d) with `2/n X^T X` having exactly `eigenvalues` (and its eigenvectors)."""
    d = len(eigenvalues)
    u, _ = np.linalg.qr(rng.normal(size=(n, d)))
    v, _ = np.linalg.qr(rng.normal(size=(d, d)))
    singular = np.sqrt(np.asarray(eigenvalues, np.float64) * n / 2.0)
    return u @ np.diag(singular) @ v.T, v
