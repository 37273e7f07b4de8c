"""Autodiff primitives on TensorFlow (tapes, `tf.function`), for the diagnostics."""

import functools

import tensorflow as tf


def compile_function(function):
    """`function` compiled into a graph (`tf.function`), retraced as rarely as possible."""
    # TensorFlow counts traces per Python code object and warns about "retracing" after a
    # few; a `functools.partial` has no code object, so each compiled function counts alone.
    return tf.function(functools.partial(function), reduce_retracing=True)


def value_and_gradient(function, values):
    """`(function(values), its gradient)`: `function` maps a list of tensors to a scalar;
    the gradient is a list of dense tensors like `values` (zeros where unconnected)."""
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(values)
        value = function(values)
    gradient = tape.gradient(value, values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return value, [tf.convert_to_tensor(g) for g in gradient]


def hessian_vector_product(function, values, vector):
    """The Hessian of the scalar `function` at `values` times `vector` (a list like
    `values`), by double differentiation: `H v = grad_w (grad_w f(w) . v)`, nested tapes."""
    with tf.GradientTape(watch_accessed_variables=False) as outer:
        outer.watch(values)
        with tf.GradientTape(watch_accessed_variables=False) as inner:
            inner.watch(values)
            value = function(values)
        gradient = inner.gradient(value, values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        directional = tf.add_n(
            [
                tf.reduce_sum(tf.cast(tf.convert_to_tensor(g), "float32") * tf.cast(v, "float32"))
                for g, v in zip(gradient, vector)
            ]
        )
    product = outer.gradient(
        directional, values, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    return [tf.convert_to_tensor(p) for p in product]
