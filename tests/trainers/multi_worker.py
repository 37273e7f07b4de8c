"""One worker of the MultiWorkerMirroredStrategy test (test_multi_worker.py starts two).

    TF_CONFIG=... python tests/trainers/multi_worker.py OUT.npz

Trains the MLP of the test with the custom loop (`optimize` inside `strategy.run`) in
both perturbation modes, counts the collective ops of the traced step, then tries
Keras's `fit`, and writes what it got to OUT.npz. Each worker reads the first half (worker
0) or the second half (worker 1) of every global batch.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_sam  # noqa: E402

STRATEGY = None  # created first thing in main(), before any other TensorFlow op

GLOBAL_BATCH = 8
STEPS = 4
SEED = 0


def data():
    rng = np.random.default_rng(SEED)
    params = [
        rng.normal(size=(3, 5)) * 0.7,
        rng.normal(size=(5,)) * 0.1,
        rng.normal(size=(5, 2)) * 0.7,
        rng.normal(size=(2,)) * 0.1,
    ]
    x = rng.normal(size=(16, 3)).astype("float32")
    t = rng.normal(size=(16, 2)).astype("float32")
    return params, x, t


def mlp(params):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(2)]
    )
    model.set_weights([p.astype("float32") for p in params])
    return model


def distributed(dataset):
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return STRATEGY.experimental_distribute_dataset(dataset.with_options(options))


def custom_loop(mode, params, x, t):
    with STRATEGY.scope():
        model = mlp(params)
        optimizer = keras_sam.SAM(
            keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1, distributed_perturbation=mode
        )
        optimizer.build(model.trainable_variables)
    squared_error = keras.losses.MeanSquaredError(reduction=None)

    @tf.function
    def step(x_batch, t_batch):
        def replica_step(x_part, t_part):
            def grad_func():
                with tf.GradientTape() as tape:
                    pred = model(x_part, training=True)
                    loss = tf.nn.compute_average_loss(
                        squared_error(t_part, pred), global_batch_size=GLOBAL_BATCH
                    )
                return pred, loss, tape

            return optimizer.optimize(grad_func, model.trainable_variables)[1]

        return STRATEGY.run(replica_step, args=(x_batch, t_batch))

    dataset = distributed(tf.data.Dataset.from_tensor_slices((x, t)).batch(GLOBAL_BATCH))
    collectives = None
    for _ in range(STEPS // 2):
        for batch in dataset:
            if collectives is None:
                collectives = count_collectives(step.get_concrete_function(*batch))
            step(*batch)
    return model.get_weights(), int(optimizer.iterations.numpy()), collectives


def count_collectives(concrete_function):
    """The collective ops in a traced function, its nested functions (cond branches) included."""
    graph_def = concrete_function.graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    return sum(node.op.startswith("Collective") for node in nodes)


def try_fit(params, x, t):
    """Keras's own `fit` under the strategy: the weights, or the error it raised."""
    try:
        with STRATEGY.scope():
            sam_model = keras_sam.SAMModel(mlp(params), num_batch_splits=None)
            sam_model.compile(
                optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1),
                loss="mse",
            )
        dataset = tf.data.Dataset.from_tensor_slices((x, t)).batch(GLOBAL_BATCH)
        sam_model.fit(dataset, epochs=1, verbose=0)
        return "ok", sam_model.get_weights()
    except Exception as error:  # noqa: BLE001 - the outcome is what the test reads
        return f"{type(error).__name__}: {error}"[:2000], []


def main(out):
    global STRATEGY
    STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()  # reads TF_CONFIG
    params, x, t = data()
    results = {}
    for mode in ("per_replica", "synchronized"):
        weights, iterations, collectives = custom_loop(mode, params, x, t)
        for i, w in enumerate(weights):
            results[f"{mode}/{i}"] = w
        results[f"{mode}/iterations"] = np.array(iterations)
        results[f"{mode}/collectives"] = np.array(collectives)
    fit_outcome, fit_weights = try_fit(params, x, t)
    for i, w in enumerate(fit_weights):
        results[f"fit/{i}"] = w
    results["fit/outcome"] = np.array(fit_outcome)
    results["task"] = np.array(json.loads(os.environ["TF_CONFIG"])["task"]["index"])
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
