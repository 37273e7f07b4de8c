"""`SAMModel`: SAM through `fit`."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from tests import reference


def _mlp(params, l2=0.0):
    regularizer = keras.regularizers.L2(l2) if l2 else None
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(5, activation="tanh", kernel_regularizer=regularizer),
            keras.layers.Dense(2, kernel_regularizer=regularizer),
        ]
    )
    model.set_weights([p.astype("float32") for p in params])
    return model


def _data(rng, n=16):
    return rng.normal(size=(n, 3)), rng.normal(size=(n, 2))


def _reference_fit(params, x, t, batch_size, epochs, lr, momentum, rho, l2=0.0, splits=1):
    """float64 SAM training over ordered batches; returns params and per-epoch logs."""
    velocities = [np.zeros_like(p) for p in params]
    logs = []
    for _ in range(epochs):
        losses, sharpness, sizes = [], [], []
        for start in range(0, len(x), batch_size):
            xb, tb = x[start : start + batch_size], t[start : start + batch_size]
            bounds = np.cumsum([0] + [(len(xb) + i) // splits for i in range(splits)])
            grads, loss, loss_sam = None, 0.0, 0.0
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                weight = (hi - lo) / len(xb)
                part_loss, part_loss_sam, part_grads = reference.mlp_sam_gradient(
                    params, xb[lo:hi], tb[lo:hi], rho, l2=l2
                )
                loss += weight * part_loss
                loss_sam += weight * part_loss_sam
                part_grads = [weight * g for g in part_grads]
                grads = (
                    part_grads
                    if grads is None
                    else [a + b for a, b in zip(grads, part_grads, strict=True)]
                )
            params, velocities = reference.sgd_momentum(params, grads, velocities, lr, momentum)
            losses.append(loss)
            sharpness.append(loss_sam - loss)
            sizes.append(len(xb))
        logs.append({"loss": np.average(losses, weights=sizes), "sharpness": np.mean(sharpness)})
    return params, logs


def _fit_sam_model(params, x, t, batch_size, epochs, rho, l2=0.0, splits=None, **fit_kwargs):
    model = _mlp(params, l2)
    sam_model = keras_sam.SAMModel(model, num_batch_splits=splits)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=rho), loss="mse"
    )
    history = sam_model.fit(
        x.astype("float32"),
        t.astype("float32"),
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        **fit_kwargs,
    )
    return model, history.history


@pytest.mark.parametrize("l2", [0.0, 0.01])
def test_fit_matches_the_float64_reference(rng, l2):
    params = reference.mlp_init(rng)
    x, t = _data(rng)
    model, history = _fit_sam_model(params, x, t, batch_size=8, epochs=2, rho=0.05, l2=l2)
    want, logs = _reference_fit(params, x, t, 8, 2, 0.1, 0.9, 0.05, l2=l2)
    for got, expected in zip(model.get_weights(), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=5e-5, atol=5e-6)
    np.testing.assert_allclose(history["loss"], [g["loss"] for g in logs], rtol=1e-5)
    np.testing.assert_allclose(
        history["sharpness"], [g["sharpness"] for g in logs], rtol=1e-3, atol=1e-7
    )
    assert all(s > 0 for s in history["sharpness"])
    if l2:  # the regularization loss is really in both passes: without it the result differs
        unregularized, _ = _reference_fit(params, x, t, 8, 2, 0.1, 0.9, 0.05, l2=0.0)
        assert max(np.max(np.abs(a - b)) for a, b in zip(want, unregularized, strict=True)) > 1e-3


@pytest.mark.parametrize("batch_size, splits", [(8, 2), (8, 4), (10, 3)])
def test_m_sharpness_averages_the_parts_sam_gradients(rng, batch_size, splits):
    params = reference.mlp_init(rng)
    x, t = _data(rng, n=2 * batch_size)
    model, history = _fit_sam_model(params, x, t, batch_size, 1, rho=0.1, splits=splits)
    want, logs = _reference_fit(params, x, t, batch_size, 1, 0.1, 0.9, 0.1, splits=splits)
    for got, expected in zip(model.get_weights(), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=5e-5, atol=5e-6)
    np.testing.assert_allclose(history["loss"], [g["loss"] for g in logs], rtol=1e-5)
    # Not the same as one perturbation for the whole batch.
    whole, _ = _reference_fit(params, x, t, batch_size, 1, 0.1, 0.9, 0.1, splits=1)
    assert max(np.max(np.abs(a - b)) for a, b in zip(want, whole, strict=True)) > 1e-5


def test_m_sharpness_refuses_a_batch_smaller_than_the_number_of_splits(rng):
    params = reference.mlp_init(rng)
    x, t = _data(rng, n=3)
    with pytest.raises(ValueError, match="cannot be split into num_batch_splits=4"):
        _fit_sam_model(params, x, t, batch_size=3, epochs=1, rho=0.1, splits=4)


def _bn_dropout_model(seed=7):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3, seed=2),
            keras.layers.Dense(3),
        ]
    )


def test_with_a_plain_optimizer_it_trains_exactly_like_the_unwrapped_model(rng):
    x, y = rng.normal(size=(40, 4)).astype("float32"), rng.integers(0, 3, 40)
    plain, wrapped_inner = _bn_dropout_model(), _bn_dropout_model()
    wrapped = keras_sam.SAMModel(wrapped_inner)
    for m in (plain, wrapped):
        m.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    h1 = plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    h2 = wrapped.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
    assert h1 == h2  # the same logs, and no `sharpness` key
    for a, b in zip(plain.weights, wrapped_inner.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


class _TrainingProbe(keras.layers.Layer):
    """Records the `training` flag of every call (eagerly)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.flags = []

    def call(self, inputs, training=None):
        self.flags.append(training)
        return inputs


def test_both_passes_run_in_training_mode_and_batchnorm_moves_once(rng):
    probe = _TrainingProbe()
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6),
            probe,
            keras.layers.BatchNormalization(momentum=0.5),
        ]
    )
    reference_model = keras.models.clone_model(model)
    reference_model.set_weights(model.get_weights())
    x = rng.normal(size=(8, 4)).astype("float32")
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1)), loss="mse", run_eagerly=True
    )
    probe.flags.clear()  # forget the symbolic call made while the model was built
    sam_model.fit(x, np.zeros((8, 6), "float32"), batch_size=8, shuffle=False, verbose=0)
    assert probe.flags == [True, True]
    reference_model(x, training=True)  # one plain training-mode pass from the same weights
    bn, ref_bn = model.layers[-1], reference_model.layers[-1]
    np.testing.assert_array_equal(bn.moving_mean.numpy(), ref_bn.moving_mean.numpy())
    np.testing.assert_array_equal(bn.moving_variance.numpy(), ref_bn.moving_variance.numpy())
    assert np.max(np.abs(bn.moving_mean.numpy())) > 0  # it did move


def _custom_loop_reference(model, optimizer, batches, loss_fn):
    @tf.function
    def step(x, y, sw):
        def grad_func():
            with tf.GradientTape() as tape:
                pred = model(x, training=True)
                loss = loss_fn(y, pred, sample_weight=sw)
            return pred, loss, tape

        return optimizer.optimize(grad_func, model.trainable_variables)

    return [step(*batch) for batch in batches]


def test_sample_and_class_weights_reach_both_passes(rng):
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, 16)
    sw = rng.uniform(0.1, 2.0, 16).astype("float32")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    inner = _bn_dropout_model()
    sam_model = keras_sam.SAMModel(inner)
    sam_model.compile(optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.1), loss=loss_fn)
    sam_model.fit(x, y, sample_weight=sw, batch_size=8, shuffle=False, verbose=0)

    ref = _bn_dropout_model()
    batches = [(x[i : i + 8], y[i : i + 8], sw[i : i + 8]) for i in (0, 8)]
    _custom_loop_reference(ref, keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.1), batches, loss_fn)
    for a, b in zip(inner.weights, ref.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)

    # class_weight is the same as the equivalent sample weights
    class_weight = {0: 0.5, 1: 2.0, 2: 1.0}
    by_class = _bn_dropout_model()
    m = keras_sam.SAMModel(by_class)
    m.compile(optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.1), loss=loss_fn)
    m.fit(x, y, class_weight=class_weight, batch_size=8, shuffle=False, verbose=0)
    by_sample = _bn_dropout_model()
    m2 = keras_sam.SAMModel(by_sample)
    m2.compile(optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.1), loss=loss_fn)
    equivalent = np.array([class_weight[int(c)] for c in y], "float32")
    m2.fit(x, y, sample_weight=equivalent, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(by_class.weights, by_sample.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


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


class SubclassedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4, activation="relu")
        self.out = keras.layers.Dense(1)

    def call(self, x):
        return self.out(self.hidden(x))


def test_subclassed_model_and_validation_and_callbacks(rng):
    model = SubclassedNet()
    model(np.zeros((1, 3), "float32"))
    x, y = rng.normal(size=(32, 3)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")
    seen = []

    class Recorder(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(sorted(logs))

    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.05)), loss="mse", metrics=["mae"]
    )
    history = sam_model.fit(
        x,
        y,
        validation_data=(x[:8], y[:8]),
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[Recorder()],
    ).history
    assert set(history) == {"loss", "mae", "sharpness", "skipped_steps", "val_loss", "val_mae"}
    assert seen[0] == ["loss", "mae", "sharpness", "skipped_steps"]
    evaluated = sam_model.evaluate(x[:8], y[:8], verbose=0, return_dict=True)
    assert set(evaluated) == {"loss", "mae"}
    np.testing.assert_allclose(evaluated["loss"], history["val_loss"][-1], rtol=1e-6)
    np.testing.assert_allclose(
        sam_model.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )
    expected_loss = float(np.mean((model.predict(x[:8], verbose=0) - y[:8]) ** 2))
    np.testing.assert_allclose(evaluated["loss"], expected_loss, rtol=1e-5)


def test_keras_file_round_trip_for_sam_model_and_inner_model(rng, tmp_path):
    x = rng.normal(size=(24, 4)).astype("float32")
    y = rng.integers(0, 3, 24)
    inner = _bn_dropout_model()
    sam_model = keras_sam.SAMModel(inner, num_batch_splits=2)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.05, momentum=0.9), rho=0.07, adaptive=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    sam_model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    sam_model.save(tmp_path / "sam.keras")
    inner.save(tmp_path / "inner.keras")

    loaded = keras.saving.load_model(tmp_path / "sam.keras")
    assert isinstance(loaded, keras_sam.SAMModel) and isinstance(loaded.optimizer, keras_sam.SAM)
    assert loaded.num_batch_splits == 2
    assert loaded.optimizer.get_config() == sam_model.optimizer.get_config()
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), sam_model.predict(x, verbose=0))
    for a, b in zip(sam_model.optimizer.variables, loaded.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Training continues identically (no dropout seed in play: rate-0 path checked above).
    plain_inner = keras.saving.load_model(tmp_path / "inner.keras")
    assert type(plain_inner) is keras.Sequential
    np.testing.assert_array_equal(plain_inner.predict(x, verbose=0), inner.predict(x, verbose=0))


def test_resume_after_keras_file_round_trip_is_bitwise(rng, tmp_path):
    params = reference.mlp_init(rng)
    x, t = (a.astype("float32") for a in _data(rng))

    def compiled(model):
        m = keras_sam.SAMModel(model)
        m.compile(optimizer=keras_sam.SAM(keras.optimizers.Adam(0.01), rho=0.05), loss="mse")
        return m

    straight = compiled(_mlp(params))
    straight.fit(x, t, batch_size=8, epochs=2, shuffle=False, verbose=0)
    first = compiled(_mlp(params))
    first.fit(x, t, batch_size=8, epochs=1, shuffle=False, verbose=0)
    first.save(tmp_path / "half.keras")
    resumed = keras.saving.load_model(tmp_path / "half.keras")
    resumed.fit(x, t, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(straight.weights, resumed.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_config_round_trip():
    model = _bn_dropout_model()
    sam_model = keras_sam.SAMModel(model, num_batch_splits=4, name="wrapped")
    config = sam_model.get_config()
    assert config["num_batch_splits"] == 4
    revived = keras_sam.SAMModel.from_config(json.loads(json.dumps(config)))
    assert revived.num_batch_splits == 4 and revived.name == "wrapped"
    assert [w.shape for w in revived.weights] == [w.shape for w in sam_model.weights]


@pytest.mark.parametrize("splits", [0, -1, 2.5, True, "2"])
def test_invalid_num_batch_splits(splits):
    with pytest.raises(ValueError, match=f"Received: num_batch_splits={splits!r}"):
        keras_sam.SAMModel(_bn_dropout_model(), num_batch_splits=splits)


def test_model_must_be_a_built_keras_model():
    with pytest.raises(ValueError, match="must be a `keras.Model`"):
        keras_sam.SAMModel(keras.layers.Dense(3))
    with pytest.raises(ValueError, match="must be built"):
        keras_sam.SAMModel(keras.Sequential([keras.layers.Dense(3)]))
    with pytest.raises(ValueError, match="already a `SAMModel`"):
        keras_sam.SAMModel(keras_sam.SAMModel(_bn_dropout_model()))


@pytest.mark.parametrize("compile_kwargs", [{"jit_compile": True}, {"steps_per_execution": 3}])
def test_fit_compiled_with_xla_or_several_steps_per_execution_agrees(rng, compile_kwargs):
    params = reference.mlp_init(rng)
    x, t = (a.astype("float32") for a in _data(rng, n=24))
    results = []
    for kwargs in ({}, compile_kwargs):
        model = _mlp(params)
        sam_model = keras_sam.SAMModel(model)
        sam_model.compile(
            optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9)), loss="mse", **kwargs
        )
        sam_model.fit(x, t, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append(model.get_weights())
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
