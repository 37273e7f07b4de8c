import keras
import numpy as np
import pytest
from keras import ops

from keras_sam import maths
from tests import reference


def _random_grads(rng, scale=1.0):
    return [rng.normal(size=s).astype("float32") * scale for s in [(3, 4), (4,), (2, 2, 3)]]


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30, 1e-8])
def test_global_norm_matches_float64_at_every_scale(rng, scale):
    grads = _random_grads(rng, scale)
    expected = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
    got = float(maths.global_norm([ops.convert_to_tensor(g) for g in grads]))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_global_norm_skips_none_and_empty(rng):
    g = rng.normal(size=(5,)).astype("float32")
    got = maths.global_norm([None, ops.zeros((0, 3)), ops.convert_to_tensor(g), None])
    np.testing.assert_allclose(float(got), np.linalg.norm(g.astype(np.float64)), rtol=1e-6)
    assert float(maths.global_norm([None, None])) == 0.0
    assert float(maths.global_norm([])) == 0.0


def test_global_norm_is_float32_for_float16_input():
    g = ops.full((300,), 7e4 / 20, dtype="float16")  # sum of squares overflows float16
    norm = maths.global_norm([g])
    assert keras.backend.standardize_dtype(norm.dtype) == "float32"
    np.testing.assert_allclose(float(norm), 3500 * np.sqrt(300), rtol=1e-3)


def test_tensor_norms_are_float32_for_float16_input():
    # The norms the step takes itself (JAX's step, and the layerwise split): each square
    # (300**2) overflows float16, whose largest value is 65504.
    t = ops.full((4, 4), 300.0, dtype="float16")
    norms = maths.tensor_norms([t, ops.ones((2,), dtype="float16")])
    assert keras.backend.standardize_dtype(norms.dtype) == "float32"
    np.testing.assert_allclose(np.asarray(norms), [1200.0, np.sqrt(2.0)], rtol=1e-6)


@pytest.mark.parametrize("bad", [None, np.nan, np.inf], ids=["finite", "nan", "inf"])
def test_tensor_norms_of_small_and_large_tensors_in_any_order_match_float64(rng, bad):
    # The tensors of at most `SMALL_TENSOR` entries share one zero-padded reduction: each
    # norm must still be its own tensor's, in the order given, and a NaN or inf stays in
    # its own tensor's norm (the step's verdict reads them).
    large = maths.SMALL_TENSOR + 3
    shapes = [(large,), (3,), (4, 5), (0,), (2, large // 2), (1,), (7, 1, 2)]
    tensors = [rng.normal(size=s).astype("float32") for s in shapes]
    if bad is not None:
        tensors[2][1, 3] = bad
    expected = [np.sqrt(np.sum(t.astype(np.float64) ** 2)) for t in tensors]
    got = np.asarray(maths.tensor_norms([ops.convert_to_tensor(t) for t in tensors]))
    assert got.shape == (len(shapes),)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Only the listed norms: in-place padding never leaks into another tensor's norm.
    assert np.isfinite(np.delete(got, 2)).all()


def test_zero_gradient_gives_zero_perturbation_not_nan():
    e = maths.sam_perturbation([ops.zeros((3, 2)), ops.zeros((4,))], rho=0.05)
    for t in e:
        assert np.all(np.asarray(t) == 0.0)


def test_sam_perturbation_matches_reference_and_has_norm_rho(rng):
    grads = _random_grads(rng)
    got = maths.sam_perturbation([ops.convert_to_tensor(g) for g in grads], rho=0.07)
    expected = reference.perturbation(grads, rho=0.07)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-9)
    norm = np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in got))
    np.testing.assert_allclose(norm, 0.07, rtol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_perturbation_direction_survives_extreme_scales(rng, scale):
    grads = _random_grads(rng)
    unit = maths.sam_perturbation([ops.convert_to_tensor(g) for g in grads], rho=1.0)
    scaled = maths.sam_perturbation([ops.convert_to_tensor(g * scale) for g in grads], rho=1.0)
    if scale < 1:
        # epsilon = 1e-12 dominates a norm of 1e-30: the direction is kept, the size is not.
        scaled_norm = float(maths.global_norm(scaled))
        assert 0 < scaled_norm < 1e-10
        scaled = [np.asarray(t) / scaled_norm for t in scaled]
    for a, b in zip(unit, scaled, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_asam_perturbation_matches_reference(rng):
    grads = _random_grads(rng)
    weights = _random_grads(rng)
    scales_np = [np.abs(w).astype(np.float64) + 0.01 for w in weights[:2]] + [None]
    scales = [maths.adaptive_scale(ops.convert_to_tensor(w), 0.01) for w in weights[:2]] + [None]
    got = maths.sam_perturbation([ops.convert_to_tensor(g) for g in grads], 0.5, scales=scales)
    expected = reference.perturbation(
        grads, 0.5, scales=scales_np[:2] + [np.ones_like(grads[2], np.float64)]
    )
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-8)
    # ASAM's neighbourhood: ||T^-1 e|| = rho.
    inverse = [np.asarray(a, np.float64) / s for a, s in zip(got[:2], scales_np[:2], strict=True)]
    norm = np.sqrt(
        sum(np.sum(t * t) for t in inverse) + np.sum(np.asarray(got[2], np.float64) ** 2)
    )
    np.testing.assert_allclose(norm, 0.5, rtol=1e-5)


def test_none_gradients_stay_none_and_out_of_the_norm(rng):
    g = rng.normal(size=(4,)).astype("float32")
    e = maths.sam_perturbation([None, ops.convert_to_tensor(g), None], rho=0.3)
    assert e[0] is None and e[2] is None
    np.testing.assert_allclose(np.linalg.norm(np.asarray(e[1], np.float64)), 0.3, rtol=1e-6)


def test_perturbation_keeps_the_gradient_dtype():
    e = maths.sam_perturbation([ops.ones((3,), "float16"), ops.ones((2,), "float32")], 0.1)
    assert [keras.backend.standardize_dtype(t.dtype) for t in e] == ["float16", "float32"]


def test_scales_must_match_gradients():
    with pytest.raises(ValueError, match="one entry per gradient"):
        maths.sam_perturbation([ops.ones((2,))], 0.1, scales=[None, None])


def test_layerwise_perturbation_matches_reference_and_splits_rho_per_layer(rng):
    grads = _random_grads(rng)
    grads[2] *= 1e3  # one layer's gradient dominates: a global norm would perturb it alone
    groups = ["a", "a", "b"]
    got = maths.layerwise_sam_perturbation([ops.convert_to_tensor(g) for g in grads], 0.3, groups)
    expected = reference.layerwise_perturbation(grads, 0.3, groups)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-9)
    squares = [np.sum(np.asarray(a, np.float64) ** 2) for a in got]
    np.testing.assert_allclose(squares[0] + squares[1], 0.3**2 / 2, rtol=1e-5)
    np.testing.assert_allclose(squares[2], 0.3**2 / 2, rtol=1e-5)
    global_ = maths.sam_perturbation([ops.convert_to_tensor(g) for g in grads], 0.3)
    assert np.sum(np.asarray(global_[2], np.float64) ** 2) > 0.99 * 0.3**2


def test_layerwise_perturbation_with_asam_scales_none_and_zero_layers(rng):
    grads = _random_grads(rng)
    weights = _random_grads(rng)
    scales_np = [np.abs(w).astype(np.float64) + 0.01 for w in weights]
    scales = [maths.adaptive_scale(ops.convert_to_tensor(w), 0.01) for w in weights]
    zero = np.zeros((5,), "float32")
    tensors = [ops.convert_to_tensor(g) for g in [*grads, zero]] + [None]
    got = maths.layerwise_sam_perturbation(
        tensors, 0.5, ["a", "b", "b", "c", "d"], scales=[*scales, None, None]
    )
    expected = reference.layerwise_perturbation(
        [*grads, zero], 0.5, ["a", "b", "b", "c"], scales=[*scales_np, np.ones(5)]
    )
    assert got[4] is None  # no gradient: not a layer, not counted in L (L = 3 + the zero one)
    for a, b in zip(got[:4], expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(np.asarray(got[3]), zero)  # a zero gradient: e = 0, not NaN


def test_layerwise_groups_must_match_gradients():
    with pytest.raises(ValueError, match="`groups` must have one entry per gradient"):
        maths.layerwise_sam_perturbation([ops.ones((2,))], 0.1, groups=["a", "b"])
