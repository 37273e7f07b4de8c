"""MESA (Du et al., NeurIPS 2022) against an independent float64 NumPy reference, on
every backend: the gradient it descends with is that of cross-entropy plus
`lmbda * tau**2 * KL(teacher || student)` at temperature `tau`, the teacher being the
moving average of the weights, updated before each step's passes. Also: m-sharpness
parts and gradient accumulation, a bitwise resume, the cost (one gradient pass and one
forward pass a step), the logged loss, the config and the argument checks.

Backend-neutral: it runs in every backend's pytest session (see tests/conftest.py).
"""

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam import backends
from tests import harness

D_IN, HIDDEN, CLASSES, BATCH = 3, 5, 4, 12
LR, MOMENTUM = 0.2, 0.9


# --------------------------------------------------------------- the reference
def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _forward(params, x):
    w1, b1, w2, b2 = params
    h = np.tanh(x @ w1 + b1)
    return h, h @ w2 + b2


def _mesa_gradient(params, average, x, labels, coefficient, tau):
    """Cross-entropy and its gradient, plus `coefficient * tau**2 * mean KL(p_t || p_s)`
    (`p = softmax(z / tau)`, the teacher's logits from `average`, held constant)."""
    n = len(x)
    h, z = _forward(params, x)
    _, z_teacher = _forward(average, x)
    onehot = np.eye(CLASSES)[labels]
    p = _softmax(z)
    loss = -np.mean(np.log(p[np.arange(n), labels]))
    # d/dz of tau**2 * KL(p_t || softmax(z / tau)) is tau * (softmax(z / tau) - p_t).
    p_s, p_t = _softmax(z / tau), _softmax(z_teacher / tau)
    dz = (p - onehot) / n + coefficient * tau * (p_s - p_t) / n
    w1, b1, w2, b2 = params
    g_w2, g_b2 = h.T @ dz, dz.sum(0)
    dh = (dz @ w2.T) * (1 - h**2)
    return loss, [x.T @ dh, dh.sum(0), g_w2, g_b2]


def _reference_run(params, batches, lmbda, tau, decay, start_step, accumulation=1, rho=0.0):
    """SGD with momentum (Keras's rule) on the MESA gradient; returns the weights, the
    moving average and the task losses of the micro-batches. With `rho`, SAM's: the
    gradient of the same loss (the term included) at `w + rho g / ||g||`."""
    params = [np.asarray(p, np.float64) for p in params]
    average = [p.copy() for p in params]
    velocities = [np.zeros_like(p) for p in params]
    losses = []
    for step in range(len(batches) // accumulation):
        average = [decay * v + (1 - decay) * p for v, p in zip(average, params, strict=True)]
        coefficient = lmbda if step >= start_step else 0.0
        total = [np.zeros_like(p) for p in params]
        for x, labels in batches[step * accumulation : (step + 1) * accumulation]:
            loss, grads = _mesa_gradient(params, average, x, labels, coefficient, tau)
            if rho:
                norm = np.sqrt(sum(np.sum(g * g) for g in grads))
                shifted = [p + rho * g / (norm + 1e-12) for p, g in zip(params, grads, strict=True)]
                _, grads = _mesa_gradient(shifted, average, x, labels, coefficient, tau)
            losses.append(loss)
            total = [t + g / accumulation for t, g in zip(total, grads, strict=True)]
        velocities = [MOMENTUM * v - LR * g for v, g in zip(velocities, total, strict=True)]
        params = [p + v for p, v in zip(params, velocities, strict=True)]
    return params, average, losses


# ----------------------------------------------------------------- the library
def _params(rng):
    return [
        rng.normal(size=(D_IN, HIDDEN)),
        rng.normal(size=(HIDDEN,)) * 0.1,
        rng.normal(size=(HIDDEN, CLASSES)),
        rng.normal(size=(CLASSES,)) * 0.1,
    ]


def _model(params):
    model = keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(CLASSES),
        ]
    )
    model.set_weights([np.asarray(p, "float32") for p in params])
    return model


def _batches(rng, steps):
    return [(rng.normal(size=(BATCH, D_IN)), rng.integers(0, CLASSES, BATCH)) for _ in range(steps)]


def _fit(params, batches, optimizer, splits=None):
    sam_model = keras_sam.SAMModel(_model(params), num_batch_splits=splits)
    sam_model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x = np.concatenate([x for x, _ in batches]).astype("float32")
    y = np.concatenate([y for _, y in batches])
    history = sam_model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return sam_model, history.history


def _mesa(**kwargs):
    return keras_sam.MESA(keras.optimizers.SGD(LR, momentum=MOMENTUM), **kwargs)


HYPER = {"lmbda": 0.7, "temperature": 2.0, "decay": 0.6, "start_step": 2}


@pytest.mark.parametrize(
    "splits, accumulation, rho",
    [(None, 1, 0.0), (3, 1, 0.0), (None, 2, 0.0), (None, 1, 0.3)],
    ids=["whole", "3_parts", "accumulate_2", "with_sam_rho"],
)
def test_mesa_descends_with_the_gradient_of_cross_entropy_plus_the_kl_term(
    rng, splits, accumulation, rho
):
    params, batches = _params(rng), _batches(rng, 6)
    optimizer = _mesa(
        **HYPER, rho=rho, gradient_accumulation_steps=None if accumulation == 1 else accumulation
    )
    sam_model, history = _fit(params, batches, optimizer, splits)
    want, want_average, losses = _reference_run(
        params,
        batches,
        **{k if k != "temperature" else "tau": v for k, v in HYPER.items()},
        accumulation=accumulation,
        rho=rho,
    )
    harness.assert_weights_close(sam_model.model.get_weights(), want, rtol=2e-4, atol=2e-5)
    averages = [harness.to_numpy(v) for v in optimizer.state_variables]
    harness.assert_weights_close(averages, want_average, rtol=2e-4, atol=2e-5)
    # The logged loss is the task loss (cross-entropy), not the total.
    np.testing.assert_allclose(history["loss"][0], np.mean(losses), rtol=1e-4)
    # The term matters: without it the run ends elsewhere.
    plain, _, _ = _reference_run(
        params, batches, 0.0, 2.0, HYPER["decay"], 0, accumulation=accumulation, rho=rho
    )
    assert max(np.max(np.abs(a - b)) for a, b in zip(plain, want, strict=True)) > 1e-3


@pytest.mark.slow
def test_mesa_costs_one_gradient_pass_and_one_forward_pass_a_step(rng, monkeypatch):
    """Counted, not timed: the backend's gradient passes and the model's forward calls
    (eagerly, so that each call runs), beside SAM's two gradient passes. Slow on JAX
    only, whose eager `fit` takes most of its 10 to 25 seconds."""
    backend = backends.current()
    counts = {"gradient": 0, "forward": 0}
    original = type(backend).gradients

    def counting_gradients(self, *args, **kwargs):
        counts["gradient"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(backend), "gradients", counting_gradients)

    class Counting(keras.layers.Layer):
        def call(self, inputs):
            counts["forward"] += 1
            return inputs

    params, batches = _params(rng), _batches(rng, 1)

    def run(optimizer):
        counts.update(gradient=0, forward=0)
        model = _model(params)
        counted = keras.Sequential([keras.Input((D_IN,)), Counting(), model])
        sam_model = keras_sam.SAMModel(counted)
        sam_model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            run_eagerly=True,
        )
        x = np.concatenate([x for x, _ in batches]).astype("float32")
        y = np.concatenate([y for _, y in batches])
        sam_model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        return dict(counts)

    # Beside a one-pass step (SAM at rho=0) and a SAM step; one step each. (`fit` calls
    # the model a backend-dependent number of times outside the steps: compared, not
    # counted absolutely.)
    one_pass = run(keras_sam.SAM(keras.optimizers.SGD(LR), rho=0.0))
    mesa = run(_mesa())
    sam = run(keras_sam.SAM(keras.optimizers.SGD(LR), rho=0.1))
    assert one_pass["gradient"] == mesa["gradient"] == 1  # one gradient pass a step
    assert sam["gradient"] == 2
    assert mesa["forward"] - one_pass["forward"] == 1  # and one forward pass (the teacher)
    assert sam["forward"] - one_pass["forward"] == 1


@pytest.mark.slow
def test_mesa_resumes_bitwise_from_a_keras_file(tmp_path):
    """The moving average is optimizer state: saved, loaded, and the run goes on as the
    uninterrupted one (the term starts in the second half)."""

    def make():
        return keras_sam.MESA(
            keras.optimizers.SGD(0.05, momentum=0.9), lmbda=0.5, decay=0.8, start_step=7
        )

    straight = harness.resume_compiled(make)
    harness.resume_fit(straight, 4)
    first = harness.resume_compiled(make)
    harness.resume_fit(first, 2)
    first.save(tmp_path / "run.keras")
    resumed = keras.saving.load_model(tmp_path / "run.keras")
    harness.resume_fit(resumed, 2)
    harness.assert_bitwise(harness.full_state(resumed), harness.full_state(straight))
    averages = resumed.optimizer.state_variables
    assert len(averages) == len(resumed.model.trainable_variables)
    # The average is not the weights (else the check above would hold it for nothing).
    assert any(
        np.max(np.abs(harness.to_numpy(a) - harness.to_numpy(w))) > 1e-4
        for a, w in zip(averages, resumed.model.trainable_variables, strict=True)
    )


def test_mesa_config_round_trip():
    optimizer = keras_sam.MESA(
        keras.optimizers.Adam(),
        lmbda=0.3,
        temperature=4,
        decay=0.99,
        start_step=100,
        from_logits=False,
        gradient_accumulation_steps=2,
    )
    config = optimizer.get_config()
    assert keras_sam.MESA.from_config(config).get_config() == config
    assert config["lmbda"] == 0.3 and config["temperature"] == 4.0 and config["decay"] == 0.99
    assert config["start_step"] == 100 and config["from_logits"] is False
    assert config["rho"] == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lmbda": -0.1}, r"`lmbda` must be a finite number >= 0. Received: lmbda=-0.1"),
        ({"lmbda": "big"}, r"`lmbda` must be a number. Received: lmbda='big'"),
        ({"temperature": 0}, r"`temperature` must be a finite number > 0. Received: temperature=0"),
        ({"decay": 1.0}, r"`decay` must be in \[0, 1\). Received: decay=1.0"),
        ({"decay": -0.5}, r"`decay` must be a finite number >= 0"),
        ({"start_step": 1.5}, r"`start_step` must be an integer. Received: start_step=1.5"),
        ({"start_step": -1}, r"`start_step` must be >= 0. Received: start_step=-1"),
        ({"from_logits": 1}, r"`from_logits` must be True or False. Received: from_logits=1"),
    ],
)
def test_mesa_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        keras_sam.MESA("sgd", **kwargs)


def test_mesa_refuses_a_model_with_several_outputs(rng):
    inputs = keras.Input((D_IN,))
    model = keras.Model(inputs, [keras.layers.Dense(2)(inputs), keras.layers.Dense(2)(inputs)])
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(optimizer=_mesa(), loss=["mse", "mse"], run_eagerly=True)
    x = rng.normal(size=(4, D_IN)).astype("float32")
    y = rng.normal(size=(4, 2)).astype("float32")
    with pytest.raises(ValueError, match="must have one output tensor. Received 2 outputs"):
        sam_model.fit(x, [y, y], epochs=1, verbose=0)
