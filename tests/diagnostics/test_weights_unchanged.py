"""Every diagnostic leaves every variable of the model bitwise as it was, also when it
stops half-way with an exception."""

import keras
import numpy as np
import pytest

from keras_sam import diagnostics
from keras_sam.diagnostics import _engine


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(3, 3, kernel_regularizer=keras.regularizers.L2(1e-3))(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dropout(0.5)(h)
    outputs = keras.layers.Dense(4)(h)
    model = keras.Model(inputs, outputs)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # BatchNorm statistics away from their initial values, so a write would show.
    bn = model.layers[2]
    bn.moving_mean.assign(np.linspace(-1, 1, 3).astype("float32"))
    bn.moving_variance.assign(np.linspace(0.5, 2, 3).astype("float32"))
    return model


def _data(rng, n=20):
    return rng.normal(size=(n, 6, 6, 1)).astype("float32"), rng.integers(0, 4, size=n)


DIAGNOSTICS = {
    "sharpness": lambda m, x, y: diagnostics.sharpness(
        diagnostics.Objective(m, x, y, batch_size=8)
    ),
    "m-sharpness": lambda m, x, y: diagnostics.sharpness(
        diagnostics.Objective(m, x, y, batch_size=8), m=6
    ),
    "multi-step sharpness": lambda m, x, y: diagnostics.sharpness(
        diagnostics.Objective(m, x, y, batch_size=8), ascent_steps=3, adaptive=True
    ),
    "hessian_vector_product": lambda m, x, y: diagnostics.hessian_vector_product(
        diagnostics.Objective(m, x, y, batch_size=8),
        [np.ones(v.shape, "float32") for v in m.trainable_variables],
    ),
    "hessian_eigenvalues": lambda m, x, y: diagnostics.hessian_eigenvalues(
        diagnostics.Objective(m, x, y, batch_size=8), k=2, max_iterations=6, tol=0.5, verbose=0
    ),
    "hessian_trace": lambda m, x, y: diagnostics.hessian_trace(
        diagnostics.Objective(m, x, y, batch_size=8), num_probes=3, verbose=0
    ),
    "loss_landscape 2-D": lambda m, x, y: diagnostics.loss_landscape(
        diagnostics.Objective(m, x, y),
        dimensions=2,
        coordinates=[-1.0, 0.5],
        include_biases=True,
        verbose=0,
    ),
    "loss_landscape between models": lambda m, x, y: diagnostics.loss_landscape(
        diagnostics.Objective(m, x, y), to_model=_model(seed=1), coordinates=[0.5, 2.0], verbose=0
    ),
}


def _values(model):
    return [np.array(v.numpy(), copy=True) for v in model.variables]


def _assert_bitwise_equal(before, model):
    after = _values(model)
    assert len(before) == len(after)
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b, strict=True)


@pytest.mark.parametrize("name", list(DIAGNOSTICS))
def test_the_weights_are_bitwise_unchanged(rng, name):
    model = _model()
    x, y = _data(rng)
    before = _values(model)
    DIAGNOSTICS[name](model, x, y)
    _assert_bitwise_equal(before, model)


@pytest.mark.parametrize("name", list(DIAGNOSTICS))
def test_the_weights_are_bitwise_unchanged_after_an_exception_half_way(rng, monkeypatch, name):
    # Every pass over the data goes through one of three methods; the second call of any
    # of them raises, after the first has run with perturbed (or interpolated) weights.
    calls = {"count": 0}

    def failing(method):
        def wrapper(*args, **kwargs):
            calls["count"] += 1
            if calls["count"] == 2:
                raise KeyboardInterrupt("stopped half-way")
            return method(*args, **kwargs)

        return wrapper

    for method in ("loss", "loss_and_gradient", "hessian_vector_product"):
        monkeypatch.setattr(_engine.Passes, method, failing(getattr(_engine.Passes, method)))
    model = _model()
    x, y = _data(rng)
    before = _values(model)
    try:
        DIAGNOSTICS[name](model, x, y)
    except KeyboardInterrupt:
        pass
    else:  # the single-pass product has no second call
        assert name == "hessian_vector_product"
    _assert_bitwise_equal(before, model)
