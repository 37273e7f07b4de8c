"""Logs that survive a skipped step, and a skip for non-finite clean-pass state (every
backend)."""

import keras
import numpy as np
import pytest

import keras_sam


def _model():
    keras.utils.set_random_seed(2)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )


def _fit(x, y, callbacks=()):
    model = _model()
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.05), rho=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = sam_model.fit(
        x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=list(callbacks)
    )
    return model, sam_model, history.history


def test_a_skipped_batch_adds_nothing_to_the_logs_and_is_counted(rng):
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.integers(0, 3, 32)
    bad_x = x.copy()
    bad_x[9, 1] = np.nan  # the second of four batches

    class Batches(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.logs = []

        def on_train_batch_end(self, batch, logs=None):
            self.logs.append(dict(logs))

    batches = Batches()
    _, sam_model, logs = _fit(bad_x, y, [batches])
    assert int(sam_model.optimizer.skipped_steps.numpy()) == 1
    assert logs["skipped_steps"] == [1.0]
    # The epoch's loss and accuracy average the three applied batches: finite, and equal
    # to those of a run on the same three batches alone... up to the weights they saw:
    # after the skip the weights are those after batch 1, as in the run without batch 2.
    keep = np.r_[0:8, 16:32]
    _, _, clean_logs = _fit(x[keep], y[keep])
    np.testing.assert_allclose(logs["loss"], clean_logs["loss"], rtol=1e-5)
    np.testing.assert_allclose(logs["accuracy"], clean_logs["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(logs["sharpness"], clean_logs["sharpness"], rtol=1e-4)
    assert [b["skipped_steps"] for b in batches.logs] == [0.0, 1.0, 1.0, 1.0]
    # EarlyStopping on `loss` sees a finite number.
    assert np.isfinite(logs["loss"][0])


def test_an_infinite_batchnorm_statistic_skips_the_step(rng):
    # One input of 1e20 makes the batch variance of the first feature overflow float32:
    # the losses and gradients stay finite (BatchNorm normalizes), but the moving
    # variance would become infinite. The step is skipped with everything untouched.
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.integers(0, 3, 8)
    x[0, 0] = 1e20
    model = _model()
    before = [np.array(v.numpy(), copy=True) for v in model.variables]
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.05), rho=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    sam_model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(sam_model.optimizer.skipped_steps.numpy()) == 1
    for a, v in zip(before, model.variables, strict=True):
        np.testing.assert_array_equal(a, v.numpy(), err_msg=v.path)


# Keras warns at the end of data of unknown length, whose end it finds by running out.
@pytest.mark.filterwarnings("ignore:Your input ran out of data")
def test_second_pass_rate_on_data_of_unknown_length(rng):
    # A Python generator has no length: Keras runs steps until it is exhausted. The rate
    # must count the 10 steps taken (5 of them two-pass with k=2), not one step more.
    x = rng.normal(size=(80, 4)).astype("float32")
    y = rng.integers(0, 3, 80)

    def batches():
        for i in range(10):
            yield x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]

    for method in (keras_sam.PeriodicSAM, keras_sam.LookSAM):
        sam_model = keras_sam.SAMModel(_model())
        optimizer = method(keras.optimizers.SGD(0.05), rho=0.05, k=2)
        sam_model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = sam_model.fit(batches(), epochs=1, shuffle=False, verbose=0).history
        assert int(optimizer.iterations) == 10
        assert int(optimizer.second_passes) == 5
        assert history["second_pass_rate"] == [0.5], method.__name__
