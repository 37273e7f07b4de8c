"""Time of a SAM step over a plain step, measured side by side.

A small CNN with Fashion-MNIST shapes (28x28x1 inputs, 10 classes, batch 128). Two
comparisons, each interleaved (plain, SAM, plain, SAM, ...) so that the machine's
drift hits both alike, and reported as the median of the per-round ratios:

1. the custom loop: a `tf.function` step with `tape.gradient` + `apply` against one
   with `SAM.optimize` (optionally both with `jit_compile=True`);
2. `fit`: a compiled plain model against `SAMModel` with `SAM`, one epoch per round,
   over a cached `tf.data` pipeline with tf.data's autotuning off: with it on, each
   `fit` call waits at the end of its epoch for the autotuner's next tick (0.1 to 0.5 s
   of idle time after the last step), which quantized the epoch times.

Each time is reported as wall-clock time and as the process's CPU time (all threads),
which a machine shared with other jobs inflates much less.

The floor is about 2.0: SAM runs two forward-backward passes per step.

With `--keras2`, the `fit` comparison also times Keras 2 (the `tf_keras` package,
installed beside Keras 3: `pip install --no-deps tf_keras`) on the same CNN, data and
pipeline, plain and with its `SharpnessAwareMinimization` model, interleaved in the
same rounds: both libraries' SAM over their own plain `fit`, and keras-sam's SAM over
Keras 2's.

With `--methods`, a third comparison times every method's custom-loop step against the
plain step, all interleaved in each round: SAM, GSAM, Friendly-SAM, LookSAM (k=5),
SAM every 5 steps and AESAM (whose cost depends on the fraction of two-pass steps it
chooses, reported alongside), and the one-pass steps: MomentumSAM (goal: 1.05 or less
over plain) and late-phase SAM (`LatePhaseRho`) in an epoch before its start, where
`rho` is 0 (goal: 1.02 or less).

With `--distributed`, the custom-loop steps run under `tf.distribute.MirroredStrategy`
on two logical CPU devices (one global batch split between them): plain, SAM with
per-replica perturbation (the default) and SAM with synchronized perturbation. It also
counts the collective ops of each traced step (one `CollectiveReduceV2` per device for
each all-reduce): per-replica SAM all-reduces once, as the plain step does. On one
machine the two replicas share its cores, so the times show the overhead, not a speed-up.

With `--mixed-precision`, `fit` runs under `mixed_float16` (Keras wraps both
optimizers in a `LossScaleOptimizer`) and under float32: SAM over plain in each, and
mixed over float32 for each. On a CPU float16 is emulated and slower than float32.

With `--backend jax` (or `torch`, or several: `--backend tensorflow jax torch`), the
comparison runs on those Keras backends instead, one process each, interleaved across
them: `fit` and each backend's compiled custom loop, SAM over plain, and SAM's `fit` step
on each backend against TensorFlow's (benchmarks/backends.py). On PyTorch it also times
the same CNN in bare `torch.nn` with davda54's SAM loop and plain SGD, in the same rounds
(benchmarks/torch_reference.py; run that file to profile the steps).

    python benchmarks/step_time.py [--rounds 15] [--steps 20] [--jit] [--methods]
                                   [--distributed] [--mixed-precision] [--keras2]
    python benchmarks/step_time.py --backend jax [torch] [--rounds 9] [--steps 20]
    python benchmarks/step_time.py --regimes [--workloads cnn mlp transformer] [--memory]

With `--regimes`, SAM's cost in three regimes (the CNN, a weights-bound MLP, a
transformer language model) on every backend, against a bare two-pass SAM step, with
peak memory in parameter copies: benchmarks/regimes.py.
"""

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if __name__ == "__main__" and "--regimes" in sys.argv:
    # SAM's cost at three scales (CNN, weights-bound MLP, transformer) on every backend:
    # benchmarks/regimes.py, one worker process per backend.
    import regimes

    regimes.main([a for a in sys.argv[1:] if a != "--regimes"])
    sys.exit()

if __name__ == "__main__" and any(a == "--backend" or a.startswith("--backend=") for a in sys.argv):
    # The same comparison on other Keras backends: benchmarks/backends.py, one worker
    # process per backend (this process must not load TensorFlow for them).
    import backends

    backends.main(sys.argv[1:])
    sys.exit()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import timing  # noqa: E402
from cnn import cnn  # noqa: E402

import keras_sam  # noqa: E402


def plain_train_step(model, loss_fn, next_batch, jit):
    """A compiled plain step on `next_batch()`: `tape.gradient` and the optimizer's `apply`."""
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)

    @tf.function(jit_compile=jit)
    def step():
        x, y = next_batch()
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        variables = model.trainable_variables
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    return step


def sam_train_step(model, optimizer, loss_fn, next_batch, jit):
    """A compiled step on `next_batch()` through `optimizer.optimize` (SAM or a variant)."""

    def step():
        x, y = next_batch()

        def grad_func():
            with tf.GradientTape() as tape:
                pred = model(x, training=True)
                loss = loss_fn(y, pred)
            return pred, loss, tape

        return optimizer.optimize(grad_func, model.trainable_variables)[1]

    return tf.function(step, jit_compile=jit)


def custom_loop_steps(batch, jit):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    sam_opt = keras_sam.SAM(keras.optimizers.SGD(0.01, momentum=0.9), rho=0.05)
    plain_step = plain_train_step(cnn(), loss_fn, lambda: batch, jit)
    return plain_step, sam_train_step(cnn(), sam_opt, loss_fn, lambda: batch, jit)


METHODS = {
    "SAM": lambda inner: keras_sam.SAM(inner, rho=0.05),
    "GSAM (alpha=0.3)": lambda inner: keras_sam.GSAM(inner, rho=0.05, alpha=0.3),
    "FriendlySAM": lambda inner: keras_sam.FriendlySAM(inner, rho=0.05),
    "LookSAM (k=5)": lambda inner: keras_sam.LookSAM(inner, rho=0.05, k=5),
    "PeriodicSAM (k=5)": lambda inner: keras_sam.PeriodicSAM(inner, rho=0.05, k=5),
    "AESAM (margin=0)": lambda inner: keras_sam.AESAM(inner, rho=0.05),
    # One pass a step, at w - rho v / ||v||: goal 1.05 or less over plain.
    "MomentumSAM (rho=3)": lambda inner: keras_sam.MomentumSAM(inner, rho=3.0),
    # Late-phase SAM in an epoch before its start: rho 0, one pass; goal 1.02 or less.
    "late-phase SAM, before its start": lambda inner: keras_sam.SAM(
        inner, rho=keras_sam.LatePhaseRho(0.05, start_step=10**9)
    ),
    # The same one pass decided when the step is traced: what the step's transaction (the
    # finite check, the commit-or-skip) costs over plain, without the `tf.cond`.
    "SAM, rho=0": lambda inner: keras_sam.SAM(inner, rho=0.0),
}
# The goal over plain of the one-pass methods (issue 12).
GOALS = {"MomentumSAM (rho=3)": 1.05, "late-phase SAM, before its start": 1.02}


def method_steps(batches, jit):
    """One plain step and one step per method, each on its own copy of the CNN.

    Each step takes the next batch of `batches` (cycled), so that AESAM sees changing
    gradients, as in training.
    """
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    xs = tf.stack([b[0] for b in batches])
    ys = tf.stack([b[1] for b in batches])

    def batch_at(counter):
        i = counter.assign_add(1) % len(batches)
        return tf.gather(xs, i), tf.gather(ys, i)

    def cycled():
        counter = tf.Variable(-1, dtype=tf.int64)
        return lambda: batch_at(counter)

    steps = {"plain": plain_train_step(cnn(), loss_fn, cycled(), jit)}
    optimizers = {}
    for name, make in METHODS.items():
        optimizer = make(keras.optimizers.SGD(0.01, momentum=0.9))
        steps[name] = sam_train_step(cnn(), optimizer, loss_fn, cycled(), jit)
        optimizers[name] = optimizer
    return steps, optimizers


def compare_methods(batches, rounds, steps, jit):
    functions, optimizers = method_steps(batches, jit)
    timing.warm_up(functions, 3)  # trace, compile and warm up
    before = {
        name: float(opt.second_passes.numpy())
        for name, opt in optimizers.items()
        if opt.may_skip_second_pass
    }
    times = timing.time_steps(functions, rounds, steps, warmup=0)
    passes = {
        name: (float(optimizers[name].second_passes.numpy()) - count) / (rounds * steps)
        for name, count in before.items()
    }
    # MomentumSAM never takes a second pass, nor does SAM at rho=0.
    passes |= {
        n: 0.0
        for n, o in optimizers.items()
        if isinstance(o, keras_sam.MomentumSAM) or o.rho_is_positive() is False
    }
    return times, passes


def report_methods(times, passes, jit):
    plain = times["plain"]
    mode = "jit_compile=True" if jit else "tf.function"
    print(f"\nEvery method, custom loop, {mode}: time per step over the plain step")
    print("(median of the per-round ratios; all steps interleaved in each round)\n")
    print("| method | ms/step | over plain | range | over SAM | two-pass steps |")
    print("|---|---|---|---|---|---|")
    print(f"| plain | {timing.ms(plain):.1f} | 1 | | | 0 % |")
    for name, values in times.items():
        if name == "plain":
            continue
        over = timing.ratio(values, plain)
        over_sam = timing.ratio(values, times["SAM"]).median
        fraction = passes.get(name, 1.0)
        print(
            f"| {name} | {timing.ms(values):.1f} | **{over.median:.3f}** | "
            f"{over.low:.2f} - {over.high:.2f} | {over_sam:.3f} | {fraction:.0%} |"
        )
    for name, goal in GOALS.items():
        ratio = timing.ratio(times[name], plain).median
        verdict = "met" if ratio <= goal else "NOT met"
        print(f"\n{name} over plain: {ratio:.3f} (goal {goal:.2f} or less: {verdict})")


def compare_custom_loop(batch, rounds, steps, jit):
    """Wall-clock and CPU seconds per step, each as (plain, SAM) lists, one entry a round."""
    plain_step, sam_step = custom_loop_steps(batch, jit)
    functions = {"plain": plain_step, "SAM": sam_step}
    times = timing.columns(timing.time_steps(functions, rounds, steps, cpu=True))
    return tuple((times["plain"][i], times["SAM"][i]) for i in (0, 1))


def fit_dataset(x, y, batch_size):
    """One cached pipeline for every model, so that only the training steps differ; with
    tf.data's autotuning off, so that an epoch ends when its last step does."""
    options = tf.data.Options()
    options.autotune.enabled = False
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).cache()
    return data.with_options(options)


def fit_models(keras2=False):
    """name -> a compiled model: Keras 3 plain and keras-sam's SAM (and Keras 2's two)."""
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    plain = cnn()
    plain.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss=loss)
    wrapped = keras_sam.SAMModel(cnn())
    wrapped.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.01, momentum=0.9), rho=0.05), loss=loss
    )
    models = {"plain": plain, "SAM": wrapped}
    if keras2:
        import tf_keras

        def keras2_cnn():
            tf_keras.utils.set_random_seed(0)
            layers = tf_keras.layers
            return tf_keras.Sequential(
                [
                    tf_keras.Input((28, 28, 1)),
                    layers.Conv2D(32, 3, activation="relu"),
                    layers.MaxPooling2D(),
                    layers.Conv2D(64, 3, activation="relu"),
                    layers.MaxPooling2D(),
                    layers.Flatten(),
                    layers.Dense(128, activation="relu"),
                    layers.Dense(10),
                ]
            )

        loss2 = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        plain2 = keras2_cnn()
        plain2.compile(optimizer=tf_keras.optimizers.SGD(0.01, momentum=0.9), loss=loss2)
        sam2 = tf_keras.models.experimental.SharpnessAwareMinimization(keras2_cnn(), rho=0.05)
        sam2.compile(optimizer=tf_keras.optimizers.SGD(0.01, momentum=0.9), loss=loss2)
        models |= {"Keras 2 plain": plain2, "Keras 2 SAM": sam2}
    return models


def time_fit(x, y, rounds, batch_size, keras2=False):
    """name -> (wall seconds, CPU seconds) per round, each a one-epoch `fit`, interleaved."""
    data = fit_dataset(x, y, batch_size)
    epochs = {
        name: (lambda m=model: m.fit(data, epochs=1, verbose=0, shuffle=False))
        for name, model in fit_models(keras2).items()
    }
    timing.warm_up(epochs, 1)  # the first epoch traces the step and fills the cache
    timers = {name: (lambda e=epoch: timing.stopwatch(e)) for name, epoch in epochs.items()}
    return timing.columns(timing.interleave(timers, rounds))


def compare_fit(x, y, rounds, batch_size):
    """Plain and SAM wall times per round (for the mixed-precision table)."""
    times = time_fit(x, y, rounds, batch_size)
    return times["plain"][0], times["SAM"][0]


def report_fit(times, fit_batches):
    """The `fit` table: wall-clock and CPU time per epoch, each method over its own plain."""
    print(
        f"\n`fit`, one epoch of {fit_batches} batches (tf.data autotuning off), "
        "medians of the rounds; ratios are medians of the per-round ratios\n"
    )
    print("| fit | ms/epoch | CPU ms/epoch | over plain | range | CPU over plain | CPU range |")
    print("|---|---|---|---|---|---|---|")
    baselines = {"plain": "plain", "SAM": "plain"}
    baselines |= {"Keras 2 plain": "Keras 2 plain", "Keras 2 SAM": "Keras 2 plain"}
    labels = {"plain": "Keras 3 plain", "SAM": "keras-sam SAMModel + SAM"}
    labels["Keras 2 SAM"] = "Keras 2 SharpnessAwareMinimization"
    for name, (wall, cpu) in times.items():
        base_wall, base_cpu = times[baselines[name]]
        over, cpu_over = timing.ratio(wall, base_wall), timing.ratio(cpu, base_cpu)
        print(
            f"| {labels.get(name, name)} | {timing.ms(wall):.1f} | {timing.ms(cpu):.1f} "
            f"| **{over.median:.3f}** | {over.low:.3f} - {over.high:.3f} "
            f"| **{cpu_over.median:.3f}** | {cpu_over.low:.3f} - {cpu_over.high:.3f} |"
        )
    if "Keras 2 SAM" in times:
        wall = timing.ratio(times["SAM"][0], times["Keras 2 SAM"][0])
        cpu = timing.ratio(times["SAM"][1], times["Keras 2 SAM"][1])
        print(
            f"\nkeras-sam's SAM epoch over Keras 2's: {wall.median:.3f} wall-clock "
            f"(range {wall.low:.3f} - {wall.high:.3f}), {cpu.median:.3f} CPU "
            f"(range {cpu.low:.3f} - {cpu.high:.3f})"
        )


def count_collectives(concrete_function):
    """Collective ops in a traced function, its nested functions (cond branches) included."""
    graph_def = concrete_function.graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    return sum(node.op.startswith("Collective") for node in nodes)


def distributed_steps(strategy, batch):
    """Plain, per-replica SAM and synchronized SAM steps under `strategy`."""
    x, y = batch
    global_batch = int(x.shape[0])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    dataset = tf.data.Dataset.from_tensors((x, y))
    distributed = next(iter(strategy.experimental_distribute_dataset(dataset)))

    def average_loss(model, x_part, y_part):
        per_example = loss_fn(y_part, model(x_part, training=True))
        return tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)

    with strategy.scope():
        plain_model, plain_opt = cnn(), keras.optimizers.SGD(0.01, momentum=0.9)
        plain_opt.build(plain_model.trainable_variables)

    @tf.function
    def plain_step(x_batch, y_batch):
        def replica(x_part, y_part):
            with tf.GradientTape() as tape:
                loss = average_loss(plain_model, x_part, y_part)
            variables = plain_model.trainable_variables
            plain_opt.apply(tape.gradient(loss, variables), variables)
            return loss

        return strategy.reduce("SUM", strategy.run(replica, args=(x_batch, y_batch)), axis=None)

    steps = {"plain": plain_step}
    for mode in ("per_replica", "synchronized"):
        with strategy.scope():
            model = cnn()
            optimizer = keras_sam.SAM(
                keras.optimizers.SGD(0.01, momentum=0.9), rho=0.05, distributed_perturbation=mode
            )
            optimizer.build(model.trainable_variables)

        def sam_step(x_batch, y_batch, model=model, optimizer=optimizer):
            def replica(x_part, y_part):
                def grad_func():
                    with tf.GradientTape() as tape:
                        pred = model(x_part, training=True)
                        loss = average_loss(model, x_part, y_part)
                    return pred, loss, tape

                return optimizer.optimize(grad_func, model.trainable_variables)[1]

            losses = strategy.run(replica, args=(x_batch, y_batch))
            return strategy.reduce("SUM", losses, axis=None)

        steps[f"SAM, {mode}"] = tf.function(sam_step)
    collectives = {
        name: count_collectives(step.get_concrete_function(*distributed))
        for name, step in steps.items()
    }
    return {name: (lambda s=step: s(*distributed)) for name, step in steps.items()}, collectives


def compare_distributed(batch, rounds, steps):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")[:2]]
    strategy = tf.distribute.MirroredStrategy(devices)
    functions, collectives = distributed_steps(strategy, batch)
    return timing.time_steps(functions, rounds, steps), collectives


def report_distributed(times, collectives, batch_size):
    print(
        f"\nMirroredStrategy on 2 logical CPU devices, custom loop, global batch {batch_size}:"
        " time per step over the plain 2-replica step\n"
    )
    print("| step | ms/step | over plain | range | collective ops in the traced step |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        over = timing.ratio(values, times["plain"])
        print(
            f"| {name} | {timing.ms(values):.1f} | **{over.median:.3f}** | "
            f"{over.low:.2f} - {over.high:.2f} | {collectives[name]} |"
        )


def compare_mixed_precision(x, y, rounds, batch_size):
    results = {}
    for policy in ("float32", "mixed_float16"):
        keras.config.set_dtype_policy(policy)
        try:
            results[policy] = compare_fit(x, y, rounds, batch_size)
        finally:
            keras.config.set_dtype_policy("float32")
    return results


def report_mixed_precision(results, fit_batches):
    print(f"\n`fit`, one epoch of {fit_batches} batches, float32 and mixed_float16\n")
    print("| policy | plain | SAM | SAM / plain | range |")
    print("|---|---|---|---|---|")
    for policy, (plain_times, sam_times) in results.items():
        report(policy, plain_times, sam_times, unit="ms")
    mixed, single = results["mixed_float16"], results["float32"]
    median = statistics.median
    plain_ratio = median(mixed[0]) / median(single[0])
    sam_ratio = median(mixed[1]) / median(single[1])
    print(f"\nmixed_float16 over float32 (medians): plain {plain_ratio:.3f}, SAM {sam_ratio:.3f}")


def report(name, plain_times, sam_times, unit):
    """A row: the medians of plain and SAM, and SAM over plain (median of the rounds')."""
    over = timing.ratio(sam_times, plain_times)
    print(
        f"| {name} | {timing.ms(plain_times):.1f} {unit} | {timing.ms(sam_times):.1f} {unit} "
        f"| **{over.median:.3f}** | {over.low:.3f} - {over.high:.3f} |"
    )


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--steps", type=int, default=20, help="steps per round (default 20)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--fit-batches", type=int, default=20, help="batches per fit epoch")
    parser.add_argument("--jit", action="store_true", help="also time jit_compile=True steps")
    parser.add_argument("--methods", action="store_true", help="also time every SAM variant's step")
    parser.add_argument(
        "--only-methods", action="store_true", help="time only the variants (with --methods)"
    )
    parser.add_argument(
        "--distributed", action="store_true", help="2-replica SAM against 2-replica plain"
    )
    parser.add_argument(
        "--mixed-precision", action="store_true", help="fit under mixed_float16 and float32"
    )
    parser.add_argument(
        "--keras2",
        action="store_true",
        help="also time Keras 2's (tf_keras) plain and SAM fit in the same rounds",
    )
    parser.add_argument(
        "--only",
        action="store_true",
        help="with --distributed, --mixed-precision or --keras2: only those",
    )
    return parser.parse_args()


def main():
    args = parse_args()
    if args.distributed:  # before TensorFlow initializes its devices
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
        )

    rng = np.random.default_rng(0)
    n = args.batch_size * args.fit_batches
    x = rng.uniform(size=(n, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, n)
    batch = (tf.constant(x[: args.batch_size]), tf.constant(y[: args.batch_size]))

    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores; "
        f"CNN on 28x28x1, batch {args.batch_size}; median of {args.rounds} interleaved rounds\n"
    )
    if args.distributed:
        report_distributed(
            *compare_distributed(batch, args.rounds, args.steps), batch_size=args.batch_size
        )
    if args.mixed_precision:
        report_mixed_precision(
            compare_mixed_precision(x, y, args.rounds, args.batch_size), args.fit_batches
        )
    if args.only and args.keras2:
        report_fit(time_fit(x, y, args.rounds, args.batch_size, keras2=True), args.fit_batches)
    if args.only and (args.distributed or args.mixed_precision or args.keras2):
        return
    if args.methods:
        batches = [
            (tf.constant(x[i : i + args.batch_size]), tf.constant(y[i : i + args.batch_size]))
            for i in range(0, n - args.batch_size + 1, args.batch_size)
        ]
        report_methods(*compare_methods(batches, args.rounds, args.steps, jit=False), jit=False)
        if args.only_methods:
            return
        print()
    print("| comparison | plain | SAM | SAM / plain | range |")
    print("|---|---|---|---|---|")
    for jit in (False, True) if args.jit else (False,):
        wall, cpu = compare_custom_loop(batch, args.rounds, args.steps, jit=jit)
        mode = "jit_compile=True" if jit else "tf.function"
        report(f"custom loop, {mode} ({args.steps} steps/round)", *wall, unit="ms/step")
        report("same, CPU time", *cpu, unit="CPU ms/step")
    report_fit(time_fit(x, y, args.rounds, args.batch_size, keras2=args.keras2), args.fit_batches)


if __name__ == "__main__":
    main()
