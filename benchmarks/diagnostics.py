"""What the diagnostics cost: a Hessian-vector product against a gradient, and a 2-D landscape.

The `cnn` model of `keras_sam.models` (Fashion-MNIST shapes). Two measurements:

1. One Hessian-vector product over the data against one gradient over the same data,
   both as `keras_sam.diagnostics` runs them (compiled passes in batches), interleaved
   (gradient, HVP, gradient, HVP, ...) so that the machine's drift hits both alike;
   the median of the per-round ratios. The issue's bound is about 3.
2. `loss_landscape(dimensions=2)` on a 21 x 21 grid over 10,000 examples, timed once,
   next to one forward pass over the same examples (`model.predict`) for scale.

    python benchmarks/diagnostics.py [--rounds 9] [--examples 1024] [--landscape-examples 10000]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import timing  # noqa: E402

from keras_sam import diagnostics  # noqa: E402
from keras_sam.diagnostics import _engine  # noqa: E402
from keras_sam.models import build_model  # noqa: E402


def images(count, seed=0):
    """Fashion-MNIST test images and labels when installed, else uniform noise."""
    try:
        from keras_sam.datasets import fashion_mnist

        (_, _), (x, y) = fashion_mnist.load_data()
        source = "Fashion-MNIST test images"
    except (FileNotFoundError, OSError, ValueError):
        rng = np.random.default_rng(seed)
        x = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=count)
        source = "random images"
    x = (x[:count].astype("float32") / 255.0)[..., None]
    return x, y[:count].astype("int64"), source


def hvp_over_gradient(model, loss, x, y, batch_size, rounds, repeats):
    objective = diagnostics.Objective(
        model, tf.constant(x), tf.constant(y), loss=loss, batch_size=batch_size
    )
    passes = _engine.Passes(objective)
    weights = _engine.snapshot(passes.variables)
    rng = np.random.default_rng(0)
    vector = [rng.standard_normal(w.shape).astype("float32") for w in weights]

    def gradient():
        _, g = passes.loss_and_gradient(weights)
        return g

    def hvp():
        return passes.hessian_vector_product(weights, vector)

    def wait(result):
        np.asarray(result[0])  # wait for the last one

    timers = {
        "gradient": lambda: timing.per_step(gradient, repeats, wait=wait),
        "hvp": lambda: timing.per_step(hvp, repeats, wait=wait),
    }
    timing.warm_up(timers, 2)  # trace and warm up
    times = timing.interleave(timers, rounds)
    return times["gradient"], times["hvp"], timing.ratios(times["hvp"], times["gradient"])


def landscape_time(model, loss, x, y, batch_size, points):
    model.predict(x, batch_size=batch_size, verbose=0)  # trace and warm up
    predict_start = time.perf_counter()
    model.predict(x, batch_size=batch_size, verbose=0)
    predict = time.perf_counter() - predict_start
    start = time.perf_counter()
    result = diagnostics.loss_landscape(
        diagnostics.Objective(model, x, y, loss=loss, batch_size=batch_size),
        dimensions=2,
        coordinates=np.linspace(-1, 1, points),
        verbose=2,
    )
    seconds = time.perf_counter() - start
    return seconds, predict, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (9)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per round (3)")
    parser.add_argument("--examples", type=int, default=1024, help="examples per pass (1024)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (256)")
    parser.add_argument("--landscape-examples", type=int, default=10000)
    parser.add_argument("--landscape-batch-size", type=int, default=500)
    parser.add_argument("--grid", type=int, default=21, help="points per axis (21)")
    parser.add_argument("--skip-landscape", action="store_true")
    args = parser.parse_args()

    model = build_model("cnn", seed=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores; "
        f"cnn ({params:,} weights) on 28x28x1\n"
    )
    x, y, source = images(max(args.examples, args.landscape_examples))
    g, h, r = hvp_over_gradient(
        model, loss, x[: args.examples], y[: args.examples], args.batch_size, args.rounds,
        args.repeats,
    )  # fmt: skip
    median = statistics.median
    print(
        f"1. Over {args.examples:,} {source}, batch {args.batch_size}; median of {args.rounds} "
        "interleaved rounds:\n"
    )
    print("| pass | time | ratio to a gradient |")
    print("|---|---|---|")
    print(f"| gradient | {median(g) * 1e3:.0f} ms | 1 |")
    print(
        f"| Hessian-vector product | {median(h) * 1e3:.0f} ms | **{median(r):.2f}** "
        f"(range {min(r):.2f} - {max(r):.2f}) |\n"
    )
    if args.skip_landscape:
        return
    n = args.landscape_examples
    seconds, predict, result = landscape_time(
        model, loss, x[:n], y[:n], args.landscape_batch_size, args.grid
    )
    points = args.grid**2
    print(
        f"\n2. loss_landscape(dimensions=2), {args.grid} x {args.grid} = {points} points over "
        f"{n:,} {source}, batch {args.landscape_batch_size}: **{seconds:.0f} s** "
        f"({seconds / 60:.1f} min, {1e3 * seconds / points:.0f} ms a point); one "
        f"model.predict over the same examples: {1e3 * predict:.0f} ms. "
        f"Loss at the centre {result['loss'][args.grid // 2, args.grid // 2]:.4f}."
    )


if __name__ == "__main__":
    main()
