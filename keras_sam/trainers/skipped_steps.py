"""Runs made of skipped steps: stopped with an error that says so.

A SAM step with a NaN or infinite loss, gradient or update is skipped: nothing changes
but `optimizer.skipped_steps`. One bad batch is harmless; a long run of them means that
nothing is being learned (the data hold NaNs, the loss diverged, the loss scale
underflowed). `SAMModel.fit` stops after `max_consecutive_skips` skipped steps in a
row with a `SkippedStepsError`; a custom loop gets the same check from
`SkippedStepsGuard`.
"""

import numbers
from typing import Any

import keras

from keras_sam.methods.hooks import unwrap_loss_scale

DEFAULT_MAX_CONSECUTIVE_SKIPS = 100


class SkippedStepsError(RuntimeError):
    """Raised when too many training steps in a row were skipped.

    A step is skipped when a loss, a gradient or an update of either pass is NaN or
    infinite; skipped steps change nothing, so the weights are those after the last
    applied step.

    Attributes:
        consecutive_skips: the number of steps skipped in a row.
        skipped_steps: the optimizer's total count of skipped steps.
        max_consecutive_skips: the limit that was reached.
    """

    def __init__(
        self, consecutive_skips: int, skipped_steps: int, max_consecutive_skips: int
    ) -> None:
        self.consecutive_skips = consecutive_skips
        self.skipped_steps = skipped_steps
        self.max_consecutive_skips = max_consecutive_skips
        super().__init__(
            f"{consecutive_skips} training steps in a row were skipped "
            f"({skipped_steps} in all) because a loss, a gradient or an update was NaN or "
            "infinite: nothing is being learned, and the weights are those after the last "
            "applied step. Likely causes: NaN or inf in the inputs or labels (check the "
            "data, e.g. with `np.isfinite`); a learning rate or `rho` too large (the loss "
            "diverged); under mixed precision, a loss-scale underflow. "
            f"`max_consecutive_skips={max_consecutive_skips}` set this limit "
            "(`SAMModel(model, max_consecutive_skips=None)` disables it)."
        )


def check_max_consecutive_skips(value):
    """The argument: None (no limit) or an integer >= 1."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
    ):
        raise ValueError(
            "`max_consecutive_skips` must be None or an integer >= 1. "
            f"Received: max_consecutive_skips={value!r}"
        )
    return None if value is None else int(value)


class SkippedStepsGuard:
    """Counts the training steps skipped in a row, and raises past a limit.

    `SAMModel.fit` uses one on every batch. In a custom loop, give it the optimizer's
    cumulative count after each step (`optimizer.skipped_steps` on TensorFlow and
    PyTorch; on JAX, that variable's value in the optimizer state the step returned):

    ```python
    guard = keras_sam.SkippedStepsGuard(max_consecutive_skips=100)
    for x, y in batches:
        ...  # one SAM step
        guard.update(optimizer.skipped_steps)  # raises keras_sam.SkippedStepsError
    ```

    Reading the count waits for the step to finish (one host-device synchronization).

    Args:
        max_consecutive_skips: int >= 1, the number of skipped steps in a row that
            raises, or `None` to only count. Defaults to 100.
        skipped_steps: the optimizer's count before the first step the guard watches.
            Defaults to 0.

    Attributes:
        consecutive_skips: the steps skipped in a row up to the last update.
    """

    def __init__(
        self,
        max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
        skipped_steps: Any = 0,
    ) -> None:
        self.max_consecutive_skips = check_max_consecutive_skips(max_consecutive_skips)
        self.skipped_steps = _count(skipped_steps)
        self.consecutive_skips = 0

    def update(self, skipped_steps: Any, steps: int = 1) -> int:
        """Takes the optimizer's count after `steps` more steps; returns the run length.

        When fewer than `steps` of them were skipped, some step among them was applied:
        the run then restarts, counting only the skips known to follow it (with
        `steps=1`, exactly; for a block of several steps whose order is not seen, the
        skips are counted from the next block on).

        Raises:
            SkippedStepsError: when `max_consecutive_skips` steps in a row were skipped.
        """
        skipped_steps = _count(skipped_steps)
        new_skips = skipped_steps - self.skipped_steps
        self.skipped_steps = skipped_steps
        if new_skips >= steps:
            self.consecutive_skips += new_skips
        else:
            self.consecutive_skips = 0
        limit = self.max_consecutive_skips
        if limit is not None and self.consecutive_skips >= limit:
            raise SkippedStepsError(self.consecutive_skips, skipped_steps, limit)
        return self.consecutive_skips


def _count(value):
    return int(keras.ops.convert_to_numpy(value))


class StopOnSkippedSteps(keras.callbacks.Callback):
    """`SAMModel.fit`'s check: a `SkippedStepsGuard` fed by the batch logs."""

    def __init__(self, max_consecutive_skips):
        super().__init__()
        self.max_consecutive_skips = max_consecutive_skips
        self.guard = None
        self._last_batch = -1

    def on_train_begin(self, logs=None):
        optimizer = unwrap_loss_scale(self.model.optimizer)
        self.guard = SkippedStepsGuard(self.max_consecutive_skips, optimizer.skipped_steps)

    def on_epoch_begin(self, epoch, logs=None):
        self._last_batch = -1

    def on_train_batch_end(self, batch, logs=None):
        if not logs or "skipped_steps" not in logs:
            return
        # With `steps_per_execution=k`, `batch` advances by k: the logs are the k-th step's.
        steps = max(batch - self._last_batch, 1)
        self._last_batch = batch
        try:
            self.guard.update(logs["skipped_steps"], steps)
        except SkippedStepsError:
            # On JAX the trainer holds the step's state apart from the variables until
            # the epoch ends: put it back, so that the model holds the weights after the
            # last applied step (the skipped ones changed nothing).
            sync = getattr(self.model, "jax_state_sync", None)
            if sync is not None:
                sync()
            raise
