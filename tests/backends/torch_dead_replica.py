"""Run by test_torch_dead_replica.py, once per process of a 2-process `torch.distributed`
group (gloo, on localhost): `SAMModel.fit` with `BackupAndRestore`, on this process's
shard of each global batch. With `KILL_AT=epoch,batch`, process 1 SIGKILLs itself at the
start of that batch, as a preempted host or an out-of-memory kill would; the survivor's
next all-reduce then fails. Prints one JSON line at the end: the final weights (and,
with `ALSO_UNINTERRUPTED`, those of a second, uninterrupted run).
"""

import datetime
import json
import os
import signal
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import keras_sam  # noqa: E402
from tests.backends import torch_distribution as common  # noqa: E402

EPOCHS = 2
# How long a process waits in a collective for a peer that does not answer: the bound on
# the survivor's exit when the peer's death is not seen at once (gloo sees a closed
# connection at once; a host that vanishes without closing it takes this long).
TIMEOUT = datetime.timedelta(seconds=30)


class KillSelf(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch = (epoch, batch), None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    torch.distributed.init_process_group("gloo", timeout=TIMEOUT)
    rank = torch.distributed.get_rank()
    result = {"rank": rank, "weights": train(rank, os.environ["BACKUP"])}
    if os.environ.get("ALSO_UNINTERRUPTED"):
        # The reference, in the same processes (one start-up less): a fresh model, never
        # interrupted, with a backup folder of its own.
        result["uninterrupted"] = train(rank, os.environ["BACKUP"] + "_uninterrupted")
    torch.distributed.destroy_process_group()
    print(json.dumps(result))
    sys.stdout.flush()


def train(rank, backup):
    x, y = common.shard(common.X, rank), common.shard(common.Y, rank)
    keras.utils.set_random_seed(0)
    model = common.build(batch_norm=True)
    model.set_weights(common.initial_weights(batch_norm=True))
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.Adam(0.01), rho=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callbacks = [keras.callbacks.BackupAndRestore(os.path.join(backup, str(rank)))]
    kill_at = os.environ.get("KILL_AT")
    if kill_at and rank == 1:
        callbacks.append(KillSelf(*map(int, kill_at.split(","))))
    sam_model.fit(
        x,
        y,
        batch_size=common.GLOBAL_BATCH // common.PROCESSES // 2,  # 4 steps an epoch
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    return [np.asarray(w).tolist() for w in model.get_weights()]


if __name__ == "__main__":
    main()
