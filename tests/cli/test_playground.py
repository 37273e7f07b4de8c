import keras
import numpy as np
import pytest

from keras_sam import cli
from keras_sam.cli import playground


def test_two_minima_loss_has_the_documented_minima_and_curvatures():
    for point, height, curvature in [
        (playground.SHARP_MINIMUM, 0.0, 100.0),
        (playground.FLAT_MINIMUM, playground.FLAT_HEIGHT, 2.0),
    ]:
        p = np.asarray(point, "float32")
        loss = playground.two_minima_loss(keras.ops.convert_to_tensor(p))
        assert float(loss) == pytest.approx(height, abs=1e-6)
        assert playground._loss_at(p) == pytest.approx(height, abs=1e-12)
        assert playground._top_curvature(p) == pytest.approx(curvature, rel=1e-4)


def test_the_float64_twin_of_the_loss_is_the_loss(rng):
    # `_loss_at` (NumPy float64, for the finite-difference curvature) and the loss the
    # backends differentiate are one function; a few points on both sides of the ridge.
    for point in [(0.05, 0.1), (0.3, -0.2), (1.0, 0.1), (1.9, 0.05), *rng.normal(1, 1, (4, 2))]:
        p = np.asarray(point, "float32")
        loss = float(playground.two_minima_loss(keras.ops.convert_to_tensor(p)))
        assert loss == pytest.approx(playground._loss_at(p), rel=1e-5, abs=1e-7)


def test_sgd_ends_in_the_sharp_minimum_and_sam_in_the_flat_one():
    result = playground.two_minima()
    assert result["sgd"]["minimum"] == "sharp"
    assert result["sam"]["minimum"] == "flat"
    np.testing.assert_allclose(result["sgd"]["point"], playground.SHARP_MINIMUM, atol=1e-3)
    np.testing.assert_allclose(result["sam"]["point"], playground.FLAT_MINIMUM, atol=2e-2)
    assert result["sgd"]["curvature"] == pytest.approx(100.0, rel=1e-3)
    assert result["sam"]["curvature"] == pytest.approx(2.0, rel=1e-2)


def test_with_rho_zero_sam_is_sgd_and_stays_sharp():
    result = playground.two_minima(rho=0.0)
    assert result["sam"] == result["sgd"]


@pytest.mark.slow
def test_playground_command_prints_the_report(capsys):
    assert cli.main(["playground", "--steps", "600"]) == 0
    out = capsys.readouterr().out
    assert "SGD settled in the sharp minimum and SAM in the flat one." in out
    sgd_line = next(
        line for line in out.splitlines() if line.strip().startswith("sgd") and "(" in line
    )
    assert sgd_line.rstrip().endswith("sharp")
    assert "test accuracy" in out


@pytest.mark.parametrize(
    "argv", [["playground", "--rho", "-1"], ["playground", "--steps", "0"], ["nope"]]
)
def test_bad_arguments_exit_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: keras-sam" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "playground" in capsys.readouterr().out


def test_public_names():
    import keras_sam

    assert sorted(keras_sam.__all__) == sorted(
        [
            "AESAM",
            "BAR",
            "FlatLoRA",
            "FriendlySAM",
            "GSAM",
            "LatePhaseRho",
            "LookSAM",
            "MESA",
            "MomentumSAM",
            "NORMALIZATION_LAYERS",
            "PeriodicSAM",
            "ProportionalRho",
            "SAM",
            "SAMModel",
            "SkippedStepsError",
            "SkippedStepsGuard",
            "__version__",
        ]
    )
    for name in keras_sam.__all__:
        assert getattr(keras_sam, name) is not None
    assert keras_sam.SAM.__module__ == "keras_sam.methods.sam"
    assert keras_sam.LookSAM.__module__ == "keras_sam.methods.looksam"
    assert keras_sam.SAMModel.__module__ == "keras_sam.trainers.sam_model"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        keras_sam.Nope  # noqa: B018


@pytest.mark.slow
def test_the_seed_toy_network_learns_with_and_without_sam():
    result = playground.uniform_vs_normal(steps=800)
    for method in ("sgd", "sam"):
        assert result[method]["test_accuracy"] > 0.95
        assert 0.0 < result[method]["test_sharpness"] < 0.1
    assert result["sgd"]["test_loss"] != result["sam"]["test_loss"]
