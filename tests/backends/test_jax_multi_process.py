"""Several JAX processes: `keras.distribution.initialize` with 2 processes on localhost
(CPU collectives over gloo), `DataParallel` across them, against one process on the same
global batches. The test launches the processes and ends them (bounded timeouts)."""

import json
import os
import socket

import numpy as np
import pytest

from tests import processes

# One worker runs the whole module: its processes start once, in a module fixture.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_jax_multi_process")]

SCRIPT = os.path.join(os.path.dirname(__file__), "jax_multi_process.py")
TIMEOUT = 300


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("processes")
    env = processes.environment("jax", XLA_FLAGS=None)  # one CPU device per process
    port = _free_port()
    workers = [
        processes.start([SCRIPT, port, i, 2, folder / f"process_{i}.json"], env=env)
        for i in range(2)
    ]
    try:
        processes.run([SCRIPT, "--single", folder / "single.json"], timeout=TIMEOUT, env=env)
        processes.finish(workers, timeout=TIMEOUT)
    finally:
        processes.kill(workers)
    return {
        name: json.loads((folder / f"{name}.json").read_text())
        for name in ("single", "process_0", "process_1")
    }


def _assert_close(got, want):
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("process", ["process_0", "process_1"])
def test_each_process_sees_both_devices_and_holds_its_own(runs, process):
    assert runs[process]["devices"] == 2
    assert runs[process]["local_devices"] == 1


@pytest.mark.parametrize("process", ["process_0", "process_1"])
def test_synchronized_equals_one_process_on_the_global_batch(runs, process):
    _assert_close(runs[process]["synchronized"], runs["single"]["synchronized"])


@pytest.mark.parametrize("process", ["process_0", "process_1"])
def test_per_replica_equals_one_process_with_a_part_per_process(runs, process):
    _assert_close(runs[process]["per_replica"], runs["single"]["per_replica"])
    difference = max(
        np.max(np.abs(np.array(a) - np.array(b)))
        for a, b in zip(runs[process]["per_replica"], runs[process]["synchronized"])
    )
    assert difference > 1e-4  # each process perturbed with its own gradient
