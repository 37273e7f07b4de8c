"""SAM's cost in three regimes, on every backend: time per step and peak memory.

Three workloads, each timed with `fit` on every Keras backend, one worker process per
backend, the rounds interleaved across backends and, inside a worker, across methods
(plain, SAM, LookSAM, MomentumSAM, bare, plain, ...), so that the machine's drift hits
all alike:

- `cnn`: the benchmarks' CNN (225k parameters), batch 128, SGD with momentum:
  compute-bound, the two forward-backward passes set the step's time;
- `mlp`: 1024 -> 4 x Dense(4096) -> 10 (54.6M parameters), batch 8, SGD with momentum:
  weights-bound, every pass over the parameters counts;
- `transformer`: a GPT-style causal language model (16.9M parameters: vocabulary 8192,
  6 blocks of width 384, 6 heads), batch 4 x 64 tokens, AdamW: the fine-tuning regime;
- `overhead`: 256 -> 8 x Dense(256) -> 10 (0.53M parameters, 18 weight tensors), batch
  32, SGD with momentum: bound by the number of operations a step dispatches, as most
  steps of small and medium models on an accelerator are (kernel launches).

Methods: plain `fit`; `SAMModel` with SAM (rho 0.05), LookSAM (k=5) and MomentumSAM;
and "bare": a two-pass SAM step written by hand on the same Keras model, as a user
would write it in 30 lines (`bare_sam.py`: gradient, `e = rho g / ||g||`, `w += e`,
gradient, `w -= e`, apply; no checks), run by the same `fit`. Reported: the median
over rounds of each method's time over plain `fit`'s (wall clock, and the process's
CPU time), and SAM's time over bare's.

With `--memory`, the peak memory of one `fit` epoch over plain `fit`'s, in copies of
the parameters, for SAM and bare, with SGD (momentum) and with Adam, on the MLP: each
in a fresh process; on a CPU the process's peak resident memory (`ru_maxrss`), on a GPU
the device's peak allocation (`torch.cuda.max_memory_allocated`, JAX's
`peak_bytes_in_use`).

The same command runs on a GPU when the backend sees one (PyTorch CUDA, JAX GPU); it
needs only Keras, NumPy and the backends. `--dtype bfloat16` trains under Keras's
`mixed_bfloat16` policy. `--jit-compile` compiles every method's step with
`jit_compile=True` (XLA on TensorFlow and JAX, the default there; `torch.compile` on
PyTorch, whose first step then takes minutes on a CPU).

    python benchmarks/regimes.py [--workloads cnn mlp transformer]
        [--backends tensorflow jax torch] [--rounds 5] [--steps 4] [--dtype float32]
        [--memory] [--jit-compile] [--json results.json]
    python benchmarks/step_time.py --regimes ...      (the same)
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys

import timing
from timing import peak_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = ("cnn", "mlp", "transformer", "overhead")
METHODS = ("plain", "SAM", "LookSAM k=5", "MomentumSAM", "bare")


# ---------------------------------------------------------------------- workloads
def workload(name, steps, seed=0):
    """`(model, x, y, batch_size, make_optimizer, loss)` for `steps` batches."""
    import keras
    import numpy as np

    sys.path.insert(0, HERE)
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    xent = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if name == "cnn":
        from cnn import cnn

        batch = 128
        x = rng.random((batch * steps, 28, 28, 1), dtype="float32")
        y = rng.integers(0, 10, batch * steps)
        return cnn(seed), x, y, batch, _sgd, xent
    if name == "mlp":
        return (*_mlp(rng, steps, inputs=1024, width=4096, depth=4, batch=8), _sgd, xent)
    if name == "overhead":
        return (*_mlp(rng, steps, inputs=256, width=256, depth=8, batch=32), _sgd, xent)
    if name == "transformer":
        batch, length, vocabulary = 4, 64, 8192
        model = transformer_lm(vocabulary, length, width=384, depth=6, heads=6)
        tokens = rng.integers(0, vocabulary, (batch * steps, length + 1))
        return model, tokens[:, :-1], tokens[:, 1:], batch, _adamw, xent
    raise ValueError(f"unknown workload {name!r}")


def _mlp(rng, steps, inputs, width, depth, batch):
    """`(model, x, y, batch)`: `inputs -> depth x Dense(width) -> 10` and random data."""
    import keras

    layers = [keras.Input((inputs,))]
    layers += [keras.layers.Dense(width, activation="relu") for _ in range(depth)]
    model = keras.Sequential(layers + [keras.layers.Dense(10)])
    x = rng.random((batch * steps, inputs), dtype="float32")
    return model, x, rng.integers(0, 10, batch * steps), batch


def _sgd():
    import keras

    return keras.optimizers.SGD(0.01, momentum=0.9)


def _adamw():
    import keras

    return keras.optimizers.AdamW(1e-4, weight_decay=0.01)


def transformer_lm(vocabulary, length, width, depth, heads):
    """A GPT-style causal language model in Keras layers: token and position
    embeddings, `depth` pre-norm blocks (causal self-attention, a 4x MLP), logits."""
    import keras
    from keras import layers

    class Positions(layers.Layer):
        """A learned embedding of each token's position (computed in the call, so that
        no tensor of one step's graph is kept for the next)."""

        def __init__(self):
            super().__init__()
            self.embedding = layers.Embedding(length, width)

        def call(self, tokens):
            return self.embedding(keras.ops.arange(keras.ops.shape(tokens)[1]))

    tokens = keras.Input((length,), dtype="int32")
    h = layers.Embedding(vocabulary, width)(tokens) + Positions()(tokens)
    for _ in range(depth):
        a = layers.LayerNormalization(epsilon=1e-5)(h)
        a = layers.MultiHeadAttention(heads, width // heads)(a, a, use_causal_mask=True)
        h = h + a
        m = layers.LayerNormalization(epsilon=1e-5)(h)
        m = layers.Dense(4 * width, activation="gelu")(m)
        h = h + layers.Dense(width)(m)
    h = layers.LayerNormalization(epsilon=1e-5)(h)
    return keras.Model(tokens, layers.Dense(vocabulary)(h))


def compiled(name, method, steps, make_optimizer=None, jit_compile=False):
    """The model of workload `name` compiled for `method`; returns it, x, y, batch."""

    import keras_sam

    sys.path.insert(0, HERE)
    from bare_sam import BareSAM

    model, x, y, batch, default_optimizer, loss = workload(name, steps)
    inner = (make_optimizer or default_optimizer)()
    if method == "plain":
        trained, optimizer = model, inner
    elif method == "bare":
        trained, optimizer = BareSAM(model, rho=0.05), inner
    else:
        trained = keras_sam.SAMModel(model)
        optimizer = {
            "SAM": lambda: keras_sam.SAM(inner, rho=0.05),
            "LookSAM k=5": lambda: keras_sam.LookSAM(inner, rho=0.05, k=5),
            "MomentumSAM": lambda: keras_sam.MomentumSAM(inner, rho=1.0),
        }[method]()
    trained.compile(
        optimizer=optimizer, loss=loss, **({"jit_compile": True} if jit_compile else {})
    )
    return trained, model, x, y, batch


# ------------------------------------------------------------------------- worker
def fit_timer(name, method, steps, jit_compile=False):
    """`(wall, CPU)` seconds per step of one `fit` epoch of `method` on workload `name`,
    from the end of its first step to the end of its last (the first waits for data)."""
    trained, _, x, y, batch = compiled(name, method, steps + 1, jit_compile=jit_compile)
    clock = timing.StepClock()

    def run():
        trained.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[clock])
        return clock.span()

    run()  # compiles
    return run


def worker(workloads, steps, jit_compile=False):
    import keras

    timers = {f"{w}|{m}": fit_timer(w, m, steps, jit_compile) for w in workloads for m in METHODS}
    ready = {"ready": keras.backend.backend(), "device": timing.device_name()}
    timing.serve(timers, ready)


# ------------------------------------------------------------------------- memory
def memory_worker(workload_name, method, optimizer_name, steps):
    """Prints the peak memory of `fit` of one method, and the parameters' bytes."""
    import keras
    import numpy as np

    make = {"sgd": _sgd, "adam": lambda: keras.optimizers.Adam(1e-4)}[optimizer_name]
    trained, model, x, y, batch = compiled(workload_name, method, steps, make)
    trained.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    # A copy of the parameters: float32 (the variables' dtype, also under mixed_bfloat16).
    parameter_bytes = 4 * sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    print(json.dumps({"peak": peak_bytes(), "parameter_bytes": parameter_bytes}), flush=True)


def measure_memory(backends, steps, dtype, jobs=1):
    """Peak over plain, in parameter copies: SAM and bare, SGD and Adam, on the MLP.

    Each measurement is a fresh process; `jobs` of them run at once (a GPU's peak is per
    process, so they may share it; on a small CPU machine keep 1)."""
    runs = [
        (backend, optimizer, method)
        for backend in backends
        for optimizer in ("sgd", "adam")
        for method in ("plain", "SAM", "bare")
    ]

    def measure(run):
        backend, optimizer, method = run
        command = [
            sys.executable,
            __file__,
            "--memory-worker",
            "mlp",
            method,
            optimizer,
            "--steps",
            str(steps),
            "--dtype",
            dtype,
        ]
        env = timing.worker_env(backend)
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        peaks = dict(zip(runs, pool.map(measure, runs)))
    results = {}
    for backend in backends:
        for optimizer in ("sgd", "adam"):
            plain = peaks[(backend, optimizer, "plain")]
            copies = {
                m: (peaks[(backend, optimizer, m)]["peak"] - plain["peak"])
                / plain["parameter_bytes"]
                for m in ("SAM", "bare")
            }
            results[f"{backend}|{optimizer}"] = copies
            print(
                f"{backend:<11} {optimizer:<5} peak over plain fit, in parameter copies:"
                f" SAM {copies['SAM']:.2f}, bare {copies['bare']:.2f}",
                flush=True,
            )
    return results


# -------------------------------------------------------------------- coordinator
def time_regimes(backends, workloads, rounds, steps, dtype, after_round=None, jit_compile=False):
    """Runs the interleaved rounds; `after_round(devices, samples)` sees the samples so
    far after each (so that a run cut short still leaves its finished rounds)."""
    arguments = ["--worker", "--steps", str(steps), "--dtype", dtype, "--workloads", *workloads]
    workers = timing.Workers(__file__, arguments + ["--jit-compile"] * jit_compile, backends)
    devices = {backend: ready["device"] for backend, ready in workers.ready.items()}

    def each_round(samples):
        if after_round is not None:
            after_round(devices, samples)

    return devices, workers.rounds(rounds, each_round)


def summarize(samples, workloads):
    """Per backend and workload: ms per plain step, each method over plain (wall, CPU),
    and SAM over bare (wall)."""
    table = {}
    for backend, rounds in samples.items():
        series = timing.columns(timing.by_name(rounds))  # "w|m" -> ([wall], [CPU])
        for w in workloads:

            def times(method, which):
                return series[f"{w}|{method}"][which]

            def ratio(a, b, which):
                return timing.ratio(times(a, which), times(b, which)).median

            row = {"plain_ms": 1e3 * statistics.median(times("plain", 0))}
            for m in METHODS[1:]:
                row[m] = (ratio(m, "plain", 0), ratio(m, "plain", 1))
            row["SAM / bare"] = (ratio("SAM", "bare", 0), ratio("SAM", "bare", 1))
            # The time SAM adds over plain, over the time the bare step adds.
            row["added / bare added"] = tuple(
                statistics.median(
                    (s - p) / (b - p)
                    for s, b, p in zip(times("SAM", i), times("bare", i), times("plain", i))
                )
                for i in (0, 1)
            )
            table[f"{backend}|{w}"] = row
    return table


def print_table(table, devices, rounds, steps, dtype):
    print(
        f"\n{rounds} interleaved rounds of {steps} steps, {dtype}; devices: "
        + ", ".join(f"{b} {d}" for b, d in devices.items())
    )
    print("Time over plain `fit`, median of the per-round ratios, wall (CPU):\n")
    print(
        "| backend | workload | plain ms/step | SAM | LookSAM k=5 | MomentumSAM | bare SAM |"
        " SAM / bare | SAM adds / bare adds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key, row in table.items():
        backend, w = key.split("|")
        cells = [
            f"{row[m][0]:.2f} ({row[m][1]:.2f})"
            for m in (
                "SAM",
                "LookSAM k=5",
                "MomentumSAM",
                "bare",
                "SAM / bare",
                "added / bare added",
            )
        ]
        print(f"| {backend} | {w} | {row['plain_ms']:.1f} | " + " | ".join(cells) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["tensorflow", "jax", "torch"],
        choices=["tensorflow", "jax", "torch"],
    )
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps a round")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--memory", action="store_true", help="also the peak-memory table")
    parser.add_argument("--no-timing", action="store_true", help="only the memory table")
    parser.add_argument("--jobs", type=int, default=1, help="memory processes at once")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument(
        "--jit-compile",
        action="store_true",
        help="compile every step with jit_compile=True (on PyTorch: torch.compile)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dtype == "bfloat16" and (args.worker or args.memory_worker):
        import keras

        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    if args.worker:
        return worker(args.workloads, args.steps, args.jit_compile)
    if args.memory_worker:
        return memory_worker(*args.memory_worker, args.steps)
    results = {"dtype": args.dtype, "rounds": args.rounds, "steps": args.steps}

    def save(results):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    def after_round(devices, samples):
        table = summarize(samples, args.workloads)
        results.update(devices=devices, samples=samples, table=table)
        save(results)

    if not args.no_timing:
        devices, samples = time_regimes(
            args.backends,
            args.workloads,
            args.rounds,
            args.steps,
            args.dtype,
            after_round,
            jit_compile=args.jit_compile,
        )
        print_table(results["table"], devices, args.rounds, args.steps, args.dtype)
    if args.memory or args.no_timing:
        print("\nPeak memory of `fit` over plain `fit`, MLP (54.6M parameters), batch 8:")
        results["memory"] = measure_memory(args.backends, args.steps, args.dtype, args.jobs)
        save(results)


if __name__ == "__main__":
    main()
