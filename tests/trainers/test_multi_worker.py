"""SAM under MultiWorkerMirroredStrategy: two worker processes on localhost.

The workers (multi_worker.py) run once for the module; each test reads what they wrote
and compares it with the same training done here on one device.
"""

import json
import socket
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_sam
from tests import processes
from tests.trainers import multi_worker

# One worker runs the whole module: its processes start once, in a module fixture.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_multi_worker")]

WORKER = Path(__file__).with_name("multi_worker.py")
TIMEOUT = 300  # seconds for both workers together; they are killed after it


def _free_ports(count):
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run_workers(directory):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    workers = []
    try:
        for index in range(2):
            task = {"type": "worker", "index": index}
            env = processes.environment(TF_CONFIG=json.dumps({"cluster": cluster, "task": task}))
            workers.append(processes.start([WORKER, directory / f"worker{index}.npz"], env=env))
        # A worker waiting for its peer ignores SIGTERM: `finish` kills what is left.
        processes.finish(workers, timeout=TIMEOUT)
    finally:
        processes.kill(workers)
    return [dict(np.load(directory / f"worker{i}.npz")) for i in range(2)]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    return _run_workers(tmp_path_factory.mktemp("multi_worker"))


def _single_device(splits, epochs=2):
    params, x, t = multi_worker.data()
    keras.utils.set_random_seed(0)
    sam_model = keras_sam.SAMModel(multi_worker.mlp(params), num_batch_splits=splits)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.1), loss="mse"
    )
    sam_model.fit(
        x, t, batch_size=multi_worker.GLOBAL_BATCH, epochs=epochs, shuffle=False, verbose=0
    )
    return sam_model.get_weights()


def _weights(result, prefix):
    return [result[f"{prefix}/{i}"] for i in range(4)]


@pytest.mark.parametrize("mode, splits", [("per_replica", 2), ("synchronized", None)])
def test_custom_loop_on_two_workers_matches_one_device(workers, mode, splits):
    want = _single_device(splits)
    for result in workers:
        assert int(result[f"{mode}/iterations"]) == multi_worker.STEPS
        for got, expected in zip(_weights(result, mode), want, strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(_weights(workers[0], mode), _weights(workers[1], mode), strict=True):
        np.testing.assert_array_equal(a, b)


def test_per_replica_step_all_reduces_once(workers):
    # One all-reduce of the final gradients, as in plain training, plus one scalar
    # reduction so that both workers agree on skipping a non-finite step. The
    # synchronized mode all-reduces the clean gradient too.
    for result in workers:
        assert int(result["per_replica/collectives"]) == 2
        assert int(result["synchronized/collectives"]) == 3


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="Keras 3 `fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585): "
    "use the custom loop. This test passes, and so fails as strict xfail, once Keras fixes it.",
)
def test_keras_fit_on_two_workers(workers):
    want = _single_device(splits=2, epochs=1)
    for result in workers:
        outcome = str(result["fit/outcome"])
        if outcome != "ok" and "Attempt to convert a value (PerReplica" not in outcome:
            raise RuntimeError(f"`fit` failed otherwise than keras#20585: {outcome}")
        assert outcome == "ok", outcome
        for got, expected in zip(_weights(result, "fit"), want, strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
