"""Custom-loop steps on the session's backend, each in that backend's own form.

`sam_step` is one SAM step as a user writes it in a custom training loop:

- TensorFlow: `optimizer.optimize(grad_func, variables)`, `grad_func` running the forward
  pass under a `tf.GradientTape` (in a `tf.function` when `compiled`);
- PyTorch: `optimizer.optimize(closure, variables)` (eager here; under `torch.compile`
  it runs with graph breaks: docs/custom-loops.md);
- JAX: `optimizer.stateless_optimize(state, compute, ...)` (under `jax.jit` when
  `compiled`), its new state then assigned to the variables.

`plain_step` is the same loop without SAM: the loss's gradients, then `optimizer.apply`
(`stateless_apply` on JAX). `forward(*inputs)` returns `(predictions, loss)`, written in
`keras.ops`; the inputs are converted to float32 tensors first.
"""

import keras


def sam_step(optimizer, model, forward, compiled=True):
    """`step(*inputs)`: one SAM step; returns `(predictions, loss, loss_sam)`."""
    variables = model.trainable_variables
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def step(*inputs):
            def grad_func():
                with tf.GradientTape() as tape:
                    predictions, loss = forward(*inputs)
                return predictions, loss, tape

            return optimizer.optimize(grad_func, variables)

        return _with_tensors(tf.function(step) if compiled else step)
    if backend == "torch":

        def step(*inputs):
            return optimizer.optimize(lambda: forward(*inputs), variables)

        return _with_tensors(step)
    import jax

    non_trainable = model.non_trainable_variables

    def pure(state, *inputs):
        return optimizer.stateless_optimize(
            state, lambda: forward(*inputs), variables, non_trainable
        )

    return _with_tensors(_stateful(jax.jit(pure) if compiled else pure, optimizer, model))


def plain_step(optimizer, model, forward, compiled=True):
    """`step(*inputs)`: the loss's gradients at the weights, applied by `optimizer`."""
    variables = model.trainable_variables
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def step(*inputs):
            with tf.GradientTape() as tape:
                _, loss = forward(*inputs)
            optimizer.apply(tape.gradient(loss, variables), variables)

        return _with_tensors(tf.function(step) if compiled else step)
    if backend == "torch":
        import torch

        def step(*inputs):
            _, loss = forward(*inputs)
            gradients = torch.autograd.grad(loss, [v.value for v in variables])
            optimizer.apply(list(gradients), variables)

        return _with_tensors(step)
    import jax

    non_trainable = model.non_trainable_variables

    def loss_at(trainable_values, non_trainable_values, *inputs):
        mapping = [*zip(variables, trainable_values), *zip(non_trainable, non_trainable_values)]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            _, loss = forward(*inputs)
        updated = [scope.get_current_value(v) for v in non_trainable]
        return loss, [v if v is not None else old for v, old in zip(updated, non_trainable_values)]

    def pure(state, *inputs):
        trainable_values, non_trainable_values, optimizer_values = state
        gradients, non_trainable_values = jax.grad(loss_at, has_aux=True)(
            trainable_values, non_trainable_values, *inputs
        )
        trainable_values, optimizer_values = optimizer.stateless_apply(
            optimizer_values, gradients, trainable_values
        )
        return (trainable_values, non_trainable_values, optimizer_values), None

    return _with_tensors(_stateful(jax.jit(pure) if compiled else pure, optimizer, model))


def _stateful(pure, optimizer, model):
    """Runs `pure(state, *inputs) -> (state, result)` on the variables' values, then
    assigns the new state to the variables (JAX's custom-loop form)."""

    def step(*inputs):
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        groups = (model.trainable_variables, model.non_trainable_variables, optimizer.variables)
        state = tuple([v.value for v in group] for group in groups)
        state, result = pure(state, *inputs)
        for group, values in zip(groups, state, strict=True):
            for variable, value in zip(group, values, strict=True):
                variable.assign(value)
        return result

    return step


def _with_tensors(step):
    def run(*inputs):
        return step(*(keras.ops.convert_to_tensor(x, "float32") for x in inputs))

    return run
