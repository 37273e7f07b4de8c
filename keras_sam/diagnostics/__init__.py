"""Diagnostics: measure how sharp a model's minimum is.

Every function leaves the model's weights exactly as they were: perturbed weights are
only ever read through a `keras.StatelessScope`.
"""

from keras_sam.diagnostics.sharpness import sharpness

__all__ = ["sharpness"]
