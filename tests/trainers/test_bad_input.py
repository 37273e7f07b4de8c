"""Bad input: a NaN or infinite pass skips the step (and is counted); a malformed batch
gets Keras's own error."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from tests.trainers.test_mixed_precision import fragile_model, snapshot


def _data(rng, n=16):
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, 3, n)


def _compiled(model, splits=None, **compile_kwargs):
    sam_model = keras_sam.SAMModel(model, num_batch_splits=splits)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.Adam(0.01), rho=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        **compile_kwargs,
    )
    return sam_model


@pytest.mark.parametrize(
    "failing_pass, splits, compile_kwargs",
    [
        ("clean", None, {}),
        ("perturbed", None, {}),
        ("clean", 2, {}),  # one bad part: the whole step is skipped
        ("perturbed", None, {"jit_compile": True}),
        ("clean", None, {"run_eagerly": True}),
    ],
)
def test_a_non_finite_pass_skips_the_step_with_everything_untouched(
    rng, failing_pass, splits, compile_kwargs
):
    x, y = _data(rng)
    model = fragile_model()
    sam_model = _compiled(model, splits, **compile_kwargs)
    sam_model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # a good step first
    optimizer = sam_model.optimizer
    bad_x = x.copy()
    if failing_pass == "clean":
        bad_x[-1, 0] = np.nan  # in the last part under m-sharpness
    else:
        model.layers[-1].arm()
    model_state = snapshot(model.variables)
    slots = optimizer.inner_optimizer.variables  # Adam's moments and its step counter
    optimizer_state = snapshot(slots)

    logs = sam_model.fit(bad_x, y, batch_size=16, epochs=1, verbose=0).history

    for before, after in zip(model_state, model.variables, strict=True):
        np.testing.assert_array_equal(before, after.numpy(), err_msg=after.path)
    for before, after in zip(optimizer_state, slots, strict=True):
        np.testing.assert_array_equal(before, after.numpy(), err_msg=after.path)
    assert int(optimizer.iterations.numpy()) == 1
    assert int(optimizer.skipped_steps.numpy()) == 1
    # The logs show it as a skipped step, which adds nothing to the averages (here the
    # epoch's only step, so they stay at zero, never NaN).
    assert logs["skipped_steps"] == [1.0]
    assert logs["loss"] == [0.0] and logs["sharpness"] == [0.0]

    # The next good batch trains.
    model.layers[-1].disarm()
    sam_model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(optimizer.iterations.numpy()) == 2


def test_custom_loop_skips_a_nan_step_and_counts_it():
    variable = keras.Variable(np.array([1.0, -2.0], "float32"))
    optimizer = keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1)

    @tf.function
    def step(target):
        def grad_func():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum((variable - target) ** 2)
            return None, loss, tape

        return optimizer.optimize(grad_func, [variable])[1]

    step(tf.constant([0.0, 0.0]))
    before = variable.numpy().copy()
    momentum = optimizer.inner_optimizer.variables[-1].numpy().copy()
    loss = step(tf.constant([np.inf, 0.0]))
    assert not np.isfinite(float(loss))
    np.testing.assert_array_equal(variable.numpy(), before)
    np.testing.assert_array_equal(optimizer.inner_optimizer.variables[-1].numpy(), momentum)
    assert int(optimizer.skipped_steps.numpy()) == 1
    assert int(optimizer.iterations.numpy()) == 1


def _keras_error(model_factory, x, y, wrap):
    model = model_factory()
    if wrap:
        model = _compiled(model, splits=2)
    else:
        model.compile(
            optimizer=keras.optimizers.Adam(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    with pytest.raises(Exception) as error:  # noqa: B017 - compared with Keras's own below
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return error.value


def _plain_classifier():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )


@pytest.mark.parametrize(
    "x, y",
    [
        (np.zeros((16, 5), "float32"), np.zeros(16, "int64")),  # one feature short
        (np.full((16, 6), "a"), np.zeros(16, "int64")),  # strings
        (np.zeros((16, 6), "float32"), np.zeros((16, 4), "float32")),  # wrong targets
    ],
)
def test_a_malformed_batch_gets_the_keras_error(x, y):
    plain = _keras_error(_plain_classifier, x, y, wrap=False)
    wrapped = _keras_error(_plain_classifier, x, y, wrap=True)
    assert type(wrapped) is type(plain)
    # The same message, up to the names Keras numbers (dense_3 against dense_1, ...).
    first_line = str(plain).strip().splitlines()[0]
    key = first_line.split("'")[0].split('"')[0][:40]
    assert key in str(wrapped), (str(plain), str(wrapped))
    assert "keras_sam" not in str(wrapped)
