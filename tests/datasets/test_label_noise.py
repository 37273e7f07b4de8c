import math
import re

import numpy as np
import pytest

from keras_sam.datasets.label_noise import NoisyLabels, corrupt_labels


def clean_labels(n=1000, num_classes=10, dtype=np.int64, seed=0):
    return np.random.default_rng(seed).integers(0, num_classes, n).astype(dtype)


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.4, 0.8, 1.0])
def test_flip_corrupts_exactly_round_rate_n(rate, seed):
    labels = clean_labels(n=1003)
    result = corrupt_labels(labels, rate, seed=seed)
    expected = round(rate * 1003)
    assert int(result.mask.sum()) == expected
    assert result.fraction == expected / 1003
    assert isinstance(result.fraction, float)


def test_flip_rounds_half_to_even():
    labels = np.arange(5) % 3
    assert int(corrupt_labels(labels, 0.5).mask.sum()) == 2  # round(2.5) == 2
    assert int(corrupt_labels(labels, 0.7).mask.sum()) == 4  # round(3.5) == 4


def test_flip_with_two_classes_swaps_them():
    labels = clean_labels(n=500, num_classes=2)
    result = corrupt_labels(labels, 0.3, seed=3)
    np.testing.assert_array_equal(result.labels[result.mask], 1 - labels[result.mask])
    assert int(result.mask.sum()) == 150


def test_flip_draws_the_other_classes_uniformly():
    # 100000 labels of class 0, all flipped: each of classes 1..9 expects 11111.1 draws,
    # standard deviation sqrt(n p (1 - p)) = 99.4; allow 5 standard deviations.
    labels = np.zeros(100_000, dtype=np.int64)
    result = corrupt_labels(labels, 1.0, num_classes=10, seed=0)
    counts = np.bincount(result.labels, minlength=10)
    assert counts[0] == 0
    np.testing.assert_allclose(counts[1:], 100_000 / 9, atol=5 * 99.4)


def test_uniform_draws_from_all_classes_including_the_true_one():
    # 100000 labels of class 0, all re-drawn: each of the 10 classes, class 0 included,
    # expects 10000 draws, standard deviation sqrt(n p (1 - p)) = 94.9; allow 5 of them.
    labels = np.zeros(100_000, dtype=np.int64)
    result = corrupt_labels(labels, 1.0, num_classes=10, seed=0, mode="uniform")
    counts = np.bincount(result.labels, minlength=10)
    np.testing.assert_allclose(counts, 10_000, atol=5 * 94.9)
    assert result.fraction == pytest.approx(0.9, abs=5 * 94.9 / 100_000)


@pytest.mark.parametrize("rate, num_classes", [(0.4, 10), (0.8, 10), (0.5, 2)])
def test_uniform_fraction_is_rate_times_k_minus_1_over_k(rate, num_classes):
    n = 200_000
    labels = clean_labels(n=n, num_classes=num_classes)
    result = corrupt_labels(labels, rate, mode="uniform", seed=5)
    # Of the k = round(rate n) re-drawn labels, Binomial(k, (K-1)/K) change. Tolerance:
    # 5 standard deviations of the fraction, sqrt(k p (1 - p)) / n.
    k = round(rate * n)
    p = (num_classes - 1) / num_classes
    tolerance = 5 * math.sqrt(k * p * (1 - p)) / n
    assert abs(result.fraction - rate * p) < tolerance
    # Some re-drawn labels land on their true class, so fewer than k differ.
    assert int(result.mask.sum()) < k


def test_uniform_selects_the_same_examples_as_flip():
    labels = clean_labels()
    flip = corrupt_labels(labels, 0.5, seed=2, mode="flip")
    uniform = corrupt_labels(labels, 0.5, seed=2, mode="uniform")
    # Same generator, same selection: the changed labels under "uniform" are a subset.
    assert np.all(flip.mask[uniform.mask])
    assert int(uniform.mask.sum()) < int(flip.mask.sum())


@pytest.mark.parametrize("mode", ["flip", "uniform"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64])
def test_result_shape_dtype_mask_and_input_untouched(mode, dtype):
    labels = clean_labels(n=300, dtype=dtype)
    before = labels.copy()
    result = corrupt_labels(labels, 0.4, mode=mode, seed=1)
    assert isinstance(result, NoisyLabels)
    assert result.labels.dtype == labels.dtype and result.labels.shape == labels.shape
    assert result.mask.dtype == np.bool_
    np.testing.assert_array_equal(result.mask, result.labels != labels)
    assert result.fraction == pytest.approx(result.mask.mean())
    np.testing.assert_array_equal(labels, before)
    assert result.labels is not labels
    assert result.labels.min() >= 0 and result.labels.max() <= 9


def test_list_input_and_explicit_num_classes():
    result = corrupt_labels([0, 1, 1, 0], 1.0, num_classes=5, seed=0)
    assert result.labels.shape == (4,)
    assert np.all(result.mask)
    assert set(result.labels.tolist()) <= {0, 1, 2, 3, 4}


def test_rate_zero_changes_nothing():
    labels = clean_labels()
    result = corrupt_labels(labels, 0.0, mode="uniform")
    np.testing.assert_array_equal(result.labels, labels)
    assert not result.mask.any() and result.fraction == 0.0


def test_empty_labels_with_num_classes():
    result = corrupt_labels(np.array([], dtype=np.int64), 0.5, num_classes=3)
    assert result.labels.shape == (0,) and result.fraction == 0.0


@pytest.mark.parametrize("mode", ["flip", "uniform"])
def test_same_seed_same_result_different_seed_different_selection(mode):
    labels = clean_labels(n=2000)
    a = corrupt_labels(labels, 0.3, seed=11, mode=mode)
    b = corrupt_labels(labels, 0.3, seed=11, mode=mode)
    c = corrupt_labels(labels, 0.3, seed=12, mode=mode)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.mask, c.mask)


def test_seed_none_is_allowed():
    result = corrupt_labels(clean_labels(), 0.2, seed=None)
    assert int(result.mask.sum()) == 200


@pytest.mark.parametrize(
    "labels, kwargs, name, echoed",
    [
        (None, {"rate": -0.1}, "rate", "rate=-0.1"),
        (None, {"rate": 1.5}, "rate", "rate=1.5"),
        (None, {"rate": float("nan")}, "rate", "rate=nan"),
        (None, {"rate": "0.3"}, "rate", "rate='0.3'"),
        (None, {"rate": True}, "rate", "rate=True"),
        (None, {"mode": "symmetric"}, "mode", "mode='symmetric'"),
        (None, {"seed": -1}, "seed", "seed=-1"),
        (None, {"seed": 1.5}, "seed", "seed=1.5"),
        (None, {"num_classes": 1}, "num_classes", "num_classes=1"),
        (None, {"num_classes": 2.5}, "num_classes", "num_classes=2.5"),
        (None, {"num_classes": True}, "num_classes", "num_classes=True"),
        (None, {"num_classes": 5}, "labels", "labels from 0 to 9"),
        (np.array([0, -1, 2]), {}, "labels", "labels from -1 to 2"),
        (np.array([0.0, 1.0]), {}, "labels", "dtype float64"),
        (np.array([True, False]), {}, "labels", "dtype bool"),
        (np.zeros((4, 1), dtype=np.int64), {}, "labels", "shape (4, 1)"),
        (np.zeros(4, dtype=np.int64), {}, "num_classes", "num_classes=None"),
        (np.array([], dtype=np.int64), {}, "num_classes", "num_classes=None"),
        (np.zeros(4, dtype=np.uint8), {"num_classes": 300}, "labels", "num_classes=300"),
    ],
)
def test_invalid_arguments_name_the_argument_and_echo_the_value(labels, kwargs, name, echoed):
    labels = clean_labels() if labels is None else labels
    kwargs = {"rate": 0.2, **kwargs}
    rate = kwargs.pop("rate")
    with pytest.raises(ValueError, match=f"`{name}`") as info:
        corrupt_labels(labels, rate, **kwargs)
    assert re.search(re.escape(echoed), str(info.value))
