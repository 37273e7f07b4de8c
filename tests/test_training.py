import json

import keras
import numpy as np
import pytest

from keras_sam import report
from keras_sam.training import RunConfig, prepare_data, train


def _arrays(rng, n_train=300, n_test=100):
    # Class k images are bright in row band k: learnable in a couple of epochs.
    def make(n):
        y = rng.integers(0, 10, n).astype("uint8")
        x = rng.integers(0, 40, (n, 28, 28)).astype("uint8")
        for i, label in enumerate(y):
            x[i, 2 * label : 2 * label + 3] = 250
        return x, y

    return make(n_train), make(n_test)


def test_prepare_data_subsets_corrupts_and_keeps_clean_labels(rng):
    arrays = _arrays(rng)
    config = RunConfig(train_size=200, label_noise=0.4, seed=3)
    data = prepare_data(config, arrays=arrays)
    assert data.x_train.shape == (200, 28, 28, 1) and data.x_train.dtype == np.float32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert data.noise_fraction == pytest.approx(0.4)
    assert np.mean(data.y_train != data.y_train_clean) == pytest.approx(0.4)
    assert len(data.x_test) == 100 and np.array_equal(data.y_test, arrays[1][1])
    again = prepare_data(config, arrays=arrays)
    np.testing.assert_array_equal(again.y_train, data.y_train)
    other = prepare_data(RunConfig(train_size=200, label_noise=0.4, seed=4), arrays=arrays)
    assert np.any(other.y_train_clean != data.y_train_clean)


@pytest.mark.parametrize("method", ["sgd", "sam", "asam"])
def test_train_records_history_and_writes_files(rng, tmp_path, method):
    config = RunConfig(
        method=method,
        rho=0.5 if method == "asam" else 0.05,
        epochs=2,
        batch_size=50,
        train_size=200,
        sharpness_examples=100,
        seed=0,
    )
    data = prepare_data(config, arrays=_arrays(rng))
    model, history = train(config, data, out_dir=tmp_path, verbose=0)
    passes = 1 if method == "sgd" else 2
    assert history["epoch"] == [1, 2]
    assert history["gradient_evaluations"] == [4 * passes, 8 * passes]
    assert (history["sharpness"][0] is None) == (method == "sgd")
    assert all(0 <= a <= 1 for a in history["test_accuracy"])
    # the recorded test accuracy is the model's on the clean test labels
    final = np.mean(model.predict(data.x_test, verbose=0).argmax(-1) == data.y_test)
    assert history["test_accuracy"][-1] == pytest.approx(final)
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved == json.loads(json.dumps(history))
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["method"], written["backend"]) == (method, keras.backend.backend())
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(
        loaded.predict(data.x_test, verbose=0),
        model.predict(data.x_test, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "method, cls, evaluations",
    [
        ("gsam", "GSAM", [8, 16]),
        ("friendly_sam", "FriendlySAM", [8, 16]),
        # 4 steps per epoch, a two-pass step at steps 0 and 3 (k=3), then 6: 4 + 2, 8 + 3.
        ("looksam", "LookSAM", [6, 11]),
        ("periodic_sam", "PeriodicSAM", [6, 11]),
        ("aesam", "AESAM", None),
    ],
)
def test_variants_train_and_count_the_passes_they_take(rng, method, cls, evaluations):
    import keras_sam
    from keras_sam.training import build_optimizer

    config = RunConfig(
        method=method, k=3, epochs=2, batch_size=50, train_size=200, sharpness_examples=50
    )
    assert type(build_optimizer(config, steps=8)) is getattr(keras_sam, cls)
    _, history = train(config, prepare_data(config, arrays=_arrays(rng)), verbose=0)
    skips = getattr(keras_sam, cls).skips_second_pass
    assert (history["second_pass_rate"][0] is None) == (not skips)
    if evaluations is not None:
        assert history["gradient_evaluations"] == evaluations
    else:  # AESAM: whatever it chose, between one and two passes a step
        assert 8 < history["gradient_evaluations"][-1] < 16


def test_eval_every_evaluates_every_k_epochs_and_the_last(rng):
    config = RunConfig(
        method="sgd", epochs=5, eval_every=2, batch_size=100, train_size=200, sharpness_examples=50
    )
    _, history = train(config, prepare_data(config, arrays=_arrays(rng)), verbose=0)
    assert history["epoch"] == [2, 4, 5]
    assert history["gradient_evaluations"] == [4, 8, 10]
    assert len(history["test_accuracy"]) == len(history["measured_sharpness"]) == 3


def test_report_table_and_plots(rng, tmp_path):
    history = {
        "epoch": [1, 2],
        "accuracy": [0.5, 0.6],
        "test_accuracy": [0.7, 0.65],
        "measured_sharpness": [0.01, 0.02],
        "gradient_evaluations": [10, 20],
        "seconds": [1.0, 2.0],
    }
    runs = {"plain": (RunConfig(epochs=2), history), "sam": (RunConfig(epochs=2), history)}
    table = report.comparison_table(runs)
    assert table.count("\n") == 4 and "| sam | 2 | 20 | 65.00 % | 70.00 % | 60.00 % |" in table
    for path in report.comparison_plots(runs, tmp_path, title="t"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "adam"},
        {"rho": -1.0},
        {"epochs": 0},
        {"train_size": 70000},
        {"label_noise": 1.5},
        {"schedule": "step"},
        {"optimizer": "lbfgs"},
        {"alpha": -0.5},
        {"k": 0},
    ],
)
def test_run_config_validation_names_the_argument(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"`{name}`.*Received: {name}="):
        RunConfig(**kwargs)
