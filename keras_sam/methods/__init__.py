"""SAM and its variants: Keras optimizer wrappers that hold hyperparameters and state.

A method never runs a model. The trainer asks it, per step (per part under m-sharpness):

- `initial_perturbation(variables)`: None (the first pass at `w`), or the `e` at which
  the first pass is taken instead (MomentumSAM), chosen before any gradient;
- `pass_values(variables)`: None, or `(variable, value)` pairs that the passes read for
  other variables, never written (FlatLoRA's noisy frozen kernels);
- `needs_second_pass(gradients, variables)`: a Python bool, or a boolean tensor decided
  inside the compiled step (SAM's: `rho > 0`);
- `perturbation(gradients, variables)`: the `e(w)` of the perturbed pass;
- `descent_gradients(gradients, perturbed_gradients, variables)`: what the wrapped
  optimizer descends with after two passes;
- `one_pass_gradients(gradients, variables)`: what it descends with after one;
- `teacher_values(variables)` and `added_loss(outputs, teacher_outputs)`: a second model
  state whose outputs (a forward pass without gradients) a term added to every pass's
  loss reads (MESA's moving average of the weights).

Persistent state lives in optimizer variables (`add_state_variable` in `build`). Hooks
read and assign them freely: the trainer records the assignments and writes them once
the whole step has succeeded. A new variant is one class overriding the hooks it needs.
"""

# Importing any method registers them all, so that a saved model compiled with any of
# them loads after `import keras_sam.methods` (or any public method name).
from keras_sam.methods import (  # noqa: E402,F401
    bar,
    flat_lora,
    friendly_sam,
    gsam,
    looksam,
    mesa,
    momentum_sam,
    sam,
    schedules,
    switching,
)
