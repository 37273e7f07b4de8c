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
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- worker
def worker(steps):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    import keras_sam

    sys.path.insert(0, HERE)
    from cnn import cnn

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    batch = 128
    x = rng.random((batch * steps, 28, 28, 1), dtype="float32")
    y = rng.integers(0, 10, batch * steps)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    class StepTimes(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    def fit_timer(sam):
        model = cnn()
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        if sam:
            model = keras_sam.SAMModel(model)
            optimizer = keras_sam.SAM(optimizer, rho=0.05)
        model.compile(optimizer=optimizer, loss=loss_fn)
        callback = StepTimes()

        def run():
            callback.times = []
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[callback])
            intervals = np.diff(callback.times)
            return float(np.median(intervals))

        run()  # compile and warm up
        return run

    def loop_timer(sam):
        model = cnn()
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        if sam:
            optimizer = keras_sam.SAM(optimizer, rho=0.05)
        optimizer.build(model.trainable_variables)
        xb, yb = keras.ops.convert_to_tensor(x[:batch]), keras.ops.convert_to_tensor(y[:batch])
        if backend == "tensorflow":
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

            def one():
                return train_step(xb, yb)

        elif backend == "torch":
            import torch_reference

            one = torch_reference.keras_loop_step(model, optimizer, loss_fn, xb, yb, sam)

        else:
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
                values, optimizer_values = optimizer.stateless_apply(
                    optimizer_values, grads, values
                )
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

        def run():
            keras.ops.convert_to_numpy(one())  # finish anything pending
            start = time.perf_counter()
            for _ in range(steps):
                loss = one()
            keras.ops.convert_to_numpy(loss)  # wait for the last step
            return (time.perf_counter() - start) / steps

        run()
        return run

    def bare_torch_timer(sam):
        import torch_reference

        model, one = torch_reference.steps(x[:batch], y[:batch], sam)
        assert torch_reference.parameter_count(model) == cnn().count_params()

        def run():
            one()
            start = time.perf_counter()
            for _ in range(steps):
                loss = one()
            float(loss)
            return (time.perf_counter() - start) / steps

        run()
        return run

    timers = {
        "fit_plain": fit_timer(False),
        "fit_sam": fit_timer(True),
        "loop_plain": loop_timer(False),
        "loop_sam": loop_timer(True),
    }
    if backend == "torch":  # the same CNN and SAM in bare PyTorch (torch_reference.py)
        timers |= {"bare_plain": bare_torch_timer(False), "bare_sam": bare_torch_timer(True)}
    print(json.dumps({"ready": backend}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        result = {name: timer() for name, timer in timers.items()}
        print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------ coordinator
def report_bare_torch(results):
    """keras-sam on PyTorch against the same CNN and SAM (davda54's) in bare PyTorch."""
    r = {k: [x[k] for x in results] for k in results[0]}

    def ratio(a, b):
        values = [x / y for x, y in zip(r[a], r[b])]
        return f"{statistics.median(values):.3f} ({min(values):.2f} - {max(values):.2f})"

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
            f"| {label} | {1e3 * statistics.median(r[plain]):.1f}"
            f" | {1e3 * statistics.median(r[sam]):.1f} | {ratio(sam, plain)}"
            f" | {over[0]} | {over[1]} |"
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
    workers = {}
    for backend in args.backends:
        env = dict(os.environ, KERAS_BACKEND=backend)
        workers[backend] = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--steps", str(args.steps)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
    for backend, process in workers.items():
        ready = json.loads(process.stdout.readline())
        assert ready == {"ready": backend}, ready
    rounds = {backend: [] for backend in workers}
    for _ in range(args.rounds):
        for backend, process in workers.items():
            process.stdin.write("round\n")
            process.stdin.flush()
            rounds[backend].append(json.loads(process.stdout.readline()))
    for process in workers.values():
        process.stdin.close()
        process.wait()

    def median(values):
        return statistics.median(values)

    print(f"CNN, batch 128, {args.steps} steps a timing, {args.rounds} interleaved rounds")
    print(
        f"{'backend':<11} {'fit plain':>10} {'fit SAM':>9} {'SAM/plain':>10}"
        f" {'loop plain':>11} {'loop SAM':>9} {'SAM/plain':>10}   (ms per step)"
    )
    for backend, results in rounds.items():
        r = {k: [x[k] for x in results] for k in results[0]}
        fit_plain, fit_sam = 1e3 * median(r["fit_plain"]), 1e3 * median(r["fit_sam"])
        print(
            f"{backend:<11} {fit_plain:>10.1f} {fit_sam:>9.1f}"
            f" {median([s / p for s, p in zip(r['fit_sam'], r['fit_plain'])]):>10.3f}"
            f" {1e3 * median(r['loop_plain']):>11.1f} {1e3 * median(r['loop_sam']):>9.1f}"
            f" {median([s / p for s, p in zip(r['loop_sam'], r['loop_plain'])]):>10.3f}"
        )
    if "torch" in rounds:
        report_bare_torch(rounds["torch"])
    if "tensorflow" in rounds and len(rounds) > 1:
        tf_fit = [x["fit_sam"] for x in rounds["tensorflow"]]
        for backend, results in rounds.items():
            if backend == "tensorflow":
                continue
            ratios = [x["fit_sam"] / t for x, t in zip(results, tf_fit)]
            print(
                f"SAM fit step, {backend} over tensorflow: {median(ratios):.3f}"
                f" (range {min(ratios):.3f} to {max(ratios):.3f})"
            )


if __name__ == "__main__":
    main()
