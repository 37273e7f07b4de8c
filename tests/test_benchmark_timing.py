"""benchmarks/timing.py, the benchmarks' timing harness: on a fake clock, what it times
(the calls it counts and those it does not), the order of interleaved rounds, the median of
the per-round ratios (not the ratio of the medians), the step-end callback's spans, and the
worker processes' protocol, with two tiny workers."""

import os
import textwrap

import pytest

from benchmarks import timing


class FakeClock:
    """A wall clock and a CPU clock that move only when told (`advance`)."""

    def __init__(self, monkeypatch):
        self.wall = self.cpu = 0.0
        monkeypatch.setattr(timing, "perf_counter", lambda: self.wall)
        monkeypatch.setattr(timing, "process_time", lambda: self.cpu)

    def advance(self, wall, cpu=0.0):
        self.wall += wall
        self.cpu += cpu


@pytest.fixture
def clock(monkeypatch):
    return FakeClock(monkeypatch)


def _steps(clock, durations, log=None):
    """A step that takes the next of `durations` (wall; half as much CPU), and logs itself."""
    durations = iter(durations)

    def step():
        seconds = next(durations)
        clock.advance(seconds, seconds / 2)
        if log is not None:
            log.append(seconds)
        return seconds

    return step


def test_per_step_times_its_steps_and_the_wait_only(clock):
    waited = []

    def wait(result):
        waited.append(result)
        clock.advance(0.5)  # the last step finishing on the device

    step = _steps(clock, [1.0, 2.0, 3.0, 100.0])
    assert timing.per_step(step, 3, wait=wait) == pytest.approx((1 + 2 + 3 + 0.5) / 3)
    assert waited == [3.0]  # the last result, once
    # `settle`: one step and its wait before the clock starts, not counted.
    step = _steps(clock, [100.0, 1.0, 3.0])
    wall, cpu = timing.per_step(step, 2, wait=lambda r: None, settle=True, cpu=True)
    assert (wall, cpu) == pytest.approx((2.0, 1.0))


def test_rounds_interleave_and_warm_up_is_not_timed(clock):
    log = []
    steps = {"plain": _steps(clock, [9, 9, 1, 1, 2, 2], log), "sam": _steps(clock, [9, 3, 7], log)}
    # The warm-up takes plain's first 9, then sam's 9 and plain's second; steps=2 for plain.
    timing.warm_up({"plain": steps["plain"]}, 1)
    timing.warm_up([steps["sam"], steps["plain"]], 1)
    seen = []
    samples = timing.interleave(
        {
            "plain": lambda: timing.per_step(steps["plain"], 2, wait=lambda r: None),
            "sam": lambda: timing.per_step(steps["sam"], 1, wait=lambda r: None),
        },
        rounds=2,
        after_round=lambda s: seen.append({k: list(v) for k, v in s.items()}),
    )
    assert log == [9, 9, 9, 1, 1, 3, 2, 2, 7]  # plain, sam, plain, sam after the warm-up
    assert samples == {"plain": [1.0, 2.0], "sam": [3.0, 7.0]}
    assert seen == [{"plain": [1.0], "sam": [3.0]}, samples]


def test_time_steps_warms_up_then_times_each_round(clock):
    steps = {"a": _steps(clock, [50, 50, 1, 3, 2, 2]), "b": _steps(clock, [50, 50, 4, 4, 6, 2])}
    times = timing.time_steps(steps, rounds=2, steps=2, warmup=2, wait=lambda r: None, cpu=True)
    assert timing.columns(times) == {"a": ([2.0, 2.0], [1.0, 1.0]), "b": ([4.0, 4.0], [2.0, 2.0])}


def test_the_ratio_is_the_median_of_the_rounds_ratios():
    plain, sam = [1.0, 2.0, 10.0], [2.0, 5.0, 11.0]
    # Per round: 2.0, 2.5, 1.1. The ratio of the medians would be 5 / 2 = 2.5.
    assert timing.ratios(sam, plain) == pytest.approx([2.0, 2.5, 1.1])
    assert timing.ratio(sam, plain) == pytest.approx(timing.Ratio(2.0, 1.1, 2.5))
    assert timing.ms([0.001, 0.003, 0.002]) == pytest.approx(2.0)


def test_step_clock_spans_an_epoch_from_its_first_step_end(clock):
    callback = timing.StepClock()
    callback.on_train_begin()
    for epoch, gaps in enumerate([[5.0, 1.0, 2.0, 3.0], [5.0, 2.0, 2.0, 8.0], [5.0]]):
        callback.on_epoch_begin(epoch)
        for batch, gap in enumerate(gaps):
            clock.advance(gap, gap / 4)
            callback.on_train_batch_end(batch, {"loss": 1.0})
    # Epoch 0: its first step (5 s, waiting for data) is not counted: (1 + 2 + 3) / 3.
    assert callback.span(0) == pytest.approx((2.0, 0.5))
    assert callback.median_interval(0) == pytest.approx(2.0)
    # Over the epochs after the first with two steps or more: epoch 1 only.
    assert callback.seconds_per_step() == pytest.approx(4.0)


WORKER = """
import os, sys
sys.path.insert(0, {benchmarks!r})
import timing

backend, log = os.environ["KERAS_BACKEND"], sys.argv[1]
counts = {{"plain": 0, "sam": 0}}

def timer(name):
    def run():
        counts[name] += 1
        with open(log, "a") as f:
            f.write(f"{{backend}} {{name}} {{counts[name]}}\\n")
        return counts[name] * (2 if name == "sam" else 1)
    return run

timing.serve({{"plain": timer("plain"), "sam": timer("sam")}}, {{"ready": backend}})
"""


def test_workers_interleave_their_rounds_across_backends(tmp_path):
    script = tmp_path / "worker.py"
    benchmarks = os.path.join(timing.ROOT, "benchmarks")
    script.write_text(textwrap.dedent(WORKER.format(benchmarks=benchmarks)))
    log = tmp_path / "log.txt"
    workers = timing.Workers(str(script), [str(log)], ["one", "two"])
    assert workers.ready == {"one": {"ready": "one"}, "two": {"ready": "two"}}
    samples = workers.rounds(2)
    assert samples == {b: [{"plain": 1, "sam": 2}, {"plain": 2, "sam": 4}] for b in ("one", "two")}
    order = [f"{b} {n} {r}" for r in (1, 2) for b in ("one", "two") for n in ("plain", "sam")]
    assert log.read_text().split("\n")[:-1] == order
    assert all(p.returncode == 0 for p in workers.processes.values())  # closed, exited
