"""The mathematics of SAM: pure functions on lists of tensors.

Everything here is written with `keras.ops`, holds no state, and knows nothing about
models, optimizers or backends. Gradient lists may contain `None` (a variable the loss
does not depend on): such entries are skipped by the norm and give `None` back.

Sparse gradients (`tf.IndexedSlices`) are a backend type: the trainer hands them here
densified, so duplicate indices are already summed and the norm is the true one.
"""

import keras
from keras import ops


class ListOps:
    """Element-wise arithmetic over lists of tensors, written with `keras.ops`: one call
    per tensor (XLA fuses them in a compiled step).

    Every list function here goes through `list_ops`, so that a backend with
    multi-tensor kernels can install its own (`use_list_ops`): PyTorch's adapter does,
    with `torch._foreach_*` (one kernel launch for a whole list on a GPU, as Keras's own
    PyTorch optimizers use). The results are the same; only the number of operations a
    step dispatches differs. `None` entries stay `None`.
    """

    def scale(self, tensors, factor):
        """`factor * t` for each tensor, in float32, cast back to the tensor's dtype;
        `factor` a float32 scalar."""
        return [
            None if t is None else ops.cast(factor * ops.cast(t, "float32"), t.dtype)
            for t in tensors
        ]

    def add_scaled(self, tensors, factor, others):
        """`t + factor * o` for each pair, in float32, cast back to `t`'s dtype; `factor`
        a float32 scalar; `None` where `t` is `None`, `t` where `o` is."""
        return [
            t
            if t is None or o is None
            else ops.cast(ops.cast(t, "float32") + factor * ops.cast(o, "float32"), t.dtype)
            for t, o in zip(tensors, others)
        ]

    def norms(self, tensors):
        """`tensor_norms`: one sum of squares for each tensor of more than
        `SMALL_TENSOR` entries, and one for all the smaller ones together, each its own
        row of one zero-padded matrix (a compiled step then launches one reduction for
        all the biases and scales of a model instead of one or two each)."""
        tensors = [ops.cast(t, "float32") for t in tensors]
        sizes = [_size(t) for t in tensors]
        small = [i for i, size in enumerate(sizes) if size <= SMALL_TENSOR]
        if len(small) < 2 or keras.distribution.distribution() is not None:
            # Under a `keras.distribution` the tensors may be sharded: each norm is taken
            # where its shards are (the padded matrix would gather them on every device).
            return ops.stack([_norm(t) for t in tensors])
        width = max(sizes[i] for i in small)
        rows = ops.stack(
            [ops.pad(ops.reshape(tensors[i], (-1,)), [(0, width - sizes[i])]) for i in small]
        )
        norms = [ops.sqrt(ops.sum(ops.square(rows), axis=1))]
        large = [i for i, size in enumerate(sizes) if size > SMALL_TENSOR]
        if large:
            norms.append(ops.stack([_norm(tensors[i]) for i in large]))
        norms = ops.concatenate(norms) if len(norms) > 1 else norms[0]
        order = small + large  # the tensor each entry of `norms` belongs to
        if order == sorted(order):
            return norms
        return ops.take(norms, sorted(range(len(order)), key=order.__getitem__))

    def combined_norm(self, norms):
        """`combined_norm`: the largest norm, divided out and multiplied back."""
        largest = ops.max(norms)
        divisor = ops.where(largest > 0, largest, ops.ones_like(largest))
        return divisor * ops.sqrt(ops.sum(ops.square(norms / divisor)))

    def cond(self, pred, value, otherwise):
        """`value` (a tensor) if `pred`, else `otherwise()` (a tensor of its shape and
        dtype): `ops.cond`, which runs `otherwise` only when it is taken."""
        return ops.cond(pred, lambda: value, otherwise)


# Entries up to which a tensor's norm is taken together with the other small ones'
# (`ListOps.norms`): 64 KiB of float32, where a reduction's launch outweighs its work.
SMALL_TENSOR = 2**14


def _size(tensor):
    """The number of entries of `tensor`; one more than `SMALL_TENSOR` when a dimension
    is known only when the step runs (a sparse gradient's rows under `tf.function`)."""
    size = 1
    for dim in tensor.shape:
        if dim is None:
            return SMALL_TENSOR + 1
        size *= dim
    return size


def _norm(tensor):
    return ops.sqrt(ops.sum(ops.square(tensor)))


list_ops = ListOps()


def use_list_ops(implementation):
    """Installs `implementation` (a `ListOps`) for every list function here; returns the
    one it replaces."""
    global list_ops
    previous, list_ops = list_ops, implementation
    return previous


def global_norm(tensors, norms=None, rescale=True):
    """Euclidean norm of a list of tensors taken as one vector, in float32.

    `None` entries and empty tensors are skipped. It is one sum of squares per tensor
    (`tensor_norms`), and the per-tensor norms are combined scaled by their largest,
    so the combination neither overflows nor underflows. Only when that norm is not
    finite or is below 1e-15 (a sum of squares may have overflowed float32, or lost
    precision to underflow) is it taken again the slow way, every tensor divided by the
    largest magnitude first (a conditional: that pass runs only then). So gradients of size
    1e-30 or 1e+30 neither underflow to 0 nor overflow to inf, where a plain
    `sqrt(sum(g**2))` does both in float32.

    Args:
        tensors: list of tensors (any float dtype) or `None`.
        norms: optional, the float32 norm of each tensor that is present (not `None`,
            not empty), in order, already taken (by the SAM step, which takes them
            anyway); `None` takes them here.
        rescale: whether a norm below 1e-15 or not finite is taken again the slow way
            (a conditional, which reads its predicate on the host on PyTorch). False
            where an `epsilon` of 1e-12 or more is added to the norm, which makes the
            underflow of the squares negligible (below 1e-18 for a billion entries).

    Returns:
        A float32 scalar; 0 when there is no entry or every entry is zero.
    """
    present = [t for t in tensors if t is not None and _size(t) != 0]
    if not present:
        return ops.zeros((), "float32")
    if norms is None:
        norms = tensor_norms(present)
    fast = combined_norm(norms)
    if not rescale:
        return fast
    # Far from float32's underflow and finite: the sums of squares were exact enough.
    in_range = ops.logical_and(ops.isfinite(fast), fast > _SMALLEST_FAST_NORM)
    return list_ops.cond(in_range, fast, lambda: _rescaled_norm(present))


# Below this norm a float32 sum of squares may have lost precision to underflow
# (squares below 1.2e-38 lose precision, below 1.4e-45 vanish; above 1e-30 a sum of
# a hundred million of them is still exact to float32 precision).
_SMALLEST_FAST_NORM = 1e-15


def tensor_norms(tensors):
    """The float32 Euclidean norm of each tensor, as a float32 vector: one sum of
    squares per tensor (XLA fuses the square into the sum; PyTorch takes them all with
    one multi-tensor kernel)."""
    return list_ops.norms(tensors)


def combined_norm(norms):
    """The norm of the concatenation of tensors of these norms (a float32 vector):
    `m * sqrt(sum((n / m)**2))` with `m` the largest, which neither overflows nor
    underflows. NaN or inf in `norms` gives NaN or inf."""
    return list_ops.combined_norm(ops.convert_to_tensor(norms))


def _rescaled_norm(present):
    """The norm with every tensor divided by the largest magnitude first: exact at any
    scale, at the price of a second pass over the tensors."""
    present = [ops.cast(t, "float32") for t in present]
    # `amax`, not `max`: Keras's PyTorch `max` looks for a `.values` attribute on its
    # result, which breaks a `torch.compile`d graph.
    largest = ops.amax(ops.stack([ops.amax(ops.abs(t)) for t in present]))
    # Divide by 1 when everything is zero: the norm is then exactly 0, never NaN.
    divisor = ops.where(largest > 0, largest, ops.ones_like(largest))
    sum_of_squares = ops.sum(ops.stack([ops.sum(ops.square(t / divisor)) for t in present]))
    return divisor * ops.sqrt(sum_of_squares)


def sam_perturbation(gradients, rho, epsilon=1e-12, scales=None, norm=None):
    """The weight perturbation `e(w)` of SAM, or of ASAM when `scales` are given.

    ```
    SAM:   e = rho * g / (||g|| + epsilon)
    ASAM:  e = rho * T**2 * g / (||T * g|| + epsilon),   T = scales (elementwise)
    ```

    The norm is global (over all gradients) and computed in float32, so a zero gradient
    gives `e = 0`, never NaN. The perturbation has the dtype of its gradient.

    Args:
        gradients: list of tensors or `None`.
        rho: float or scalar tensor, the radius of the neighbourhood (>= 0).
        epsilon: float, added to the norm. Defaults to `1e-12`.
        scales: optional list, one entry per gradient: a tensor `T` of the gradient's
            shape, or `None` for `T = 1`. Defaults to `None` (plain SAM).
        norm: optional float32 scalar, `||T * g||` already taken. Defaults to `None`
            (taken here, with `global_norm`).

    Returns:
        A list like `gradients`: one tensor per gradient, `None` where it was `None`.
    """
    scales = _checked_scales(scales, gradients)
    scaled = [_times(s, g) for g, s in zip(gradients, scales)]
    if norm is None:
        norm = global_norm(scaled)
    factor = ops.cast(rho, "float32") / (norm + epsilon)
    if all(s is None for s in scales):
        return list_ops.scale(gradients, factor)
    directions = [
        None if g is None else _times(s, ops.cast(sg, "float32"))
        for g, s, sg in zip(gradients, scales, scaled)
    ]
    return [
        None if g is None else ops.cast(e, g.dtype)
        for g, e in zip(gradients, list_ops.scale(directions, factor))
    ]


def layerwise_sam_perturbation(gradients, rho, groups, epsilon=1e-12, scales=None):
    """SAM's (or ASAM's) perturbation normalized per layer: every layer gets its share.

    ```
    e_l = (rho / sqrt(L)) * T_l**2 g_l / (||T_l g_l|| + epsilon)   for each layer l
    ```

    `g_l` is the part of the gradient that belongs to layer `l` (the tensors with the same
    `groups` entry) and `L` the number of layers that have a gradient. Each layer's
    perturbation has norm `rho / sqrt(L)` (in the `T`-scaled metric; less for a layer whose
    gradient is zero, which is not perturbed), so the whole perturbation has norm `rho`, as
    with one global norm, but no layer's share depends on the size of its gradient. With
    one global norm the layers with the largest gradients take almost all of `rho`: in
    wide networks the last layer (Haas et al., 2024).

    Args:
        gradients: list of tensors or `None`.
        rho: float or scalar tensor, the radius of the whole perturbation (>= 0).
        groups: list, one hashable per gradient: the layer it belongs to. Tensors with
            equal entries are normalized together.
        epsilon: float, added to each layer's norm. Defaults to `1e-12`.
        scales: optional list of ASAM scales `T`, as in `sam_perturbation`.
            Defaults to `None` (plain SAM).

    Returns:
        A list like `gradients`: one tensor per gradient, `None` where it was `None`.

    References:
        - Haas et al., muP^2: Effective Sharpness Aware Minimization Requires Layerwise
          Perturbation Scaling, NeurIPS 2024. https://arxiv.org/abs/2411.00075
    """
    if len(groups) != len(gradients):
        raise ValueError(
            "`groups` must have one entry per gradient. "
            f"Received: len(groups)={len(groups)}, len(gradients)={len(gradients)}"
        )
    scales = _checked_scales(scales, gradients)
    members = {}
    for i, (g, group) in enumerate(zip(gradients, groups)):
        if g is not None:
            members.setdefault(group, []).append(i)
    perturbation = [None] * len(gradients)
    if not members:
        return perturbation
    share = ops.cast(rho, "float32") / ops.sqrt(ops.cast(len(members), "float32"))
    for indices in members.values():
        part = sam_perturbation(
            [gradients[i] for i in indices], share, epsilon, [scales[i] for i in indices]
        )
        for i, e in zip(indices, part):
            perturbation[i] = e
    return perturbation


def _checked_scales(scales, gradients):
    """`scales` as one entry per gradient (`None` for `T = 1` everywhere)."""
    if scales is None:
        return [None] * len(gradients)
    if len(scales) != len(gradients):
        raise ValueError(
            "`scales` must have one entry per gradient. "
            f"Received: len(scales)={len(scales)}, len(gradients)={len(gradients)}"
        )
    return scales


def adaptive_scale(variable_value, eta):
    """ASAM's normalization operator for one weight tensor: `T_w = |w| + eta`."""
    return ops.abs(variable_value) + ops.cast(eta, variable_value.dtype)


def _times(scale, tensor):
    if tensor is None or scale is None:
        return tensor
    return ops.cast(scale, tensor.dtype) * tensor


def _size(tensor):
    size = 1
    for dim in tensor.shape:
        if dim is None:
            return None
        size *= dim
    return size


def dot(a, b):
    """The inner product of two lists of tensors taken as vectors, in float32.

    Entries where either side is `None` contribute nothing.
    """
    terms = [
        ops.sum(ops.cast(x, "float32") * ops.cast(y, "float32"))
        for x, y in zip(a, b, strict=True)
        if x is not None and y is not None
    ]
    if not terms:
        return ops.zeros((), "float32")
    return ops.sum(ops.stack(terms))


def orthogonal_component(vectors, direction):
    """The part of `vectors` orthogonal to `direction`: `v - (v . d / ||d||**2) d`.

    Both are lists of tensors taken as one vector each, in float32: the coefficient
    `(v . d / ||d||) / ||d||` (the norm without `global_norm`'s rescaled pass: a
    direction whose entries are all below about 1e-19 counts as zero), then one
    multi-tensor `v - c d` (`list_ops.add_scaled`); when `direction` is zero nothing is
    removed. `None` entries of `vectors` stay `None`; entries where
    only `direction` is `None` are kept whole.

    Returns:
        A list like `vectors`, each entry in its own dtype.
    """
    norm = global_norm(direction, rescale=False)
    safe = ops.where(norm > 0, norm, ops.ones_like(norm))
    # `v . d / ||d||**2`, divided twice: `|v . d| / ||d||` is at most `||v||`, so
    # neither quotient overflows or underflows where `||d||**2` would.
    coefficient = dot(vectors, direction) / safe / safe
    return list_ops.add_scaled(vectors, -coefficient, direction)


def linear_combination(terms):
    """`sum_i c_i * v_i` over lists of tensors: `terms` is a list of `(c_i, v_i)` pairs.

    The coefficients are float32 scalars (numbers or tensors). Each entry is summed over
    the lists that have it (not `None`), in float32, and cast back to the dtype of the
    first list's entry; an entry that is `None` in the first list stays `None`.
    """
    first = terms[0][1]
    result = []
    for i, reference in enumerate(first):
        if reference is None:
            result.append(None)
            continue
        total = None
        for coefficient, vectors in terms:
            if vectors[i] is None:
                continue
            term = ops.cast(coefficient, "float32") * ops.cast(vectors[i], "float32")
            total = term if total is None else total + term
        result.append(ops.cast(total, reference.dtype))
    return result


def gsam_gradients(gradients, perturbed_gradients, alpha):
    """GSAM's descent direction: `g_adv - alpha * g_perp`.

    `g_perp` is the component of the clean gradient `g` orthogonal to the perturbed
    gradient `g_adv`. The descent step `-(g_adv - alpha * g_perp)` moves along
    `+g_perp`, which raises the clean loss `L(w)` and leaves the perturbed loss unchanged
    to first order, so the surrogate gap `L(w + e) - L(w)` shrinks (Zhuang et al., 2022).
    """
    orthogonal = orthogonal_component(gradients, perturbed_gradients)
    return list_ops.add_scaled(perturbed_gradients, -ops.cast(alpha, "float32"), orthogonal)


def looksam_gradients(gradients, orthogonal, alpha, g_norm=None):
    """LookSAM's gradient on a step without the perturbed pass.

    ```
    g_s = g + alpha * (||g|| / ||g_v||) * g_v
    ```
    with `g_v` the stored component of the last SAM gradient orthogonal to its clean
    gradient. A zero `g_v` (no SAM step yet) gives `g`. `g_norm`: `||g||` if already
    taken. The norms skip `global_norm`'s rescaled pass (a ratio of two norms of
    gradients: below 1e-15 a norm may lose precision to underflow, as the step's do).
    """
    if g_norm is None:
        g_norm = global_norm(gradients, rescale=False)
    v_norm = global_norm(orthogonal, rescale=False)
    scale = ops.where(
        v_norm > 0, ops.cast(alpha, "float32") * g_norm / ops.where(v_norm > 0, v_norm, 1.0), 0.0
    )
    return list_ops.add_scaled(gradients, scale, orthogonal)
