"""Bad input: a NaN step in the custom loop is skipped (and counted); a malformed batch
gets Keras's own error. A non-finite pass in `fit`, on every backend: test_contract.py."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam


def _compiled(model, splits=None, **compile_kwargs):
    sam_model = keras_sam.SAMModel(model, num_batch_splits=splits)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.Adam(0.01), rho=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        **compile_kwargs,
    )
    return sam_model


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
