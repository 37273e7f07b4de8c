"""A run SIGKILLed mid-epoch resumes with `BackupAndRestore` bitwise as if never killed.

Each case trains in a subprocess (tests/trainers/kill_resume.py) that kills itself in
the middle of its second epoch; a second process resumes from the backup and finishes.
Its final variables (weights, BatchNorm statistics, dropout seeds, optimizer slots, the
method's state, accumulation sums, loss scale) must equal, bit for bit, those of a run
that was never interrupted.
"""

import signal
from pathlib import Path

import keras
import numpy as np
import pytest

from tests import processes

SCRIPT = Path(__file__).with_name("kill_resume.py")
KILL_AT = 8  # global step 8: the third step of the second epoch (6 steps an epoch)

# Every kind of state on TensorFlow, in one run (a state that did not come back fails it
# as a run of that state alone would), and plain SAM; the step is backend-neutral, so JAX
# runs LookSAM (SAM's state and the method's) and PyTorch SAM.
CASES = {
    "tensorflow": ["looksam+accumulation+mixed_float16", "sam"],
    "jax": ["looksam"],
    "torch": ["sam"],
}


def _train(case, backup, out, kill_at):
    return processes.run([SCRIPT, case, backup, out, kill_at], timeout=600, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES[keras.backend.backend()])
def test_a_run_killed_mid_epoch_resumes_bitwise(tmp_path, case):
    killed = _train(case, tmp_path / "backup", tmp_path / "resumed.npz", KILL_AT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "resumed.npz").exists()
    # The first epoch's backup is there; the second epoch was lost mid-way.
    assert (tmp_path / "backup").is_dir()

    resumed = _train(case, tmp_path / "backup", tmp_path / "resumed.npz", -1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = _train(case, tmp_path / "straight", tmp_path / "straight.npz", -1)
    assert straight.returncode == 0, straight.stderr[-3000:]

    with np.load(tmp_path / "resumed.npz") as a, np.load(tmp_path / "straight.npz") as b:
        # The restart trained the second and third epochs only (6 steps each): it did
        # resume from the first epoch's backup, not start over.
        assert int(a["steps_run"]) == 12 and int(b["steps_run"]) == 18
        assert len(a.files) == len(b.files) > 1
        for name in set(a.files) - {"steps_run"}:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
