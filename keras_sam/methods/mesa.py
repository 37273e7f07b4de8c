"""`MESA`: memory-efficient sharpness-aware training (Du et al., NeurIPS 2022)."""

import numbers
from typing import Any

import keras
from keras import ops

from keras_sam import maths
from keras_sam.methods.sam import SAM, check_number


@keras.saving.register_keras_serializable(package="keras_sam")
class MESA(SAM):
    """MESA: self-distillation from a moving average of the weights, in place of SAM's
    perturbed pass.

    The memory-efficient variant of Sharpness-Aware Training for Free (SAF): the loss
    gets a trajectory term, the KL divergence from the outputs of an exponential
    moving average (EMA) of the weights (the teacher) to the outputs of the current
    weights, both softened by a temperature. Per step, in the authors' order:

    ```
    v   = decay * v + (1 - decay) * w           # v starts at the initial weights
    z_t = f(v; x)                                # teacher forward pass, no gradient
    L   = L_task(w) + c * tau**2 * mean_x KL(softmax(z_t / tau) || softmax(f(w; x) / tau))
    w   = optimizer.update(w, grad L(w))         # one forward-backward pass
    ```

    with `c = lmbda` from step `start_step` on (the optimizer's `iterations`) and 0
    before. The EMA is updated on every step, before and after `start_step`, and starts
    at the weights of the first step; it is state of this optimizer (one slot per
    weight, saved in checkpoints). The logged `loss` is the task loss alone.

    Cost: one forward-backward pass and one forward pass (the teacher) per step, and
    one weight-sized slot; the paper reports about 1.15x a plain step, against SAM's 2x.

    When to use it: where SAM's second pass is too expensive (full training of large
    models); the paper reports SAM-like gains on ImageNet at close to plain cost. The
    model's outputs must be one tensor of class scores: logits (`from_logits=True`) or
    probabilities (`from_logits=False`, their log is taken). Recommended (the authors'
    scripts): `lmbda=0.8`, `temperature=5`, `decay=0.9998`, `start_step` of about 5
    epochs. `decay` is per step: `1 / (1 - decay)` steps is the average's memory, so a
    short run wants a smaller one (0.99: about 100 steps).

    `rho` defaults to 0 (MESA alone); a positive `rho` adds SAM's perturbed pass, whose
    loss carries the same term.

    Args:
        optimizer: the wrapped `keras.optimizers.Optimizer`.
        lmbda: float >= 0, the coefficient of the trajectory term. Defaults to `0.8`.
        temperature: float > 0, the softmax temperature of both outputs. Defaults to
            `5.0`.
        decay: float in [0, 1), the moving average's decay per step. Defaults to
            `0.9998`.
        start_step: int >= 0, the first step (counted in `iterations`) whose loss has
            the term. Defaults to `0`.
        from_logits: whether the model outputs logits (else probabilities). Defaults
            to `True`.
        rho: float >= 0 or a schedule, SAM's radius. Defaults to `0.0`.
        **kwargs: the other arguments of `keras_sam.SAM` (`gradient_accumulation_steps`,
            `distributed_perturbation`, `name`, ...).

    Reference:
        Du et al., Sharpness-Aware Training for Free, NeurIPS 2022.
        https://arxiv.org/abs/2205.14083
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | str,
        lmbda: float = 0.8,
        temperature: float = 5.0,
        decay: float = 0.9998,
        start_step: int = 0,
        from_logits: bool = True,
        rho: float | keras.optimizers.schedules.LearningRateSchedule = 0.0,
        **kwargs: Any,
    ) -> None:
        lmbda = check_number("lmbda", lmbda, minimum=0.0, float32=True)
        temperature = check_number("temperature", temperature, minimum=0.0, strict=True)
        decay = check_number("decay", decay, minimum=0.0)
        if decay >= 1:
            raise ValueError(f"`decay` must be in [0, 1). Received: decay={decay!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, numbers.Integral):
            raise ValueError(
                f"`start_step` must be an integer. Received: start_step={start_step!r}"
            )
        if start_step < 0:
            raise ValueError(f"`start_step` must be >= 0. Received: start_step={start_step!r}")
        if not isinstance(from_logits, bool):
            raise ValueError(
                f"`from_logits` must be True or False. Received: from_logits={from_logits!r}"
            )
        super().__init__(optimizer, rho=rho, **kwargs)
        self.lmbda = lmbda
        self.temperature = temperature
        self.decay = decay
        self.start_step = int(start_step)
        self.from_logits = from_logits

    def build(self, var_list):
        super().build(var_list)
        self._averages = self.add_state_slots(var_list, "weight_average")

    def teacher_values(self, variables):
        """`v = decay * v + (1 - decay) * w`, assigned; the teacher is `v`.

        On the first step (`iterations` 0) the decay is 0: the average starts at the
        weights (the slots, created as zeros, need no copy of them).
        """
        slots = [self._averages[v] for v in variables]
        weights = [ops.cast(ops.stop_gradient(v.value), s.dtype) for v, s in zip(variables, slots)]
        decay = ops.where(ops.greater(self.iterations, 0), self.decay, 0.0)
        decayed = maths.list_ops.scale([s.value for s in slots], decay)
        averages = maths.list_ops.add_scaled(decayed, 1.0 - decay, weights)
        for slot, value in zip(slots, averages):
            slot.assign(value)
        return list(averages)

    def added_loss(self, outputs, teacher_outputs):
        """`c * tau**2 * mean KL(softmax(z_t / tau) || softmax(z / tau))`."""
        student = _class_scores(outputs, self.from_logits)
        teacher = _class_scores(teacher_outputs, self.from_logits)
        tau = self.temperature
        log_student = ops.log_softmax(student / tau, axis=-1)
        log_teacher = ops.log_softmax(teacher / tau, axis=-1)
        kl = ops.sum(ops.exp(log_teacher) * (log_teacher - log_student), axis=-1)
        return self._coefficient() * (tau * tau) * ops.mean(kl)

    def _coefficient(self):
        """`lmbda` from `start_step` on, 0 before."""
        if self.start_step == 0:
            return self.lmbda
        started = ops.greater_equal(self.iterations, self.start_step)
        return ops.where(started, self.lmbda, 0.0)

    def get_config(self):
        return super().get_config() | {
            "lmbda": self.lmbda,
            "temperature": self.temperature,
            "decay": self.decay,
            "start_step": self.start_step,
            "from_logits": self.from_logits,
        }


def _class_scores(outputs, from_logits):
    """The model's one output tensor as float32 logits."""
    flat = keras.tree.flatten(outputs)
    if len(flat) != 1:
        raise ValueError(
            "MESA's trajectory term compares the model's class scores: the model must "
            f"have one output tensor. Received {len(flat)} outputs."
        )
    scores = ops.cast(flat[0], "float32")
    if from_logits:
        return scores
    return ops.log(ops.clip(scores, 1e-7, 1.0))
