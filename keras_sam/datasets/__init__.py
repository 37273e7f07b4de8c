"""Data sets for the experiments: `fashion_mnist` (a verified loader) and `label_noise`.

`keras_sam.datasets.fashion_mnist.load_data()` returns what
`keras.datasets.fashion_mnist.load_data()` does, from a local copy when there is one.
"""

from keras_sam.datasets import fashion_mnist, label_noise

__all__ = ["fashion_mnist", "label_noise"]
