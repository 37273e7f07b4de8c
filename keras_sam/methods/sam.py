"""`SAM`: Sharpness-Aware Minimization (and ASAM) as a Keras optimizer wrapper."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras

from keras_sam._validation import (  # FLOAT32_*: re-exported for the tests
    FLOAT32_MAX,  # noqa: F401
    FLOAT32_SMALLEST_NORMAL,  # noqa: F401
    check_number,
    check_rate,
)
from keras_sam._validation import check_accumulation_steps as _check_accumulation_steps
from keras_sam._validation import check_bool as _check_bool
from keras_sam._validation import check_epsilon as _check_epsilon
from keras_sam.methods.config import check_perturb, deserialize, serialize_perturb, serialize_rate
from keras_sam.methods.hooks import (
    DISTRIBUTED_PERTURBATIONS,
    GLOBAL_NORM,
    PER_REPLICA,
    PERTURBATION_NORMS,
    MethodHooks,
    unwrap_loss_scale,
)

# Base-optimizer arguments that belong on the wrapped optimizer, with their defaults
# (a config carrying a default value is accepted, as `LossScaleOptimizer` does).
_INNER_OPTIMIZER_ARGUMENTS = {
    "learning_rate": None,
    "weight_decay": None,
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
}


@keras.saving.register_keras_serializable(package="keras_sam")
class SAM(MethodHooks, keras.optimizers.Optimizer):
    """Sharpness-Aware Minimization around any Keras optimizer.

    Each step climbs from the weights `w` to the worst point of a neighbourhood of
    radius `rho`, takes the gradient there, and lets the wrapped optimizer descend
    from `w` with it:

    ```
    g     = grad L(w)                          # clean pass
    e     = rho * g / (||g|| + epsilon)        # SAM
    e     = rho * T**2 g / (||T g|| + epsilon) # ASAM, T = |w| + eta on weights, 1 on biases
    g_sam = grad L(w + e)                      # perturbed pass
    w     = optimizer.update(w, g_sam)         # the weights never hold w + e
    ```

    The cost is two forward-backward passes per step. `rho=0` skips the second pass and
    is exactly (bitwise) the wrapped optimizer; so does every step where a `rho`
    schedule is 0 (late-phase SAM, `keras_sam.LatePhaseRho`, costs one pass per step
    before its start). `learning_rate` and `iterations` are
    those of the wrapped optimizer; base-optimizer arguments such as `clipnorm` or
    `weight_decay` belong on it, and apply to the final gradient only.

    A `SAM` optimizer runs the two passes itself, so it cannot be handed gradients:
    use it through `keras_sam.SAMModel(model).compile(optimizer=sam)` or through the
    custom-loop call `sam.optimize(grad_func, variables)`.

    A step whose loss or gradients are NaN or infinite, in either pass (or whose
    gradients are so large that their squares overflow float32), is skipped:
    nothing changes but `skipped_steps` (and the loss scale under mixed precision, where
    Keras's `LossScaleOptimizer` wraps `SAM`, or `SAM` wraps it in a custom loop). Under
    `tf.distribute`, `keras.distribution.DataParallel` (JAX) or `torch.distributed`
    (PyTorch), `distributed_perturbation` says whether each replica perturbs with its own
    gradient; `gradient_accumulation_steps` accumulates SAM gradients over
    micro-batches.

    Its members for users, besides the Keras optimizer's own (`learning_rate`,
    `iterations`, `variables`, `build`, `get_config`, ...): the custom-loop step,
    `optimize` (TensorFlow, PyTorch) or `stateless_optimize` (JAX); `bind(model)`, for a
    `perturb` given as layer classes in a custom loop; the counters `skipped_steps` and
    `second_passes`; the hyperparameters, as attributes (`rho`, `adaptive`, `eta`,
    `epsilon`, `perturb`, ...; the wrapped optimizer is `inner_optimizer`). The hooks a
    new method overrides, and the helpers they call, come from
    `keras_sam.methods.hooks.MethodHooks` (see "Adding a method").

    Args:
        optimizer: the `keras.optimizers.Optimizer` instance that takes the steps
            (a string identifier such as `"sgd"` is accepted too).
        rho: float >= 0 (finite in float32), the radius of the neighbourhood, or a
            schedule of the step (a `keras.optimizers.schedules.LearningRateSchedule`,
            evaluated at `iterations`; see `keras_sam.ProportionalRho` and
            `keras_sam.LatePhaseRho`; a step where it is 0 takes one pass, and
            `SAMModel` then logs `second_pass_rate`). Defaults to `0.05`
            (the paper's value for SGD; ASAM usually wants about 10x more).
        adaptive: bool, use ASAM's scale-invariant neighbourhood. Defaults to `False`.
        eta: float >= 0, ASAM's offset in `T_w = |w| + eta`. Ignored unless
            `adaptive`. Defaults to `0.01`.
        epsilon: float, added to the gradient norm; at least the smallest normal
            float32 (1.18e-38), as the norm is float32. Defaults to `1e-12`.
        perturb: which variables are perturbed; the others stay at `w` in the
            perturbed pass but still descend with the perturbed gradient, and the
            norm is taken over the perturbed ones only. `None` (every variable), a
            regular expression searched in each `variable.path`, a tuple of layer
            classes (the variables of those layers; `keras_sam.NORMALIZATION_LAYERS`
            gives SAM-ON; needs `bind(model)`, which `SAMModel` does), or a callable
            `variable -> bool` registered with
            `@keras.saving.register_keras_serializable()`: a function, or an object of
            a class with `get_config`. Each form survives `get_config` and `.keras`
            files; one that could not (a lambda, a `functools.partial`, anything
            unregistered) is refused here. Defaults to `None`.
        perturbation_norm: over what the radius `rho` is measured. `"global"`: one norm
            over all the perturbed weights, as in the paper (`e = rho g / ||g||`).
            `"layerwise"`: each layer (the variables that share a `variable.path` up to
            the last `/`) is normalized on its own and gets an equal share of the
            radius, `e_l = (rho / sqrt(L)) g_l / ||g_l||` over the `L` perturbed layers,
            so the whole perturbation still has norm `rho`. With one global norm the
            layers with the largest gradients take nearly all of `rho` (in wide networks
            the last layer, Haas et al. 2024); layerwise, every layer is perturbed. With
            `adaptive`, each layer's norm is ASAM's `||T_l g_l||`. Defaults to
            `"global"`.
        distributed_perturbation: how the replicas perturb (of a `tf.distribute`
            strategy, of `keras.distribution.DataParallel` on JAX, or the processes of
            `torch.distributed` on PyTorch). `"per_replica"`: each replica perturbs the
            weights with its own clean gradient and no gradient is all-reduced before
            the perturbed pass (m-sharpness with m = the per-replica batch, as in the
            paper; one all-reduce per step, as for plain training). `"synchronized"`:
            the clean gradient is all-reduced first, so every replica takes the same
            perturbation, that of the global batch (two all-reduces per step; for SAM
            and ASAM the same step as on one device). Ignored on one replica.
            Defaults to `"per_replica"`.
        gradient_accumulation_steps: int >= 1 or `None`. With `k > 1`, each call
            (each `fit` batch, or each `optimize` call) is one micro-batch: it takes
            its own perturbation, and its SAM gradient is added to an accumulator;
            every k-th call, the wrapped optimizer steps with the average of the k
            SAM gradients. That is m-sharpness with k parts over the k micro-batches
            (`SAMModel(num_batch_splits=k)` on their concatenation); the weights do
            not move on the other k-1 calls, and `iterations` counts the steps
            taken. Set it here, not on the wrapped optimizer. Defaults to `None`.
        verify_optimizer_step: bool. A step is applied only when every loss is
            finite and every gradient (and state update) is tame: finite, with a
            float32 norm below 2**63, so that its squares are finite. From such
            gradients Keras's optimizers write finite weights and slots, and the step
            checks nothing after the optimizer and keeps no copy. `True` also checks
            what the wrapped optimizer wrote, for an optimizer that could still
            overflow (a custom one, say): before each step the weights, slots and
            accumulation sums are copied, and restored (the step skipped) if any value
            written is NaN or infinite; it costs one copy of those variables and a
            pass over them per step. Defaults to `False`.
        name: string, the optimizer's name. Defaults to `None` (automatic).

    Example:

    ```python
    opt = keras_sam.SAM(keras.optimizers.SGD(0.01, momentum=0.9), rho=0.05)
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    sam_model.fit(x, y, epochs=10)
    ```

    References:
        - Foret et al., Sharpness-Aware Minimization for Efficiently Improving
          Generalization, ICLR 2021. https://arxiv.org/abs/2010.01412
        - Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for
          Scale-Invariant Learning of Deep Neural Networks, ICML 2021.
          https://arxiv.org/abs/2102.11600
        - Haas et al., muP^2: Effective Sharpness Aware Minimization Requires Layerwise
          Perturbation Scaling, NeurIPS 2024 (`perturbation_norm="layerwise"`).
          https://arxiv.org/abs/2411.00075
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | str,
        rho: float | keras.optimizers.schedules.LearningRateSchedule = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        epsilon: float = 1e-12,
        perturb: str | tuple[type, ...] | Callable[[keras.Variable], bool] | None = None,
        perturbation_norm: str = GLOBAL_NORM,
        distributed_perturbation: str = PER_REPLICA,
        gradient_accumulation_steps: int | None = None,
        verify_optimizer_step: bool = False,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        _refuse_inner_optimizer_arguments(type(self).__name__, kwargs)
        optimizer = _check_optimizer(type(self).__name__, optimizer)
        if distributed_perturbation not in DISTRIBUTED_PERTURBATIONS:
            raise ValueError(
                "`distributed_perturbation` must be one of "
                f"{', '.join(repr(m) for m in DISTRIBUTED_PERTURBATIONS)}. "
                f"Received: distributed_perturbation={distributed_perturbation!r}"
            )
        if perturbation_norm not in PERTURBATION_NORMS:
            raise ValueError(
                "`perturbation_norm` must be one of "
                f"{', '.join(repr(m) for m in PERTURBATION_NORMS)}. "
                f"Received: perturbation_norm={perturbation_norm!r}"
            )
        gradient_accumulation_steps = _check_accumulation_steps(gradient_accumulation_steps)
        rho = check_rate("rho", rho)
        adaptive = _check_bool("adaptive", adaptive)
        eta = check_number("eta", eta, minimum=0.0)
        epsilon = _check_epsilon(epsilon)
        perturb = check_perturb(perturb)
        verify_optimizer_step = _check_bool("verify_optimizer_step", verify_optimizer_step)
        super().__init__(learning_rate=0.0, name=name)
        # Created with `iterations`, not in `build`: a compiled but untrained model then
        # saves as many optimizer variables as it loads (as a plain SGD model does).
        self._skipped_steps = self.add_variable(shape=(), dtype="int", name="skipped_steps")
        self.rho = rho
        self.adaptive = adaptive
        self.eta = eta
        self.epsilon = epsilon
        self.perturb = perturb
        self.distributed_perturbation = distributed_perturbation
        self.perturbation_norm = perturbation_norm
        # Not `gradient_accumulation_steps`: the base class would accumulate by itself.
        self.accumulation_steps = gradient_accumulation_steps or 1
        self.verify_optimizer_step = verify_optimizer_step
        self.inner_optimizer = optimizer
        self.gradient_norms = None  # set by the step (`MethodHooks.gradient_norms`)
        self._bound_variables = None
        self._state_variables = []
        self._state_sums = []

    # ------------------------------------------------------------------ for users
    def bind(self, model: keras.Model) -> SAM:
        """Resolves a `perturb` given as layer classes against `model`'s layers."""
        if isinstance(self.perturb, tuple):
            layers = model._flatten_layers(include_self=True, recursive=True)
            self._bound_variables = {
                id(v) for layer in layers if isinstance(layer, self.perturb) for v in layer.weights
            }
        return self

    @property
    def skipped_steps(self):
        """The number of steps skipped because a loss or gradient was NaN or infinite.

        A skipped step changes nothing but this count (and, under loss scaling, the
        loss scale): weights, optimizer slots, `iterations`, BatchNorm statistics and
        the method's state are left exactly as they were.
        """
        return self._skipped_steps

    # ------------------------------------------------------------ the custom loop
    def optimize(self, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        """One SAM step in a custom training loop, in the backend's own form.

        TensorFlow: `optimize(grad_func, variables)`, with `grad_func()` running the
        forward pass under a `tf.GradientTape` and returning `(predictions, loss,
        tape)`; it is called twice, at `w` and at `w + e`. `variables` are the Keras
        variables to train, e.g. `model.trainable_variables`. Returns `(predictions,
        loss, loss_sam)`: the clean predictions and loss at `w`, and the loss at the
        perturbed weights `w + e`.

        PyTorch: `optimize(closure, variables)`, with `closure()` running the forward
        pass and returning `(predictions, loss)` (no tape, no `loss.backward()`); the
        same return values.

        JAX takes a pure function of the state instead: `stateless_optimize`.
        """
        return _backend().optimize(self, *args, **kwargs)

    def stateless_optimize(
        self,
        state: tuple[Sequence[Any], Sequence[Any], Sequence[Any]],
        compute: Callable[[], tuple[Any, Any]],
        trainable_variables: Sequence[keras.Variable],
        non_trainable_variables: Sequence[keras.Variable] = (),
    ) -> tuple[tuple[list, list, list], tuple[Any, Any, Any]]:
        """One SAM step as a pure function of the state (JAX), usable inside `jax.jit`.

        The form of Keras's JAX custom-loop guide:

        ```python
        state = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in optimizer.variables],   # after optimizer.build(...)
        )

        @jax.jit
        def train_step(state, x, y):
            def compute():                            # runs the model statefully
                pred = model(x, training=True)
                return pred, loss_fn(y, pred)

            return optimizer.stateless_optimize(
                state, compute, model.trainable_variables, model.non_trainable_variables
            )

        state, (pred, loss, loss_sam) = train_step(state, x, y)
        ```

        Args:
            state: `(trainable_values, non_trainable_values, optimizer_values)`: the
                values of `trainable_variables`, `non_trainable_variables` and of this
                optimizer's `variables`.
            compute: a callable with no arguments that runs the forward pass (reading
                the model's variables) and returns `(predictions, loss)`. It is called
                with the variables reading `w`, then `w + e`.
            trainable_variables: the variables to train.
            non_trainable_variables: the other variables the forward pass reads or
                updates (BatchNorm statistics, seed generators). Defaults to none.

        Returns:
            `(new_state, (predictions, loss, loss_sam))`. Nothing is written to a
            variable: write the final state back with `variable.assign(value)`.
        """
        return _backend().stateless_optimize(
            self, state, compute, trainable_variables, non_trainable_variables
        )

    # ------------------------------------------------------- the optimizer protocol
    def build(self, var_list):
        self.inner_optimizer.build(var_list)
        super().build(var_list)
        if self.accumulation_steps > 1:
            self._micro_steps = self.add_variable(shape=(), dtype="int", name="micro_steps")
            self._gradient_sums = [
                self.add_variable_from_reference(v, name="gradient_sum") for v in var_list
            ]
        if self.may_skip_second_pass:
            # Fractional under m-sharpness, where each part decides for itself.
            self._second_passes = self.add_state_variable(name="second_passes")

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        raise ValueError(
            f"`{type(self).__name__}` runs two forward-backward passes per step, so it "
            "cannot be given gradients through `apply()` or `apply_gradients()`, which "
            "is what a plain `keras.Model` does in `fit()`. Wrap the model: "
            "`keras_sam.SAMModel(model).compile(optimizer=...)`, or in a custom loop "
            "call `optimizer.optimize(grad_func, variables)`."
        )

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "rho": serialize_rate(self.rho),
            "adaptive": self.adaptive,
            "eta": self.eta,
            "epsilon": self.epsilon,
            "perturb": serialize_perturb(self.perturb),
            "distributed_perturbation": self.distributed_perturbation,
            "perturbation_norm": self.perturbation_norm,
            "gradient_accumulation_steps": (
                None if self.accumulation_steps == 1 else self.accumulation_steps
            ),
            "verify_optimizer_step": self.verify_optimizer_step,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return deserialize(cls, config, custom_objects)


def _backend():
    """The `keras_sam.backends.base.Backend` of Keras's backend, which runs the custom
    loops. Imported when a loop is called: the methods never import a backend module."""
    from keras_sam import backends

    return backends.current()


# SAM-ON (Mueller et al., 2023): perturb only the affine parameters of these layers.
NORMALIZATION_LAYERS = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
    keras.layers.RMSNormalization,
)
"""The normalization layer classes, for SAM-ON: `SAM(..., perturb=NORMALIZATION_LAYERS)`.

SAM-ON (Mueller et al., NeurIPS 2023) perturbs only the normalization layers' affine
parameters (scales and offsets); every variable still descends with the perturbed
gradient. It wants a much larger `rho` than SAM (the authors use about 1 to 10).
https://arxiv.org/abs/2306.04226
"""


def _refuse_inner_optimizer_arguments(class_name, kwargs):
    for name, default in _INNER_OPTIMIZER_ARGUMENTS.items():
        if name in kwargs and kwargs.pop(name) != default:
            raise ValueError(
                f"`{class_name}` does not take `{name}`: it belongs on the wrapped "
                f"optimizer, e.g. `{class_name}(keras.optimizers.SGD({name}=...))`."
            )
    if kwargs:
        raise ValueError(
            f"`{class_name}` got unexpected arguments: {', '.join('`' + k + '`' for k in kwargs)}."
        )


def _check_optimizer(class_name, optimizer):
    if isinstance(optimizer, str):
        optimizer = keras.optimizers.get(optimizer)
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            f"`optimizer` must be a `keras.optimizers.Optimizer` instance, such as "
            f"`keras.optimizers.SGD(0.1)`. Received: optimizer={optimizer!r}"
        )
    if isinstance(optimizer, SAM):
        raise ValueError(
            f"`optimizer` must be a plain Keras optimizer: `{class_name}` cannot wrap "
            f"another SAM method. Received: optimizer={optimizer!r}"
        )
    steps_owner = unwrap_loss_scale(optimizer)
    if steps_owner.gradient_accumulation_steps:
        raise ValueError(
            f"Set `gradient_accumulation_steps` on `{class_name}`, not on the wrapped "
            f"optimizer: `{class_name}(optimizer, gradient_accumulation_steps="
            f"{steps_owner.gradient_accumulation_steps})` gives each micro-batch its own "
            "perturbation and steps with the average SAM gradient. Received: "
            f"optimizer.gradient_accumulation_steps={steps_owner.gradient_accumulation_steps}"
        )
    return optimizer
