"""`keras.distribution.DataParallel` on JAX, on 2 host CPU devices (in a subprocess: the
device count is fixed when JAX starts)."""

import json
import os

import numpy as np
import pytest

from tests import processes

# One worker runs the whole module: its processes start once, in a module fixture.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_jax_distribution")]


@pytest.fixture(scope="module")
def runs():
    script = os.path.join(os.path.dirname(__file__), "jax_distribution.py")
    result = processes.run([script], backend="jax", timeout=900)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_weights_close(a, b):
    for x, y in zip(a["weights"], b["weights"], strict=True):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-5, atol=1e-6)


def test_synchronized_equals_one_device_on_the_global_batch(runs):
    _assert_weights_close(runs["synchronized"], runs["one_device"])


def test_per_replica_equals_one_device_with_a_part_per_device(runs):
    _assert_weights_close(runs["per_replica"], runs["one_device_two_parts"])
    # ... and differs from the synchronized step (each device perturbs with its own gradient).
    difference = max(
        np.max(np.abs(np.array(x) - np.array(y)))
        for x, y in zip(runs["per_replica"]["weights"], runs["synchronized"]["weights"])
    )
    assert difference > 1e-4


def test_mesa_per_replica_equals_one_device_with_a_part_per_device(runs):
    """MESA's teacher pass, moving average and KL term per device, averaged once."""
    _assert_weights_close(runs["mesa_per_replica"], runs["mesa_one_device_two_parts"])
    assert runs["mesa_per_replica"]["same_on_devices"]
    # One all-reduce of the gradients (with the losses and the moving average), one vote.
    assert len(runs["mesa_per_replica"]["all_reduces"]) == 2, runs["mesa_per_replica"]


def test_the_devices_hold_the_same_weights(runs):
    assert runs["synchronized"]["same_on_devices"]
    assert runs["per_replica"]["same_on_devices"]


def test_all_reduces_per_step(runs):
    # One device: none.
    assert runs["one_device"]["all_reduces"] == []
    # Per replica: the gradients (with the losses) are averaged once, plus the one-integer
    # vote on whether every device's passes were finite.
    per_replica = runs["per_replica"]["all_reduces"]
    assert len(per_replica) == 2, per_replica
    assert sum(r.startswith("s32[]") for r in per_replica) == 1
    # Synchronized: the clean gradient and the perturbed gradient.
    synchronized = runs["synchronized"]["all_reduces"]
    assert len(synchronized) == 2, synchronized
    assert all("f32[8,4]" in r or "f32[4,8]" in r for r in synchronized)
