"""Schedules of `rho`: `ProportionalRho`, a radius that follows the learning rate, as GSAM's
paper does; `LatePhaseRho`, SAM from a given step on only."""

import keras

from keras_sam._validation import check_integer
from keras_sam.methods.sam import check_number


@keras.saving.register_keras_serializable(package="keras_sam")
class ProportionalRho(keras.optimizers.schedules.LearningRateSchedule):
    """`rho_t` proportional to the learning rate `lr_t`, between `rho_min` and `rho_max`.

    ```
    rho_t = rho_min + (rho_max - rho_min) * clip((lr_t - lr_min) / (lr_max - lr_min), 0, 1)
    ```

    GSAM's schedule (Zhuang et al., 2022): with a decaying learning rate the radius
    decays with it. Usable as `rho` of every keras_sam method, evaluated at the
    optimizer's `iterations`, so that `lr_t` is the rate of the same step.

    Args:
        learning_rate: the learning-rate schedule to follow (the one given to the
            wrapped optimizer).
        rho_max: float >= 0, the radius at `lr_max`.
        rho_min: float >= 0, the radius at `lr_min`. Defaults to `0.0`.
        lr_max: float, the largest learning rate. Defaults to `learning_rate(0)`
            (give it explicitly for a schedule with warm-up).
        lr_min: float < lr_max, the smallest learning rate. Defaults to `0.0`.

    Example:

    ```python
    lr = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=10_000)
    opt = keras_sam.GSAM(
        keras.optimizers.SGD(lr, momentum=0.9),
        rho=keras_sam.ProportionalRho(lr, rho_max=0.1, rho_min=0.01),
        alpha=0.1,
    )
    ```
    """

    def __init__(
        self,
        learning_rate: keras.optimizers.schedules.LearningRateSchedule,
        rho_max: float,
        rho_min: float = 0.0,
        lr_max: float | None = None,
        lr_min: float = 0.0,
    ) -> None:
        if isinstance(learning_rate, dict):
            learning_rate = keras.optimizers.schedules.deserialize(learning_rate)
        if not isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError(
                "`learning_rate` must be a `keras.optimizers.schedules."
                "LearningRateSchedule` (the wrapped optimizer's). "
                f"Received: learning_rate={learning_rate!r}"
            )
        rho_max = check_number("rho_max", rho_max, minimum=0.0, float32=True)
        rho_min = check_number("rho_min", rho_min, minimum=0.0, float32=True)
        if rho_min > rho_max:
            raise ValueError(
                "`rho_min` must be <= `rho_max`. "
                f"Received: rho_min={rho_min!r}, rho_max={rho_max!r}"
            )
        if lr_max is None:
            lr_max = float(keras.ops.convert_to_numpy(learning_rate(0)))
        lr_max = check_number("lr_max", lr_max, minimum=0.0)
        lr_min = check_number("lr_min", lr_min, minimum=0.0)
        if lr_min >= lr_max:
            raise ValueError(
                "`lr_min` must be < `lr_max` (give `lr_max` for a schedule that starts "
                f"at 0). Received: lr_min={lr_min!r}, lr_max={lr_max!r}"
            )
        self.learning_rate = learning_rate
        self.rho_max = rho_max
        self.rho_min = rho_min
        self.lr_max = lr_max
        self.lr_min = lr_min

    def __call__(self, step):
        ops = keras.ops
        lr = ops.cast(self.learning_rate(step), "float32")
        fraction = ops.clip((lr - self.lr_min) / (self.lr_max - self.lr_min), 0.0, 1.0)
        return self.rho_min + (self.rho_max - self.rho_min) * fraction

    def get_config(self):
        return {
            "learning_rate": keras.optimizers.schedules.serialize(self.learning_rate),
            "rho_max": self.rho_max,
            "rho_min": self.rho_min,
            "lr_max": self.lr_max,
            "lr_min": self.lr_min,
        }


@keras.saving.register_keras_serializable(package="keras_sam")
class LatePhaseRho(keras.optimizers.schedules.LearningRateSchedule):
    """`rho` from step `start_step` on, 0 before it: late-phase SAM in one line.

    ```
    rho_t = 0     for t < start_step    # one pass: a step of the wrapped optimizer
    rho_t = rho   for t >= start_step   # SAM's two passes
    ```

    SAM applied only at the end of training has been reported to keep most of its
    effect on generalization (Zhou et al., ICLR 2025). The steps before `start_step`
    take one forward-backward pass (the perturbed pass is not run), so a run costs
    `1 + f` passes per step, where `f` is the fraction of steps from `start_step` on.
    `t` is the optimizer's `iterations`, counted from 0: with `steps_per_epoch` steps
    an epoch, `start_step=E * steps_per_epoch` starts SAM with the (E+1)-th epoch.
    Usable as `rho` of every keras_sam method; `SAMModel` logs `second_pass_rate`, the
    fraction of two-pass steps.

    `keras.optimizers.schedules.PiecewiseConstantDecay([b], [0.0, rho])` does the same
    with `start_step = b + 1` (its value at step `b` is still the first one).

    Args:
        rho: float >= 0, the radius from `start_step` on.
        start_step: int >= 0, the first step with `rho`.

    Example:

    ```python
    steps_per_epoch = 390
    opt = keras_sam.SAM(
        keras.optimizers.SGD(0.1, momentum=0.9),
        rho=keras_sam.LatePhaseRho(0.05, start_step=150 * steps_per_epoch),
    )   # epochs 1-150 plain (one pass a step), 151 on SAM
    ```

    Reference:
        Zhou et al., Sharpness-Aware Minimization Efficiently Selects Flatter Minima
        Late in Training, ICLR 2025. https://arxiv.org/abs/2410.10373
    """

    def __init__(self, rho: float, start_step: int) -> None:
        rho = check_number("rho", rho, minimum=0.0, float32=True)
        start_step = check_integer("start_step", start_step, minimum=0)
        self.rho = rho
        self.start_step = int(start_step)

    def __call__(self, step):
        ops = keras.ops
        started = ops.greater_equal(step, self.start_step)
        return ops.where(started, ops.cast(self.rho, "float32"), ops.cast(0.0, "float32"))

    def get_config(self):
        return {"rho": self.rho, "start_step": self.start_step}
