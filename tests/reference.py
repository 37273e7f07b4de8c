"""An independent NumPy float64 implementation of SAM and ASAM, for the tests.

It shares no code with keras_sam: the norm, the perturbation, a two-layer MLP with
hand-written gradients, and Keras's SGD-with-momentum rule.
"""

import numpy as np


def perturbation(grads, rho, epsilon=1e-12, scales=None):
    """e = rho * T^2 g / (||T g|| + epsilon); T = 1 when `scales` is None."""
    grads = [np.asarray(g, np.float64) for g in grads]
    if scales is None:
        scales = [np.ones_like(g) for g in grads]
    scaled = [s * g for s, g in zip(scales, grads, strict=True)]
    norm = np.sqrt(sum(np.sum(t * t) for t in scaled))
    return [rho * s * t / (norm + epsilon) for s, t in zip(scales, scaled, strict=True)]


# A two-layer MLP: y = tanh(x W1 + b1) W2 + b2, loss = mean((y - t)^2) + l2 * sum(W^2).
def mlp_init(rng, d_in=3, d_hidden=5, d_out=2):
    return [
        rng.normal(size=(d_in, d_hidden)) * 0.7,
        rng.normal(size=(d_hidden,)) * 0.1,
        rng.normal(size=(d_hidden, d_out)) * 0.7,
        rng.normal(size=(d_out,)) * 0.1,
    ]


def mlp_loss_and_grads(params, x, t, l2=0.0):
    w1, b1, w2, b2 = params
    h_pre = x @ w1 + b1
    h = np.tanh(h_pre)
    y = h @ w2 + b2
    diff = y - t
    loss = np.mean(diff**2) + l2 * (np.sum(w1**2) + np.sum(w2**2))
    dy = 2.0 * diff / diff.size
    g_w2 = h.T @ dy + 2 * l2 * w2
    g_b2 = dy.sum(0)
    dh = dy @ w2.T * (1 - h**2)
    g_w1 = x.T @ dh + 2 * l2 * w1
    g_b1 = dh.sum(0)
    return loss, [g_w1, g_b1, g_w2, g_b2]


def mlp_sam_gradient(params, x, t, rho, adaptive=False, eta=0.01, l2=0.0, epsilon=1e-12):
    """SAM (or ASAM, with T = |w| + eta on the two weight matrices) gradient, and losses."""
    loss, grads = mlp_loss_and_grads(params, x, t, l2)
    scales = None
    if adaptive:
        scales = [np.abs(p) + eta if p.ndim == 2 else np.ones_like(p) for p in params]
    e = perturbation(grads, rho, epsilon, scales)
    loss_sam, sam_grads = mlp_loss_and_grads(
        [p + ei for p, ei in zip(params, e, strict=True)], x, t, l2
    )
    return loss, loss_sam, sam_grads


def sgd_momentum(params, grads, velocities, lr, momentum):
    """Keras's SGD: v = momentum * v - lr * g; w = w + v (plain step when momentum == 0)."""
    new_params, new_velocities = [], []
    for p, g, v in zip(params, grads, velocities, strict=True):
        if momentum:
            v = momentum * v - lr * g
            new_params.append(p + v)
        else:
            new_params.append(p - lr * g)
        new_velocities.append(v)
    return new_params, new_velocities
