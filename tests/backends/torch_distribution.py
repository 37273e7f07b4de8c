"""Run by test_torch_distribution.py, once per process of a 2-process `torch.distributed`
group (gloo, on localhost; `MASTER_ADDR`, `MASTER_PORT`, `RANK` and `WORLD_SIZE` in the
environment): trains on this process's shard of each global batch and prints one JSON
object, the final weights and all-reduce counts of each run.

The test imports it too, for the data, the model and the one-process reference runs.
"""

import datetime
import json
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import keras_sam  # noqa: E402

PROCESSES = 2
GLOBAL_BATCH = 16
EPOCHS = 2
# The data: 2 global batches of 16; each process gets its half of every global batch.
_rng = np.random.default_rng(0)
X = _rng.normal(size=(32, 4)).astype("float32")
Y = _rng.integers(0, 3, size=(32,))
STEPS = EPOCHS * len(X) // GLOBAL_BATCH
# A NaN in process 1's part of the second global batch: the whole step is skipped.
X_NAN = X.copy()
X_NAN[GLOBAL_BATCH + GLOBAL_BATCH // PROCESSES + 3, 1] = np.nan


def initial_weights(batch_norm=False):
    keras.utils.set_random_seed(0)
    return build(batch_norm).get_weights()


def build(batch_norm=False):
    layers = [keras.Input((4,)), keras.layers.Dense(8, activation="tanh")]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization())
    return keras.Sequential(layers + [keras.layers.Dense(3)])


def optimizer(mode, accumulation=None):
    return keras_sam.SAM(
        keras.optimizers.SGD(0.1, momentum=0.9),
        rho=0.1,
        distributed_perturbation=mode,
        gradient_accumulation_steps=accumulation,
    )


def shard(array, rank):
    """Process `rank`'s part of every global batch, in order."""
    per_process = GLOBAL_BATCH // PROCESSES
    batches = array.reshape((-1, PROCESSES, per_process) + array.shape[1:])
    return batches[:, rank].reshape((-1,) + array.shape[1:])


def fit(
    mode,
    x,
    y,
    batch_size,
    num_batch_splits=None,
    batch_norm=False,
    accumulation=None,
    policy="float32",
):
    """`SAMModel.fit`; returns the model and the SAM optimizer."""
    initial = initial_weights(batch_norm)
    keras.config.set_dtype_policy(policy)
    try:
        model = build(batch_norm)
        model.set_weights(initial)
        sam_model = keras_sam.SAMModel(model, num_batch_splits=num_batch_splits)
        sam_model.compile(
            optimizer=optimizer(mode, accumulation),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        sam_model.fit(x, y, batch_size=batch_size, epochs=EPOCHS, shuffle=False, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    opt = sam_model.optimizer
    if isinstance(opt, keras.optimizers.LossScaleOptimizer):  # mixed_float16
        opt = opt.inner_optimizer
    return model, opt


def closure_loop(mode, x, y, batch_size):
    """The closure custom loop over the same batches as `fit`."""
    model = build()
    model.set_weights(initial_weights())
    opt = optimizer(mode)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for _ in range(EPOCHS):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]

            def closure(xb=xb, yb=yb):
                pred = model(xb, training=True)
                return pred, loss_fn(yb, pred)

            opt.optimize(closure, model.trainable_variables)
    return model, opt


def fit_under_data_parallel(x, y, batch_size):
    """`fit` with `keras.distribution.DataParallel` set: on PyTorch, Keras 3.15 accepts it
    (with the devices given) and changes nothing; the processes do the work."""
    devices = [f"cpu:{i}" for i in range(PROCESSES)]
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    try:
        return fit("per_replica", x, y, batch_size)
    finally:
        keras.distribution.set_distribution(None)


def summary(model, opt, all_reduces=None):
    return {
        "weights": [w.tolist() for w in model.get_weights()],
        "iterations": int(keras.ops.convert_to_numpy(opt.iterations)),
        "skipped_steps": int(keras.ops.convert_to_numpy(opt.skipped_steps)),
        "all_reduces": all_reduces,
    }


def main():
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = torch.distributed.get_rank()
    assert torch.distributed.get_world_size() == PROCESSES

    # Every collective the step calls goes through `torch.distributed.all_reduce`.
    calls = []
    all_reduce = torch.distributed.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(list(tensor.shape))
        return all_reduce(tensor, *args, **kwargs)

    torch.distributed.all_reduce = counted
    x, y, x_nan = shard(X, rank), shard(Y, rank), shard(X_NAN, rank)
    batch = GLOBAL_BATCH // PROCESSES
    runs = {
        "fit_per_replica": lambda: fit("per_replica", x, y, batch),
        "fit_synchronized": lambda: fit("synchronized", x, y, batch),
        "loop_per_replica": lambda: closure_loop("per_replica", x, y, batch),
        "loop_synchronized": lambda: closure_loop("synchronized", x, y, batch),
        "fit_nan": lambda: fit("per_replica", x_nan, y, batch),
        "fit_batch_norm": lambda: fit("per_replica", x, y, batch, batch_norm=True),
        "fit_data_parallel": lambda: fit_under_data_parallel(x, y, batch),
        "fit_accumulation": lambda: fit("per_replica", x, y, batch, accumulation=2),
        "fit_mixed_float16": lambda: fit("per_replica", x, y, batch, policy="mixed_float16"),
    }
    results = {}
    for name, run in runs.items():
        calls.clear()
        model, opt = run()
        results[name] = summary(model, opt, list(calls))
    torch.distributed.all_reduce = all_reduce
    torch.distributed.destroy_process_group()
    print(json.dumps({"rank": rank, "runs": results}))


if __name__ == "__main__":
    main()
