"""What the step asks of a method, and the helpers a method's hooks call.

`SAM` inherits `MethodHooks`: the per-step hooks with SAM's answers, and what a variant's
hooks call. A new method overrides hooks and calls helpers; it never touches the step. The
whole protocol is named once, in the tuples below (`HOOKS`, `FLAGS`, `STEP_READS`), each
name a public member of `MethodHooks`:

- `HOOKS`, asked per step (per part under m-sharpness): `initial_perturbation`,
  `pass_values`, `needs_second_pass`, `perturbation`, `descent_gradients`,
  `one_pass_gradients`, `teacher_values` and `added_loss`;
- `FLAGS`, class attributes: `skips_second_pass`, `one_pass` and `measures_sharpness`;
- `STEP_READS`, what the step reads besides, with no reason to override but the first:
  `binds_model`, `keeps_sparse_gradients`, `gradient_norms` (set by the step around its
  `perturbation` call: the clean gradients' norms, which `perturbation_along` reads) and
  `accumulation_variables`; and `SAM`'s attributes (`inner_optimizer`,
  `accumulation_steps`, `distributed_perturbation`, `verify_optimizer_step`,
  `skipped_steps`, `variables`, `bind`).

The helpers: `current_rho`, `at_step`, `rho_is_positive`, `decide_second_pass`,
`every_k_steps`, `perturbation_along`, `add_state_variable`, `add_state_slots`,
`state_variables`, `second_passes`, `may_skip_second_pass`; and, in this module,
`layer_of`, `adaptive_scales`, `unwrap_loss_scale` (and, for a config,
`keras_sam.methods.config`'s `serialize_rate`, `refuse_perturbation_arguments`,
`without_perturbation_arguments`). The step reads nothing private of a method
(`tests/step/test_protocol.py`).

docs/adding-a-method.md says what each hook returns, with an example.
"""

from __future__ import annotations

import re

import keras

from keras_sam import maths

# How the trainers perturb under `tf.distribute` (see `SAM`'s `distributed_perturbation`).
PER_REPLICA = "per_replica"
SYNCHRONIZED = "synchronized"
DISTRIBUTED_PERTURBATIONS = (PER_REPLICA, SYNCHRONIZED)

# Over what `rho` is measured (see `SAM`'s `perturbation_norm`).
GLOBAL_NORM = "global"
LAYERWISE_NORM = "layerwise"
PERTURBATION_NORMS = (GLOBAL_NORM, LAYERWISE_NORM)

# ASAM leaves these at T = 1, as the official implementation does for every parameter
# whose name does not contain "weight": biases and normalization offsets.
_NON_ADAPTIVE_NAMES = ("bias", "beta", "offset")

# The protocol between the step and a method, named once (see the module's docstring).
HOOKS = (
    "initial_perturbation",
    "pass_values",
    "needs_second_pass",
    "perturbation",
    "descent_gradients",
    "one_pass_gradients",
    "teacher_values",
    "added_loss",
)
FLAGS = ("skips_second_pass", "one_pass", "measures_sharpness")
STEP_READS = ("binds_model", "keeps_sparse_gradients", "gradient_norms", "accumulation_variables")


class MethodHooks:
    """The hooks a method overrides, with SAM's answers, and the helpers they call.

    A mixin of `keras_sam.SAM`, which holds the hyperparameters (`rho`, `adaptive`, `eta`,
    `epsilon`, `perturb`, `perturbation_norm`) and the variables these read.
    """

    # Whether the method's own rule makes some steps take one pass only (a `rho`
    # schedule may too: see `may_skip_second_pass`).
    skips_second_pass = False
    # Whether the method never takes the perturbed pass (MomentumSAM, BAR, FlatLoRA: one
    # pass a step, whatever `rho`): `needs_second_pass` is then False and no
    # `second_pass_rate` is logged.
    one_pass = False
    # Whether a step measures the sharpness `L(w + e) - L(w)` (then `SAMModel` logs it).
    measures_sharpness = True

    # ------------------------------------------------------------------ the hooks
    # The trainer asks these per step (per part under m-sharpness). They may read and
    # assign the method's state variables (`state_variables`): the trainer records the
    # assignments and commits them only when the whole step has succeeded.

    def needs_second_pass(self, gradients, variables):
        """Whether this step takes the perturbed pass.

        A Python bool (decided once, when the step is traced) or a scalar boolean
        tensor (decided per step, inside the compiled step: the pass not taken is not
        run). SAM takes it when `rho > 0`: always for a positive number, never for the
        number 0, and, for a schedule, on the steps where it is positive; never for a
        `one_pass` method.
        """
        del gradients, variables
        if self.one_pass:
            return False
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

    # ----------------------------------------------------------- method helpers
    def current_rho(self):
        """`rho` at this step: the number, or the schedule at `iterations` (float32)."""
        return self.at_step(self.rho)

    def at_step(self, value):
        """A hyperparameter at this step: a number as is, a schedule at `iterations`."""
        if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
            return keras.ops.cast(value(self.iterations), "float32")
        return value

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
        if self.one_pass:
            return False
        schedule = isinstance(self.rho, keras.optimizers.schedules.LearningRateSchedule)
        return self.skips_second_pass or schedule

    def every_k_steps(self, k):
        """A boolean: whether `iterations` is a multiple of `k` (Python True for k=1)."""
        if k == 1:
            return True
        return keras.ops.equal(keras.ops.mod(self.iterations, k), 0)

    @property
    def second_passes(self):
        """The number of steps that took the perturbed pass (methods that skip it)."""
        return self._second_passes

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

    # ---------------------------------------------------- read by the step only
    # `STEP_READS`: what the step asks of every method besides the hooks.

    # The norms of the clean gradients the step hands to `perturbation` (a
    # `GradientNorms`), set by the step for the duration of that call, None otherwise.
    # The step takes them anyway, for its finite check: `perturbation_along` reads the
    # norm of those gradients here instead of taking it again (one pass over them). A
    # method's `perturbation` need not read it; a direction of its own (FriendlySAM's
    # `g - sigma m`) is not among those gradients, and its norm is taken anew.
    gradient_norms = None

    @property
    def binds_model(self):
        """Whether `SAMModel` calls `bind(model)` before each step (a `perturb` given as
        layer classes; `FlatLoRA`, to find its LoRA layers). A method whose hooks need
        the model's layers overrides it."""
        return isinstance(self.perturb, tuple)

    @property
    def keeps_sparse_gradients(self):
        """Whether the step may keep an Embedding's sparse gradient sparse.

        True when the perturbation scales each gradient entry by one global factor
        (SAM, not ASAM, whose factor depends on the weight) and the final gradient is
        the perturbed one: then only the looked-up rows are perturbed and descended.
        Variants that combine gradients get dense ones.
        """
        own = MethodHooks.__dict__
        return not self.adaptive and all(
            getattr(type(self), hook) is own[hook]
            for hook in ("perturbation", "descent_gradients", "one_pass_gradients")
        )

    @property
    def accumulation_variables(self):
        """`(micro_steps, gradient_sums, state_sums)` under gradient accumulation: the
        micro-batch counter and the sums the step adds to (empty sums without it)."""
        return self._micro_steps, list(self._gradient_sums), list(self._state_sums)

    # ---------------------------------------------------------------- internals
    def _known_norm(self, directions):
        """The norm of `directions` from the step's gradient norms, when they are the
        step's gradients (else None: it is taken anew).

        Used only with `epsilon >= 1e-12` (the default): the per-tensor sums of squares
        are float32, exact to float32 precision down to norms of about 1e-15; below
        that, underflow errs by at most about 1e-18 (for a billion entries), which
        `epsilon` makes negligible in `||g|| + epsilon`. A smaller `epsilon` takes the
        norm anew, with `maths.global_norm`'s rescaled pass where the norm is small.
        """
        step_norms = self.gradient_norms
        if step_norms is None or self.epsilon < 1e-12:
            return None
        return step_norms.norm_of(directions)

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

    def _perturb_repr(self):
        if isinstance(self.perturb, tuple):
            return f"({_class_names(self.perturb)})"
        return repr(self.perturb)

    def _count_second_pass(self, decision):
        """Adds this step's decision to the `second_passes` state variable."""
        counter = self._second_passes
        counter.assign(counter.value + keras.ops.cast(decision, "float32"))
        return decision


class GradientNorms:
    """The float32 norms of the clean gradients the step hands to `perturbation`
    (`MethodHooks.gradient_norms`), by gradient (a plain object: TensorFlow's tracking
    would wrap a dict or tuple attribute, and refuses integer keys)."""

    def __init__(self, gradients, norms):
        self.positions = {id(t): i for i, t in enumerate(gradients)}
        self.norms = norms

    def norm_of(self, directions):
        """The global norm of `directions` (None entries left out) when each is one of
        the gradients; else None (it is taken anew)."""
        present = [d for d in directions if d is not None]
        positions = self.positions
        if not present or any(id(d) not in positions for d in present):
            return None
        if len(present) == len(positions):
            return maths.combined_norm(self.norms)
        return maths.combined_norm(keras.ops.take(self.norms, [positions[id(d)] for d in present]))


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


def _class_names(classes):
    return ", ".join(c.__name__ for c in classes)


def unwrap_loss_scale(optimizer):
    """The optimizer a `keras.optimizers.LossScaleOptimizer` wraps, or `optimizer` itself
    when it is not one (Keras's `compile` wraps the optimizer so under `mixed_float16`)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer
