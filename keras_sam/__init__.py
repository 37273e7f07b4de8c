"""keras-sam: Sharpness-Aware Minimization for Keras 3, on TensorFlow, JAX and PyTorch."""

__version__ = "0.1.0"

__all__ = [
    "AESAM",
    "BAR",
    "FlatLoRA",
    "FriendlySAM",
    "GSAM",
    "LatePhaseRho",
    "LookSAM",
    "MESA",
    "MomentumSAM",
    "NORMALIZATION_LAYERS",
    "PeriodicSAM",
    "ProportionalRho",
    "SAM",
    "SAMModel",
    "SkippedStepsError",
    "SkippedStepsGuard",
    "__version__",
]

# Public name -> the module that defines it. Resolved on first use (PEP 562), so that
# `keras-sam --help` answers at once and the command line can quiet TensorFlow's
# start-up logging before TensorFlow is imported.
_PUBLIC = {
    "SAM": "keras_sam.methods.sam",
    "NORMALIZATION_LAYERS": "keras_sam.methods.sam",
    "GSAM": "keras_sam.methods.gsam",
    "BAR": "keras_sam.methods.bar",
    "FriendlySAM": "keras_sam.methods.friendly_sam",
    "FlatLoRA": "keras_sam.methods.flat_lora",
    "LookSAM": "keras_sam.methods.looksam",
    "MomentumSAM": "keras_sam.methods.momentum_sam",
    "MESA": "keras_sam.methods.mesa",
    "PeriodicSAM": "keras_sam.methods.switching",
    "AESAM": "keras_sam.methods.switching",
    "ProportionalRho": "keras_sam.methods.schedules",
    "LatePhaseRho": "keras_sam.methods.schedules",
    "SAMModel": "keras_sam.trainers.sam_model",
    "SkippedStepsError": "keras_sam.trainers.skipped_steps",
    "SkippedStepsGuard": "keras_sam.trainers.skipped_steps",
}


# The public subpackages, imported on first use (listed by `dir(keras_sam)`, not in
# `__all__`: `from keras_sam import *` stays the classes).
_SUBPACKAGES = ("datasets", "diagnostics", "models")


def __getattr__(name):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"keras_sam.{name}")
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        _register()
        globals()[name] = value
        return value
    raise AttributeError(f"module 'keras_sam' has no attribute {name!r}")


def __dir__():
    return sorted([*__all__, *_SUBPACKAGES])


def _register():
    """Imports the modules whose classes `keras.saving.load_model` must find by name."""
    import keras_sam.methods  # noqa: F401
    import keras_sam.trainers.sam_model  # noqa: F401


# When Keras is already loaded (`import keras` above `import keras_sam`, the usual order),
# registering costs nothing: do it now, so that `.keras` files load without touching a
# keras_sam name first. Otherwise the first public name accessed registers everything.
import sys as _sys  # noqa: E402

if "keras" in _sys.modules:
    _register()
