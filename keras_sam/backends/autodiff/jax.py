"""Autodiff primitives on JAX (`jax.grad`, `jax.jvp`, `jax.jit`), for the diagnostics."""

import jax


def compile_function(function):
    """`function` compiled by XLA (`jax.jit`): pure, of arrays and lists of arrays."""
    return jax.jit(function)


def value_and_gradient(function, values):
    """`(function(values), its gradient)`: `function` maps a list of arrays to a scalar;
    the gradient is a list of arrays like `values`."""
    return jax.value_and_grad(function)(values)


def hessian_vector_product(function, values, vector):
    """The Hessian of the scalar `function` at `values` times `vector` (a list like
    `values`), by double differentiation: the forward derivative of the gradient along
    `vector` (`jax.jvp` of `jax.grad`, forward-over-reverse)."""
    _, product = jax.jvp(jax.grad(function), (list(values),), (list(vector),))
    return product
