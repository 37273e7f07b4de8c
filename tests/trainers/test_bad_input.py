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


@pytest.mark.parametrize("jit_compile", [None, False, True])
def test_custom_loop_skips_a_step_that_overflows_adam(jit_compile):
    # A loss of about 1e30: its gradient is finite, Adam's second moment is not.
    variable = keras.Variable(np.array([1.0, -2.0], "float32"))
    optimizer = keras_sam.SAM(keras.optimizers.Adam(0.1), rho=0.1)

    def step(scale):
        def grad_func():
            with tf.GradientTape() as tape:
                loss = scale * tf.reduce_sum(variable**2)
            return None, loss, tape

        return optimizer.optimize(grad_func, [variable])[1]

    if jit_compile is not None:
        step = tf.function(step, jit_compile=jit_compile)
    step(tf.constant(1.0))
    variables = [variable] + optimizer.variables
    before = [np.array(v.numpy(), copy=True) for v in variables]
    loss = step(tf.constant(1e30))
    assert np.isfinite(float(loss))
    for a, v in zip(before, variables, strict=True):
        if v is not optimizer.skipped_steps:
            np.testing.assert_array_equal(a, v.numpy(), err_msg=v.path)
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


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_small_last_batch_of_unknown_size_is_trained_as_eagerly(rng, monkeypatch, jit_compile):
    # From a tf.data pipeline the step's batch size is unknown in the graph: the split
    # is taken when the step runs, four parts of which two stand in for empty ones.
    from keras_sam.backends import tensorflow as adapter

    calls = []
    split = adapter.BACKEND.dynamic_split
    monkeypatch.setattr(
        adapter.BACKEND, "dynamic_split", lambda *a: calls.append(a[1]) or split(*a)
    )
    x, y = rng.normal(size=(10, 6)).astype("float32"), rng.integers(0, 3, 10)
    results = []
    for kwargs in ({"run_eagerly": True}, {"jit_compile": jit_compile}):
        model = _plain_classifier()
        sam_model = _compiled(model, splits=4, **kwargs)
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
        sam_model.fit(data, epochs=2, shuffle=False, verbose=0)
        assert int(sam_model.optimizer.iterations.numpy()) == 6
        results.append(model.get_weights())
    assert calls and set(calls) == {4}
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
