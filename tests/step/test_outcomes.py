"""The step's outcomes, one at a time, with a fake backend.

`step._finish` takes the step's verdict and results and commits, applies, accumulates,
checks, rolls back or skips (`step._Outcomes`). Here a fake backend takes its decisions
with Python `if`s, without a pass or a replica, so each outcome's exact writes are
asserted on small variables: every value below is exact in float32.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_sam
from keras_sam import step
from tests.harness import to_numpy


class FakeBackend:
    """All the outcomes ask of a backend: Python decisions, one replica."""

    def __init__(self):
        self.verdicts = []  # what each `decide` was given

    def decide(self, ok, take_step, skip_step, tracked, args=()):
        del tracked
        ok = bool(to_numpy(ok))
        self.verdicts.append(ok)
        (take_step if ok else skip_step)(*args)

    def stateful_cond(self, pred, true_fn, false_fn, tracked):
        del tracked
        (true_fn if bool(to_numpy(pred)) else false_fn)()

    def run_in_replicas(self, fn, *args):
        return fn(*args)

    def all_finite(self, tensors):
        return all(np.isfinite(to_numpy(t)).all() for t in tensors)

    def dense(self, gradient):
        return gradient


def _tensors(*values):
    return [ops.convert_to_tensor(np.asarray(v, "float32")) for v in values]


class Step:
    """Two weights, one state update (a BatchNorm statistic, say), and the method."""

    def __init__(self, method, state=False):
        self.weights = [keras.Variable([1.0, 2.0]), keras.Variable([3.0])]
        self.statistic = keras.Variable(0.0, trainable=False)
        self.method = method
        if state:
            self.state = method.add_state_variable(name="state")
        method.build(self.weights)
        self.roles = step.resolve(method)
        self.backend = FakeBackend()

    def finish(self, finite, gradients, statistic=4.0, state=()):
        result = step.StepResult(
            gradients, _tensors(*state), [(self.statistic, _tensors(statistic)[0])], finite
        )
        step.finish(self.backend, self.roles, self.weights, result)

    def read(self):
        """The weights, the statistic, the optimizer's `iterations`, `skipped_steps`."""
        return (
            [to_numpy(w).tolist() for w in self.weights],
            float(to_numpy(self.statistic)),
            int(to_numpy(self.roles.applier.iterations)),
            int(to_numpy(self.method.skipped_steps)),
        )


def _sgd(learning_rate=0.5):
    return keras.optimizers.SGD(learning_rate=learning_rate)


def test_a_taken_step_commits_the_updates_and_applies_the_gradients():
    s = Step(keras_sam.SAM(_sgd()))
    s.finish(True, _tensors([0.5, 0.25], [2.0]))
    # w - 0.5 g; the statistic committed; one optimizer step.
    assert s.read() == ([[0.75, 1.875], [2.0]], 4.0, 1, 0)
    assert s.backend.verdicts == [True]


def test_a_skipped_step_changes_nothing_but_skipped_steps():
    s = Step(keras_sam.SAM(_sgd()))
    s.finish(False, _tensors([np.nan, 0.25], [np.inf]))
    assert s.read() == ([[1.0, 2.0], [3.0]], 0.0, 0, 1)


@pytest.mark.parametrize("growth_steps", [1, 2])
def test_the_loss_scale_grows_after_applied_steps_and_halves_on_a_skip(growth_steps):
    scaled = keras.optimizers.LossScaleOptimizer(
        _sgd(), initial_scale=8.0, dynamic_growth_steps=growth_steps
    )
    s = Step(keras_sam.SAM(scaled))
    assert s.roles.scaler is scaled
    gradients = _tensors([0.5, 0.25], [2.0])
    history = []
    for finite in (True, True, False, True):
        s.finish(finite, gradients)
        history.append((float(to_numpy(scaled.dynamic_scale)), int(to_numpy(scaled.step_counter))))
    if growth_steps == 1:  # doubles after every applied step
        assert history == [(16.0, 0), (32.0, 0), (16.0, 0), (32.0, 0)]
    else:  # doubles after every second one in a row
        assert history == [(8.0, 1), (16.0, 0), (8.0, 0), (8.0, 1)]
    # Three steps applied: w - 3 * 0.5 g.
    assert s.read() == ([[0.25, 1.625], [0.0]], 4.0, 3, 1)


def test_a_verified_step_that_writes_no_nan_stands():
    s = Step(keras_sam.SAM(_sgd(), verify_optimizer_step=True))
    s.finish(True, _tensors([0.5, 0.25], [2.0]))
    assert s.read() == ([[0.75, 1.875], [2.0]], 4.0, 1, 0)
    assert s.backend.verdicts == [True, True]  # the step's, then the check's


@pytest.mark.parametrize("loss_scale", [False, True])
def test_a_verified_step_whose_optimizer_overflows_is_rolled_back(loss_scale):
    optimizer = _sgd(learning_rate=2.0)
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=8.0)
    s = Step(keras_sam.SAM(optimizer, verify_optimizer_step=True))
    # A finite gradient (the step's verdict is True) that SGD's update overflows:
    # 1 - 2 * 3e38 is -inf in float32.
    s.finish(True, _tensors([3e38, 0.25], [2.0]))
    assert s.backend.verdicts == [True, False]
    # Everything as before, the statistic and `iterations` too; the step counted skipped.
    assert s.read() == ([[1.0, 2.0], [3.0]], 0.0, 0, 1)
    if loss_scale:
        assert float(to_numpy(s.roles.scaler.dynamic_scale)) == 4.0


def test_accumulation_sums_the_micro_batches_and_applies_their_mean_at_the_kth():
    s = Step(keras_sam.SAM(_sgd(), gradient_accumulation_steps=2), state=True)
    micro_steps, gradient_sums, state_sums = s.method.accumulation_variables

    s.finish(True, _tensors([0.5, 0.25], [2.0]), statistic=4.0, state=[2.0])
    # Nothing applied yet; the statistic is committed at once, the state summed.
    assert s.read() == ([[1.0, 2.0], [3.0]], 4.0, 0, 0)
    assert [to_numpy(t).tolist() for t in gradient_sums] == [[0.5, 0.25], [2.0]]
    assert float(to_numpy(state_sums[0])) == 2.0
    assert float(to_numpy(s.state)) == 0.0
    assert int(to_numpy(micro_steps)) == 1

    s.finish(False, _tensors([np.nan, 0.0], [0.0]), statistic=np.nan, state=[np.nan])
    # A skipped micro-batch adds nothing and does not count.
    assert int(to_numpy(micro_steps)) == 1
    assert [to_numpy(t).tolist() for t in gradient_sums] == [[0.5, 0.25], [2.0]]
    assert s.read() == ([[1.0, 2.0], [3.0]], 4.0, 0, 1)

    # The second weight has no gradient at the k-th micro-batch: its sum is not applied.
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        s.finish(True, [_tensors([1.5, 0.75])[0], None], statistic=5.0, state=[4.0])
    # w - 0.5 * (g1 + g2) / 2; the state is the mean of its updates; the sums zeroed.
    assert s.read() == ([[0.5, 1.75], [3.0]], 5.0, 1, 1)
    assert float(to_numpy(s.state)) == 3.0
    assert [to_numpy(t).tolist() for t in gradient_sums] == [[0.0, 0.0], [0.0]]
    assert float(to_numpy(state_sums[0])) == 0.0
    assert int(to_numpy(micro_steps)) == 0
