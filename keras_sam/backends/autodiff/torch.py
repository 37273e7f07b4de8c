"""Autodiff primitives on PyTorch (`torch.autograd`, eager), for the diagnostics."""

import torch


def compile_function(function):
    """`function` as is: PyTorch runs eagerly."""
    return function


def value_and_gradient(function, values):
    """`(function(values), its gradient)`: `function` maps a list of tensors to a scalar;
    the gradient is a list of tensors like `values` (zeros where unconnected)."""
    leaves = [v.detach().requires_grad_(True) for v in values]
    with torch.enable_grad():
        value = function(leaves)
        gradient = _gradient(value, leaves)
    return value.detach(), gradient


def hessian_vector_product(function, values, vector):
    """The Hessian of the scalar `function` at `values` times `vector` (a list like
    `values`), by double differentiation: `H v = grad_w (grad_w f(w) . v)`, double backward."""
    leaves = [v.detach().requires_grad_(True) for v in values]
    with torch.enable_grad():
        value = function(leaves)
        gradient = _gradient(value, leaves, create_graph=True)
        directional = sum(
            torch.sum(g.to(torch.float32) * v.to(torch.float32)) for g, v in zip(gradient, vector)
        )
        return _gradient(directional, leaves)


def _gradient(value, leaves, create_graph=False):
    """The gradient of `value` at `leaves`, detached unless `create_graph`; zeros where
    `value` does not depend on a leaf (or on none: a function linear in them)."""
    if not value.requires_grad:
        return [torch.zeros_like(w) for w in leaves]
    gradient = torch.autograd.grad(value, leaves, create_graph=create_graph, allow_unused=True)
    return [
        torch.zeros_like(w) if g is None else (g if create_graph else g.detach())
        for g, w in zip(gradient, leaves)
    ]
