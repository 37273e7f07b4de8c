"""`SAMModel`'s contract, on every backend: what a SAM step through `fit` does to the
model's state, the logs, the sample weights, a non-finite batch, checkpoints; eagerly,
compiled and under XLA, against NumPy float64 references where there is a number to get.

Backend-neutral: it runs in every backend's pytest session (see tests/conftest.py).
"""

import json
import warnings

import keras
import numpy as np
import pytest

import keras_sam
from tests import harness, reference

# Every test of a step runs in every mode where cheap; the costlier ones in every mode for
# one case and in the backend's cheapest compiled mode (`harness.COMPILED`) for the others.
MODES = sorted(harness.MODES)
COMPILED = harness.COMPILED


def _sgd(lr=0.1):
    return keras.optimizers.SGD(lr, momentum=0.9)


def _xent():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# ------------------------------------------------------------------ BatchNorm
class _TrainingProbe(keras.layers.Layer):
    """Records the `training` flag of every call (eagerly)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.flags = []

    def call(self, inputs, training=None):
        self.flags.append(training)
        return inputs


@pytest.mark.parametrize("mode, splits", [(m, None) for m in MODES] + [(COMPILED, 2)])
def test_batchnorm_moving_statistics_come_from_the_clean_pass_only(rng, mode, splits):
    probe = _TrainingProbe()
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6),
            probe,
            keras.layers.BatchNormalization(momentum=0.5),
        ]
    )
    kernel, bias = (w.astype("float64") for w in model.layers[0].get_weights())
    x = rng.normal(size=(8, 4))
    sam_model = keras_sam.SAMModel(model, num_batch_splits=splits)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.5),
        loss="mse",
        **harness.MODES[mode],
    )
    probe.flags.clear()  # forget the symbolic call made while the model was built
    sam_model.fit(
        x.astype("float32"), np.zeros((8, 6), "float32"), batch_size=8, shuffle=False, verbose=0
    )

    # float64: one momentum-0.5 update per part from the clean pass's batch moments (at
    # the weights before the step); a perturbed pass counted too would move them again.
    mean, variance = np.zeros(6), np.ones(6)
    bounds = reference.split_bounds(8, splits or 1)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        h = x[lo:hi] @ kernel + bias
        mean = 0.5 * mean + 0.5 * h.mean(0)
        variance = 0.5 * variance + 0.5 * h.var(0)
    bn = model.layers[-1]
    np.testing.assert_allclose(harness.to_numpy(bn.moving_mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(harness.to_numpy(bn.moving_variance), variance, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(mean)) > 0.1  # it did move
    if mode == "eager":  # both passes of every part in training mode
        # (On JAX and PyTorch, `fit` first traces the model once in inference mode for
        # its output shapes: that call is no pass of the step.)
        passes = 2 * (splits or 1)
        assert probe.flags[-passes:] == [True] * passes
        assert probe.flags.count(True) == passes


# -------------------------------------------------------------------- Dropout
class _CleanPassRecorder(keras.layers.Layer):
    """Keeps its training-mode input in a non-trainable variable: the clean pass's, since a
    step commits the state of the clean pass only; eagerly, every pass's too."""

    def __init__(self, batch_size, **kwargs):
        super().__init__(**kwargs)
        self.batch_size = batch_size
        self.passes = []

    def build(self, input_shape):
        self.seen = self.add_weight(
            shape=(self.batch_size, input_shape[-1]), initializer="zeros", trainable=False
        )

    def call(self, inputs, training=None):
        if training:
            self.seen.assign(inputs)
            self.passes.append(inputs)  # read in eager mode only
        return inputs


@pytest.mark.parametrize("mode", MODES)
def test_both_passes_use_the_same_dropout_mask(rng, mode):
    # The step against the float64 SAM step whose two passes share the clean pass's mask.
    params = reference.mlp_init(rng)
    x, t = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
    recorder = _CleanPassRecorder(16)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dropout(0.5, seed=2),
            recorder,
            keras.layers.Dense(2),
        ]
    )
    model.layers[0].set_weights([p.astype("float32") for p in params[:2]])
    model.layers[-1].set_weights([p.astype("float32") for p in params[2:]])
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(optimizer=keras_sam.SAM(_sgd(), rho=0.5), loss="mse", **harness.MODES[mode])
    recorder.passes.clear()
    sam_model.fit(x.astype("float32"), t.astype("float32"), batch_size=16, shuffle=False, verbose=0)

    kept = harness.to_numpy(recorder.seen) != 0
    assert 0.2 < kept.mean() < 0.8  # a real mask
    mask = kept / 0.5
    _, _, grads = reference.mlp_sam_gradient(params, x, t, 0.5, mask=mask)
    want, _ = reference.sgd_momentum(params, grads, [0 * p for p in params], 0.1, 0.9)
    harness.assert_weights_close(harness.snapshot(model.trainable_variables), want)
    if mode == "eager" and keras.backend.backend() in ("tensorflow", "torch"):
        # (On JAX a pass runs inside `jax.grad` even eagerly: its tensors are tracers.)
        clean, perturbed = (harness.to_numpy(p) for p in recorder.passes)
        np.testing.assert_array_equal(clean != 0, perturbed != 0)
        assert np.max(np.abs(clean - perturbed)) > 0  # two passes at different weights


# ------------------------------------------- regularization, logs, weights, metrics
def _reference_fit(params, x, t, batch_size, epochs, lr, momentum, rho, l2=0.0, splits=1):
    """float64 SAM training over ordered batches; returns params and per-epoch logs."""
    velocities = [np.zeros_like(p) for p in params]
    logs = []
    for _ in range(epochs):
        losses, sharpness, sizes = [], [], []
        for start in range(0, len(x), batch_size):
            xb, tb = x[start : start + batch_size], t[start : start + batch_size]
            # A batch smaller than `splits` is split into parts of one example.
            loss, loss_sam, grads = reference.mlp_split_sam_gradient(
                params, xb, tb, rho, splits=min(splits, len(xb)), l2=l2
            )
            params, velocities = reference.sgd_momentum(params, grads, velocities, lr, momentum)
            losses.append(loss)
            sharpness.append(loss_sam - loss)
            sizes.append(len(xb))
        logs.append({"loss": np.average(losses, weights=sizes), "sharpness": np.mean(sharpness)})
    return params, logs


def _fit_mlp(params, x, t, mode, batch_size, epochs, rho, l2=0.0, splits=None, **fit_kwargs):
    model = harness.mlp(params, l2)
    sam_model = keras_sam.SAMModel(model, num_batch_splits=splits)
    sam_model.compile(optimizer=keras_sam.SAM(_sgd(), rho=rho), loss="mse", **harness.MODES[mode])
    history = sam_model.fit(
        x.astype("float32"),
        t.astype("float32"),
        batch_size=batch_size,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        **fit_kwargs,
    )
    return model, history.history


@pytest.mark.parametrize(
    "mode, l2, splits",
    [(m, 0.01, None) for m in MODES] + [(COMPILED, 0.0, None), ("xla", 0.01, 2)],
)
def test_regularization_losses_in_both_passes_and_the_loss_and_sharpness_logs(
    rng, mode, l2, splits
):
    params = reference.mlp_init(rng)
    x, t = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
    model, history = _fit_mlp(params, x, t, mode, 8, 2, rho=0.05, l2=l2, splits=splits)
    want, logs = _reference_fit(params, x, t, 8, 2, 0.1, 0.9, 0.05, l2=l2, splits=splits or 1)
    harness.assert_weights_close(model.get_weights(), want)
    np.testing.assert_allclose(history["loss"], [g["loss"] for g in logs], rtol=1e-5)
    np.testing.assert_allclose(
        history["sharpness"], [g["sharpness"] for g in logs], rtol=1e-3, atol=1e-7
    )
    assert all(s > 0 for s in history["sharpness"])
    if l2:  # the regularization loss is really in both passes: without it the result differs
        unregularized, _ = _reference_fit(params, x, t, 8, 2, 0.1, 0.9, 0.05, splits=splits or 1)
        assert max(np.max(np.abs(a - b)) for a, b in zip(want, unregularized, strict=True)) > 1e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [9, 10, 3])
def test_m_sharpness_splits_a_batch_smaller_than_the_number_of_splits_into_single_examples(
    rng, mode, n
):
    # Batches of 4 with num_batch_splits=4: the last batch of an epoch of 9 or 10 holds
    # 1 or 2 examples, a whole epoch of 3 is one batch of 3. Such a batch is trained as
    # parts of one example each, alike eagerly, compiled and under XLA (where its size
    # is known only when the step runs): the reference is m-sharpness with
    # min(4, batch size) parts, every step applied.
    params = reference.mlp_init(rng)
    x, t = rng.normal(size=(n, 3)), rng.normal(size=(n, 2))
    model, history = _fit_mlp(params, x, t, mode, batch_size=4, epochs=2, rho=0.1, splits=4)
    want, logs = _reference_fit(params, x, t, 4, 2, 0.1, 0.9, 0.1, splits=4)
    harness.assert_weights_close(model.get_weights(), want)
    np.testing.assert_allclose(history["loss"], [g["loss"] for g in logs], rtol=1e-5)
    assert history["skipped_steps"] == [0.0, 0.0]


@pytest.mark.parametrize("mode", MODES)
def test_sample_weights_reach_both_passes(rng, mode):
    params = reference.mlp_init(rng)
    x, t = rng.normal(size=(16, 3)), rng.normal(size=(16, 2))
    sw = rng.uniform(0.1, 2.0, 16)
    model, _ = _fit_mlp(params, x, t, mode, 8, 1, rho=0.2, sample_weight=sw.astype("float32"))

    def weighted(params, xb, tb, state, step):
        part = slice(8 * step, 8 * step + 8)
        _, _, grads = reference.mlp_sam_gradient(params, xb, tb, 0.2, sample_weight=sw[part])
        return grads, state, True

    batch_list = [(x[:8], t[:8]), (x[8:], t[8:])]
    want, _, _ = reference.trajectory(weighted, params, batch_list, reference.sgd(0.1, 0.9))
    harness.assert_weights_close(model.get_weights(), want)
    plain, _, _ = reference.trajectory(
        lambda *args: reference.sam_step(*args, rho=0.2),
        params,
        batch_list,
        reference.sgd(0.1, 0.9),
    )
    assert max(np.max(np.abs(a - b)) for a, b in zip(want, plain, strict=True)) > 1e-4


def test_class_weights_are_the_equivalent_sample_weights(rng):
    x, y = rng.normal(size=(16, 4)).astype("float32"), rng.integers(0, 3, 16)
    class_weight = {0: 0.5, 1: 2.0, 2: 1.0}
    equivalent = np.array([class_weight[int(c)] for c in y], "float32")
    results = []
    for fit_kwargs in ({"class_weight": class_weight}, {"sample_weight": equivalent}, {}):
        model = harness.bn_dropout_model()
        sam_model = keras_sam.SAMModel(model)
        sam_model.compile(optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.1), loss=_xent())
        sam_model.fit(x, y, batch_size=8, shuffle=False, verbose=0, **fit_kwargs)
        results.append(model.get_weights())
    by_class, by_sample, unweighted = results
    harness.assert_weights_close(by_class, by_sample, rtol=1e-6, atol=1e-7)
    assert max(np.max(np.abs(a - b)) for a, b in zip(by_class, unweighted, strict=True)) > 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_metrics_and_the_loss_log_come_from_the_clean_pass(rng, mode):
    params = reference.mlp_init(rng)
    batch_list = harness.batches(rng, 3, size=8)
    run = harness.train(
        keras_sam.SAM(_sgd(), rho=0.5), harness.mlp(params), batch_list, mode, metrics=["mae"]
    )
    clean_mae, perturbed_mae, clean_loss = [], [], []
    velocities = [np.zeros_like(p) for p in params]
    for x, t in batch_list:
        loss, _, grads = reference.mlp_sam_gradient(params, x, t, 0.5)
        clean_loss.append(loss)
        clean_mae.append(np.mean(np.abs(reference.mlp_predict(params, x) - t)))
        _, g = reference.mlp_loss_and_grads(params, x, t)
        at_e = [p + e for p, e in zip(params, reference.perturbation(g, 0.5), strict=True)]
        perturbed_mae.append(np.mean(np.abs(reference.mlp_predict(at_e, x) - t)))
        params, velocities = reference.sgd_momentum(params, grads, velocities, 0.1, 0.9)
    harness.assert_weights_close(run.weights, params)
    assert run.history["mae"][0] == pytest.approx(np.mean(clean_mae), rel=1e-5)
    assert run.history["loss"][0] == pytest.approx(np.mean(clean_loss), rel=1e-5)
    # Counting the perturbed pass (alone or with the clean one) would show.
    assert abs(np.mean(perturbed_mae) - np.mean(clean_mae)) > 1e-3 * np.mean(clean_mae)


@pytest.mark.parametrize("mode", MODES)
def test_the_sharpness_and_second_pass_rate_logs(rng, mode):
    # PeriodicSAM with k=4 over 8 steps takes the perturbed pass at steps 0 and 4; the
    # sharpness is the mean over those two steps, not diluted by the one-pass steps.
    params = reference.mlp_init(rng)
    batch_list = harness.batches(rng, 8, size=8)
    run = harness.train(
        keras_sam.PeriodicSAM(keras.optimizers.SGD(0.01), rho=0.05, k=4),
        harness.mlp(params),
        batch_list,
        mode,
    )
    sharpness = []
    for step, (x, t) in enumerate(batch_list):
        if step % 4 == 0:
            loss, loss_sam, grads = reference.mlp_sam_gradient(params, x, t, 0.05)
            sharpness.append(loss_sam - loss)
        else:
            _, grads = reference.mlp_loss_and_grads(params, x, t)
        params = [p - 0.01 * g for p, g in zip(params, grads, strict=True)]
    harness.assert_weights_close(run.weights, params)
    assert run.history["second_pass_rate"] == [pytest.approx(0.25)]
    assert run.history["sharpness"][0] == pytest.approx(np.mean(sharpness), rel=1e-3, abs=1e-7)
    assert np.mean(sharpness) > 0

    plain = harness.train(
        keras_sam.SAM(keras.optimizers.SGD(0.01)), harness.mlp(params), batch_list, mode
    )
    assert set(plain.history) == {"loss", "sharpness", "skipped_steps"}


# ----------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    "method, failing_pass, splits, mode",
    [("SAM+Adam", "clean", None, m) for m in MODES]
    + [
        ("SAM+Adam", "perturbed", None, COMPILED),
        ("SAM+Adam", "perturbed", None, "xla"),
        ("SAM+Adam", "clean", 2, COMPILED),  # one bad part: the whole step is skipped
        ("FriendlySAM+SGD", "perturbed", None, COMPILED),
        ("LookSAM+SGD", "clean", None, "xla"),
        # Its one pass, at w (the clean batch) or at w - rho v / ||v|| (armed): v untouched.
        ("MomentumSAM+SGD", "clean", None, "xla"),
        ("MomentumSAM+SGD", "perturbed", 2, COMPILED),
    ],
)
def test_a_non_finite_pass_skips_the_step_with_everything_untouched(
    rng, method, failing_pass, splits, mode
):
    optimizer = {
        "SAM+Adam": lambda: keras_sam.SAM(keras.optimizers.Adam(0.01), rho=0.1),
        "FriendlySAM+SGD": lambda: keras_sam.FriendlySAM(_sgd(0.01), rho=0.1),
        "LookSAM+SGD": lambda: keras_sam.LookSAM(_sgd(0.01), rho=0.1, k=2),
        "MomentumSAM+SGD": lambda: keras_sam.MomentumSAM(_sgd(0.01), rho=0.5),
    }[method]()
    x, y = rng.normal(size=(16, 6)).astype("float32"), rng.integers(0, 3, 16)
    model = harness.fragile_model()
    sam_model = keras_sam.SAMModel(model, num_batch_splits=splits)
    sam_model.compile(
        optimizer=optimizer, loss=_xent(), metrics=["accuracy"], **harness.MODES[mode]
    )
    sam_model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # a good step first
    bad_x = x.copy()
    if failing_pass == "clean":
        bad_x[-1, 0] = np.nan  # in the last part under m-sharpness
    else:
        model.layers[-1].arm()
    skipped = optimizer.skipped_steps
    kept = [v for v in model.variables + optimizer.variables if v is not skipped]
    before = harness.snapshot(kept)
    assert any(np.any(b) for b in harness.snapshot(optimizer.state_variables)) or (
        not optimizer.state_variables
    )

    logs = sam_model.fit(bad_x, y, batch_size=16, epochs=1, verbose=0).history

    for want, variable in zip(before, kept, strict=True):
        np.testing.assert_array_equal(harness.to_numpy(variable), want, err_msg=variable.path)
    assert int(harness.to_numpy(optimizer.iterations)) == 1
    assert int(harness.to_numpy(skipped)) == 1
    # The logs show it as a skipped step, which adds nothing to the averages: here the
    # epoch's only step, so the epoch has no applied step and logs NaN (as plain Keras
    # would on this batch), never a loss of 0 that looks like success.
    assert logs["skipped_steps"] == [1.0]
    assert np.isnan(logs["loss"][0]) and np.isnan(logs["accuracy"][0])
    assert (
        np.isnan(logs["sharpness"][0])
        if optimizer.measures_sharpness
        else ("sharpness" not in logs)
    )

    # The next good batch trains.
    model.layers[-1].disarm()
    sam_model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(harness.to_numpy(optimizer.iterations)) == 2
    assert int(harness.to_numpy(skipped)) == 1


# ------------------------------------------------- what SAM reduces to, bitwise
INNER_OPTIMIZERS = harness.INNER_OPTIMIZERS


def _plain_and_wrapped(rng, mode, plain_optimizer, wrapped_optimizer, **model_kwargs):
    x, y = rng.normal(size=(40, 4)).astype("float32"), rng.integers(0, 3, 40)
    plain = harness.bn_dropout_model(**model_kwargs)
    wrapped_inner = harness.bn_dropout_model(**model_kwargs)
    wrapped = keras_sam.SAMModel(wrapped_inner)
    for model, optimizer in ((plain, plain_optimizer), (wrapped, wrapped_optimizer)):
        model.compile(
            optimizer=optimizer, loss=_xent(), metrics=["accuracy"], **harness.MODES[mode]
        )
    histories = [
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0).history
        for model in (plain, wrapped)
    ]
    return plain, wrapped_inner, histories


@pytest.mark.parametrize("mode", MODES)
def test_with_a_plain_optimizer_it_trains_exactly_like_the_unwrapped_model(rng, mode):
    with pytest.warns(UserWarning, match="compiled with `SGD`, not a keras-sam optimizer") as w:
        plain, wrapped_inner, (h1, h2) = _plain_and_wrapped(
            rng,
            mode,
            keras.optimizers.SGD(0.1, momentum=0.9),
            keras.optimizers.SGD(0.1, momentum=0.9),
        )
    # Once, at compile: not a warning per step.
    assert len([x for x in w if "not a keras-sam optimizer" in str(x.message)]) == 1
    assert h1 == h2  # the same logs, and no `sharpness` key
    harness.assert_bitwise(
        harness.snapshot(wrapped_inner.variables), harness.snapshot(plain.variables)
    )


def test_a_plain_optimizer_warns_once_with_the_fix_and_a_sam_one_does_not():
    sam_model = keras_sam.SAMModel(harness.fragile_model())
    with pytest.warns(UserWarning) as caught:
        sam_model.compile(optimizer="adam", loss=_xent())
    (message,) = [str(w.message) for w in caught if "SAMModel" in str(w.message)]
    assert "compiled with `Adam`" in message
    assert "keras_sam.SAM(keras.optimizers.Adam(...), rho=0.05)" in message
    sam_model = keras_sam.SAMModel(harness.fragile_model())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sam_model.compile(optimizer=keras_sam.SAM(_sgd()), loss=_xent())


def test_a_model_with_nothing_to_train_is_refused_before_any_step(rng):
    model = harness.fragile_model()
    model.trainable = False
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(optimizer=keras_sam.SAM(_sgd()), loss=_xent())
    before = harness.snapshot(model.variables)
    x, y = rng.normal(size=(8, 6)).astype("float32"), rng.integers(0, 3, 8)
    with pytest.raises(ValueError, match="has no trainable weights: SAM has nothing to perturb"):
        sam_model.fit(x, y, verbose=0)
    harness.assert_bitwise(harness.snapshot(model.variables), before)
    model.trainable = True  # the fix the message names
    sam_model.compile(optimizer=keras_sam.SAM(_sgd()), loss=_xent())
    history = sam_model.fit(x, y, verbose=0).history
    assert history["sharpness"][0] > 0


@pytest.mark.parametrize(
    "name, mode",
    # Every optimizer where the step is bitwise (TensorFlow eagerly; PyTorch), else compiled.
    [(n, COMPILED if keras.backend.backend() == "jax" else "eager") for n in INNER_OPTIMIZERS]
    + [("sgd_momentum", COMPILED), ("adam", "compiled"), ("adam", "xla")],
)
def test_rho_zero_is_the_inner_optimizer(rng, name, mode):
    # Bitwise where the ops run as written (TensorFlow, eagerly). Compiled, the one-pass SAM
    # step and Keras's own step are different graphs, which TensorFlow's graph optimizer
    # (grappler) and XLA may fuse differently: on TensorFlow they differ by an ulp here (and
    # agree bitwise with `disable_meta_optimizer`). On JAX, SAM's pass runs under `jax.grad`
    # inside its step and Keras's under `jax.value_and_grad`: an ulp apart, eagerly too. So
    # there they agree to float32 rounding, which a bias cancelled by BatchNormalization
    # cannot show: its gradient is rounding noise that Adam amplifies to the learning rate
    # (harness.bn_dropout_model), so those models leave it out. PyTorch runs eagerly in
    # both modes (jit_compile=False), with the same ops as Keras's step: bitwise there.
    backend = keras.backend.backend()
    bitwise = backend == "torch" or (mode == "eager" and backend == "tensorflow")
    inner = INNER_OPTIMIZERS[name]()
    plain_optimizer = INNER_OPTIMIZERS[name]()
    sam = keras_sam.SAM(inner, rho=0)
    plain, wrapped_inner, (h1, h2) = _plain_and_wrapped(
        rng, mode, plain_optimizer, sam, bias_before_batchnorm=bitwise
    )
    got = harness.snapshot(wrapped_inner.variables) + harness.snapshot(inner.variables)
    want = harness.snapshot(plain.variables) + harness.snapshot(plain_optimizer.variables)
    if bitwise:
        assert h1["loss"] == h2["loss"] and h1["accuracy"] == h2["accuracy"]
        harness.assert_bitwise(got, want)
    else:
        np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-6)
        harness.assert_weights_close(got, want, rtol=1e-5, atol=1e-6)
    assert int(harness.to_numpy(sam.iterations)) == 10


# ---------------------------------------------------------- steps per execution
@pytest.mark.parametrize(
    "method, mode",
    [("SAM", "eager"), ("SAM", "compiled"), ("LookSAM", COMPILED), ("LookSAM", "xla")],
)
def test_several_steps_per_execution_match_the_float64_reference(rng, mode, method):
    if keras.backend.backend() == "torch":
        pytest.skip(
            "Keras's PyTorch trainer refuses steps_per_execution > 1 for any model "
            "(ValueError: `steps_per_execution` must be 1 with the PyTorch backend)"
        )
    params = reference.mlp_init(rng)
    batch_list = harness.batches(rng, 7, size=8)  # executions of 3, 3 and 1 steps
    if method == "SAM":
        optimizer = keras_sam.SAM(_sgd(), rho=0.05)
        step_fn = lambda *a: reference.sam_step(*a, rho=0.05)  # noqa: E731
    else:
        optimizer = keras_sam.LookSAM(_sgd(), rho=0.1, k=2, alpha=0.7)
        step_fn = lambda *a: reference.looksam_step(*a, rho=0.1, k=2, alpha=0.7)  # noqa: E731
    run = harness.train(optimizer, harness.mlp(params), batch_list, mode, steps_per_execution=3)
    want, _, passes = reference.trajectory(step_fn, params, batch_list, reference.sgd(0.1, 0.9))
    harness.assert_weights_close(run.weights, want)
    assert run.iterations == 7
    if method == "LookSAM":
        assert run.second_passes == passes == 4


# ------------------------------------------------------------- saving, resuming
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, mode",
    [(n, harness.DEFAULT_MODE) for n in harness.RESUME_OPTIMIZERS]
    + [("SAM+Adam", m) for m in MODES if m != harness.DEFAULT_MODE],
)
def test_resume_from_a_keras_file_is_bitwise_the_uninterrupted_run(tmp_path, name, mode):
    make_optimizer = harness.RESUME_OPTIMIZERS[name]
    straight = harness.resume_compiled(make_optimizer, **harness.MODES[mode])
    harness.resume_fit(straight, 4)

    first = harness.resume_compiled(make_optimizer, **harness.MODES[mode])
    harness.resume_fit(first, 2)
    first.save(tmp_path / "run.keras")
    resumed = keras.saving.load_model(tmp_path / "run.keras")
    harness.resume_fit(resumed, 2)
    harness.assert_bitwise(harness.full_state(resumed), harness.full_state(straight))


def test_keras_file_round_trip_for_sam_model_and_inner_model(rng, tmp_path):
    x = rng.normal(size=(24, 4)).astype("float32")
    y = rng.integers(0, 3, 24)
    inner = harness.bn_dropout_model()
    sam_model = keras_sam.SAMModel(inner, num_batch_splits=2)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.05, momentum=0.9), rho=0.07, adaptive=True),
        loss=_xent(),
        metrics=["accuracy"],
    )
    sam_model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    sam_model.save(tmp_path / "sam.keras")
    inner.save(tmp_path / "inner.keras")

    loaded = keras.saving.load_model(tmp_path / "sam.keras")
    assert isinstance(loaded, keras_sam.SAMModel) and isinstance(loaded.optimizer, keras_sam.SAM)
    assert loaded.num_batch_splits == 2
    assert loaded.optimizer.get_config() == sam_model.optimizer.get_config()
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), sam_model.predict(x, verbose=0))
    harness.assert_bitwise(
        harness.snapshot(loaded.optimizer.variables),
        harness.snapshot(sam_model.optimizer.variables),
    )
    plain_inner = keras.saving.load_model(tmp_path / "inner.keras")
    assert type(plain_inner) is keras.Sequential
    np.testing.assert_array_equal(plain_inner.predict(x, verbose=0), inner.predict(x, verbose=0))


def test_saved_model_keeps_the_variant_and_its_state(rng, tmp_path):
    params = reference.mlp_init(rng)
    x, t = harness.stack(harness.batches(rng, 4, size=8))
    sam_model = keras_sam.SAMModel(harness.mlp(params))
    sam_model.compile(optimizer=keras_sam.LookSAM(keras.optimizers.SGD(0.05), k=3), loss="mse")
    sam_model.fit(x, t, batch_size=8, epochs=1, verbose=0)
    sam_model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, keras_sam.LookSAM) and loaded.optimizer.k == 3
    saved, restored = sam_model.optimizer.variables, loaded.optimizer.variables
    # own, skipped steps, pass counter, g_v slots, SGD's
    assert len(saved) == len(restored) == 2 + 1 + 1 + 4 + 2
    assert float(harness.to_numpy(loaded.optimizer.second_passes)) == 2  # steps 0 and 3 of 4
    assert np.any(harness.to_numpy(loaded.optimizer.state_variables[1]))
    harness.assert_bitwise(harness.snapshot(restored), harness.snapshot(saved))


# ------------------------------------------------------------ the model itself
class SubclassedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4, activation="relu")
        self.out = keras.layers.Dense(1)

    def call(self, x):
        return self.out(self.hidden(x))


def test_subclassed_model_and_validation_and_callbacks(rng):
    model = SubclassedNet()
    model(np.zeros((1, 3), "float32"))
    x, y = rng.normal(size=(32, 3)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")
    seen = []

    class Recorder(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(sorted(logs))

    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.05)), loss="mse", metrics=["mae"]
    )
    history = sam_model.fit(
        x,
        y,
        validation_data=(x[:8], y[:8]),
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[Recorder()],
    ).history
    assert set(history) == {"loss", "mae", "sharpness", "skipped_steps", "val_loss", "val_mae"}
    assert seen[0] == ["loss", "mae", "sharpness", "skipped_steps"]
    evaluated = sam_model.evaluate(x[:8], y[:8], verbose=0, return_dict=True)
    assert set(evaluated) == {"loss", "mae"}
    np.testing.assert_allclose(evaluated["loss"], history["val_loss"][-1], rtol=1e-6)
    np.testing.assert_allclose(
        sam_model.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6
    )
    expected_loss = float(np.mean((model.predict(x[:8], verbose=0) - y[:8]) ** 2))
    np.testing.assert_allclose(evaluated["loss"], expected_loss, rtol=1e-5)


def test_config_round_trip():
    model = harness.bn_dropout_model()
    sam_model = keras_sam.SAMModel(model, num_batch_splits=4, name="wrapped")
    config = sam_model.get_config()
    assert config["num_batch_splits"] == 4
    revived = keras_sam.SAMModel.from_config(json.loads(json.dumps(config)))
    assert revived.num_batch_splits == 4 and revived.name == "wrapped"
    assert [w.shape for w in revived.weights] == [w.shape for w in sam_model.weights]


@pytest.mark.parametrize("splits", [0, -1, 2.5, True, "2"])
def test_invalid_num_batch_splits(splits):
    with pytest.raises(ValueError, match=f"Received: num_batch_splits={splits!r}"):
        keras_sam.SAMModel(harness.bn_dropout_model(), num_batch_splits=splits)


def test_model_must_be_a_built_keras_model():
    with pytest.raises(ValueError, match="must be a `keras.Model`"):
        keras_sam.SAMModel(keras.layers.Dense(3))
    with pytest.raises(ValueError, match="must be built"):
        keras_sam.SAMModel(keras.Sequential([keras.layers.Dense(3)]))
    with pytest.raises(ValueError, match="already a `SAMModel`"):
        keras_sam.SAMModel(keras_sam.SAMModel(harness.bn_dropout_model()))
