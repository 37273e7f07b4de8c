"""The modes a session leaves out (tests/conftest.py's `SAME_MODE`) run the same step as one
it runs: Keras's JAX and PyTorch trainers compile only with `jit_compile=True`, so there
`run_eagerly=True` and `jit_compile=False` run the same step, and the suite runs each case
once. This checks that premise on the Keras installed: if a release starts compiling the
step under `jit_compile=False`, this fails and `SAME_MODE` must shrink."""

import keras
import numpy as np
import pytest

from tests import conftest, harness

pytestmark = pytest.mark.backends("jax", "torch")


class _Records(keras.layers.Layer):
    """The identity, noting how each call ran: traced by `jax.jit` or compiled by
    `torch.compile`, or not."""

    def __init__(self, seen, **kwargs):
        super().__init__(**kwargs)
        self.note = seen.add  # a set attribute would be copied into Keras's tracking

    def call(self, inputs):
        if keras.backend.backend() == "jax":
            import jax

            # Under `jax.jit` the inputs are abstract: no concrete value to read.
            try:
                np.asarray(inputs)
                self.note("concrete")
            except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
                self.note("traced")
        else:
            import torch

            self.note("compiled" if torch.compiler.is_compiling() else "eager")
        return inputs


def _how_fit_ran(mode):
    seen = set()
    # First, on the input: not a function of the weights, so only `jax.jit` traces it.
    model = keras.Sequential([keras.Input((3,)), _Records(seen), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse", **harness.MODES[mode])
    model.fit(np.ones((4, 3), "float32"), np.ones((4, 2), "float32"), verbose=0)
    return frozenset(seen)


def test_the_modes_the_suite_skips_run_like_one_it_runs():
    assert conftest.SAME_MODE == {"eager": "compiled"}
    ran = {mode: _how_fit_ran(mode) for mode in harness.MODES if mode != "xla"}
    assert ran["eager"] == ran["compiled"]
    if keras.backend.backend() == "jax":  # the suite runs `xla` too: a different step
        assert "xla" not in conftest.SAME_MODE and _how_fit_ran("xla") != ran["compiled"]
