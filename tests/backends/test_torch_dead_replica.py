"""A dead replica does not hang the others (PyTorch data parallel, 2 gloo processes).

Process 1 SIGKILLs itself in the middle of the second epoch. Process 0, in the step's
all-reduce, gets gloo's error naming the lost peer's address and exits non-zero within a
bounded time (at once when the peer's connection closes; at most the process group's
`timeout`, 30 s in the script, when a peer vanishes without closing it), having written
no checkpoint past the last complete epoch. Both processes restarted with
`BackupAndRestore` resume from that epoch and end bitwise as a run never interrupted.
"""

import json
import os
import signal
import socket
import time

import numpy as np
import pytest

from tests import processes

pytestmark = pytest.mark.slow  # two launches of two processes: 1 to 3 minutes

SCRIPT = os.path.join(os.path.dirname(__file__), "torch_dead_replica.py")
LAUNCH_TIMEOUT = 400
# The survivor must exit this soon after its peer died: the script's process-group
# timeout (30 s) plus the time to unwind and exit.
SURVIVOR_BOUND = 60


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, name, backup, kill_at=None, also_uninterrupted=False):
    """Starts both processes; returns [(returncode, stdout, stderr, exit time)] by rank."""
    env = processes.environment(
        "torch",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=_free_port(),
        WORLD_SIZE=2,
        BACKUP=backup,
        KILL_AT=kill_at or None,
        ALSO_UNINTERRUPTED="1" if also_uninterrupted else None,
    )
    started = [processes.start([SCRIPT], env=dict(env, RANK=str(r))) for r in range(2)]
    ended = [None, None]
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while None in ended and time.monotonic() < deadline:
            for r, process in enumerate(started):
                if ended[r] is None and process.poll() is not None:
                    ended[r] = time.monotonic()
            time.sleep(0.2)
        return [
            (
                process.poll(),
                processes.output(process, "stdout"),
                processes.output(process, "stderr"),
                ended[r],
            )
            for r, process in enumerate(started)
        ]
    finally:
        processes.kill(started)  # no orphans


def _weights(result, key="weights"):
    returncode, out, err, _ = result
    assert returncode == 0, err[-3000:]
    return [np.array(w, "float32") for w in json.loads(out.strip().splitlines()[-1])[key]]


def test_a_killed_replica_stops_the_survivor_and_a_restart_resumes_bitwise(tmp_path):
    backup = tmp_path / "backup"
    killed = _launch(tmp_path, "killed", backup, kill_at="1,1")
    (survivor_code, _, survivor_err, survivor_end), (dead_code, _, _, dead_end) = killed
    assert dead_code == -signal.SIGKILL
    assert survivor_code not in (0, None), "the survivor did not exit"
    assert survivor_end - dead_end < SURVIVOR_BOUND
    # gloo's error names the lost peer by address.
    last_line = survivor_err.strip().splitlines()[-1]
    assert "RuntimeError" in last_line and "[127.0.0.1]:" in last_line, last_line
    assert "a process was probably lost" in last_line, last_line
    # No checkpoint past the last complete epoch: the backups resume at epoch 1, the
    # one the kill interrupted.
    for rank in range(2):
        metadata = json.loads((backup / str(rank) / "training_metadata.json").read_text())
        assert metadata["epoch"] == 1, metadata

    resumed = _launch(tmp_path, "resumed", backup, also_uninterrupted=True)
    want = _weights(resumed[0], "uninterrupted")
    for rank in range(2):
        for key in ("weights", "uninterrupted"):
            for a, b in zip(want, _weights(resumed[rank], key), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"rank {rank}, {key}")
    assert not (backup / "0").exists()  # a finished run deletes its backup
