"""Time of a SAM step over a plain step, measured side by side.

A small CNN with Fashion-MNIST shapes (28x28x1 inputs, 10 classes, batch 128). Two
comparisons, each interleaved (plain, SAM, plain, SAM, ...) so that the machine's
drift hits both alike, and reported as the median of the per-round ratios:

1. the custom loop: a `tf.function` step with `tape.gradient` + `apply` against one
   with `SAM.optimize` (optionally both with `jit_compile=True`);
2. `fit`: a compiled plain model against `SAMModel` with `SAM`, one epoch per round.

The floor is about 2.0: SAM runs two forward-backward passes per step.

    python benchmarks/step_time.py [--rounds 15] [--steps 20] [--jit]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_sam  # noqa: E402


def cnn(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def custom_loop_steps(batch, jit):
    x, y = batch
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    plain_model, sam_model = cnn(), cnn()
    plain_opt = keras.optimizers.SGD(0.01, momentum=0.9)
    sam_opt = keras_sam.SAM(keras.optimizers.SGD(0.01, momentum=0.9), rho=0.05)

    @tf.function(jit_compile=jit)
    def plain_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, plain_model(x, training=True))
        variables = plain_model.trainable_variables
        plain_opt.apply(tape.gradient(loss, variables), variables)
        return loss

    @tf.function(jit_compile=jit)
    def sam_step():
        def grad_func():
            with tf.GradientTape() as tape:
                pred = sam_model(x, training=True)
                loss = loss_fn(y, pred)
            return pred, loss, tape

        return sam_opt.optimize(grad_func, sam_model.trainable_variables)[1]

    return plain_step, sam_step


def timed(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        result = step()
    float(result)  # wait for the last step
    return (time.perf_counter() - start) / steps


def compare_custom_loop(batch, rounds, steps, jit):
    plain_step, sam_step = custom_loop_steps(batch, jit)
    for _ in range(3):  # trace, compile and warm up
        plain_step(), sam_step()
    ratios, plain_times, sam_times = [], [], []
    for _ in range(rounds):
        p = timed(plain_step, steps)
        s = timed(sam_step, steps)
        plain_times.append(p)
        sam_times.append(s)
        ratios.append(s / p)
    return plain_times, sam_times, ratios


def compare_fit(x, y, rounds, batch_size):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # One cached pipeline for both, so that only the training steps differ.
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).cache()
    plain = cnn()
    plain.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss=loss)
    wrapped = keras_sam.SAMModel(cnn())
    wrapped.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.01, momentum=0.9), rho=0.05), loss=loss
    )
    for model in (plain, wrapped):  # the first epoch traces the step and fills the cache
        model.fit(data, epochs=1, verbose=0)
    ratios, plain_times, sam_times = [], [], []
    for _ in range(rounds):
        times = []
        for model in (plain, wrapped):
            start = time.perf_counter()
            model.fit(data, epochs=1, verbose=0, shuffle=False)
            times.append(time.perf_counter() - start)
        plain_times.append(times[0])
        sam_times.append(times[1])
        ratios.append(times[1] / times[0])
    return plain_times, sam_times, ratios


def report(name, plain_times, sam_times, ratios, unit):
    median = statistics.median
    print(
        f"| {name} | {median(plain_times) * 1e3:.1f} {unit} | {median(sam_times) * 1e3:.1f} {unit} "
        f"| **{median(ratios):.3f}** | {min(ratios):.3f} - {max(ratios):.3f} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--steps", type=int, default=20, help="steps per round (default 20)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--fit-batches", type=int, default=20, help="batches per fit epoch")
    parser.add_argument("--jit", action="store_true", help="also time jit_compile=True steps")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n = args.batch_size * args.fit_batches
    x = rng.uniform(size=(n, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, n)
    batch = (tf.constant(x[: args.batch_size]), tf.constant(y[: args.batch_size]))

    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores; "
        f"CNN on 28x28x1, batch {args.batch_size}; median of {args.rounds} interleaved rounds\n"
    )
    print("| comparison | plain | SAM | SAM / plain | range |")
    print("|---|---|---|---|---|")
    report(
        f"custom loop, tf.function ({args.steps} steps/round)",
        *compare_custom_loop(batch, args.rounds, args.steps, jit=False),
        unit="ms/step",
    )
    if args.jit:
        report(
            f"custom loop, jit_compile=True ({args.steps} steps/round)",
            *compare_custom_loop(batch, args.rounds, args.steps, jit=True),
            unit="ms/step",
        )
    report(
        f"fit, one epoch of {args.fit_batches} batches",
        *compare_fit(x, y, args.rounds, args.batch_size),
        unit="ms/epoch",
    )


if __name__ == "__main__":
    main()
