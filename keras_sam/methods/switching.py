"""SAM on some steps only: every k steps (`PeriodicSAM`), or when the gradient is
unusually large (`AESAM`). The other steps are plain steps of the wrapped optimizer."""

import math
import numbers
from typing import Any

import keras

from keras_sam import maths
from keras_sam.methods.config import serialize_rate
from keras_sam.methods.sam import SAM, check_number


@keras.saving.register_keras_serializable(package="keras_sam")
class PeriodicSAM(SAM):
    """SAM every `k` steps, plain steps of the wrapped optimizer in between.

    ```
    iterations % k == 0:  w = optimizer.update(w, grad L(w + e(w)))   # two passes
    otherwise:            w = optimizer.update(w, grad L(w))          # one pass
    ```

    Cost: `1 + 1/k` gradient evaluations per step. When to use it: the simplest way
    to buy part of SAM's effect for part of its cost; `LookSAM` keeps more of it at
    the same cost by reusing SAM's direction on the plain steps. `k=1` is SAM.
    `SAMModel` logs `second_pass_rate`; `second_passes` counts the two-pass steps.

    Args:
        optimizer: the wrapped `keras.optimizers.Optimizer`.
        rho: float >= 0 or a schedule of the step, the radius. Defaults to `0.05`.
        k: int >= 1, the period. Defaults to `5`.
        **kwargs: the other arguments of `keras_sam.SAM` (`adaptive`, `eta`,
            `epsilon`, `perturb`, `distributed_perturbation`,
            `gradient_accumulation_steps`, `name`).
    """

    skips_second_pass = True

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | str,
        rho: float | keras.optimizers.schedules.LearningRateSchedule = 0.05,
        k: int = 5,
        **kwargs: Any,
    ) -> None:
        k = check_period("k", k)
        super().__init__(optimizer, rho=rho, **kwargs)
        self.k = k

    def needs_second_pass(self, gradients, variables):
        del gradients, variables
        return self.decide_second_pass(self.every_k_steps(self.k))

    def get_config(self):
        return super().get_config() | {"k": self.k}


@keras.saving.register_keras_serializable(package="keras_sam")
class AESAM(SAM):
    """SAM only where the loss surface looks sharp, in the spirit of AE-SAM.

    The squared norm of the clean gradient is compared with its own running
    statistics; a step takes the perturbed pass only when it is unusually large:

    ```
    s     = ||grad L(w)||**2
    mean  = decay * mean + (1 - decay) * s             # the first step sets mean = s,
    var   = decay * var + (1 - decay) * (s - mean)**2  # var = 0
    s >= mean + margin_t * sqrt(var):  a SAM step (two passes)
    otherwise:                         a plain step (the clean gradient)
    ```

    `mean`, `var` and `second_passes` are state of this optimizer (three scalars, in
    checkpoints). Cost: between 1 and 2 gradient evaluations per step, depending on
    the data; `SAMModel` logs `second_pass_rate`, the fraction of two-pass steps.
    With `margin=0` about half the steps take two passes; a larger margin, fewer.
    The paper raises the margin linearly over training (from `lambda_1` to
    `lambda_2`): pass a schedule, e.g.
    `keras.optimizers.schedules.PolynomialDecay(-1.0, total_steps, 1.0, power=1)`.

    Differences from the paper: the first step initializes the statistics (instead of
    starting them at zero), and the decision is taken on the same mini-batch whose
    gradient updates the statistics. Under m-sharpness each part decides for itself.

    Args:
        optimizer: the wrapped `keras.optimizers.Optimizer`.
        rho: float >= 0 or a schedule of the step, the radius. Defaults to `0.05`.
        margin: a number (negative allowed) or a schedule of the step, in units of
            the running standard deviation. Defaults to `0.0`.
        decay: float in [0, 1), the decay of the running statistics. Defaults to
            `0.9`.
        **kwargs: the other arguments of `keras_sam.SAM` (`adaptive`, `eta`,
            `epsilon`, `perturb`, `distributed_perturbation`,
            `gradient_accumulation_steps`, `name`).

    Reference:
        Jiang et al., An Adaptive Policy to Employ Sharpness-Aware Minimization,
        ICLR 2023. https://arxiv.org/abs/2304.14647
    """

    skips_second_pass = True

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | str,
        rho: float | keras.optimizers.schedules.LearningRateSchedule = 0.05,
        margin: float | keras.optimizers.schedules.LearningRateSchedule = 0.0,
        decay: float = 0.9,
        **kwargs: Any,
    ) -> None:
        margin = _check_margin(margin)
        decay = check_number("decay", decay, minimum=0.0)
        if decay >= 1:
            raise ValueError(f"`decay` must be in [0, 1). Received: decay={decay!r}")
        super().__init__(optimizer, rho=rho, **kwargs)
        self.margin = margin
        self.decay = decay

    def build(self, var_list):
        super().build(var_list)
        self._mean = self.add_state_variable(name="squared_norm_mean")
        self._variance = self.add_state_variable(name="squared_norm_variance")
        self._observations = self.add_state_variable(name="observations")

    def needs_second_pass(self, gradients, variables):
        del variables
        if self.rho_is_positive() is False:
            return False
        # The statistics see every step's gradient, also those where a `rho` schedule
        # is 0 (which take one pass whatever the statistics say).
        ops = keras.ops
        squared = ops.square(maths.global_norm(gradients))
        first = ops.equal(self._observations.value, 0.0)
        mean = ops.where(
            first, squared, self.decay * self._mean.value + (1.0 - self.decay) * squared
        )
        variance = ops.where(
            first,
            0.0,
            self.decay * self._variance.value + (1.0 - self.decay) * ops.square(squared - mean),
        )
        self._mean.assign(mean)
        self._variance.assign(variance)
        self._observations.assign(self._observations.value + 1.0)
        decision = ops.greater_equal(squared, mean + self.at_step(self.margin) * ops.sqrt(variance))
        return self.decide_second_pass(decision)

    def get_config(self):
        return super().get_config() | {"margin": serialize_rate(self.margin), "decay": self.decay}


def check_period(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")
    return int(value)


def _check_margin(value):
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(
            "`margin` must be a finite number or a "
            "`keras.optimizers.schedules.LearningRateSchedule` of the step. "
            f"Received: margin={value!r}"
        )
    return float(value)
