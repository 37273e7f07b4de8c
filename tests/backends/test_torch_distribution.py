"""Data parallel on PyTorch: 2 `torch.distributed` processes (gloo, on localhost), each
training on its own shard of every global batch, against one process on the global batch.

The processes are started by the test and ended by it (a timeout kills both).
"""

import json
import os
import socket

import numpy as np
import pytest

from tests import processes
from tests.backends import torch_distribution as runs_on

# One worker runs the whole module: its processes start once, in a module fixture.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_torch_distribution")]

TIMEOUT = 600


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    """The JSON each of the 2 processes printed, by rank."""
    script = os.path.join(os.path.dirname(__file__), "torch_distribution.py")
    env = processes.environment(
        "torch",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=_free_port(),
        WORLD_SIZE=runs_on.PROCESSES,
    )
    started = [
        processes.start([script], env=dict(env, RANK=str(rank)))
        for rank in range(runs_on.PROCESSES)
    ]
    printed = processes.finish(started, timeout=TIMEOUT)
    outputs = [json.loads(out.strip().splitlines()[-1]) for out in printed]
    assert [o["rank"] for o in outputs] == list(range(runs_on.PROCESSES))
    return [o["runs"] for o in outputs]


@pytest.fixture(scope="module")
def one_process():
    """The references, in this (single-process) session."""
    global_batch = runs_on.GLOBAL_BATCH
    splits = runs_on.PROCESSES
    x, y = runs_on.X, runs_on.Y
    return {
        "global_batch": runs_on.fit("synchronized", x, y, global_batch),
        "one_part_per_process": runs_on.fit(
            "per_replica", x, y, global_batch, num_batch_splits=splits
        ),
        "nan": runs_on.fit("per_replica", runs_on.X_NAN, y, global_batch, num_batch_splits=splits),
        "accumulation": runs_on.fit(
            "per_replica", x, y, global_batch, num_batch_splits=splits, accumulation=2
        ),
        "mixed_float16": runs_on.fit(
            "per_replica", x, y, global_batch, num_batch_splits=splits, policy="mixed_float16"
        ),
    }


def _assert_weights_close(run, reference):
    model, _ = reference
    for got, want in zip(run["weights"], model.get_weights(), strict=True):
        np.testing.assert_allclose(np.array(got, "float32"), want, rtol=1e-5, atol=1e-5)


def _max_difference(a, b):
    return max(
        np.max(np.abs(np.array(x) - np.array(y)))
        for x, y in zip(a["weights"], b["weights"], strict=True)
    )


@pytest.mark.parametrize("loop", ["fit", "loop", "fit_under_data_parallel"])
def test_per_replica_equals_one_process_with_a_part_per_process(ranks, one_process, loop):
    for runs in ranks:
        run = runs[
            "fit_data_parallel" if loop == "fit_under_data_parallel" else f"{loop}_per_replica"
        ]
        _assert_weights_close(run, one_process["one_part_per_process"])
        assert run["iterations"] == runs_on.STEPS
        # ... and differs from the synchronized step (each process perturbs with its own
        # gradient).
        assert _max_difference(run, runs["fit_synchronized"]) > 1e-4


@pytest.mark.parametrize("loop", ["fit", "loop"])
def test_synchronized_equals_one_process_on_the_global_batch(ranks, one_process, loop):
    for runs in ranks:
        run = runs[f"{loop}_synchronized"]
        _assert_weights_close(run, one_process["global_batch"])
        assert run["iterations"] == runs_on.STEPS


def test_the_processes_hold_the_same_weights(ranks):
    first, second = ranks
    for name in first:
        for a, b in zip(first[name]["weights"], second[name]["weights"], strict=True):
            np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=name)


def test_batch_norm_statistics_are_averaged_over_the_processes(ranks):
    """Each process's BatchNorm moving statistics come from its own shard; the step
    commits their average, so the processes keep the same statistics (checked bitwise
    by the test above) and those moved."""
    weights = ranks[0]["fit_batch_norm"]["weights"]
    moving_mean, moving_variance = np.array(weights[4]), np.array(weights[5])
    assert np.all(moving_mean != 0) and np.all(moving_variance != 1)


def test_all_reduces_per_step(ranks):
    steps = runs_on.STEPS
    for runs in ranks:
        for loop in ("fit", "loop"):
            # Per replica: one all-reduce of one flat buffer per step, the gradients
            # (4*8 + 8 + 8*3 + 3 = 67 values) with the vote on finiteness.
            assert runs[f"{loop}_per_replica"]["all_reduces"] == [[68]] * steps
            # Synchronized: the clean gradient first, then the same buffer.
            assert runs[f"{loop}_synchronized"]["all_reduces"] == [[67], [68]] * steps
        assert runs["fit_data_parallel"]["all_reduces"] == [[68]] * steps
        # BatchNorm's moving statistics travel in the same buffer.
        batch_norm = runs["fit_batch_norm"]["all_reduces"]
        assert batch_norm == [[68 + 2 * 8 + 2 * 8]] * steps


def test_a_nan_on_one_process_skips_the_step_on_every_process(ranks, one_process):
    # The NaN is in process 1's shard of the second global batch, once an epoch.
    _, reference = one_process["nan"]
    assert int(reference.skipped_steps.numpy()) == runs_on.EPOCHS
    for runs in ranks:
        run = runs["fit_nan"]
        assert run["skipped_steps"] == runs_on.EPOCHS
        assert run["iterations"] == runs_on.STEPS - runs_on.EPOCHS
        _assert_weights_close(run, one_process["nan"])


def test_gradient_accumulation_over_processes(ranks, one_process):
    """Each micro-batch's SAM gradient is averaged over the processes, then accumulated:
    one process with a part per process and the same accumulation."""
    _, reference = one_process["accumulation"]
    assert int(reference.iterations.numpy()) == runs_on.STEPS // 2
    for runs in ranks:
        run = runs["fit_accumulation"]
        assert run["iterations"] == runs_on.STEPS // 2
        assert run["all_reduces"] == [[68]] * runs_on.STEPS
        _assert_weights_close(run, one_process["accumulation"])


def test_mixed_float16_over_processes(ranks, one_process):
    """Both passes loss-scaled in each process; the same step as one process."""
    for runs in ranks:
        run = runs["fit_mixed_float16"]
        assert run["iterations"] == runs_on.STEPS
        _assert_weights_close(run, one_process["mixed_float16"])
        # ... which is not the float32 step (the passes ran in float16).
        assert _max_difference(run, runs["fit_per_replica"]) > 1e-5
