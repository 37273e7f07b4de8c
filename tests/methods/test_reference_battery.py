"""SAM, ASAM and every variant through `SAMModel.fit`, on every backend, against the
independent NumPy float64 implementations of `tests/reference.py`: several steps with the
method's state. Every case runs in the backend's default mode (`fit`'s own: XLA on
TensorFlow and JAX); the mode-sensitive cases (`MODE_SENSITIVE`) eagerly and compiled too
(`harness.modes_for` says which and why).

Backend-neutral: it runs in every backend's pytest session (see tests/conftest.py).
"""

import dataclasses
import functools

import keras
import numpy as np
import pytest

import keras_sam
from tests import harness, reference

LR, MOMENTUM, ADAM_LR, STEPS = 0.1, 0.9, 0.01, 7
HEAD, HIDDEN = [False, False, True, True], [True, True, False, False]


# A `perturb` predicate must be registered, so that a saved model can hold it.
@keras.saving.register_keras_serializable(package="keras_sam_tests")
def _in_hidden(variable):
    return "hidden" in variable.path


@keras.saving.register_keras_serializable(package="keras_sam_tests")
def _in_layer_normalization(variable):
    return "/layer_normalization" in variable.path


@keras.saving.register_keras_serializable(package="keras_sam_tests")
class HiddenDense(keras.layers.Dense):
    """A Dense layer of its own class, for `perturb=(HiddenDense,)`."""


def _sgd(lr=LR):
    return keras.optimizers.SGD(lr, momentum=MOMENTUM)


def _adam():
    return keras.optimizers.Adam(ADAM_LR)


def _cosine_lr(step):
    return reference.cosine_decay(step, 0.1, 5)


@dataclasses.dataclass
class Case:
    optimizer: object  # () -> a keras_sam optimizer
    step: object  # tests/reference.py's step function, bound to the hyperparameters
    update: object = dataclasses.field(default_factory=lambda: reference.sgd(LR, MOMENTUM))
    model: dict = dataclasses.field(default_factory=dict)  # harness.mlp keyword arguments
    splits: int | None = None
    state: dict = dataclasses.field(default_factory=dict)  # state slot -> (reference key, rtol)


def _ref(step_fn, **kwargs):
    return functools.partial(step_fn, **kwargs)


CASES = {
    # SAM and ASAM with SGD momentum and with Adam.
    "sam": Case(lambda: keras_sam.SAM(_sgd(), rho=0.05), _ref(reference.sam_step, rho=0.05)),
    "asam": Case(
        lambda: keras_sam.SAM(_sgd(), rho=0.5, adaptive=True),
        _ref(reference.sam_step, rho=0.5, adaptive=True),
    ),
    "sam_adam": Case(
        lambda: keras_sam.SAM(_adam(), rho=0.05),
        _ref(reference.sam_step, rho=0.05),
        reference.adam_update(ADAM_LR),
    ),
    "asam_adam": Case(
        lambda: keras_sam.SAM(_adam(), rho=0.5, adaptive=True, eta=0.05),
        _ref(reference.sam_step, rho=0.5, adaptive=True, eta=0.05),
        reference.adam_update(ADAM_LR),
    ),
    # m-sharpness: parts of 8 and 8; of 5, 5 and 6.
    "sam_2_splits": Case(
        lambda: keras_sam.SAM(_sgd(), rho=0.1),
        _ref(reference.sam_step, rho=0.1, splits=2),
        splits=2,
    ),
    "asam_3_splits": Case(
        lambda: keras_sam.SAM(_sgd(), rho=0.5, adaptive=True),
        _ref(reference.sam_step, rho=0.5, adaptive=True, splits=3),
        splits=3,
    ),
    # Layerwise perturbation: each layer normalized on its own, radius rho / sqrt(2) each
    # (one case for cost: ASAM's scales, m-sharpness and Adam at once; plain SAM's
    # layerwise perturbation is tested against float64 in tests/test_maths.py).
    "asam_layerwise_2_splits": Case(
        lambda: keras_sam.SAM(_adam(), rho=0.5, adaptive=True, perturbation_norm="layerwise"),
        _ref(reference.sam_step, rho=0.5, adaptive=True, layerwise=True, splits=2),
        reference.adam_update(ADAM_LR),
        splits=2,
    ),
    # The variants, with their state.
    "gsam": Case(
        lambda: keras_sam.GSAM(_sgd(), rho=0.1, alpha=0.3),
        _ref(reference.gsam_step, rho=0.1, alpha=0.3),
    ),
    "gsam_adam": Case(
        lambda: keras_sam.GSAM(_adam(), rho=0.1, alpha=0.3),
        _ref(reference.gsam_step, rho=0.1, alpha=0.3),
        reference.adam_update(ADAM_LR),
    ),
    "friendly_sam": Case(
        lambda: keras_sam.FriendlySAM(_sgd(), rho=0.1, sigma=0.8, lmbda=0.6),
        _ref(reference.friendly_sam_step, rho=0.1, sigma=0.8, lmbda=0.6),
        state={"gradient_average": ("m", 5e-5)},
    ),
    "looksam": Case(
        lambda: keras_sam.LookSAM(_sgd(), rho=0.1, k=3, alpha=0.7),
        _ref(reference.looksam_step, rho=0.1, k=3, alpha=0.7),
        state={"orthogonal_gradient": ("g_v", 5e-4)},
    ),
    "periodic_sam": Case(
        lambda: keras_sam.PeriodicSAM(_sgd(), rho=0.1, k=3),
        _ref(reference.periodic_sam_step, rho=0.1, k=3),
    ),
    "aesam": Case(
        lambda: keras_sam.AESAM(_sgd(), rho=0.1, margin=0.2, decay=0.5),
        _ref(reference.aesam_step, rho=0.1, margin=0.2, decay=0.5),
        state={"squared_norm_mean": ("mean", 1e-5), "squared_norm_variance": ("var", 1e-4)},
    ),
    # `perturb=`: a regular expression, a callable, layer classes.
    "perturb_regex": Case(
        lambda: keras_sam.SAM(_sgd(), rho=0.3, perturb=r"/head/"),
        _ref(reference.masked_sam_step, rho=0.3, mask=HEAD),
    ),
    "perturb_callable": Case(
        lambda: keras_sam.SAM(_sgd(), rho=0.3, perturb=_in_hidden),
        _ref(reference.masked_sam_step, rho=0.3, mask=HIDDEN),
    ),
    "perturb_layer_class": Case(
        lambda: keras_sam.SAM(_sgd(), rho=0.3, perturb=(HiddenDense,)),
        _ref(reference.masked_sam_step, rho=0.3, mask=HIDDEN),
        model={"hidden_layer": HiddenDense},
    ),
    # rho schedules: a Keras schedule; ProportionalRho following a cosine learning rate.
    "rho_exponential_decay": Case(
        lambda: keras_sam.SAM(_sgd(), rho=keras.optimizers.schedules.ExponentialDecay(0.2, 2, 0.5)),
        _ref(reference.sam_step, rho=lambda step: 0.2 * 0.5 ** (step / 2)),
    ),
    "looksam_rho_schedule": Case(
        lambda: keras_sam.LookSAM(
            _sgd(),
            rho=keras.optimizers.schedules.ExponentialDecay(0.2, 2, 0.5),
            k=2,
            alpha=0.5,
        ),
        lambda params, x, t, state, step: reference.looksam_step(
            params, x, t, state, step, rho=0.2 * 0.5 ** (step / 2), k=2, alpha=0.5
        ),
        state={"orthogonal_gradient": ("g_v", 5e-4)},
    ),
    # Late-phase SAM (rho 0 for steps 0-2, then SAM): the steps before take one pass.
    "sam_late_phase": Case(
        lambda: keras_sam.SAM(_sgd(), rho=keras_sam.LatePhaseRho(0.1, start_step=3)),
        _ref(reference.sam_step, rho=lambda step: 0.1 if step >= 3 else 0.0),
    ),
    "looksam_late_phase": Case(
        lambda: keras_sam.LookSAM(
            _sgd(), rho=keras_sam.LatePhaseRho(0.1, start_step=3), k=2, alpha=0.5
        ),
        _ref(reference.looksam_step, rho=lambda step: 0.1 if step >= 3 else 0.0, k=2, alpha=0.5),
        state={"orthogonal_gradient": ("g_v", 5e-4)},
    ),
    "friendly_sam_late_phase": Case(
        lambda: keras_sam.FriendlySAM(
            _sgd(), rho=keras_sam.LatePhaseRho(0.1, start_step=3), sigma=0.8, lmbda=0.6
        ),
        _ref(
            reference.friendly_sam_step,
            rho=lambda step: 0.1 if step >= 3 else 0.0,
            sigma=0.8,
            lmbda=0.6,
        ),
        state={"gradient_average": ("m", 5e-5)},
    ),
    # Momentum-SAM: one pass a step, at w - rho v / ||v||; with Adam, ASAM's neighbourhood
    # and m-sharpness (the parts' passes are at the same point: the whole batch's step).
    "momentum_sam": Case(
        lambda: keras_sam.MomentumSAM(_sgd(), rho=0.5, momentum=0.8),
        _ref(reference.momentum_sam_step, rho=0.5, momentum=0.8),
        state={"momentum": ("v", 5e-5)},
    ),
    "momentum_asam_adam": Case(
        lambda: keras_sam.MomentumSAM(_adam(), rho=1.0, momentum=0.9, adaptive=True, eta=0.05),
        _ref(reference.momentum_sam_step, rho=1.0, momentum=0.9, adaptive=True, eta=0.05),
        reference.adam_update(ADAM_LR),
        state={"momentum": ("v", 5e-5)},
    ),
    "momentum_sam_perturb_regex": Case(
        lambda: keras_sam.MomentumSAM(_sgd(), rho=0.5, momentum=0.8, perturb=r"/head/"),
        _ref(reference.momentum_sam_step, rho=0.5, momentum=0.8, mask=HEAD),
        state={"momentum": ("v", 5e-5)},
    ),
    "momentum_sam_2_splits": Case(
        lambda: keras_sam.MomentumSAM(_sgd(), rho=0.5, momentum=0.8),
        _ref(reference.momentum_sam_step, rho=0.5, momentum=0.8),
        splits=2,
        state={"momentum": ("v", 5e-5)},
    ),
    "gsam_proportional_rho": Case(
        lambda: keras_sam.GSAM(
            keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.1, 5), momentum=0.9),
            rho=keras_sam.ProportionalRho(
                keras.optimizers.schedules.CosineDecay(0.1, 5), rho_max=0.2, rho_min=0.02
            ),
            alpha=0.2,
        ),
        # GSAM's schedule: rho_t = rho_min + (rho_max - rho_min) * lr_t / lr_max.
        lambda params, x, t, state, step: reference.gsam_step(
            params, x, t, state, step, rho=0.02 + 0.18 * _cosine_lr(step) / 0.1, alpha=0.2
        ),
        reference.sgd(_cosine_lr, MOMENTUM),
    ),
}


# The cases whose step decides, carries state or splits unevenly, one of each kind: the
# plain step; uneven m-sharpness parts (5, 5, 6); a skipped perturbed pass every k-th step
# with carried state (LookSAM), by a statistic (AESAM) and by a rho schedule (late phase);
# a one-pass method with its state and parts (MomentumSAM); an EMA state (Friendly-SAM); a
# schedule read from the learning rate (GSAM's ProportionalRho).
MODE_SENSITIVE = [
    "sam",
    "asam_3_splits",
    "looksam",
    "aesam",
    "sam_late_phase",
    "momentum_sam_2_splits",
    "friendly_sam",
    "gsam_proportional_rho",
]


@pytest.mark.parametrize("case, mode", harness.modes_for(CASES, MODE_SENSITIVE))
def test_trajectory_matches_the_float64_reference(rng, case, mode):
    spec = CASES[case]
    params = reference.mlp_init(rng)
    batch_list = harness.batches(rng, STEPS)
    optimizer = spec.optimizer()
    run = harness.train(
        optimizer, harness.mlp(params, **spec.model), batch_list, mode, num_batch_splits=spec.splits
    )
    want, state, passes = reference.trajectory(spec.step, params, batch_list, spec.update)

    harness.assert_weights_close(run.weights, want)
    assert run.iterations == STEPS
    assert run.skipped_steps == 0
    if optimizer.may_skip_second_pass:  # by its own rule, or a rho schedule
        assert run.second_passes == passes
        assert run.history["second_pass_rate"] == [pytest.approx(passes / STEPS)]
    else:
        assert "second_pass_rate" not in run.history
    if optimizer.skips_second_pass or case.endswith("late_phase"):
        assert 0 < passes < STEPS  # the reference took both kinds of steps
    assert ("sharpness" in run.history) == optimizer.measures_sharpness
    for slot, (key, rtol) in spec.state.items():
        got, expected = run.state_named(slot), state[key]
        if isinstance(expected, list):  # one slot per weight
            harness.assert_weights_close(got, expected, rtol=rtol, atol=1e-6)
        else:
            assert got[0] == pytest.approx(expected, rel=rtol)


def test_the_cases_differ_from_plain_sam(rng):
    # Each case's reference is a different trajectory from SAM's (and from SGD's), so the
    # battery would see a trainer that ignored the method, the mask, the splits or rho.
    params = reference.mlp_init(rng)
    batch_list = harness.batches(rng, STEPS)
    sam, _, _ = reference.trajectory(CASES["sam"].step, params, batch_list, CASES["sam"].update)
    for name, spec in CASES.items():
        if name == "sam":
            continue
        want, _, _ = reference.trajectory(spec.step, params, batch_list, spec.update)
        gap = max(np.max(np.abs(a - b)) for a, b in zip(want, sam, strict=True))
        assert gap > 1e-4, name


@pytest.mark.parametrize("mode", sorted(harness.MODES))
def test_friendly_sam_state_under_m_sharpness_is_the_ema_of_the_batch_gradient(rng, mode):
    # With m_0 = 0 and a mean loss, one step sets m = (1 - lmbda) * mean of the parts'
    # gradients = (1 - lmbda) * the whole batch's gradient (the parts are equal).
    params = reference.mlp_init(rng)
    batch_list = harness.batches(rng, 1)
    optimizer = keras_sam.FriendlySAM(keras.optimizers.SGD(0.01), rho=0.1, lmbda=0.7)
    run = harness.train(optimizer, harness.mlp(params), batch_list, mode, num_batch_splits=4)
    _, g = reference.mlp_loss_and_grads(params, *batch_list[0])
    harness.assert_weights_close(
        run.state_named("gradient_average"), [0.3 * gi for gi in g], rtol=1e-4, atol=1e-7
    )


@pytest.mark.parametrize("mode", sorted(harness.MODES))
def test_sam_on_perturbs_only_normalization_layers(rng, mode):
    # Layer classes resolve, through SAMModel, to exactly the normalization variables:
    # the same step as a predicate naming them, and a different one from plain SAM.
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 3, 32)

    def train(perturb_fn):
        keras.utils.set_random_seed(3)
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(6),
                keras.layers.LayerNormalization(),
                keras.layers.Dense(3),
            ]
        )
        sam_model = keras_sam.SAMModel(model)
        optimizer = keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.5, perturb=perturb_fn(model))
        sam_model.compile(
            optimizer=optimizer, loss="sparse_categorical_crossentropy", **harness.MODES[mode]
        )
        sam_model.fit(x, y, batch_size=32, epochs=3, verbose=0)
        return model.get_weights()

    by_layers = train(lambda model: keras_sam.NORMALIZATION_LAYERS)
    by_predicate = train(lambda model: _in_layer_normalization)
    everything = train(lambda model: None)
    harness.assert_bitwise(by_layers, by_predicate)
    assert any(not np.array_equal(a, b) for a, b in zip(by_layers, everything, strict=True))
