"""keras-sam: Sharpness-Aware Minimization for TensorFlow 2 and Keras 3."""

from keras_sam.methods.sam import SAM
from keras_sam.trainers.sam_model import SAMModel

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "SAMModel",
    "__version__",
]
