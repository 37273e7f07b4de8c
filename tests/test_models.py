import keras
import numpy as np
import pytest

from keras_sam.models import MODELS, build_model


@pytest.mark.parametrize("name", MODELS)
def test_models_map_28x28_images_to_10_logits(name):
    model = build_model(name, seed=0)
    out = model(np.zeros((2, 28, 28, 1), "float32"))
    assert tuple(out.shape) == (2, 10)
    has_bn = any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert has_bn == (name == "resnet")
    if name == "cnn":
        with_bn = build_model(name, batch_norm=True)
        assert (
            sum(isinstance(layer, keras.layers.BatchNormalization) for layer in with_bn.layers) == 2
        )


def test_seed_makes_the_weights_repeatable():
    a, b = build_model("cnn", seed=3), build_model("cnn", seed=3)
    c = build_model("cnn", seed=4)
    for x, y in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(np.any(x != z) for x, z in zip(a.get_weights(), c.get_weights(), strict=True))


def test_resnet_20_has_the_papers_layout():
    model = build_model("resnet", depth=20, width=16)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert sum(layer.kernel_size == (3, 3) for layer in convs) == 19  # 1 + 3 stages * 3 blocks * 2
    assert {layer.filters for layer in convs} == {16, 32, 64}


@pytest.mark.parametrize("bad", [{"name": "vgg"}, {"name": "resnet", "depth": 21}])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match="Received"):
        build_model(**bad)
