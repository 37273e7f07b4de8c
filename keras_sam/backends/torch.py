"""The PyTorch adapter: what keras_sam needs of torch and cannot write with `keras.ops`."""

import sys

import keras
import torch

from keras_sam import step
from keras_sam.methods import sam

# ------------------------------------------------------------------ autodiff primitives
# (used by the diagnostics; the SAM step may share them)


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


# ------------------------------------------------------------------------- the SAM step
# PyTorch runs eagerly: the gradient of a pass is `torch.autograd.grad` of the loss with
# respect to fresh leaf tensors that the trained variables read (a `StatelessScope`), and
# the step's conditionals are Python `if`s on the tensors' values. The rest of the step
# runs under `torch.no_grad()`: only the passes build a graph, and the commit assigns
# the variables in place as Keras's own PyTorch trainer does.


class Torch(step.Backend):
    def gradients(self, compute, variables, values, pending, scale):
        leaves = [v.detach().requires_grad_(True) for v in values]
        scope = step.RecordingScope(
            state_mapping=list(pending.values()) + list(zip(variables, leaves))
        )
        with torch.enable_grad():
            with scope:
                outputs, loss, _ = compute()
            loss = keras.ops.convert_to_tensor(loss)
            scaled = loss if scale is None else loss.to(torch.float32) * _tensor(scale)
            if scaled.requires_grad:
                gradients = torch.autograd.grad(scaled, leaves, allow_unused=True)
            else:  # the loss depends on no variable
                gradients = [None] * len(leaves)
        updates = [(v, _detached(value)) for v, value in scope.updates()]
        outputs = keras.tree.map_structure(_detached, outputs)
        return outputs, loss.detach(), list(gradients), updates

    def cond(self, pred, true_fn, false_fn):
        return true_fn() if bool(pred) else false_fn()

    def stateful_cond(self, pred, true_fn, false_fn, tracked):
        del tracked  # eager: the branch taken assigns the variables itself
        if bool(pred):
            true_fn()
        else:
            false_fn()


BACKEND = Torch()


def _tensor(value):
    return value.value if isinstance(value, keras.Variable) else value


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def check_compile(sam_model):
    """Refuses `jit_compile=True` for a SAM optimizer (called by `SAMModel.fit`)."""
    optimizer = sam_model.optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if sam_model.jit_compile and isinstance(optimizer, sam.SAM):
        raise ValueError(
            "`jit_compile=True` (`torch.compile`) is not supported for a SAM step on the "
            "PyTorch backend: the step decides in Python, on the values of its tensors, "
            "whether to take the perturbed pass and whether to commit or skip, where "
            "`torch.compile` would break the graph at every decision. Compile the "
            "`SAMModel` with `jit_compile=False` (the default on PyTorch). Received: "
            "jit_compile=True"
        )


def train_step(sam_model, data):
    """`SAMModel.train_step` on PyTorch: eager, stateful."""
    with torch.no_grad():
        return step.model_step(BACKEND, sam_model, data)


def optimize(method, closure, variables):
    """The custom-loop step: `pred, loss, loss_sam = method.optimize(closure, variables)`.

    `closure()` runs the forward pass (the model reads its variables) and returns
    `(predictions, loss)`; it is called at `w` and at `w + e`, with no tape and no
    `loss.backward()`: the step takes the gradients itself.
    """
    variables = step.check_variables(variables)
    if not callable(closure):
        raise ValueError(
            "`closure` must be a callable returning `(predictions, loss)`. "
            f"Received: closure={closure!r}"
        )

    def compute():
        result = closure()
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise ValueError(
                "`closure` must return `(predictions, loss)`, with `loss` a scalar tensor "
                f"computed from the variables. Received: {result!r}"
            )
        return result[0], result[1], None

    with torch.no_grad():
        (part,), _ = step.run_step(BACKEND, method, [compute], [1.0], variables)
    return part.outputs, part.loss, part.loss_sam


sam.register_custom_loop("torch", sys.modules[__name__])
