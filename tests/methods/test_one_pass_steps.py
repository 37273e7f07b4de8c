"""The passes a step really runs, through `SAMModel.fit`, eagerly, compiled and under XLA:
a step where a `rho` schedule is 0 takes one pass (the perturbed pass is not run), and
`MomentumSAM` takes one pass on every step.

A layer counts the training-mode forward passes as they run: a `tf.Variable` on
TensorFlow (which SAM's stateless scopes do not capture), a `jax.debug.callback` on JAX
(run only in the branch of a `lax.cond` that is taken), a Python counter on PyTorch (whose
`fit` runs the step eagerly).

Backend-neutral: it runs in every backend's pytest session (see tests/conftest.py).
"""

import keras
import numpy as np
import pytest

import keras_sam
from tests import harness, reference

STEPS = 10
MODES = sorted(harness.MODES)


class _Counter:
    """A count of the forward passes that ran, readable after `fit`."""

    def __init__(self):
        self.backend = keras.backend.backend()
        if self.backend == "tensorflow":
            import tensorflow as tf

            self.variable = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.python = 0

    def add(self, inputs):
        """Returns `inputs`, counting one pass when the step runs this."""
        if self.backend == "tensorflow":
            import tensorflow as tf

            with tf.control_dependencies([self.variable.assign_add(1)]):
                return tf.identity(inputs)
        if self.backend == "jax":
            import jax

            jax.debug.callback(self._increment)
            return inputs
        self._increment()
        return inputs

    def _increment(self):
        self.python += 1

    @property
    def count(self):
        if self.backend == "tensorflow":
            return int(self.variable.numpy())
        if self.backend == "jax":
            import jax

            jax.effects_barrier()  # the callbacks of the last step have run
        return self.python


class _PassCounter(keras.layers.Layer):
    """The identity; counts its training-mode calls (the step's passes) in `counter`."""

    def __init__(self, counter, **kwargs):
        super().__init__(**kwargs)
        self.counter = counter

    def call(self, inputs, training=None):
        if training:
            return self.counter.add(inputs)
        return inputs


def _counted_run(make_optimizer, mode, rng, steps=STEPS, lora_rank=None):
    """Trains the reference MLP (a pass counter after its hidden layer; with `lora_rank`,
    LoRA on the hidden layer) for `steps` steps; returns the passes that ran, the optimizer
    and the weights."""
    params = reference.mlp_init(rng)
    counter = _Counter()
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(5, activation="tanh"),
            _PassCounter(counter),
            keras.layers.Dense(2),
        ]
    )
    model.set_weights([p.astype("float32") for p in params])
    if lora_rank:
        model.layers[0].enable_lora(lora_rank)
    optimizer = make_optimizer()
    run = harness.train(optimizer, model, harness.batches(rng, steps), mode)
    assert run.iterations == steps
    return counter.count, optimizer, run


def _late(rho=0.05):
    return keras_sam.LatePhaseRho(rho, start_step=5)


# method -> (optimizer, perturbed passes over the 10 steps, or None if data-dependent)
LATE_PHASE = {
    "sam": (lambda: keras_sam.SAM(keras.optimizers.SGD(0.05), rho=_late()), 5),
    # Keras's PiecewiseConstantDecay keeps its first value up to its boundary included:
    # rho is 0 at steps 0-5, so SAM runs at 6-9.
    "sam_piecewise_constant": (
        lambda: keras_sam.SAM(
            keras.optimizers.SGD(0.05),
            rho=keras.optimizers.schedules.PiecewiseConstantDecay([5], [0.0, 0.05]),
        ),
        4,
    ),
    "gsam": (lambda: keras_sam.GSAM(keras.optimizers.SGD(0.05), rho=_late(), alpha=0.2), 5),
    "friendly_sam": (lambda: keras_sam.FriendlySAM(keras.optimizers.SGD(0.05), rho=_late()), 5),
    # Every other step from step 5 on: steps 6 and 8.
    "looksam": (lambda: keras_sam.LookSAM(keras.optimizers.SGD(0.05), rho=_late(), k=2), 2),
    "periodic_sam": (
        lambda: keras_sam.PeriodicSAM(keras.optimizers.SGD(0.05), rho=_late(), k=2),
        2,
    ),
    "aesam": (lambda: keras_sam.AESAM(keras.optimizers.SGD(0.05), rho=_late(), margin=-1.0), None),
}


# Every method in the default mode; in every mode, one whose decision follows the schedule
# alone and one whose decision reads the gradients (AESAM).
@pytest.mark.parametrize("method, mode", harness.modes_for(LATE_PHASE, ["sam", "aesam"]))
def test_steps_where_the_rho_schedule_is_zero_take_one_pass(rng, method, mode):
    make_optimizer, perturbed = LATE_PHASE[method]
    passes, optimizer, run = _counted_run(make_optimizer, mode, rng)
    counted = float(harness.to_numpy(optimizer.second_passes))
    if perturbed is None:  # AESAM: whatever its statistics chose, none before step 5
        assert 0 < counted <= 5
    else:
        assert counted == perturbed
    assert passes == STEPS + counted  # 15 for SAM, not 20
    assert run.history["second_pass_rate"] == [pytest.approx(counted / STEPS)]


@pytest.mark.parametrize("mode", MODES)
def test_momentum_sam_takes_one_pass_a_step(rng, mode):
    passes, optimizer, run = _counted_run(
        lambda: keras_sam.MomentumSAM(keras.optimizers.SGD(0.05, momentum=0.9), rho=0.5), mode, rng
    )
    assert passes == STEPS
    assert "second_pass_rate" not in run.history and "sharpness" not in run.history
    assert not optimizer.may_skip_second_pass


def test_bar_takes_one_pass_a_step(rng):
    # The default mode only: BAR's `needs_second_pass` is the Python `False`, so no mode
    # traces a perturbed pass (no conditional to compile differently).
    passes, optimizer, run = _counted_run(
        lambda: keras_sam.BAR(keras.optimizers.SGD(0.05), alpha=0.1),
        harness.DEFAULT_MODE,
        rng,
        lora_rank=2,
    )
    assert passes == STEPS
    assert "second_pass_rate" not in run.history and "sharpness" not in run.history
    assert not optimizer.may_skip_second_pass and not optimizer.state_variables


class _TwoPassesAlways:
    """A method that takes the perturbed pass whatever `rho` is: what a schedule at 0
    cost before steps with rho = 0 took one pass."""

    def needs_second_pass(self, gradients, variables):
        del gradients, variables
        return True


# Each method in the default mode; in every mode SAM (the one-pass branch is the step's) and
# FriendlySAM (its state moves in that branch too).
@pytest.mark.parametrize(
    "name, mode", harness.modes_for(["SAM", "GSAM", "FriendlySAM"], ["SAM", "FriendlySAM"])
)
def test_the_one_pass_step_at_rho_zero_is_the_two_pass_step_at_rho_zero(rng, name, mode):
    # The weights (and F-SAM's moving average) are those of two passes at rho = 0: the
    # skipped pass changed nothing but the cost. Eagerly, SAM and F-SAM descend with the
    # perturbed gradient at e = 0, the clean one, bitwise; GSAM up to rounding, and
    # compiled steps too (XLA fuses a conditional's branches differently; on JAX the
    # passes are compiled in every mode).
    cls = getattr(keras_sam, name)
    always = type(f"{name}TwoPasses", (_TwoPassesAlways, cls), {})

    def run(method_class):
        keras.utils.set_random_seed(1)
        optimizer = method_class(keras.optimizers.SGD(0.1, momentum=0.9), rho=_late(0.2))
        data_rng = np.random.default_rng(3)
        return _counted_run(lambda: optimizer, mode, data_rng, steps=7)

    passes, _, one_pass = run(cls)
    twice, _, two_passes = run(always)
    assert (passes, twice) == (7 + 2, 14)
    # The method's state but the pass counter (which the forced method never adds to).
    kept, want = (
        [v for n, v in r.state if not n.endswith("second_passes")] for r in (one_pass, two_passes)
    )
    assert len(kept) == (4 if name == "FriendlySAM" else 0)  # F-SAM: one `m` per variable
    if mode == "eager" and keras.backend.backend() != "jax" and name != "GSAM":
        harness.assert_bitwise(one_pass.weights, two_passes.weights)
        harness.assert_bitwise(kept, want)
    else:
        harness.assert_weights_close(one_pass.weights, two_passes.weights, rtol=1e-5, atol=1e-7)
        harness.assert_weights_close(kept, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_late_phase_steps_before_the_start_are_the_wrapped_optimizer_bitwise(rng, mode):
    def run(rho):
        keras.utils.set_random_seed(1)
        return _counted_run(
            lambda: keras_sam.SAM(keras.optimizers.Adam(0.01), rho=rho),
            mode,
            np.random.default_rng(4),
            steps=6,
        )

    passes, _, late = run(keras_sam.LatePhaseRho(0.1, start_step=6))
    plain_passes, _, plain = run(0.0)
    assert passes == plain_passes == 6
    harness.assert_bitwise(late.weights, plain.weights)
    harness.assert_bitwise(late.inner_variables, plain.inner_variables)  # Adam's m and v too


@pytest.mark.parametrize("mode", MODES)
def test_momentum_sam_at_rho_zero_is_the_wrapped_optimizer_bitwise(rng, mode):
    def run(make_optimizer):
        keras.utils.set_random_seed(1)
        return _counted_run(make_optimizer, mode, np.random.default_rng(4), steps=4)

    inner = lambda: keras.optimizers.Adam(0.01)  # noqa: E731
    passes, optimizer, msam = run(lambda: keras_sam.MomentumSAM(inner(), rho=0.0))
    _, _, plain = run(lambda: keras_sam.SAM(inner(), rho=0.0))
    assert passes == 4
    harness.assert_bitwise(msam.weights, plain.weights)
    harness.assert_bitwise(msam.inner_variables, plain.inner_variables)
    assert all(np.any(v) for _, v in msam.state)  # v still follows the gradients
