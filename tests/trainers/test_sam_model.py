"""`SAMModel` with a multi-input, multi-output model, against the TensorFlow custom loop.

The rest of `SAMModel`'s contract runs on every backend: tests/trainers/test_contract.py."""

import keras
import numpy as np
import tensorflow as tf

import keras_sam


def test_multi_input_multi_output_functional_model(rng):
    keras.utils.set_random_seed(3)
    a_in, b_in = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Dense(6, activation="relu")(keras.layers.Concatenate()([a_in, b_in]))
    out_1 = keras.layers.Dense(1, name="reg")(h)
    out_2 = keras.layers.Dense(3, name="cls")(h)
    model = keras.Model({"a": a_in, "b": b_in}, {"reg": out_1, "cls": out_2})
    ref = keras.models.clone_model(model)
    ref.set_weights(model.get_weights())
    x = {
        "a": rng.normal(size=(8, 3)).astype("float32"),
        "b": rng.normal(size=(8, 2)).astype("float32"),
    }
    y = {"reg": rng.normal(size=(8, 1)).astype("float32"), "cls": rng.integers(0, 3, (8,))}
    mse = keras.losses.MeanSquaredError()
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.1), loss={"reg": mse, "cls": xent}
    )
    logs = sam_model.fit(x, y, batch_size=8, verbose=0).history

    opt = keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.1)

    def grad_func():
        with tf.GradientTape() as tape:
            pred = ref(x, training=True)
            loss = mse(y["reg"], pred["reg"]) + xent(y["cls"], pred["cls"])
        return pred, loss, tape

    _, loss, _ = opt.optimize(grad_func, ref.trainable_variables)
    np.testing.assert_allclose(logs["loss"][0], float(loss), rtol=1e-6)
    for a, b in zip(model.weights, ref.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
