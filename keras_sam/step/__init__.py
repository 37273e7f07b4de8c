"""The SAM step, written once for every backend.

A step runs, for each part of the batch (one part, or `num_batch_splits` parts for
m-sharpness): the clean pass at `w` (at a point the method chose beforehand, for a method
with an `initial_perturbation` such as MomentumSAM); the method's decision whether to
take the perturbed pass; the perturbed pass at `w + e`; the method's final gradient. It
then takes one decision for the whole step: when a loss or a gradient of any pass, or a
state update it would commit, is NaN or infinite, the step is skipped (nothing changes
but `skipped_steps` and, under loss scaling, the loss scale); otherwise the clean pass's
state updates (BatchNorm statistics, seeds) and the method's state are committed and the
wrapped optimizer steps (under gradient accumulation: the SAM gradient is added to the
sums, and the optimizer steps every k-th micro-batch). What the optimizer wrote (weights,
slots, sums) is checked in turn: if any of it is NaN or infinite, every variable is
restored from a copy taken before the commit and the step is skipped all the same.

Nothing is written to a variable before that decision. Both passes run inside a
`keras.StatelessScope` whose state mapping gives the trained variables as tensors: the
clean pass reads `w` and its state updates are recorded; the perturbed pass reads
`w + e` and its updates are dropped. So the weights are never perturbed in place, a pass
that raises leaves every variable as it was, BatchNorm statistics come from the clean
pass alone, and both passes see the same dropout masks.

What differs between backends is small and lives in `keras_sam/backends/`: how the
gradient of one pass is taken (tape, `jax.grad`, autograd), sparse gradients, how the
replicas of a distribution agree, and how the commit-or-skip decision is taken (a
`tf.cond` in the cross-replica context, a functional `lax.cond`, a Python `if`). They
subclass `keras_sam.backends.base.Backend`. The step is written with `keras.ops` and
never imports a backend.

The package, in the order its files import each other (one way):

- `records.py`: who does what (`Roles`, from `resolve`) and what the passes give the
  commit (`StepResult`, the one record from a part's passes to the commit);
- `passes.py`: a part's passes (`run_part`), the parts combined and the step's verdict
  (`compute_step`);
- `outcomes.py`: commit and apply, or skip (`finish`), accumulation, the checked take;
- `entry.py`: the entry points, `run_step` (the custom loops) and `model_step`
  (`SAMModel.train_step`), and `split_batch`, `check_variables`.
"""

from keras_sam.step.entry import check_variables, model_step, prepare_step, run_step, split_batch
from keras_sam.step.outcomes import finish
from keras_sam.step.passes import TAME_NORM, compute_step, run_part
from keras_sam.step.records import Roles, StepResult, resolve, stateless_run

__all__ = [
    "TAME_NORM",
    "Roles",
    "StepResult",
    "check_variables",
    "compute_step",
    "finish",
    "model_step",
    "prepare_step",
    "resolve",
    "run_part",
    "run_step",
    "split_batch",
    "stateless_run",
]
