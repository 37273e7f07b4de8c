"""Run by test_jax_multi_process.py: one of 2 JAX processes on localhost (CPU collectives
over gloo), `keras.distribution.initialize` then `DataParallel` across them, fitting SAM on
its half of each global batch; or (`--single`) the one-process run on the global batches.

Usage: jax_multi_process.py PORT PROCESS_ID NUM_PROCESSES OUT.json  |  --single OUT.json
Writes the final weights of a synchronized and a per-replica run (one process: with
`num_batch_splits=2`), and, for the processes, the device counts they saw, as JSON.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

GLOBAL_BATCH, STEPS, EPOCHS = 16, 2, 2


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 4)).astype("float32")
    y = rng.integers(0, 3, size=(GLOBAL_BATCH * STEPS,))
    return x, y


def local_part(array, process_id, num_processes):
    """This process's rows of every global batch: the global batch is the processes'
    local batches concatenated in process order."""
    local = GLOBAL_BATCH // num_processes
    starts = [step * GLOBAL_BATCH + process_id * local for step in range(STEPS)]
    return np.concatenate([array[s : s + local] for s in starts])


def fit(x, y, batch_size, mode, num_batch_splits=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )
    sam_model = keras_sam.SAMModel(model, num_batch_splits=num_batch_splits)
    sam_model.compile(
        optimizer=keras_sam.SAM(
            keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1, distributed_perturbation=mode
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    sam_model.fit(x, y, batch_size=batch_size, epochs=EPOCHS, shuffle=False, verbose=0)
    return [np.asarray(w).tolist() for w in model.get_weights()]


def main(argv):
    x, y = data()
    if argv[0] == "--single":
        out = {
            "synchronized": fit(x, y, GLOBAL_BATCH, "synchronized"),
            "per_replica": fit(x, y, GLOBAL_BATCH, "per_replica", num_batch_splits=2),
        }
        path = argv[1]
    else:
        port, process_id, num_processes, path = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
        keras.distribution.initialize(
            job_addresses=f"localhost:{port}",
            num_processes=num_processes,
            process_id=process_id,
        )
        devices = jax.devices()
        # Each process passes its own rows (`local_part`): no automatic sharding.
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
        )
        x_local = local_part(x, process_id, num_processes)
        y_local = local_part(y, process_id, num_processes)
        out = {"devices": len(devices), "local_devices": len(jax.local_devices())}
        for mode in ("synchronized", "per_replica"):
            out[mode] = fit(x_local, y_local, GLOBAL_BATCH // num_processes, mode)
    with open(path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1:])
