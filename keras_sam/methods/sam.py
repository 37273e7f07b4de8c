"""`SAM`: Sharpness-Aware Minimization (and ASAM) as a Keras optimizer wrapper."""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import types
from collections.abc import Callable, Sequence
from typing import Any

import keras

from keras_sam import maths

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

# How the trainers perturb under `tf.distribute` (see `SAM`'s `distributed_perturbation`).
PER_REPLICA = "per_replica"
SYNCHRONIZED = "synchronized"
DISTRIBUTED_PERTURBATIONS = (PER_REPLICA, SYNCHRONIZED)

# Over what `rho` is measured (see `SAM`'s `perturbation_norm`).
GLOBAL_NORM = "global"
LAYERWISE_NORM = "layerwise"
PERTURBATION_NORMS = (GLOBAL_NORM, LAYERWISE_NORM)

# SAM's arguments that shape the perturbed pass, with the values that mean "not given": a
# method that never perturbs (BAR, FlatLoRA) refuses any other value and leaves them out
# of its config (`refuse_perturbation_arguments`, `without_perturbation_arguments`).
PERTURBATION_ARGUMENTS = {
    "rho": None,
    "adaptive": False,
    "eta": 0.01,
    "epsilon": 1e-12,
    "perturb": None,
    "perturbation_norm": GLOBAL_NORM,
    "distributed_perturbation": PER_REPLICA,
}

# ASAM leaves these at T = 1, as the official implementation does for every parameter
# whose name does not contain "weight": biases and normalization offsets.
_NON_ADAPTIVE_NAMES = ("bias", "beta", "offset")


@keras.saving.register_keras_serializable(package="keras_sam")
class SAM(keras.optimizers.Optimizer):
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

    Its members, besides the Keras optimizer's own (`learning_rate`, `iterations`,
    `variables`, `build`, `get_config`, ...), are of two kinds:

    - for users: the custom-loop step, `optimize` (TensorFlow, PyTorch) or
      `stateless_optimize` (JAX); `bind(model)`, for a `perturb` given as layer classes
      in a custom loop; the counters `skipped_steps` and `second_passes` (and
      `may_skip_second_pass`, whether the latter counts); the hyperparameters, as
      attributes (`rho`, `adaptive`, `eta`, `epsilon`, `perturb`, ...; the wrapped
      optimizer is `inner_optimizer`);
    - hooks, for a new method to override (see "Adding a method"): the per-step
      questions `initial_perturbation`, `pass_values`, `needs_second_pass`, `perturbation`,
      `descent_gradients` and `one_pass_gradients`; `teacher_values` and `added_loss`
      (a loss term from a second model state, MESA's); the class attributes
      `skips_second_pass` and `measures_sharpness`; and what they call:
      `add_state_variable`, `add_state_slots`, `state_variables`, `current_rho`,
      `rho_is_positive`, `at_step`, `every_k_steps`, `decide_second_pass` and
      `perturbation_along`.

    The rest (a leading underscore) is read by the step only.

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

    # Whether the method's own rule makes some steps take one pass only (a `rho`
    # schedule may too: see `may_skip_second_pass`).
    skips_second_pass = False
    # Whether a step measures the sharpness `L(w + e) - L(w)` (then `SAMModel` logs it).
    measures_sharpness = True

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
        perturb = _check_perturb(perturb)
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
        self._step_norms = None
        self._bound_variables = None
        self._state_variables = []
        self._state_sums = []

    # ----------------------------------------------------------------- the method
    # The trainer asks these per step (per part under m-sharpness). They may read and
    # assign the method's state variables (`state_variables`): the trainer records the
    # assignments and commits them only when the whole step has succeeded.

    def needs_second_pass(self, gradients, variables):
        """Whether this step takes the perturbed pass.

        A Python bool (decided once, when the step is traced) or a scalar boolean
        tensor (decided per step, inside the compiled step: the pass not taken is not
        run). SAM takes it when `rho > 0`: always for a positive number, never for the
        number 0, and, for a schedule, on the steps where it is positive.
        """
        del gradients, variables
        return self.decide_second_pass(True)

    def initial_perturbation(self, variables):
        """Where the first pass is taken: `w + e` with this `e` (None: at `w`).

        Called before any gradient of the step; it may read the method's state.
        Returns None (SAM's first pass is the clean pass at `w`), or one perturbation
        per variable (None where that variable is not moved). The first pass's
        gradients are then those at `w + e`, and so are its loss and its state updates
        (BatchNorm statistics); the weights themselves never hold `w + e`.
        """
        del variables
        return None

    def pass_values(self, variables):
        """What the passes of this step read for variables other than `variables`.

        Called before any gradient of the step, beside `initial_perturbation`; it may
        read the method's state. Returns None (the passes read every other variable as
        it is), or `(variable, value)` pairs: each pass of the step then reads `value`
        for that `variable` (a frozen weight, say), which is never written. The
        variables must not be among the trained `variables` (those read the step's
        weights). `FlatLoRA` uses it to take its pass at the frozen kernels plus seeded
        noise.
        """
        del variables
        return None

    def perturbation(self, gradients, variables):
        """The perturbation `e(w)` for these clean gradients (None where not perturbed)."""
        return self.perturbation_along(gradients, variables)

    def descent_gradients(self, gradients, perturbed_gradients, variables):
        """The gradient the wrapped optimizer descends with: SAM's is `grad L(w + e)`."""
        del gradients, variables
        return perturbed_gradients

    def one_pass_gradients(self, gradients, variables):
        """The gradient to descend with on a step without the perturbed pass."""
        del variables
        return gradients

    def teacher_values(self, variables):
        """The weights of a second model state whose outputs the loss may read.

        Called once per step (per part), before the first pass; it may read and assign
        the method's state. Returns None (SAM: no added loss), or one value per variable
        (None where the variable's own value is meant): the step then runs one forward
        pass at them, without gradients, and every pass of the step differentiates
        `loss + added_loss(outputs, teacher_outputs)`. The logged `loss` stays the task
        loss. MESA's teacher is the moving average of the weights.
        """
        del variables
        return None

    def added_loss(self, outputs, teacher_outputs):
        """The term added to each pass's loss (a scalar), from the pass's outputs and
        the teacher's (`teacher_values`; those carry no gradient). Called only when
        `teacher_values` gives values."""
        raise NotImplementedError(
            f"`{type(self).__name__}.teacher_values` gave values: define `added_loss`, "
            "the term they add to the loss."
        )

    # ------------------------------------------------------------- method helpers
    def current_rho(self):
        """`rho` at this step: the number, or the schedule at `iterations` (float32)."""
        return self.at_step(self.rho)

    def at_step(self, value):
        """A hyperparameter at this step: a number as is, a schedule at `iterations`."""
        if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
            return keras.ops.cast(value(self.iterations), "float32")
        return value

    def perturbation_along(self, directions, variables, sign=1.0):
        """`rho * T**2 d / ||T d||` restricted to the perturbed variables (`perturb`);
        `sign=-1.0` gives the perturbation against `d` (without negating `d`)."""
        mask = self._perturbed_mask(variables)
        directions = [d if m else None for d, m in zip(directions, mask)]
        scales = adaptive_scales(variables, self.eta) if self.adaptive else None
        if self.perturbation_norm == LAYERWISE_NORM:
            layers = [layer_of(v) for v in variables]
            return maths.layerwise_sam_perturbation(
                directions, sign * self.current_rho(), layers, self.epsilon, scales
            )
        norm = None
        if scales is None:
            norm = self._known_norm(directions)
            if norm is None and self.epsilon >= 1e-12:  # see `_known_norm`
                norm = maths.global_norm(directions, rescale=False)
        return maths.sam_perturbation(
            directions, sign * self.current_rho(), self.epsilon, scales, norm=norm
        )

    @contextlib.contextmanager
    def _gradient_norms(self, tensors, norms):
        """Within it, `perturbation_along` reads the norm of `tensors` (the step's
        gradients) from `norms` (their float32 norms, which the step takes anyway for
        its finite check) instead of taking it again: one pass over the gradients."""
        self._step_norms = _StepNorms(tensors, norms)
        try:
            yield
        finally:
            self._step_norms = None

    def _known_norm(self, directions):
        """The norm of `directions` from the step's gradient norms, when they are the
        step's gradients (else None: it is taken anew).

        Used only with `epsilon >= 1e-12` (the default): the per-tensor sums of squares
        are float32, exact to float32 precision down to norms of about 1e-15; below
        that, underflow errs by at most about 1e-18 (for a billion entries), which
        `epsilon` makes negligible in `||g|| + epsilon`. A smaller `epsilon` takes the
        norm anew, with `maths.global_norm`'s rescaled pass where the norm is small.
        """
        step_norms = getattr(self, "_step_norms", None)
        present = [d for d in directions if d is not None]
        if step_norms is None or not present or self.epsilon < 1e-12:
            return None
        positions, norms = step_norms.positions, step_norms.norms
        if any(id(d) not in positions for d in present):
            return None
        if len(present) == len(positions):
            return maths.combined_norm(norms)
        return maths.combined_norm(keras.ops.take(norms, [positions[id(d)] for d in present]))

    def _perturbed_mask(self, variables):
        """One bool per variable: whether `perturb` selects it."""
        perturb = self.perturb
        if perturb is None:
            return [True] * len(variables)
        if isinstance(perturb, str):
            mask = [re.search(perturb, v.path) is not None for v in variables]
        elif isinstance(perturb, tuple):
            if self._bound_variables is None:
                raise ValueError(
                    f"`perturb` names layer classes ({_class_names(perturb)}), so "
                    f"`{type(self).__name__}` needs the model to find their variables: "
                    "call `optimizer.bind(model)` before the first step (`SAMModel` does "
                    "it for you), or give `perturb` a regular expression or a callable."
                )
            mask = [id(v) in self._bound_variables for v in variables]
        else:
            mask = [bool(perturb(v)) for v in variables]
        if not any(mask):
            raise ValueError(
                f"`perturb` selects none of the {len(variables)} variables, so nothing "
                f"would be perturbed. Received: perturb={self._perturb_repr()}; variable "
                f"paths: {', '.join(v.path for v in variables[:8])}"
                + (", ..." if len(variables) > 8 else "")
            )
        return mask

    def bind(self, model: keras.Model) -> SAM:
        """Resolves a `perturb` given as layer classes against `model`'s layers."""
        if isinstance(self.perturb, tuple):
            layers = model._flatten_layers(include_self=True, recursive=True)
            self._bound_variables = {
                id(v) for layer in layers if isinstance(layer, self.perturb) for v in layer.weights
            }
        return self

    @property
    def _binds_model(self):
        """Whether `SAMModel` calls `bind(model)` before each step (a `perturb` given as
        layer classes; `FlatLoRA`, to find its LoRA layers)."""
        return isinstance(self.perturb, tuple)

    def _perturb_repr(self):
        if isinstance(self.perturb, tuple):
            return f"({_class_names(self.perturb)})"
        return repr(self.perturb)

    def rho_is_positive(self):
        """Whether `rho > 0` at this step: a Python bool for a number, a boolean tensor
        for a schedule."""
        if isinstance(self.rho, keras.optimizers.schedules.LearningRateSchedule):
            return keras.ops.greater(self.current_rho(), 0.0)
        return self.rho > 0

    def decide_second_pass(self, decision):
        """This step's decision: the method's own `decision` (a bool or a boolean tensor)
        and `rho > 0`. Counted in `second_passes` when the method has the counter.

        A step with `rho = 0` takes one pass: with a `rho` schedule the decision is a
        tensor, so the perturbed pass is not run on the steps where it is 0.
        """
        positive = self.rho_is_positive()
        if positive is False or decision is False:
            return False
        if positive is True:
            combined = decision
        elif decision is True:
            combined = positive
        else:
            combined = keras.ops.logical_and(positive, decision)
        if self.may_skip_second_pass:
            combined = self._count_second_pass(combined)
        return combined

    @property
    def may_skip_second_pass(self):
        """Whether some steps may take one pass only: by the method's own rule
        (`skips_second_pass`), or because `rho` is a schedule, which may be 0. Then
        `second_passes` counts the two-pass steps and `SAMModel` logs
        `second_pass_rate`."""
        schedule = isinstance(self.rho, keras.optimizers.schedules.LearningRateSchedule)
        return self.skips_second_pass or schedule

    def every_k_steps(self, k):
        """A boolean: whether `iterations` is a multiple of `k` (Python True for k=1)."""
        if k == 1:
            return True
        return keras.ops.equal(keras.ops.mod(self.iterations, k), 0)

    def _count_second_pass(self, decision):
        """Adds this step's decision to the `second_passes` state variable."""
        counter = self._second_passes
        counter.assign(counter.value + keras.ops.cast(decision, "float32"))
        return decision

    @property
    def second_passes(self):
        """The number of steps that took the perturbed pass (methods that skip it)."""
        return self._second_passes

    @property
    def state_variables(self):
        """The method's own per-step state (empty for SAM), in the optimizer's variables."""
        return list(self._state_variables)

    def add_state_variable(self, shape=(), name=None, reference=None):
        """Creates a float32 state variable (shaped like `reference` when given).

        Under gradient accumulation, the trainer also gets a companion variable in
        which it sums the state's new values over the micro-batches of a step.
        """
        if reference is not None:
            variable = self.add_variable_from_reference(reference, name=name)
        else:
            variable = self.add_variable(shape=shape, name=name, dtype="float32")
        self._state_variables.append(variable)
        if self.accumulation_steps > 1:
            self._state_sums.append(
                self.add_variable(shape=variable.shape, name=f"{name}_sum", dtype=variable.dtype)
            )
        return variable

    def add_state_slots(self, var_list, name):
        """One state variable shaped like each of `var_list`, looked up by variable.

        `slots[variable]` gives the slot. (A dict keyed by `id` would stop
        `tf.train.Checkpoint`, which cannot save a dict with non-string keys; the
        slots are saved as `state_variables`.)
        """
        return _Slots({id(v): self.add_state_variable(reference=v, name=name) for v in var_list})

    @property
    def _sparse_gradients_supported(self):
        """Whether the trainer may keep an Embedding's sparse gradient sparse.

        True when the perturbation scales each gradient entry by one global factor
        (SAM, not ASAM, whose factor depends on the weight) and the final gradient is
        the perturbed one: then only the looked-up rows are perturbed and descended.
        Variants that combine gradients get dense ones.
        """
        own = SAM.__dict__
        return not self.adaptive and all(
            getattr(type(self), hook) is own[hook]
            for hook in ("perturbation", "descent_gradients", "one_pass_gradients")
        )

    # ------------------------------------------------- trainer state (not the method's)
    @property
    def skipped_steps(self):
        """The number of steps skipped because a loss or gradient was NaN or infinite.

        A skipped step changes nothing but this count (and, under loss scaling, the
        loss scale): weights, optimizer slots, `iterations`, BatchNorm statistics and
        the method's state are left exactly as they were.
        """
        return self._skipped_steps

    @property
    def _accumulation_variables(self):
        """`(micro_steps, gradient_sums, state_sums)` under gradient accumulation."""
        return self._micro_steps, list(self._gradient_sums), list(self._state_sums)

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
            "perturb": _serialize_perturb(self.perturb),
            "distributed_perturbation": self.distributed_perturbation,
            "perturbation_norm": self.perturbation_norm,
            "gradient_accumulation_steps": (
                None if self.accumulation_steps == 1 else self.accumulation_steps
            ),
            "verify_optimizer_step": self.verify_optimizer_step,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = copy.deepcopy(config)  # Keras's deserialization edits nested configs
        optimizer = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        # `perturb` has its own forms; taken out first, so that it is deserialized once.
        perturb = _deserialize_perturb(config.pop("perturb", None), custom_objects)
        for key, value in config.items():
            if isinstance(value, dict) and "class_name" in value:
                config[key] = keras.saving.deserialize_keras_object(
                    value, custom_objects=custom_objects
                )
        return cls(optimizer, perturb=perturb, **config)


def _backend():
    """The `keras_sam.backends.base.Backend` of Keras's backend, which runs the custom
    loops. Imported when a loop is called: the methods never import a backend module."""
    from keras_sam import backends

    return backends.current()


class _StepNorms:
    """The step's gradient norms by gradient (a plain object: TensorFlow's tracking
    would wrap a dict or tuple attribute, and refuses integer keys)."""

    def __init__(self, tensors, norms):
        self.positions = {id(t): i for i, t in enumerate(tensors)}
        self.norms = norms


class _Slots:
    """Model variable -> state variable, kept out of TensorFlow's tracking."""

    def __init__(self, by_id):
        self._by_id = by_id

    def __getitem__(self, variable):
        # A variable, or its `id` (as the dicts these replace were keyed).
        return self._by_id[variable if isinstance(variable, int) else id(variable)]


def layer_of(variable):
    """The layer a variable belongs to, for `perturbation_norm="layerwise"`: its path up
    to the last `/` (`"block_1/dense/kernel"` -> `"block_1/dense"`)."""
    return variable.path.rsplit("/", 1)[0]


def adaptive_scales(variables, eta):
    """ASAM's `T_w = |w| + eta` for each weight-like variable, `None` (T = 1) for biases."""
    return [maths.adaptive_scale(v.value, eta) if _is_adaptive(v) else None for v in variables]


def _is_adaptive(variable):
    """Whether ASAM scales this variable by `|w| + eta` (weights) or by 1 (biases)."""
    name = variable.name.split("/")[-1].split(":")[0]
    return not name.endswith(_NON_ADAPTIVE_NAMES)


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


def serialize_rate(value):
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return keras.saving.serialize_keras_object(value)
    return value


def _check_perturb(perturb):
    """`perturb` in one of its documented forms, each of which a `.keras` file can hold.

    A form that could be used but not saved (a lambda, a `functools.partial`, an
    unregistered function, object or layer class) is refused here, at construction:
    refused later, by `get_config` inside `model.save`, it would leave the file being
    replaced truncated (Keras opens it before asking for the config).
    """
    if perturb is None:
        return perturb
    if isinstance(perturb, str):
        try:
            re.compile(perturb)
        except re.error as error:
            raise ValueError(
                f"`perturb` is not a valid regular expression ({error}). "
                f"Received: perturb={perturb!r}"
            ) from None
        return perturb
    if callable(perturb) and not isinstance(perturb, type):
        _check_saveable_callable(perturb)
        return perturb
    classes = tuple(perturb) if isinstance(perturb, (list, tuple)) else (perturb,)
    if classes and all(isinstance(c, type) and issubclass(c, keras.layers.Layer) for c in classes):
        for layer_class in classes:
            if getattr(keras.layers, layer_class.__name__, None) is not layer_class:
                what = f"the layer class `{layer_class.__name__}`"
                _check_registered(layer_class, what, perturb)
        return classes
    raise ValueError(
        "`perturb` must be None, a regular expression (matched against "
        "`variable.path`), a tuple of Keras layer classes, or a callable "
        f"`variable -> bool` registered with `@keras.saving.register_keras_serializable()`. "
        f"Received: perturb={perturb!r}"
    )


def _check_saveable_callable(perturb):
    if isinstance(perturb, types.FunctionType):
        if perturb.__name__ == "<lambda>":
            raise ValueError(
                "`perturb` is a lambda, which a saved model cannot hold (Keras refuses to "
                "load lambdas by default). Define a named function and register it with "
                "`@keras.saving.register_keras_serializable()`, or pass a regular "
                f"expression or a tuple of layer classes. Received: perturb={perturb!r}"
            )
        _check_registered(perturb, f"the function `{perturb.__qualname__}`", perturb)
        return
    if isinstance(perturb, functools.partial):
        raise ValueError(
            "`perturb` is a `functools.partial`, which a saved model cannot hold. Write a "
            "callable class with `__call__` and `get_config` (its arguments) and register "
            "it with `@keras.saving.register_keras_serializable()`. "
            f"Received: perturb={perturb!r}"
        )
    kind = type(perturb)
    if isinstance(perturb, (types.BuiltinFunctionType, types.MethodType)):
        raise ValueError(
            "`perturb` must be a registered function or an instance of a registered class "
            "(`@keras.saving.register_keras_serializable()`), so that a saved model can "
            f"hold it; a {kind.__name__} cannot be saved. Received: perturb={perturb!r}"
        )
    # Keras registers only classes with `get_config`, so a registered one can be saved.
    _check_registered(kind, f"the class `{kind.__qualname__}` of the callable object", perturb)


def _check_registered(obj, what, perturb):
    if keras.saving.get_registered_object(keras.saving.get_registered_name(obj)) is not obj:
        raise ValueError(
            f"`perturb` uses {what}, which is not registered with Keras, so a saved model "
            "could not be loaded. Decorate it with "
            "`@keras.saving.register_keras_serializable()` (or pass a regular expression). "
            f"Received: perturb={perturb!r}"
        )


def _class_names(classes):
    return ", ".join(c.__name__ for c in classes)


def _serialize_perturb(perturb):
    if perturb is None or isinstance(perturb, str):
        return perturb
    if isinstance(perturb, tuple):
        return {"layers": [keras.saving.get_registered_name(c) for c in perturb]}
    return keras.saving.serialize_keras_object(perturb)


def _deserialize_perturb(config, custom_objects):
    """The inverse of `_serialize_perturb`; each form is deserialized exactly once."""
    if config is None or isinstance(config, str):
        return config
    if isinstance(config, dict) and set(config) == {"layers"}:
        classes = []
        for name in config["layers"]:
            cls = keras.saving.get_registered_object(name, custom_objects=custom_objects)
            cls = cls or getattr(keras.layers, name, None)
            if cls is None:
                raise ValueError(
                    f"`perturb` names the layer class {name!r}, which is neither a Keras "
                    "layer nor a registered custom object: pass it in `custom_objects`."
                )
            classes.append(cls)
        return tuple(classes)
    if isinstance(config, dict) and config.get("class_name") != "function":
        # A registered callable class: its `from_config`, or its constructor.
        name = config.get("registered_name") or config.get("class_name")
        cls = keras.saving.get_registered_object(name, custom_objects=custom_objects)
        if isinstance(cls, type) and not hasattr(cls, "from_config"):
            return cls(**config.get("config", {}))
    return keras.saving.deserialize_keras_object(config, custom_objects=custom_objects)


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


def refuse_perturbation_arguments(kwargs, message):
    """Pops SAM's perturbation arguments (`PERTURBATION_ARGUMENTS`) from `kwargs`, for a
    method that never perturbs; raises `ValueError(message)` for any value but the one
    meaning "not given" (`message` may name `{name}` and `{value}`)."""
    for name, default in PERTURBATION_ARGUMENTS.items():
        if name in kwargs:
            value = kwargs.pop(name)
            if value != default:
                raise ValueError(message.format(name=name, value=value))


def without_perturbation_arguments(config):
    """`config` without SAM's perturbation arguments (a method that never perturbs)."""
    return {key: value for key, value in config.items() if key not in PERTURBATION_ARGUMENTS}


def unwrap_loss_scale(optimizer):
    """The optimizer a `keras.optimizers.LossScaleOptimizer` wraps, or `optimizer` itself
    when it is not one (Keras's `compile` wraps the optimizer so under `mixed_float16`)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer


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


# The checks of the arguments, shared with the diagnostics and the command line; imported
# here under the names the methods use.
from keras_sam._validation import (  # noqa: E402, F401 (FLOAT32_*: re-exported)
    FLOAT32_MAX,
    FLOAT32_SMALLEST_NORMAL,
    check_number,
    check_rate,
)
from keras_sam._validation import check_accumulation_steps as _check_accumulation_steps  # noqa: E402
from keras_sam._validation import check_bool as _check_bool  # noqa: E402
from keras_sam._validation import check_epsilon as _check_epsilon  # noqa: E402
