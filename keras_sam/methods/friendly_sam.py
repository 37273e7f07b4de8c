"""`FriendlySAM`: Friendly Sharpness-Aware Minimization (Li et al., CVPR 2024)."""

from typing import Any

import keras

from keras_sam import maths
from keras_sam.methods.sam import SAM, check_number


@keras.saving.register_keras_serializable(package="keras_sam")
class FriendlySAM(SAM):
    """Friendly-SAM (F-SAM): perturb along the batch's gradient noise only.

    The mini-batch gradient is a full-gradient component plus batch-specific noise;
    F-SAM estimates the full gradient by an exponential moving average of past
    gradients and removes it from the ascent direction. In the paper's order:

    ```
    g   = grad L_B(w)                          # clean pass
    m   = lmbda * m + (1 - lmbda) * g          # the EMA is fed the raw gradient first,
    d   = g - sigma * m                        # then the updated EMA is removed
    e   = rho * d / (||d|| + epsilon)          # ASAM's T scaling with adaptive=True
    w   = optimizer.update(w, grad L_B(w + e)) # perturbed pass
    ```

    `m` starts at zero and is state of this optimizer (one slot per variable, in
    checkpoints). It is updated on every step, also on those where a `rho` schedule is
    0, which take one pass and descend with `g`.

    When to use it: in place of SAM, at the same cost (two passes per step, plus one
    slot of memory per weight); the paper reports consistent small gains over SAM on
    CIFAR and ImageNet. Recommended: `sigma=1`, `lmbda=0.95` (the authors' scripts),
    `rho` as for SAM or somewhat larger (the authors use 0.2 on CIFAR-100).

    Args:
        optimizer: the wrapped `keras.optimizers.Optimizer`.
        rho: float >= 0 or a schedule of the step, the radius. Defaults to `0.05`.
        sigma: float >= 0, how much of the moving average is removed. Defaults to `1.0`.
        lmbda: float in [0, 1), the moving average's decay. Defaults to `0.95`.
        **kwargs: the other arguments of `keras_sam.SAM` (`adaptive`, `eta`,
            `epsilon`, `perturb`, `distributed_perturbation`,
            `gradient_accumulation_steps`, `name`).

    Reference:
        Li et al., Friendly Sharpness-Aware Minimization, CVPR 2024.
        https://arxiv.org/abs/2403.12350
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | str,
        rho: float | keras.optimizers.schedules.LearningRateSchedule = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.95,
        **kwargs: Any,
    ) -> None:
        sigma = check_number("sigma", sigma, minimum=0.0)
        lmbda = check_number("lmbda", lmbda, minimum=0.0)
        if lmbda >= 1:
            raise ValueError(f"`lmbda` must be in [0, 1). Received: lmbda={lmbda!r}")
        super().__init__(optimizer, rho=rho, **kwargs)
        self.sigma = sigma
        self.lmbda = lmbda

    def build(self, var_list):
        super().build(var_list)
        self._averages = self.add_state_slots(var_list, "gradient_average")

    def perturbation(self, gradients, variables):
        averages = self._update_averages(gradients, variables)
        directions = maths.list_ops.add_scaled(gradients, -self.sigma, averages)  # g - sigma m
        return self.perturbation_along(directions, variables)

    def one_pass_gradients(self, gradients, variables):
        # A step where `rho` is 0: the moving average is fed as on every other step.
        self._update_averages(gradients, variables)
        return gradients

    def _update_averages(self, gradients, variables):
        """`m = lmbda * m + (1 - lmbda) * g`, assigned, over all the slots at once;
        returns the new `m` (None where no gradient)."""
        present = [i for i, g in enumerate(gradients) if g is not None]
        slots = [self._averages[variables[i]] for i in present]
        decayed = maths.list_ops.scale([s.value for s in slots], self.lmbda)
        new = maths.list_ops.add_scaled(
            decayed,
            1.0 - self.lmbda,
            [keras.ops.cast(gradients[i], s.dtype) for i, s in zip(present, slots)],
        )
        averages = [None] * len(gradients)
        for i, slot, value in zip(present, slots, new):
            slot.assign(value)
            averages[i] = value
        return averages

    def get_config(self):
        return super().get_config() | {"sigma": self.sigma, "lmbda": self.lmbda}
