"""A small model zoo sized for a 2-core CPU and 28x28 grayscale images.

- `cnn`: two convolution blocks and a dense head, fast on a CPU (its step times are on
  the benchmarks page, docs/benchmarks.md); BatchNorm on request (`batch_norm=True`).
- `resnet`: a CIFAR-style ResNet (He et al., 2016) with BatchNorm, `6n + 2` layers in
  three stages; `depth=20, width=16` is ResNet-20, the paper's family at CPU scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

MODELS = ("cnn", "resnet")


def build_model(
    name: str,
    *,
    input_shape: tuple[int, ...] = (28, 28, 1),
    num_classes: int = 10,
    seed: int | None = None,
    **kwargs: Any,
) -> keras.Model:
    """Builds a model of the zoo by name.

    Args:
        name: one of `MODELS`.
        input_shape: tuple, one example's shape. Defaults to `(28, 28, 1)`.
        num_classes: int, the number of logits. Defaults to 10.
        seed: int or `None`, seeds the initial weights. Defaults to `None`.
        **kwargs: the model's own arguments (see `cnn` and `resnet`).

    Returns:
        A built `keras.Model` producing logits.
    """
    if name not in MODELS:
        raise ValueError(f"`name` must be one of {MODELS}. Received: name={name!r}")
    if seed is not None:
        set_random_seed(seed)
    builder = cnn if name == "cnn" else resnet
    return builder(input_shape=input_shape, num_classes=num_classes, **kwargs)


def set_random_seed(seed: int) -> None:
    """Seeds what Keras draws initial weights and default seeds from.

    On TensorFlow, `keras.utils.set_random_seed`. Elsewhere Python's and NumPy's
    generators, the ones Keras draws its default seeds from (the same initial weights as
    `keras.utils.set_random_seed`): that function also imports TensorFlow whenever it is
    installed, to seed it, and TensorFlow has no business in a JAX or PyTorch process.
    """
    import random

    import keras
    import numpy as np

    if keras.backend.backend() == "tensorflow":
        keras.utils.set_random_seed(seed)
    else:
        random.seed(seed)
        np.random.seed(seed)  # noqa: NPY002 (as Keras seeds it)


def cnn(
    input_shape: tuple[int, ...] = (28, 28, 1),
    num_classes: int = 10,
    width: int = 32,
    batch_norm: bool = False,
) -> keras.Model:
    """Conv(width)-Pool-Conv(2 width)-Pool-Dense(128)-Dense(num_classes), ReLU."""
    import keras

    layers = keras.layers
    inputs = keras.Input(input_shape)
    x = inputs
    for filters in (width, 2 * width):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm)(x)
        if batch_norm:
            x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name=f"cnn{width}")


def resnet(
    input_shape: tuple[int, ...] = (28, 28, 1),
    num_classes: int = 10,
    depth: int = 20,
    width: int = 16,
) -> keras.Model:
    """CIFAR-style ResNet: 3 stages of `(depth - 2) / 6` basic blocks, widths w, 2w, 4w."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(
            f"`depth` must be 6n + 2 with n >= 1 (8, 14, 20, ...). Received: depth={depth}"
        )
    import keras

    layers = keras.layers
    blocks = (depth - 2) // 6

    def conv_bn(x, filters, strides=1, relu=True):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU()(x) if relu else x

    inputs = keras.Input(input_shape)
    x = conv_bn(inputs, width)
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = conv_bn(x, filters, strides)
            y = conv_bn(y, filters, relu=False)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=False)(shortcut)
                shortcut = layers.BatchNormalization()(shortcut)
            x = layers.ReLU()(layers.Add()([y, shortcut]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}_{width}")
