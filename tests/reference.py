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


def layerwise_perturbation(grads, rho, groups, epsilon=1e-12, scales=None):
    """e_l = (rho / sqrt(L)) T_l^2 g_l / (||T_l g_l|| + epsilon), for the L distinct `groups`."""
    grads = [np.asarray(g, np.float64) for g in grads]
    if scales is None:
        scales = [np.ones_like(g) for g in grads]
    names = sorted(set(groups))
    share = rho / np.sqrt(len(names))
    e = [None] * len(grads)
    for name in names:
        members = [i for i, group in enumerate(groups) if group == name]
        norm = np.sqrt(sum(np.sum((scales[i] * grads[i]) ** 2) for i in members))
        for i in members:
            e[i] = share * scales[i] ** 2 * grads[i] / (norm + epsilon)
    return e


# A two-layer MLP: y = tanh(x W1 + b1) W2 + b2, loss = mean((y - t)^2) + l2 * sum(W^2).
def mlp_init(rng, d_in=3, d_hidden=5, d_out=2):
    return [
        rng.normal(size=(d_in, d_hidden)) * 0.7,
        rng.normal(size=(d_hidden,)) * 0.1,
        rng.normal(size=(d_hidden, d_out)) * 0.7,
        rng.normal(size=(d_out,)) * 0.1,
    ]


def mlp_predict(params, x, mask=None):
    w1, b1, w2, b2 = params
    h = np.tanh(x @ w1 + b1)
    return (h if mask is None else h * mask) @ w2 + b2


def mlp_loss_and_grads(params, x, t, l2=0.0, sample_weight=None, mask=None):
    """The loss and its gradients; `sample_weight` weighs the examples as Keras does (the
    weighted sum over the batch size), `mask` multiplies the hidden units (dropout)."""
    w1, b1, w2, b2 = params
    h_pre = x @ w1 + b1
    h = np.tanh(h_pre)
    h_out = h if mask is None else h * mask
    y = h_out @ w2 + b2
    diff = y - t
    weights = np.ones(len(x)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    loss = np.sum(weights[:, None] * diff**2) / diff.size + l2 * (np.sum(w1**2) + np.sum(w2**2))
    dy = 2.0 * weights[:, None] * diff / diff.size
    g_w2 = h_out.T @ dy + 2 * l2 * w2
    g_b2 = dy.sum(0)
    dh = dy @ w2.T
    if mask is not None:
        dh = dh * mask
    dh = dh * (1 - h**2)
    g_w1 = x.T @ dh + 2 * l2 * w1
    g_b1 = dh.sum(0)
    return loss, [g_w1, g_b1, g_w2, g_b2]


def mlp_sam_gradient(
    params, x, t, rho, adaptive=False, eta=0.01, l2=0.0, epsilon=1e-12, layerwise=False, **kw
):
    """SAM (or ASAM, with T = |w| + eta on the two weight matrices) gradient, and losses;
    `layerwise`: each layer (W1 and b1; W2 and b2) normalized on its own.

    `**kw` (`sample_weight`, `mask`) goes to both passes."""
    loss, grads = mlp_loss_and_grads(params, x, t, l2, **kw)
    scales = None
    if adaptive:
        scales = [np.abs(p) + eta if p.ndim == 2 else np.ones_like(p) for p in params]
    if layerwise:
        e = layerwise_perturbation(
            grads, rho, ["hidden", "hidden", "head", "head"], epsilon, scales
        )
    else:
        e = perturbation(grads, rho, epsilon, scales)
    loss_sam, sam_grads = mlp_loss_and_grads(
        [p + ei for p, ei in zip(params, e, strict=True)], x, t, l2, **kw
    )
    return loss, loss_sam, sam_grads


def split_bounds(n, splits):
    """Where `SAMModel(num_batch_splits=splits)` cuts a batch of n: sizes differ by <= 1."""
    return np.cumsum([0] + [(n + i) // splits for i in range(splits)])


def mlp_split_sam_gradient(params, x, t, rho, splits=1, **kw):
    """m-sharpness: each part's SAM gradient and losses, averaged weighted by part size."""
    bounds = split_bounds(len(x), splits)
    loss, loss_sam, grads = 0.0, 0.0, [np.zeros_like(p) for p in params]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        weight = (hi - lo) / len(x)
        part_loss, part_loss_sam, part_grads = mlp_sam_gradient(
            params, x[lo:hi], t[lo:hi], rho, **kw
        )
        loss += weight * part_loss
        loss_sam += weight * part_loss_sam
        grads = [g + weight * pg for g, pg in zip(grads, part_grads, strict=True)]
    return loss, loss_sam, grads


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


def adam(params, grads, slots, step, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Keras's Adam at 0-based `step`; `slots` = (m, v), None at the start."""
    if slots is None:
        slots = ([np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params])
    t = step + 1
    alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
    new_params, new_m, new_v = [], [], []
    for p, g, m, v in zip(params, grads, *slots, strict=True):
        m = m + (g - m) * (1 - beta_1)
        v = v + (g * g - v) * (1 - beta_2)
        new_params.append(p - alpha * m / (np.sqrt(v) + epsilon))
        new_m.append(m)
        new_v.append(v)
    return new_params, (new_m, new_v)


def sgd(lr, momentum=0.0):
    """Keras's SGD as an `update(params, grads, slots, step)`; `lr` a number or lr(step)."""

    def update(params, grads, slots, step):
        if slots is None:
            slots = [np.zeros_like(p) for p in params]
        rate = lr(step) if callable(lr) else lr
        return sgd_momentum(params, grads, slots, rate, momentum)

    return update


def adam_update(lr, **kwargs):
    """Keras's Adam as an `update(params, grads, slots, step)`."""

    def update(params, grads, slots, step):
        return adam(params, grads, slots, step, lr, **kwargs)

    return update


def trajectory(step_fn, params, batches, update):
    """Runs a method's `step_fn` (below) with an optimizer's `update` over the batches.

    Returns the final params, the method's final state and the number of two-pass steps.
    """
    state, slots, passes = {}, None, 0
    for step, (x, t) in enumerate(batches):
        grads, state, two_pass = step_fn(params, x, t, state, step)
        params, slots = update(params, grads, slots, step)
        passes += two_pass
    return params, state, passes


# ----------------------------------------------------------------- SAM variants
# Each `*_step` takes the MLP parameters, the batch, the method's state (a dict, empty at
# the start) and the step number, and returns (descent gradients, new state, two_pass).


def _rate(rho, step):
    """`rho` at `step`: a number, or a function of the step (a schedule)."""
    return rho(step) if callable(rho) else rho


def sam_step(params, x, t, state, step, rho, splits=1, **kw):
    """SAM or ASAM (`adaptive=True`), with m-sharpness over `splits` parts; `rho` may be
    a function of the step (a schedule). A step with `rho = 0` is one pass (the clean
    gradient)."""
    rate = _rate(rho, step)
    if rate == 0:
        _, _, grads = mlp_split_sam_gradient(params, x, t, 0.0, splits=splits, **kw)
        return grads, state, False
    _, _, grads = mlp_split_sam_gradient(params, x, t, rate, splits=splits, **kw)
    return grads, state, True


def _flat_dot(a, b):
    return sum(float(np.sum(x * y)) for x, y in zip(a, b, strict=True))


def _flat_norm(a):
    return np.sqrt(_flat_dot(a, a))


def _at(params, e):
    return [p + ei for p, ei in zip(params, e, strict=True)]


def gsam_step(params, x, t, state, step, rho, alpha):
    """GSAM: g_adv - alpha * (g - (g . u) u), u = g_adv / ||g_adv||."""
    _, g = mlp_loss_and_grads(params, x, t)
    _, g_adv = mlp_loss_and_grads(_at(params, perturbation(g, rho)), x, t)
    u = [ga / _flat_norm(g_adv) for ga in g_adv]
    c = _flat_dot(g, u)
    g_perp = [gi - c * ui for gi, ui in zip(g, u, strict=True)]
    return [ga - alpha * gp for ga, gp in zip(g_adv, g_perp, strict=True)], state, True


def friendly_sam_step(params, x, t, state, step, rho, sigma, lmbda):
    """F-SAM, the paper's order: m = lmbda m + (1 - lmbda) g; d = g - sigma m. At
    `rho = 0`: m updated, the clean gradient."""
    _, g = mlp_loss_and_grads(params, x, t)
    m = state.get("m", [np.zeros_like(p) for p in params])
    m = [lmbda * mi + (1 - lmbda) * gi for mi, gi in zip(m, g, strict=True)]
    rate = _rate(rho, step)
    if rate == 0:
        return g, {"m": m}, False
    d = [gi - sigma * mi for gi, mi in zip(g, m, strict=True)]
    _, g_s = mlp_loss_and_grads(_at(params, perturbation(d, rate)), x, t)
    return g_s, {"m": m}, True


def looksam_step(params, x, t, state, step, rho, k, alpha):
    """LookSAM: SAM and the stored g_v every k steps; g + alpha ||g|| / ||g_v|| g_v otherwise.

    A step with `rho = 0` is a plain step (g); on a k-th one, g_v = 0 (SAM's component
    orthogonal to g at rho = 0)."""
    _, g = mlp_loss_and_grads(params, x, t)
    g_v = state.get("g_v", [np.zeros_like(p) for p in params])
    rate = _rate(rho, step)
    if rate == 0:
        if step % k == 0:
            g_v = [np.zeros_like(p) for p in params]
        return g, {"g_v": g_v}, False
    if step % k == 0:
        _, g_s = mlp_loss_and_grads(_at(params, perturbation(g, rate)), x, t)
        c = _flat_dot(g_s, g) / _flat_dot(g, g)
        g_v = [gs - c * gi for gs, gi in zip(g_s, g, strict=True)]
        return g_s, {"g_v": g_v}, True
    v_norm = _flat_norm(g_v)
    scale = alpha * _flat_norm(g) / v_norm if v_norm > 0 else 0.0
    return [gi + scale * vi for gi, vi in zip(g, g_v, strict=True)], state, False


def momentum_sam_step(
    params, x, t, state, step, rho, momentum, adaptive=False, eta=0.01, mask=None
):
    """Momentum-SAM: ONE pass, at w - rho T^2 v / ||T v|| (T = 1 unless `adaptive`; v = 0
    at the start gives the pass at w); v = momentum v + g; descend from w with g. With
    `mask`, only the parameters where it is True move (norm over those only)."""
    v = state.get("v", [np.zeros_like(p) for p in params])
    mask = mask or [True] * len(params)
    chosen = [(p, -vi) for p, vi, m in zip(params, v, mask, strict=True) if m]
    scales = None
    if adaptive:
        scales = [np.abs(p) + eta if p.ndim == 2 else np.ones_like(p) for p, _ in chosen]
    e_chosen = iter(perturbation([d for _, d in chosen], _rate(rho, step), scales=scales))
    e = [next(e_chosen) if m else np.zeros_like(p) for p, m in zip(params, mask, strict=True)]
    _, g = mlp_loss_and_grads(_at(params, e), x, t)
    v = [momentum * vi + gi for vi, gi in zip(v, g, strict=True)]
    return g, {"v": v}, False


def periodic_sam_step(params, x, t, state, step, rho, k):
    _, g = mlp_loss_and_grads(params, x, t)
    if step % k == 0:
        _, g_s = mlp_loss_and_grads(_at(params, perturbation(g, rho)), x, t)
        return g_s, state, True
    return g, state, False


def aesam_step(params, x, t, state, step, rho, margin, decay):
    """SAM when ||g||^2 >= mean + margin * std of its running statistics."""
    _, g = mlp_loss_and_grads(params, x, t)
    s = _flat_dot(g, g)
    if "mean" not in state:
        mean, var = s, 0.0
    else:
        mean = decay * state["mean"] + (1 - decay) * s
        var = decay * state["var"] + (1 - decay) * (s - mean) ** 2
    state = {"mean": mean, "var": var}
    if s >= mean + margin * np.sqrt(var):
        _, g_s = mlp_loss_and_grads(_at(params, perturbation(g, rho)), x, t)
        return g_s, state, True
    return g, state, False


def masked_sam_step(params, x, t, state, step, rho, mask):
    """SAM perturbing only the parameters where `mask` is True (norm over those only)."""
    _, g = mlp_loss_and_grads(params, x, t)
    chosen = [gi for gi, m in zip(g, mask, strict=True) if m]
    e_chosen = iter(perturbation(chosen, rho))
    e = [next(e_chosen) if m else np.zeros_like(p) for p, m in zip(params, mask, strict=True)]
    _, g_s = mlp_loss_and_grads(_at(params, e), x, t)
    return g_s, state, True


def cosine_decay(step, initial, decay_steps, alpha=0.0):
    """Keras's CosineDecay without warm-up."""
    fraction = min(step, decay_steps) / decay_steps
    return initial * ((1 - alpha) * 0.5 * (1 + np.cos(np.pi * fraction)) + alpha)


# -------------------------------------------------------------------- clipping
def clip(grads, clipnorm=None, global_clipnorm=None, clipvalue=None):
    """Keras's gradient clipping: per tensor by norm, all by the global norm, or by value."""
    grads = [np.asarray(g, np.float64) for g in grads]
    if clipnorm:
        return [g * clipnorm / max(np.sqrt(np.sum(g * g)), clipnorm) for g in grads]
    if global_clipnorm:
        norm = np.sqrt(sum(np.sum(g * g) for g in grads))
        return [g * global_clipnorm / max(norm, global_clipnorm) for g in grads]
    if clipvalue:
        return [np.clip(g, -clipvalue, clipvalue) for g in grads]
    return grads


# ----------------------------------------------------------------- BAR on a LoRA MLP
# y = tanh(x (K + A B) + b1) W2 + b2, loss = mean((y - t)^2): the first layer's kernel K
# frozen and adapted by LoRA (rank r, scale 1), the head trained in full. The parameters
# are [A, B, b1, W2, b2].


def lora_head_loss_and_grads(params, kernel, x, t):
    a, b, b1, w2, b2 = params
    h = np.tanh(x @ (kernel + a @ b) + b1)
    y = h @ w2 + b2
    d_y = 2.0 * (y - t) / y.size
    d_pre = (d_y @ w2.T) * (1.0 - h * h)
    g_merged = x.T @ d_pre  # the gradient of the loss in the adapted kernel K + A B
    grads = [g_merged @ b.T, a.T @ g_merged, d_pre.sum(0), h.T @ d_y, d_y.sum(0)]
    return np.mean((y - t) ** 2), grads


def bar_gradients(grads, a, b, alpha, variant):
    """Li, Zhang & He (2024), Algs. 2 (nBAR) and 3 (oBAR), as gradient terms: the factor
    `s * alpha` of `A` is subtracted from `g_A` and that of `B` added to `g_B`, where
    s = +1 when nBAR's ||g_A|| >= ||g_B||, or oBAR's ||A|| < ||B||, else -1.
    Returns the new (g_A, g_B) and s."""
    g_a, g_b = grads
    if variant == "nbar":
        s = 1.0 if np.linalg.norm(g_a) >= np.linalg.norm(g_b) else -1.0
    else:
        s = 1.0 if np.linalg.norm(a) < np.linalg.norm(b) else -1.0
    return g_a - s * alpha * a, g_b + s * alpha * b, s


def bar_step(params, x, t, state, step, kernel, alpha, variant):
    """One BAR step on the LoRA MLP (one pass); `state["signs"]` records each step's s."""
    _, grads = lora_head_loss_and_grads(params, kernel, x, t)
    g_a, g_b, s = bar_gradients(grads[:2], params[0], params[1], _rate(alpha, step), variant)
    state = {"signs": [*state.get("signs", []), s]}
    return [g_a, g_b, *grads[2:]], state, False


# ------------------------------------------------------------------ Flat-LoRA
# Li et al., "Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape", ICML 2025: one pass
# at the merged weight plus noise, `eps_ij ~ N(0, sigma_t^2 / n ||W'_i||^2)`, row i an output
# unit (the last axis of a Keras kernel), `sigma_t = sigma (1 - cos(pi t / T)) / 2`.
def flat_lora_strength(sigma, step, total_steps=None):
    if total_steps is None:
        return sigma
    t = min(step, total_steps)
    return sigma * 0.5 * (1.0 - np.cos(np.pi * t / total_steps))


def flat_lora_deviation(merged, strength, axes):
    """The noise's standard deviation, broadcast over `merged`: `strength ||W'_i|| / sqrt(n)`,
    the norm over `axes` (the inputs of each output unit), n their sizes' product."""
    merged = np.asarray(merged, np.float64)
    n = int(np.prod([merged.shape[a] for a in axes]))
    return strength * np.sqrt(np.sum(merged**2, axis=axes, keepdims=True)) / np.sqrt(n)


_U32 = np.uint32


def _lowbias32(x):
    """Wellons's lowbias32 integer hash, on uint32 (NumPy wraps the products)."""
    x = x ^ (x >> _U32(16))
    x = x * _U32(0x7FEB352D)
    x = x ^ (x >> _U32(15))
    x = x * _U32(0x846CA68B)
    return x ^ (x >> _U32(16))


def flat_lora_standard_normal(shape, seed, step, index):
    """keras_sam's counter-based noise, written from its description in uint32 NumPy: a key
    from (seed, step, layer), each counter hashed to a 24-bit uniform, Box-Muller pairs."""
    size = int(np.prod(shape))
    pairs = (size + 1) // 2
    with np.errstate(over="ignore"):
        key = _lowbias32(_U32(seed ^ 0x9E3779B9))
        key = _lowbias32(key ^ _U32(step))
        key = _lowbias32(key ^ _U32(index + 0x632BE5AB))
        salted = _lowbias32(key ^ _U32(0x632BE5AB))
        counters = np.arange(2 * pairs, dtype=np.uint32)
        bits = _lowbias32(_lowbias32(counters ^ key) + salted)
    uniform = ((bits >> _U32(8)).astype(np.float64) + 0.5) / 2.0**24
    radius = np.sqrt(-2.0 * np.log(uniform[0::2]))
    angle = 2.0 * np.pi * uniform[1::2]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size].reshape(shape)


def lora_mlp_loss_and_grads(params, x, t, noise=(None, None)):
    """`y = tanh(x M1 + b1) M2 + b2`, `M = W + eps + s A B` per layer, loss = mean((y - t)^2);
    `params` = [(W, b, A, B, s)] * 2. Returns the loss and the gradients of (b, A, B) per
    layer (W is frozen)."""
    merged = []
    for (w, _, a, b_lora, s), eps in zip(params, noise, strict=True):
        merged.append(w + (0.0 if eps is None else eps) + s * a @ b_lora)
    (_, b1, a1, bl1, s1), (_, b2, a2, bl2, s2) = params
    pre = x @ merged[0] + b1
    h = np.tanh(pre)
    y = h @ merged[1] + b2
    diff = y - t
    loss = np.mean(diff**2)
    dy = 2.0 * diff / diff.size
    dm2 = h.T @ dy
    dpre = (dy @ merged[1].T) * (1.0 - h**2)
    dm1 = x.T @ dpre
    grads = []
    for dm, db, a, bl, s in ((dm1, dpre.sum(0), a1, bl1, s1), (dm2, dy.sum(0), a2, bl2, s2)):
        grads.append((db, s * dm @ bl.T, s * a.T @ dm))
    return loss, grads
