"""Run in a subprocess by test_jax_model_parallel.py: SAMModel.fit under
`keras.distribution.ModelParallel` (kernels sharded by a `LayoutMap`) on 2 and 4 host CPU
devices, against one device; and the compiled step's memory per device.

Prints one JSON object.
"""

import json
import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

rng = np.random.default_rng(0)
X = rng.normal(size=(32, 8)).astype("float32")
Y = rng.integers(0, 4, size=(32,))

METHODS = {
    "sam": (lambda: keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1), None),
    "asam": (
        lambda: keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.5, adaptive=True),
        None,
    ),
    "looksam": (lambda: keras_sam.LookSAM(keras.optimizers.SGD(0.1), rho=0.1, k=2), None),
    "momentum_sam": (lambda: keras_sam.MomentumSAM(keras.optimizers.SGD(0.1, momentum=0.9)), None),
    "sam_2_splits": (lambda: keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.1), 2),
}
# (data, model) axes of the device mesh; None: one device, no distribution.
MESHES = {"one_device": None, "2_devices": (1, 2), "4_devices": (2, 2), "4_model": (1, 4)}


def build(width=16, d_in=8, d_out=4):
    return keras.Sequential(
        [
            keras.Input((d_in,)),
            keras.layers.Dense(width, activation="tanh", name="hidden"),
            keras.layers.Dense(d_out, name="head"),
        ]
    )


keras.utils.set_random_seed(0)
INITIAL = build().get_weights()


def distribute(mesh):
    if mesh is None:
        keras.distribution.set_distribution(None)
        return
    data, model = mesh
    device_mesh = keras.distribution.DeviceMesh(
        shape=(data, model), axis_names=["data", "model"], devices=jax.devices()[: data * model]
    )
    layout_map = keras.distribution.LayoutMap(device_mesh)
    # Keys are regular expressions matched in full against `variable.path`.
    layout_map[".*hidden/kernel"] = (None, "model")
    layout_map[".*hidden/bias"] = ("model",)
    layout_map[".*head/kernel"] = ("model", None)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="data")
    )


def fit(method, mesh):
    make_optimizer, splits = METHODS[method]
    distribute(mesh)
    model = build()
    model.set_weights(INITIAL)
    sam_model = keras_sam.SAMModel(model, num_batch_splits=splits)
    sam_model.compile(
        optimizer=make_optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    sam_model.fit(X, Y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    kernel = model.get_layer("hidden").kernel.value
    result = {
        "weights": [w.tolist() for w in model.get_weights()],
        "kernel_spec": [str(axis) for axis in kernel.sharding.spec]
        if hasattr(kernel.sharding, "spec")
        else [],
        "kernel_shard_shape": list(kernel.addressable_shards[0].data.shape),
    }
    keras.distribution.set_distribution(None)
    return result


def compiled_step(mesh, sam, width):
    """Memory per device and collectives of the compiled train step of a wide MLP."""
    distribute(mesh)
    keras.utils.set_random_seed(0)
    model = build(width=width, d_in=256, d_out=256)
    if sam:
        trainer = keras_sam.SAMModel(model)
        optimizer = keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1)
    else:
        trainer = model
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    trainer.compile(optimizer=optimizer, loss="mse")
    x = np.zeros((16, 256), "float32")
    trainer.fit(x, x, batch_size=16, epochs=1, verbose=0)  # builds the optimizer's slots
    state = tuple(
        [v.value for v in group]
        for group in (
            trainer.trainable_variables,
            trainer.non_trainable_variables,
            trainer.optimizer.variables,
            trainer.metrics_variables,
        )
    )
    data = (x, x)
    if mesh is not None:
        sharding = jax.sharding.NamedSharding(
            keras.distribution.distribution().device_mesh.backend_mesh,
            jax.sharding.PartitionSpec("data"),
        )
        data = jax.device_put(data, sharding)
    compiled = jax.jit(trainer.train_step).lower(state, data).compile()
    memory = compiled.memory_analysis()
    hlo = compiled.as_text()
    gathers = [
        line.split("=")[1].strip()[:60] for line in hlo.splitlines() if "all-gather(" in line
    ]
    keras.distribution.set_distribution(None)
    parameters = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    return {
        "parameters": parameters,
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "all_gathers": gathers,
        "full_kernel_gathered": any(
            f"f32[256,{width}]" in g or f"f32[{width},256]" in g for g in gathers
        ),
    }


if __name__ == "__main__":
    out = {"fits": {}, "memory": {}}
    for method in METHODS:
        # Every method on one device and on 2 x 2 devices (data and model axes); SAM also
        # on 2 devices and on 4 along the model axis alone.
        names = MESHES if method == "sam" else ("one_device", "4_devices")
        out["fits"][method] = {name: fit(method, MESHES[name]) for name in names}
    for name, mesh in (("one_device", None), ("2_model", (1, 2)), ("4_model", (1, 4))):
        out["memory"][name] = {
            "plain": compiled_step(mesh, sam=False, width=1024),
            "sam": compiled_step(mesh, sam=True, width=1024),
        }
    print(json.dumps(out))
