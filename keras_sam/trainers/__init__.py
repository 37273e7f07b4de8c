"""`SAMModel`, the `keras.Model` whose `fit` takes a SAM optimizer's steps, and the guard
that stops a run of skipped steps (`SkippedStepsGuard`, `SkippedStepsError`).

The step itself is written once, in the step (`keras_sam/step/`); what differs between
TensorFlow, JAX and PyTorch is the backend interface (`keras_sam/backends/`)."""
