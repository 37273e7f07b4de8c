"""SAM and its variants: Keras optimizer wrappers that hold hyperparameters and state.

A method answers three questions per step, and never runs a model itself:
`needs_second_pass()`, `perturbation(gradients, variables)` and
`descent_gradients(gradients, perturbed_gradients, variables)`.
"""
