"""Synthetic label noise: corrupt a chosen fraction of the training labels, reproducibly."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from keras_sam._validation import check_integer

MODES = ("flip", "uniform")


class NoisyLabels(NamedTuple):
    """The result of `corrupt_labels`.

    Attributes:
        labels: the noisy labels, same shape and dtype as the clean ones (a new array).
        mask: boolean array, `True` where the noisy label differs from the clean one
            (exactly `labels != clean_labels`).
        fraction: float, the fraction of labels that differ, `mask.mean()` (0.0 when there
            are no labels).
    """

    labels: np.ndarray
    mask: np.ndarray
    fraction: float


def _check_labels(labels):
    array = np.asarray(labels)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            "`labels` must be integer class indices (sparse labels, not one-hot or float). "
            f"Received: labels of dtype {array.dtype}"
        )
    if array.ndim != 1:
        raise ValueError(
            "`labels` must be 1-D, one class index per example (use `labels.reshape(-1)` for "
            f"a column of labels). Received: labels of shape {array.shape}"
        )
    return array


def corrupt_labels(
    labels: ArrayLike,
    rate: float,
    *,
    num_classes: int | None = None,
    seed: int | None = 0,
    mode: str = "flip",
) -> NoisyLabels:
    """Replaces a fraction `rate` of the labels with random classes.

    Exactly `round(rate * n)` of the `n` examples are selected, without replacement, by a
    NumPy `Generator` seeded with `seed` (Python's `round`: halves go to the even number).
    Each selected label is then replaced according to `mode`:

    - `"flip"` (the default): by a class drawn uniformly from the `num_classes - 1` *other*
      classes. Every selected label becomes wrong, so the corrupted fraction is exactly
      `round(rate * n) / n`: the rate you report is the rate of wrong labels.
    - `"uniform"`: by a class drawn uniformly from *all* `num_classes` classes, possibly the
      true one. This is the "symmetric" noise of much of the label-noise literature, where
      the noise rate counts re-drawn labels; about `1 / num_classes` of them land back on
      their true class, so the expected corrupted fraction is
      `rate * (num_classes - 1) / num_classes` (36% wrong labels for `rate=0.4` and 10
      classes).

    `"flip"` is the default because the requested rate is then exactly the fraction of wrong
    labels, with no sampling error; pass `mode="uniform"` to reproduce an experiment that
    uses the symmetric convention (check which one a paper means before comparing numbers).

    The same arguments and seed give the same result; the input is not modified.

    Args:
        labels: 1-D array-like of integer class indices in `[0, num_classes)`.
        rate: float in `[0, 1]`, the fraction of examples whose label is re-drawn.
        num_classes: int >= 2, the number of classes. Defaults to `None`, meaning
            `max(labels) + 1`.
        seed: int >= 0 seeding `numpy.random.default_rng`, or `None` for fresh,
            unrepeatable randomness. Defaults to `0`.
        mode: `"flip"` or `"uniform"`, see above. Defaults to `"flip"`.

    Returns:
        A `NoisyLabels(labels, mask, fraction)` named tuple: the noisy labels (new array,
        same shape and dtype as the input), the boolean mask of labels that now differ from
        the clean ones, and the fraction of them as a float.

    Raises:
        ValueError: an argument is out of its range or of the wrong kind; the message names
            it and echoes the value received.

    Example:

    ```python
    from keras_sam.datasets import fashion_mnist, label_noise

    (x_train, y_train), _ = fashion_mnist.load_data()
    noisy = label_noise.corrupt_labels(y_train, 0.4, seed=1)
    print(noisy.fraction)  # 0.4 exactly: 24000 of the 60000 labels are wrong
    model.fit(x_train, noisy.labels)
    ```
    """
    array = _check_labels(labels)
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate <= 1:
        raise ValueError(f"`rate` must be a number in [0, 1]. Received: rate={rate!r}")
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0
    ):
        raise ValueError(f"`seed` must be an int >= 0 or None. Received: seed={seed!r}")

    if num_classes is None:
        if array.size == 0:
            raise ValueError(
                "`num_classes` must be given when `labels` is empty (it defaults to "
                "max(labels) + 1). Received: num_classes=None with 0 labels"
            )
        num_classes = int(array.max()) + 1
        if num_classes < 2:
            raise ValueError(
                "`num_classes` must be >= 2; by default it is max(labels) + 1, which is "
                f"{num_classes} here. Pass num_classes explicitly. Received: num_classes=None"
            )
    num_classes = check_integer("num_classes", num_classes, minimum=2, rule="an int >= 2")
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"`labels` must lie in [0, num_classes) = [0, {num_classes}). Received: labels "
                f"from {low} to {high}"
            )
    if num_classes - 1 > np.iinfo(array.dtype).max:
        raise ValueError(
            f"`labels` of dtype {array.dtype} cannot hold class {num_classes - 1}. Received: "
            f"num_classes={num_classes} with labels of dtype {array.dtype}"
        )

    rng = np.random.default_rng(seed)
    n = array.size
    selected = rng.choice(n, size=round(rate * n), replace=False)
    if mode == "flip":
        # An offset in 1..K-1 added modulo K reaches each other class with equal probability.
        offsets = rng.integers(1, num_classes, size=selected.size)
        new = (array[selected].astype(np.int64) + offsets) % num_classes
    else:
        new = rng.integers(0, num_classes, size=selected.size)
    noisy = array.copy()
    noisy[selected] = new.astype(array.dtype)
    mask = noisy != array
    fraction = float(mask.mean()) if n else 0.0
    return NoisyLabels(noisy, mask, fraction)
