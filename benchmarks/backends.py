"""SAM over plain on each Keras backend, and SAM on JAX against SAM on TensorFlow.

One worker process per backend (Keras picks its backend at import), each holding its
models compiled and warm; the rounds are interleaved across the workers (TensorFlow,
JAX, TensorFlow, JAX, ...) and, inside a worker, across its steps (plain, SAM, plain,
SAM), so that the machine's drift hits all alike. Reported: the median over rounds of
each ratio, and of the ms per step.

Each worker times, on the CNN of `step_time.py` (28x28x1 inputs, 10 classes, batch 128):
- `fit`: a plain compiled model against `SAMModel` with `SAM`, per step, from a callback's
  batch-end timestamps (so the tf.data autotuner's wait at an epoch's end is not counted);
- the custom loop, compiled where the backend compiles: TensorFlow's `tf.function`
  (`tape.gradient` + `apply` against `SAM.optimize`), JAX's `jax.jit` (`stateless_apply`
  against `stateless_optimize`); on PyTorch, eager (`loss.backward()` + `apply` against
  the closure form `SAM.optimize(closure, variables)`);
- on PyTorch also the same CNN in bare `torch.nn`, plain (`loss.backward()` + SGD) and
  with davda54's SAM optimizer (torch_reference.py), in the same rounds: keras-sam's
  steps over bare torch's.

    python benchmarks/backends.py [--backend tensorflow jax torch] [--rounds 9] [--steps 20]
"""

import argparse
import os
import sys

import timing

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 128


# ----------------------------------------------------------------------------- worker
def fit_timer(x, y, steps, sam):
    """Seconds per step of one `fit` epoch of the CNN (plain, or `SAMModel` with SAM): the
    median interval between the steps' ends."""
    import keras
    from cnn import cnn

    import keras_sam

    model = cnn()
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    if sam:
        model = keras_sam.SAMModel(model)
        optimizer = keras_sam.SAM(optimizer, rho=0.05)
    model.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    clock = timing.StepClock()

    def run():
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[clock])
        return clock.median_interval()

    run()  # compile and warm up
    return run


def tensorflow_loop_step(model, optimizer, loss_fn, xb, yb, sam):
    """The custom loop on TensorFlow, `tf.function(jit_compile=True)`: `tape.gradient` and
    `apply`, or `SAM.optimize`. Returns a callable -> the loss."""
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def train_step(xb, yb):
        def grad_func():
            with tf.GradientTape() as tape:
                pred = model(xb, training=True)
                loss = loss_fn(yb, pred)
            return pred, loss, tape

        if sam:
            return optimizer.optimize(grad_func, model.trainable_variables)[1]
        _, loss, tape = grad_func()
        optimizer.apply(tape.gradient(loss, model.trainable_variables))
        return loss

    return lambda: train_step(xb, yb)


def jax_loop_step(model, optimizer, loss_fn, xb, yb, sam):
    """The custom loop on JAX, `jax.jit`: `stateless_apply` or `stateless_optimize`, the
    state carried from step to step. Returns a callable -> the loss."""
    import jax

    trainable, non_trainable = model.trainable_variables, model.non_trainable_variables

    def compute_loss(values, non_trainable_values, xb, yb):
        pred, non_trainable_values = model.stateless_call(
            values, non_trainable_values, xb, training=True
        )
        return loss_fn(yb, pred), non_trainable_values

    @jax.jit
    def train_step(state, xb, yb):
        values, non_trainable_values, optimizer_values = state
        if sam:

            def compute():
                pred = model(xb, training=True)
                return pred, loss_fn(yb, pred)

            state, (_, loss, _) = optimizer.stateless_optimize(
                state, compute, trainable, non_trainable
            )
            return state, loss
        grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
        (loss, non_trainable_values), grads = grad_fn(values, non_trainable_values, xb, yb)
        values, optimizer_values = optimizer.stateless_apply(optimizer_values, grads, values)
        return (values, non_trainable_values, optimizer_values), loss

    holder = {
        "state": (
            [v.value for v in trainable],
            [v.value for v in non_trainable],
            [v.value for v in optimizer.variables],
        )
    }

    def one():
        holder["state"], loss = train_step(holder["state"], xb, yb)
        return loss

    return one


def loop_timer(x, y, steps, sam):
    """Seconds per step of the backend's custom loop over `steps` steps on one batch."""
    import keras
    from cnn import cnn

    import keras_sam

    model = cnn()
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    if sam:
        optimizer = keras_sam.SAM(optimizer, rho=0.05)
    optimizer.build(model.trainable_variables)
    xb, yb = keras.ops.convert_to_tensor(x[:BATCH]), keras.ops.convert_to_tensor(y[:BATCH])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if keras.backend.backend() == "torch":
        from torch_reference import keras_loop_step as loop_step
    elif keras.backend.backend() == "jax":
        loop_step = jax_loop_step
    else:
        loop_step = tensorflow_loop_step
    one = loop_step(model, optimizer, loss_fn, xb, yb, sam)

    def run():  # the first step finishes anything pending
        return timing.per_step(one, steps, wait=keras.ops.convert_to_numpy, settle=True)

    run()
    return run


def bare_torch_timer(x, y, steps, sam):
    """Seconds per step of the CNN in bare `torch.nn`, plain or davda54's SAM."""
    import torch_reference
    from cnn import cnn

    model, one = torch_reference.steps(x[:BATCH], y[:BATCH], sam)
    assert torch_reference.parameter_count(model) == cnn().count_params()

    def run():
        return timing.per_step(one, steps, settle=True)

    run()
    return run


def worker(steps):
    """Builds and warms this backend's timers, then serves rounds (`timing.serve`)."""
    import keras
    import numpy as np

    sys.path.insert(0, HERE)
    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.random((BATCH * steps, 28, 28, 1), dtype="float32")
    y = rng.integers(0, 10, BATCH * steps)
    timers = {
        "fit_plain": fit_timer(x, y, steps, False),
        "fit_sam": fit_timer(x, y, steps, True),
        "loop_plain": loop_timer(x, y, steps, False),
        "loop_sam": loop_timer(x, y, steps, True),
    }
    if backend == "torch":  # the same CNN and SAM in bare PyTorch (torch_reference.py)
        timers["bare_plain"] = bare_torch_timer(x, y, steps, False)
        timers["bare_sam"] = bare_torch_timer(x, y, steps, True)
    timing.serve(timers, {"ready": backend})


# ------------------------------------------------------------------------ coordinator
def report_bare_torch(results):
    """keras-sam on PyTorch against the same CNN and SAM (davda54's) in bare PyTorch."""
    r = timing.by_name(results)

    def ratio(a, b):
        over = timing.ratio(r[a], r[b])
        return f"{over.median:.3f} ({over.low:.2f} - {over.high:.2f})"

    print(
        "\nPyTorch: keras-sam against bare torch (torch.nn CNN, davda54 SAM), ms per step;"
        " ratios are medians (ranges) of the per-round ratios"
    )
    print("| step | plain | SAM | SAM / plain | plain over bare | SAM over bare |")
    print("|---|---|---|---|---|---|")
    for label, plain, sam in (
        ("bare torch (davda54 SAM)", "bare_plain", "bare_sam"),
        ("keras-sam `fit`", "fit_plain", "fit_sam"),
        ("keras-sam closure loop", "loop_plain", "loop_sam"),
    ):
        over = (
            ("1", "1")
            if plain == "bare_plain"
            else (ratio(plain, "bare_plain"), ratio(sam, "bare_sam"))
        )
        print(
            f"| {label} | {timing.ms(r[plain]):.1f}"
            f" | {timing.ms(r[sam]):.1f} | {ratio(sam, plain)}"
            f" | {over[0]} | {over[1]} |"
        )


def report(rounds, steps, count):
    """The table of every backend, then bare torch's, then each backend's SAM `fit` step
    over TensorFlow's."""
    print(f"CNN, batch 128, {steps} steps a timing, {count} interleaved rounds")
    print(
        f"{'backend':<11} {'fit plain':>10} {'fit SAM':>9} {'SAM/plain':>10}"
        f" {'loop plain':>11} {'loop SAM':>9} {'SAM/plain':>10}   (ms per step)"
    )
    for backend, results in rounds.items():
        r = timing.by_name(results)
        print(
            f"{backend:<11} {timing.ms(r['fit_plain']):>10.1f} {timing.ms(r['fit_sam']):>9.1f}"
            f" {timing.ratio(r['fit_sam'], r['fit_plain']).median:>10.3f}"
            f" {timing.ms(r['loop_plain']):>11.1f} {timing.ms(r['loop_sam']):>9.1f}"
            f" {timing.ratio(r['loop_sam'], r['loop_plain']).median:>10.3f}"
        )
    if "torch" in rounds:
        report_bare_torch(rounds["torch"])
    if "tensorflow" in rounds and len(rounds) > 1:
        tf_fit = timing.by_name(rounds["tensorflow"])["fit_sam"]
        for backend, results in rounds.items():
            if backend == "tensorflow":
                continue
            over = timing.ratio(timing.by_name(results)["fit_sam"], tf_fit)
            print(
                f"SAM fit step, {backend} over tensorflow: {over.median:.3f}"
                f" (range {over.low:.3f} to {over.high:.3f})"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        "--backends",
        dest="backends",
        nargs="+",
        default=["tensorflow", "jax", "torch"],
        choices=["tensorflow", "jax", "torch"],
        help="the backends to time, interleaved (default: all three)",
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.steps)
        return
    workers = timing.Workers(__file__, ["--worker", "--steps", str(args.steps)], args.backends)
    for backend, ready in workers.ready.items():
        assert ready == {"ready": backend}, ready
    report(workers.rounds(args.rounds), args.steps, args.rounds)


if __name__ == "__main__":
    main()
