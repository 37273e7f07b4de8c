import keras
import numpy as np
import pytest

from keras_sam.diagnostics import Objective, loss_landscape, normalized_direction


def _filter_norms(array):
    return np.sqrt(np.sum(np.asarray(array, np.float64) ** 2, axis=tuple(range(array.ndim - 1))))


def test_filter_normalization_gives_each_filter_the_norm_of_the_weights_filter(rng):
    weights = [
        rng.normal(size=(3, 3, 2, 4)),  # a convolution kernel: 4 filters
        rng.normal(size=(5, 3)) * np.array([0.1, 1.0, 10.0]),  # a dense kernel: 3 units
        rng.normal(size=(3,)),  # a bias
        rng.normal(size=(4,)),  # a normalization scale
    ]
    weights[0][..., 2] = 0.0  # a dead filter stays at zero, without NaN
    direction = [rng.normal(size=w.shape) * 7 for w in weights]
    normalized = normalized_direction(direction, weights)
    for n, w in zip(normalized[:2], weights[:2]):
        assert n.dtype == np.float32 and n.shape == w.shape
        np.testing.assert_allclose(_filter_norms(n), _filter_norms(w), rtol=1e-6)
    assert np.all(normalized[0][..., 2] == 0)
    # Each filter keeps its direction: a positive multiple of the random one.
    ratio = normalized[1] / direction[1]
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[0], ratio.shape), rtol=1e-5)
    assert np.all(ratio > 0)
    assert not np.any(normalized[2]) and not np.any(normalized[3])  # biases and BN: zero


def test_biases_can_be_included_and_layer_normalization_scales_whole_variables(rng):
    weights = [rng.normal(size=(5, 3)), rng.normal(size=(3,))]
    direction = [rng.normal(size=w.shape) for w in weights]
    with_biases = normalized_direction(direction, weights, include_biases=True)
    assert np.linalg.norm(with_biases[1]) == pytest.approx(np.linalg.norm(weights[1]), rel=1e-6)
    layer = normalized_direction(direction, weights, normalization="layer")
    assert np.linalg.norm(layer[0]) == pytest.approx(np.linalg.norm(weights[0]), rel=1e-6)
    assert not np.allclose(_filter_norms(layer[0]), _filter_norms(weights[0]))
    assert not np.any(layer[1])


def _regression(rng, n=40, d=3, scale=1.0):
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1)])
    model.set_weights(
        [(scale * rng.normal(size=(d, 1))).astype("float32"), np.array([0.3], "float32")]
    )
    model.compile(loss="mse")
    return model, x, y


def _numpy_loss(model_weights, x, y):
    """mean((x W + b - y)^2) in float64."""
    kernel, bias = (np.asarray(w, np.float64) for w in model_weights)
    return float(np.mean((x.astype(np.float64) @ kernel + bias - y) ** 2))


def test_one_dimensional_landscape_is_the_loss_along_the_returned_direction(rng):
    model, x, y = _regression(rng)
    steps = np.linspace(-2, 2, 9)
    result = loss_landscape(Objective(model, x, y, batch_size=16), coordinates=steps, verbose=0)
    (direction,) = result["directions"]
    assert not np.any(direction[1])  # the bias does not move
    np.testing.assert_array_equal(result["coordinates"], steps)
    weights = model.get_weights()
    expected = [_numpy_loss([w + a * d for w, d in zip(weights, direction)], x, y) for a in steps]
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-5)
    assert result["loss"][4] == pytest.approx(_numpy_loss(weights, x, y), rel=1e-6)
    assert result["accuracy"] is None  # a regression model


def test_two_dimensional_landscape_indexes_loss_by_the_first_then_the_second_axis(rng):
    model, x, y = _regression(rng)
    a, b = np.linspace(-1, 1, 5), np.array([-0.5, 0.0, 0.5])
    result = loss_landscape(
        Objective(model, x, y),
        dimensions=2,
        coordinates=(a, b),
        seed=3,
        include_biases=True,
        verbose=0,
    )
    first, second = result["directions"]
    assert np.any(first[1])  # include_biases moves the bias too
    assert result["loss"].shape == (5, 3)
    weights = model.get_weights()
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            point = [w + ai * d1 + bj * d2 for w, d1, d2 in zip(weights, first, second)]
            assert result["loss"][i, j] == pytest.approx(_numpy_loss(point, x, y), rel=1e-5)


def test_the_same_seed_draws_the_same_directions_for_any_model(rng):
    model, x, y = _regression(rng)
    twice = keras.models.clone_model(model)
    twice.set_weights([2 * w for w in model.get_weights()])
    twice.compile(loss="mse")
    one = loss_landscape(Objective(model, x, y), coordinates=[0.0], seed=5, verbose=0)[
        "directions"
    ][0]
    two = loss_landscape(Objective(twice, x, y), coordinates=[0.0], seed=5, verbose=0)[
        "directions"
    ][0]
    np.testing.assert_allclose(two[0], 2 * one[0], rtol=1e-6)  # filter norms doubled
    other = loss_landscape(Objective(model, x, y), coordinates=[0.0], seed=6, verbose=0)[
        "directions"
    ][0]
    assert not np.allclose(other[0], one[0])


def _mse(y, prediction):
    # Through NumPy: on PyTorch an eager prediction requires grad (float() would warn).
    return float(np.mean((y - keras.ops.convert_to_numpy(prediction)) ** 2))


def test_interpolation_between_two_models_moves_every_weight_including_batchnorm(rng):
    def build():
        model = keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(4),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(1),
            ]
        )
        model.compile(loss="mse")
        return model

    x = rng.normal(size=(30, 3)).astype("float32")
    y = rng.normal(size=(30, 1)).astype("float32")
    a, b = build(), build()
    for model in (a, b):  # distinct moving statistics, too
        model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.weights])
        model.layers[1].moving_variance.assign(np.abs(model.layers[1].moving_variance.numpy()))
    ts = np.array([0.0, 0.25, 1.0, 1.5])
    result = loss_landscape(Objective(a, x, y), to_model=b, coordinates=ts, verbose=0)
    assert result["directions"] is None
    own = [_mse(y, m(x, training=False)) for m in (a, b)]
    assert result["loss"][0] == pytest.approx(own[0], rel=1e-6)
    assert result["loss"][2] == pytest.approx(own[1], rel=1e-6)
    mixed = build()
    mixed.set_weights([0.75 * wa + 0.25 * wb for wa, wb in zip(a.get_weights(), b.get_weights())])
    expected = _mse(y, mixed(x, training=False))
    assert result["loss"][1] == pytest.approx(expected, rel=1e-5)


def test_a_classifier_gets_its_accuracy_on_the_grid(rng):
    x = rng.normal(size=(50, 4)).astype("float32")
    labels = rng.integers(0, 3, size=50)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    result = loss_landscape(
        Objective(model, x, labels, loss=loss), coordinates=[-0.5, 0.0], verbose=0
    )
    accuracy = np.mean(np.argmax(model.predict(x, verbose=0), axis=-1) == labels)
    assert result["accuracy"][1] == pytest.approx(accuracy)
    one_hot = keras.ops.convert_to_numpy(keras.ops.one_hot(labels, 3))
    same = loss_landscape(
        Objective(model, x, one_hot, loss=keras.losses.CategoricalCrossentropy(from_logits=True)),
        coordinates=[-0.5, 0.0],
        verbose=0,
    )
    np.testing.assert_allclose(same["accuracy"], result["accuracy"])
    np.testing.assert_allclose(same["loss"], result["loss"], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dimensions": 3}, r"`dimensions` must be 1 or 2. Received: dimensions=3"),
        ({"normalization": "unit"}, r"`normalization` must be one of \('filter', 'layer'\)"),
        ({"coordinates": [[0.0, 1.0]]}, r"`coordinates` must be a non-empty 1-D array"),
        ({"coordinates": []}, r"`coordinates` must be a non-empty 1-D array"),
        ({"coordinates": [0.0, np.nan]}, r"`coordinates` must be a non-empty 1-D array"),
        ({"seed": -2}, r"`seed` must be an integer >= 0. Received: seed=-2"),
    ],
)
def test_arguments_are_checked(rng, kwargs, message):
    model, x, y = _regression(rng, n=8)
    with pytest.raises(ValueError, match=message):
        loss_landscape(Objective(model, x, y), verbose=0, **kwargs)


def test_interpolation_needs_one_dimension_and_a_model_with_the_same_variables(rng):
    model, x, y = _regression(rng, n=8)
    other, _, _ = _regression(rng, n=8, d=4)
    with pytest.raises(ValueError, match="`dimensions` must be 1 with `to_model`"):
        loss_landscape(Objective(model, x, y), to_model=model, dimensions=2)
    with pytest.raises(ValueError, match="`to_model` must have the same trainable variables"):
        loss_landscape(Objective(model, x, y), to_model=other)
