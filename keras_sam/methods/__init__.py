"""SAM and its variants: Keras optimizer wrappers that hold hyperparameters and state.

A method answers three questions per step, and never runs a model itself:
`needs_second_pass()`, `perturbation(gradients, variables)` and
`descent_gradients(gradients, perturbed_gradients, variables)`.
"""

# Importing any method registers them all, so that a saved model compiled with any of
# them loads after `import keras_sam.methods` (or any public method name).
from keras_sam.methods import friendly_sam, gsam, looksam, sam, schedules, switching  # noqa: E402,F401
