"""Logs that survive a skipped step, and a skip for non-finite clean-pass state (every
backend)."""

import keras
import numpy as np
import pytest

import keras_sam
from tests import harness


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


# ------------------------------------------------ runs of skipped steps: visible, then stopped
def _nan_x(rng, batches):
    return np.full((8 * batches, 4), np.nan, "float32"), rng.integers(0, 3, 8 * batches)


def _compiled(max_consecutive_skips, optimizer=None, **compile_args):
    sam_model = keras_sam.SAMModel(_model(), max_consecutive_skips=max_consecutive_skips)
    sam_model.compile(
        optimizer=optimizer or keras_sam.SAM(keras.optimizers.SGD(0.05), rho=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        **compile_args,
    )
    return sam_model


def test_an_epoch_of_skipped_steps_logs_nan_not_a_perfect_loss(rng):
    # Plain Keras logs `loss: nan` on NaN data; an epoch whose every step was skipped
    # must not log the mean of nothing (0, "the best run ever"). `None`: no limit.
    # Several steps per execution where the backend has them (not PyTorch).
    steps_per_execution = 1 if keras.backend.backend() == "torch" else 2
    x, y = _nan_x(rng, 4)
    sam_model = _compiled(None, steps_per_execution=steps_per_execution)
    history = sam_model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    assert history["skipped_steps"] == [4.0, 8.0]
    for name in ("loss", "accuracy", "sharpness"):
        assert np.isnan(history[name]).all(), (name, history[name])
    # An epoch with an applied step logs the applied steps' means again.
    good = rng.normal(size=(32, 4)).astype("float32")
    history = sam_model.fit(good, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0]) and history["loss"][0] > 0
    assert history["skipped_steps"] == [8.0]


@pytest.mark.parametrize(
    "steps_per_execution",
    [1, pytest.param(2, marks=pytest.mark.backends("tensorflow", "jax"))],
)
def test_fit_stops_after_max_consecutive_skips_with_the_last_applied_weights(
    rng, steps_per_execution
):
    # Two good batches, then NaN ones: fit raises after 3 skipped steps in a row (with
    # steps_per_execution=2 the check sees blocks of two steps: after the second block,
    # 4 in a row), and the model holds bitwise what a run of the two good batches
    # alone leaves: weights, BatchNorm statistics, Adam's slots.
    x, y = _nan_x(rng, 8)
    x[:16] = rng.normal(size=(16, 4))
    stopped = _compiled(
        3, keras_sam.SAM(keras.optimizers.Adam(0.01)), steps_per_execution=steps_per_execution
    )
    with pytest.raises(keras_sam.SkippedStepsError) as caught:
        stopped.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    expected_run = 3 if steps_per_execution == 1 else 4
    message = str(caught.value)
    assert f"{expected_run} training steps in a row were skipped" in message
    for cause in ("NaN or inf in the inputs or labels", "learning rate or `rho`", "loss-scale"):
        assert cause in message
    assert isinstance(caught.value, RuntimeError)
    assert caught.value.consecutive_skips == expected_run
    assert int(harness.to_numpy(stopped.optimizer.skipped_steps)) == expected_run

    reference = _compiled(None, keras_sam.SAM(keras.optimizers.Adam(0.01)))
    reference.fit(x[:16], y[:16], batch_size=8, epochs=1, shuffle=False, verbose=0)
    skipped = stopped.optimizer.skipped_steps
    got = [v for v in stopped.variables + stopped.optimizer.variables if v is not skipped]
    skipped = reference.optimizer.skipped_steps
    want = [v for v in reference.variables + reference.optimizer.variables if v is not skipped]
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(harness.to_numpy(a), harness.to_numpy(b), err_msg=a.path)


def test_the_consecutive_count_spans_epochs(rng):
    # 2 NaN batches an epoch: 3 epochs would make 6 in a row, across epoch ends.
    x, y = _nan_x(rng, 2)
    with pytest.raises(keras_sam.SkippedStepsError, match="^5 training steps in a row"):
        _compiled(5).fit(x, y, batch_size=8, epochs=3, verbose=0)
    # (A good batch restarting the count: the guard's test below.)


def test_the_guard_counts_runs_of_skipped_steps():
    guard = keras_sam.SkippedStepsGuard(max_consecutive_skips=3, skipped_steps=5)
    assert [guard.update(n) for n in (6, 6, 7, 8)] == [1, 0, 1, 2]
    with pytest.raises(keras_sam.SkippedStepsError, match="3 training steps in a row") as caught:
        guard.update(9)
    assert caught.value.skipped_steps == 9 and caught.value.max_consecutive_skips == 3
    # Blocks of several steps: a block with an applied step restarts the count.
    guard = keras_sam.SkippedStepsGuard(max_consecutive_skips=None)
    assert [guard.update(n, steps=4) for n in (4, 7, 11, 15)] == [4, 0, 4, 8]
    assert guard.update(keras.ops.convert_to_tensor(16)) == 9  # a tensor is read


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "100"])
def test_max_consecutive_skips_is_checked(value):
    with pytest.raises(ValueError, match="`max_consecutive_skips` must be None or an integer"):
        keras_sam.SAMModel(_model(), max_consecutive_skips=value)
    with pytest.raises(ValueError, match="`max_consecutive_skips` must be None or an integer"):
        keras_sam.SkippedStepsGuard(max_consecutive_skips=value)


def test_max_consecutive_skips_is_in_the_config():
    for value in (None, 7):
        sam_model = keras_sam.SAMModel(_model(), max_consecutive_skips=value)
        config = sam_model.get_config()
        assert config["max_consecutive_skips"] == value
        assert keras_sam.SAMModel.from_config(config).max_consecutive_skips == value
    assert keras_sam.SAMModel(_model()).max_consecutive_skips == 100
