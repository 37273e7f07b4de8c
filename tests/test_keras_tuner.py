"""Searching rho and the learning rate of a SAMModel with KerasTuner, on every backend."""

import warnings

import keras
import numpy as np
import pytest

import keras_sam

kt = pytest.importorskip("keras_tuner")


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32") + (x[:, 2] > 1).astype("int32")
    return (x[:64], y[:64]), (x[64:], y[64:])


def build(hp):
    rho = hp.Float("rho", 0.01, 0.5, sampling="log")
    learning_rate = hp.Choice("learning_rate", [0.03, 0.1])
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(learning_rate, momentum=0.9), rho=rho),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return sam_model


@pytest.mark.slow
def test_random_search_over_rho_and_learning_rate(tmp_path):
    keras.utils.set_random_seed(0)
    (x, y), validation = _data()
    tuner = kt.RandomSearch(
        build,
        objective="val_loss",
        max_trials=3,
        seed=0,
        directory=str(tmp_path),
        project_name="rho",
    )
    tuner.search(x, y, validation_data=validation, epochs=2, batch_size=16, verbose=0)

    trials = tuner.oracle.get_best_trials(num_trials=3)
    assert len(trials) == 3
    rhos = [t.hyperparameters.get("rho") for t in trials]
    assert len(set(rhos)) == 3 and all(0.01 <= r <= 0.5 for r in rhos)
    losses = [t.metrics.get_best_value("val_loss") for t in trials]
    assert losses == sorted(losses)  # best first
    # SAMModel's own metric reaches the tuner's records.
    assert all(np.isfinite(t.metrics.get_last_value("sharpness")) for t in trials)

    best_hp = tuner.get_best_hyperparameters(1)[0]
    with warnings.catch_warnings():
        # KerasTuner loads the best checkpoint into a freshly built, compiled model whose
        # optimizer has no slots yet: Keras skips the optimizer's saved variables with a
        # warning (as for any Keras model with a stateful optimizer); the weights load.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        best = tuner.get_best_models(1)[0]
    assert isinstance(best, keras_sam.SAMModel)
    assert best.optimizer.rho == pytest.approx(best_hp.get("rho"))
    assert float(best.optimizer.learning_rate) == pytest.approx(best_hp.get("learning_rate"))
    # The reloaded best model is the one whose validation loss the tuner recorded.
    val_loss = best.evaluate(*validation, batch_size=16, verbose=0)
    assert val_loss == pytest.approx(losses[0], rel=1e-5)
