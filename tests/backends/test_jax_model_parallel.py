"""`keras.distribution.ModelParallel` on JAX: kernels sharded by a `LayoutMap` over 2 and 4
host CPU devices (data and model axes), against one device; and the compiled step's
memory per device (in a subprocess: the device count is fixed when JAX starts)."""

import json
import os

import numpy as np
import pytest

from tests import processes

# One worker runs the whole module: its processes start once, in a module fixture.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_jax_model_parallel")]


@pytest.fixture(scope="module")
def runs():
    script = os.path.join(os.path.dirname(__file__), "jax_model_parallel.py")
    result = processes.run([script], backend="jax", timeout=1200)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _cases():
    return [
        ("sam", "2_devices"),
        ("sam", "4_devices"),
        ("sam", "4_model"),
        ("asam", "4_devices"),
        ("looksam", "4_devices"),
        ("momentum_sam", "4_devices"),
        ("sam_2_splits", "4_devices"),
    ]


@pytest.mark.parametrize("method, mesh", _cases())
def test_sharded_fit_equals_one_device(runs, method, mesh):
    # Equal to the one-device run on the global batch: the perturbation's norm is the
    # global one (each device holds a slice of the kernels, and of the batch on 2 x 2).
    fits = runs["fits"][method]
    for got, want in zip(fits[mesh]["weights"], fits["one_device"]["weights"], strict=True):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh, columns", [("2_devices", 8), ("4_devices", 8), ("4_model", 4)])
def test_the_kernels_stay_sharded(runs, mesh, columns):
    fit = runs["fits"]["sam"][mesh]
    assert fit["kernel_spec"] == ["None", "model"]
    assert fit["kernel_shard_shape"] == [8, columns]  # of the (8, 16) kernel


def test_the_compiled_step_memory_per_device_shrinks_with_the_shards(runs):
    memory = runs["memory"]
    for kind in ("plain", "sam"):
        one = memory["one_device"][kind]
        for name, shards in (("2_model", 2), ("4_model", 4)):
            sharded = memory[name][kind]
            for key in ("argument_bytes", "output_bytes", "temp_bytes"):
                # Weights, slots and the step's buffers all split; only the (replicated)
                # biases of the head and scalars do not.
                assert sharded[key] <= one[key] / shards * 1.05 + 4096, (kind, name, key)
            assert not sharded["full_kernel_gathered"], sharded["all_gathers"]
    # SAM's step has temporaries (the perturbation, the clean gradient) that plain's does
    # not; they shrink with the shards like the weights.
    assert memory["one_device"]["sam"]["temp_bytes"] > 0
