"""One training process of test_kill_resume.py, which SIGKILLs it and starts it again.

    python tests/trainers/kill_resume.py CASE BACKUP_DIR OUT.npz KILL_AT

CASE is the state to carry over, one or several joined by "+": `sam`; `looksam` (the
method's own state); `accumulation` (the accumulation sums, 4 micro-batches a step);
`mixed_float16` (the loss scale).

Trains a small dropout + BatchNorm model with `SAMModel.fit` for `EPOCHS` epochs under
`keras.callbacks.BackupAndRestore(BACKUP_DIR)` (a backup at every epoch's end). With
KILL_AT >= 0 the process SIGKILLs itself at the end of that global step (mid-epoch, so
the epoch in progress is lost and the restart must redo it from the last backup); with -1
it trains to the end (resuming from BACKUP_DIR if a backup is there) and writes every
variable of the model and the optimizer to OUT.npz.
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

EPOCHS = 3
BATCH = 16
EXAMPLES = 96  # 6 steps an epoch


def optimizer(case):
    parts = set(case.split("+"))
    unknown = parts - {"sam", "looksam", "accumulation", "mixed_float16"}
    if unknown:
        raise ValueError(case)
    inner = keras.optimizers.SGD(0.05, momentum=0.9)
    kwargs = {"gradient_accumulation_steps": 4} if "accumulation" in parts else {}
    if "mixed_float16" in parts:
        keras.mixed_precision.set_global_policy("mixed_float16")
    if "looksam" in parts:
        return keras_sam.LookSAM(inner, rho=0.1, k=2, **kwargs)
    return keras_sam.SAM(inner, rho=0.1, **kwargs)


def main(case, backup_dir, out, kill_at):
    keras.utils.set_random_seed(0)
    opt = optimizer(case)  # sets the policy before the model is built
    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, 6)).astype("float32")
    y = rng.integers(0, 3, EXAMPLES)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            # Unseeded, its masks come from a Keras seed generator, which SAMModel
            # checkpoints; except on PyTorch, where Keras draws an unseeded dropout mask
            # from torch's global generator, which no checkpoint holds (docs/reliability.md).
            keras.layers.Dropout(0.3, seed=3 if keras.backend.backend() == "torch" else None),
            keras.layers.Dense(3),
        ]
    )
    sam_model = keras_sam.SAMModel(model, num_batch_splits=2)
    sam_model.compile(
        optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )

    class Kill(keras.callbacks.Callback):
        step = 0

        def on_train_batch_end(self, batch, logs=None):
            if self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            self.step += 1

    kill = Kill()
    callbacks = [keras.callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False)]
    sam_model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=callbacks + [kill],
    )
    values = [np.asarray(v.numpy()) for v in sam_model.variables + sam_model.optimizer.variables]
    # The steps this process trained: fewer than EPOCHS epochs' when it resumed.
    np.savez(out, *values, steps_run=np.array(kill.step))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
