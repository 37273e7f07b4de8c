"""The benchmarks' one timing harness: timed steps, interleaved rounds, per-round ratios.

Every timing script measures the same way, with these pieces:

- `per_step(step, steps)`: seconds per call of `step` over `steps` calls, waiting for the
  last result (a GPU, or a compiled graph, runs ahead of the host); with `cpu=True` also
  the process's CPU time (all threads), which a shared machine inflates much less;
- `warm_up(functions, times)` traces, compiles and warms each function in turn;
- `interleave(timers, rounds)`: each round calls every timer once, in order (plain, SAM,
  plain, SAM, ...), so that the machine's drift hits all alike; `time_steps` is the
  three together (warm-up, then rounds of `per_step` of each step);
- `ratio(values, baseline)`: the median, lowest and highest of the per-round ratios (a
  ratio is taken within a round, then summarized: never a ratio of two medians), and
  `by_name`, `columns` and `ms` to reshape and summarize the samples;
- `StepClock()`: a Keras callback that stamps each training step's end inside `fit`
  (wall and CPU), so that a step's time excludes what `fit` does around its epochs;
- `Workers` and `serve`: one worker process per Keras backend (Keras picks its backend
  at import), each holding its timers compiled and warm; the coordinator asks every
  worker for one round in turn, so that the rounds interleave across backends too;
- `peak_bytes()` and `device_name()`: what a worker reports besides its times.

This module imports no backend: a coordinator that only starts workers stays light. Its
clocks are the module's `perf_counter` and `process_time` (tests put a fake clock there).
"""

import json
import os
import resource
import statistics
import subprocess
import sys
from time import perf_counter, process_time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------ timed calls
def stopwatch(function):
    """`(wall seconds, CPU seconds)` of one call of `function`."""
    start, start_cpu = perf_counter(), process_time()
    function()
    return perf_counter() - start, process_time() - start_cpu


def per_step(step, steps, wait=float, settle=False, cpu=False):
    """Seconds per call of `step` over `steps` calls, `wait(result)` on the last result
    before the clock stops; `(wall, CPU)` with `cpu`. With `settle`, one untimed call
    (and its wait) first, so that nothing pending from before is counted."""
    if settle:
        wait(step())

    def run():
        for _ in range(steps):
            result = step()
        wait(result)

    wall, cpu_seconds = stopwatch(run)
    return (wall / steps, cpu_seconds / steps) if cpu else wall / steps


def warm_up(functions, times):
    """Calls each of `functions` (a dict or a sequence) in turn, `times` rounds of them."""
    functions = list(functions.values() if isinstance(functions, dict) else functions)
    for _ in range(times):
        for function in functions:
            function()


def interleave(timers, rounds, after_round=None):
    """`name -> [one result a round]`: each round calls every timer of `timers` (name ->
    callable) once, in their order; `after_round(samples)` sees the samples after each."""
    samples = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(timer())
        if after_round is not None:
            after_round(samples)
    return samples


def time_steps(steps_by_name, rounds, steps, warmup=3, **per_step_options):
    """`warm_up` each step `warmup` times, then `interleave` rounds of `per_step` of each
    (name -> [seconds per step, one a round]; `(wall, CPU)` pairs with `cpu=True`)."""
    warm_up(steps_by_name, warmup)
    timers = {
        name: (lambda s=step: per_step(s, steps, **per_step_options))
        for name, step in steps_by_name.items()
    }
    return interleave(timers, rounds)


# ---------------------------------------------------------------------------- summaries
def by_name(rounds):
    """`name -> [one value a round]` from rounds that each give `{name: value}` (what a
    worker answers to a round)."""
    return {name: [sample[name] for sample in rounds] for name in rounds[0]}


def columns(samples):
    """`name -> ([first of each round], [second of each round], ...)` from samples whose
    rounds each give a tuple (`per_step(..., cpu=True)`: wall, CPU)."""
    return {name: tuple(list(c) for c in zip(*rounds)) for name, rounds in samples.items()}


class Ratio(NamedTuple):
    """The median, lowest and highest of per-round ratios."""

    median: float
    low: float
    high: float


def ratios(values, baseline):
    """The per-round ratios `values[i] / baseline[i]`."""
    return [v / b for v, b in zip(values, baseline)]


def ratio(values, baseline):
    """`Ratio` of the per-round ratios of `values` over `baseline`."""
    per_round = ratios(values, baseline)
    return Ratio(statistics.median(per_round), min(per_round), max(per_round))


def ms(seconds):
    """The median of `seconds`, in milliseconds."""
    return 1e3 * statistics.median(seconds)


# ---------------------------------------------------------------------- step ends in fit
class StepClock:
    """A Keras callback (built when made, so that importing this module loads no backend):
    the wall and CPU time at each training step's end, per epoch, after reading the step's
    loss (which waits for the step: a GPU runs ahead of the host)."""

    def __new__(cls):
        import keras

        class Clock(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.epochs = []

            def on_epoch_begin(self, epoch, logs=None):
                self.epochs.append([])

            def on_train_batch_end(self, batch, logs=None):
                float(keras.ops.convert_to_numpy(logs["loss"]))
                self.epochs[-1].append((perf_counter(), process_time()))

            def span(self, epoch=-1):
                """`(wall, CPU)` seconds per step of an epoch, from its first step's end to
                its last's (the first step, which waits for the data, is not counted)."""
                ends = self.epochs[epoch]
                steps = len(ends) - 1
                return tuple((ends[-1][i] - ends[0][i]) / steps for i in (0, 1))

            def median_interval(self, epoch=-1):
                """The median wall time between consecutive step ends of an epoch."""
                ends = [wall for wall, _ in self.epochs[epoch]]
                return statistics.median(b - a for a, b in zip(ends, ends[1:]))

            def seconds_per_step(self):
                """The median over the epochs after the first of their wall `span` (None:
                no such epoch has two steps)."""
                later = range(1, len(self.epochs))
                spans = [self.span(i)[0] for i in later if len(self.epochs[i]) > 1]
                return statistics.median(spans) if spans else None

        return Clock()


# -------------------------------------------------------------------- worker processes
def worker_env(backend=None):
    """The environment of a benchmark's child process: this checkout's `keras_sam` first
    on the path, TensorFlow's C++ logging quiet, and `KERAS_BACKEND=backend` if given."""
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="3")
    if backend is not None:
        env["KERAS_BACKEND"] = backend
    return env


def serve(timers, ready):
    """A worker's loop: prints `ready` as a JSON line, then answers each `round` line on
    stdin with one JSON line, `{name: timer()}` for each of `timers` in order; stops at
    any other line or at the end of stdin."""
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        sample = interleave(timers, 1)
        print(json.dumps({name: values[0] for name, values in sample.items()}), flush=True)


class Workers:
    """One worker process per backend, each `python <script> <arguments>` under its
    `KERAS_BACKEND`, each ending in `serve`; `ready` holds each one's first line."""

    def __init__(self, script, arguments, backends):
        self.processes = {
            backend: subprocess.Popen(
                [sys.executable, script, *arguments],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=worker_env(backend),
            )
            for backend in backends
        }
        self.ready = {b: json.loads(p.stdout.readline()) for b, p in self.processes.items()}

    def one_round(self, backend):
        process = self.processes[backend]
        process.stdin.write("round\n")
        process.stdin.flush()
        return json.loads(process.stdout.readline())

    def rounds(self, rounds, after_round=None):
        """`backend -> [one sample a round]`, the rounds interleaved across the workers
        (then closed); `after_round(samples)` sees the samples so far after each round."""
        timers = {backend: lambda b=backend: self.one_round(b) for backend in self.processes}
        try:
            return interleave(timers, rounds, after_round)
        finally:
            for process in self.processes.values():
                process.stdin.close()
                process.wait()
                process.stdout.close()


# ---------------------------------------------------------------------- what a worker is
def device_name():
    """The accelerator Keras's backend runs on ("cpu" when none)."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if backend == "jax":
        import jax

        return jax.devices()[0].device_kind
    return "cpu"


def peak_bytes():
    """The device's peak allocation on a GPU, else the process's peak resident memory."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu":
            return device.memory_stats()["peak_bytes_in_use"]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
