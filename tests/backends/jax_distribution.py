"""Run in a subprocess by test_jax_distribution.py: SAMModel.fit under
`keras.distribution.DataParallel` on 2 host CPU devices, against one device.

Prints one JSON object: the final weights of each run, whether the devices hold the same
weights, and the all-reduces of each compiled step.
"""

import json
import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

rng = np.random.default_rng(0)
X = rng.normal(size=(32, 4)).astype("float32")
Y = rng.integers(0, 3, size=(32,))
keras.utils.set_random_seed(0)
INITIAL = keras.Sequential(
    [keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
).get_weights()


def run(mode, distributed, num_batch_splits=None, mesa=False):
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices()) if distributed else None
    )
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )
    model.set_weights(INITIAL)
    sam_model = keras_sam.SAMModel(model, num_batch_splits=num_batch_splits)
    sgd = keras.optimizers.SGD(0.1, momentum=0.9)
    if mesa:  # one pass a step, the KL term to the moving average
        optimizer = keras_sam.MESA(
            sgd, lmbda=0.5, temperature=2.0, decay=0.5, distributed_perturbation=mode
        )
    else:
        optimizer = keras_sam.SAM(sgd, rho=0.1, distributed_perturbation=mode)
    sam_model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    sam_model.fit(X, Y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    same_on_devices = all(
        all(
            np.array_equal(np.asarray(s.data), np.asarray(v.value.addressable_shards[0].data))
            for s in v.value.addressable_shards
        )
        for v in model.weights
    )
    state = tuple(
        [v.value for v in group]
        for group in (
            sam_model.trainable_variables,
            sam_model.non_trainable_variables,
            sam_model.optimizer.variables,
            sam_model.metrics_variables,
        )
    )
    data = (X[:16], Y[:16])
    if distributed:
        sharding = jax.sharding.NamedSharding(
            keras.distribution.distribution().device_mesh.backend_mesh,
            jax.sharding.PartitionSpec("batch"),
        )
        data = jax.device_put(data, sharding)
    hlo = jax.jit(sam_model.train_step).lower(state, data).compile().as_text()
    all_reduces = [
        line.split("=")[1].split("all-reduce(")[0].strip()
        for line in hlo.splitlines()
        if "all-reduce(" in line
    ]
    keras.distribution.set_distribution(None)
    return {
        "weights": [w.tolist() for w in model.get_weights()],
        "same_on_devices": same_on_devices,
        "all_reduces": all_reduces,
    }


print(
    json.dumps(
        {
            "one_device": run("synchronized", False),
            "one_device_two_parts": run("per_replica", False, num_batch_splits=2),
            "synchronized": run("synchronized", True),
            "per_replica": run("per_replica", True),
            "mesa_one_device_two_parts": run("per_replica", False, num_batch_splits=2, mesa=True),
            "mesa_per_replica": run("per_replica", True, mesa=True),
        }
    )
)
