"""Runs SAM methods through `SAMModel` on any Keras backend, for the backend-neutral tests.

Keras, keras.ops and NumPy only: nothing here imports a backend. `train` runs the batches
through `SAMModel.fit` in one of `MODES` and returns the weights and the optimizer's state
as NumPy arrays, for comparison with `tests/reference.py`.
"""

import dataclasses

import keras
import numpy as np

import keras_sam

# How `compile` runs the step: eagerly, compiled without XLA, compiled with XLA. A session
# runs the modes that are different code on its backend (tests/conftest.py).
MODES = {
    "eager": {"run_eagerly": True},
    "compiled": {"jit_compile": False},
    "xla": {"jit_compile": True},
}
# The mode `compile` picks by default (`jit_compile="auto"`) on each backend: XLA where the
# model supports it, and PyTorch's eager step (`torch.compile` traces for long on a CPU).
DEFAULT_MODE = {"tensorflow": "xla", "jax": "xla", "torch": "compiled"}[keras.backend.backend()]
# The cheapest compiled step, for a case that needs one and no mode in particular: a
# `tf.function` without XLA on TensorFlow; on JAX `jit_compile=False` is no compilation at
# all (each op dispatched from Python, the slowest step there), so `jax.jit`.
COMPILED = "xla" if keras.backend.backend() == "jax" else "compiled"


def modes_for(cases, mode_sensitive):
    """`(case, mode)` pairs: every case in `DEFAULT_MODE`, and the `mode_sensitive` ones in
    every mode too (the session keeps the modes that differ on its backend).

    A case is mode-sensitive where tracing or compiling the step could change what it
    computes: a decision taken in the step (a pass skipped, a schedule read from the
    iteration count), the method's state carried from step to step, parts of unequal
    size. The others differ from a mode-sensitive case only in maths that every mode
    runs alike (a mask resolved in Python when the optimizer is built, the inner
    optimizer's update, ASAM's scaling).
    """
    unknown = set(mode_sensitive) - set(cases)
    assert not unknown, unknown
    pairs = [(case, DEFAULT_MODE) for case in cases]
    pairs += [(case, mode) for case in mode_sensitive for mode in MODES if mode != DEFAULT_MODE]
    return pairs


def to_numpy(value):
    return np.array(keras.ops.convert_to_numpy(value), copy=True)


def snapshot(variables):
    """Copies of the variables' values, to compare bitwise later."""
    return [to_numpy(v) for v in variables]


# ------------------------------------------------------------------------ models
def mlp(params, l2=0.0, hidden_layer=keras.layers.Dense):
    """`tests/reference.py`'s MLP: Dense(5, tanh) named `hidden`, Dense(2) named `head`.

    `hidden_layer` is the class of the first layer (a Dense subclass, to select it by
    class).
    """
    regularizer = keras.regularizers.L2(l2) if l2 else None
    (d_in, d_hidden), d_out = params[0].shape, params[2].shape[1]
    layers = [
        keras.Input((d_in,)),
        hidden_layer(d_hidden, activation="tanh", kernel_regularizer=regularizer, name="hidden"),
        keras.layers.Dense(d_out, kernel_regularizer=regularizer, name="head"),
    ]
    model = keras.Sequential(layers)
    model.set_weights([np.asarray(p, "float32") for p in params])
    return model


def bn_dropout_model(seed=7, d_in=4, classes=3, bias_before_batchnorm=True):
    """Dense, BatchNormalization, Dropout, Dense: the state a step must handle.

    The first Dense layer's bias is cancelled by the BatchNormalization after it: its
    gradient is zero in exact arithmetic and rounding noise in float32 (about 1e-9), which
    Adam-like optimizers normalize into steps of the learning rate's size. Two computations
    of the same step that round differently are therefore comparable there only bitwise;
    `bias_before_batchnorm=False` leaves that bias out.
    """
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((d_in,)),
            keras.layers.Dense(8, use_bias=bias_before_batchnorm),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3, seed=2),
            keras.layers.Dense(classes),
        ]
    )


class BlowsUpWhenPerturbed(keras.layers.Layer):
    """Adds inf to its output, once armed, when its scale has left the armed value.

    Armed, it is finite in the clean pass (scale == reference) and infinite in the
    perturbed pass (scale + e).
    """

    def build(self, input_shape):
        shape = (input_shape[-1],)
        self.scale = self.add_weight(shape=shape, initializer="ones", autocast=False)
        self.reference = self.add_weight(
            shape=shape, initializer="ones", trainable=False, autocast=False
        )
        self.armed = self.add_weight(shape=(), initializer="zeros", trainable=False)

    def call(self, inputs):
        moved = keras.ops.any(keras.ops.not_equal(self.scale, self.reference))
        blow_up = keras.ops.logical_and(moved, self.armed > 0)
        scaled = inputs * keras.ops.cast(self.scale, inputs.dtype)
        return scaled + keras.ops.cast(keras.ops.where(blow_up, float("inf"), 0.0), inputs.dtype)

    def arm(self):
        # A copy: on JAX two variables must not share one buffer (`fit` donates them).
        self.reference.assign(keras.ops.copy(self.scale))
        self.armed.assign(1.0)

    def disarm(self):
        self.armed.assign(0.0)


def fragile_model(seed=3):
    """A classifier with BatchNorm and Dropout whose perturbed pass can be made infinite."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.2, seed=4),
            keras.layers.Dense(3),
            BlowsUpWhenPerturbed(),
        ]
    )


def seed_states(model):
    """The model's seed-generator states (dropout), which are variables but not weights."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


# -------------------------------------------------------------------------- data
def batches(rng, steps, size=16, d_in=3, d_out=2):
    """A different float64 regression batch per step."""
    return [(rng.normal(size=(size, d_in)), rng.normal(size=(size, d_out))) for _ in range(steps)]


def stack(batch_list):
    """The batches as one float32 array pair, for `fit(..., shuffle=False)`."""
    x = np.concatenate([x for x, _ in batch_list]).astype("float32")
    y = np.concatenate([y for _, y in batch_list]).astype("float32")
    return x, y


# ------------------------------------------------------------------------ a run
@dataclasses.dataclass
class Run:
    """What `train` returns: all NumPy, read after the last step."""

    weights: list  # the model's weights, in `model.get_weights()` order
    iterations: int
    skipped_steps: int
    second_passes: float | None  # None for methods that never skip the perturbed pass
    # (by their own rule or a rho schedule)
    state: list  # (variable name, value) of the method's `state_variables`
    inner_variables: list  # the wrapped optimizer's variables
    history: dict
    sam_model: keras_sam.SAMModel

    def state_named(self, suffix):
        """The method's state variables whose name ends with `suffix`, in order."""
        return [value for name, value in self.state if name.endswith(suffix)]


def train(
    optimizer,
    model,
    batch_list,
    mode,
    num_batch_splits=None,
    loss="mse",
    metrics=None,
    fit_kwargs=None,
    **compile_kwargs,
):
    """Trains `model` wrapped in a `SAMModel` on `batch_list`, one step per batch, in order.

    `mode` is a key of `MODES`; `compile_kwargs` go to `compile` (`steps_per_execution`).
    """
    sam_model = keras_sam.SAMModel(model, num_batch_splits=num_batch_splits)
    sam_model.compile(
        optimizer=optimizer, loss=loss, metrics=metrics, **MODES[mode], **compile_kwargs
    )
    x, y = stack(batch_list)
    history = sam_model.fit(
        x,
        y,
        batch_size=len(batch_list[0][0]),
        epochs=1,
        shuffle=False,
        verbose=0,
        **(fit_kwargs or {}),
    ).history
    return result(sam_model, history)


def result(sam_model, history=None):
    """The `Run` of a trained `SAMModel`."""
    optimizer = sam_model.optimizer
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    is_sam = isinstance(optimizer, keras_sam.SAM)
    second_passes = None
    if is_sam and optimizer.may_skip_second_pass:
        second_passes = float(to_numpy(optimizer.second_passes))
    return Run(
        weights=[np.array(w, copy=True) for w in sam_model.model.get_weights()],
        iterations=int(to_numpy(optimizer.iterations)),
        skipped_steps=int(to_numpy(optimizer.skipped_steps)) if is_sam else 0,
        second_passes=second_passes,
        state=[(v.name, to_numpy(v)) for v in optimizer.state_variables] if is_sam else [],
        inner_variables=snapshot(optimizer.inner_optimizer.variables if is_sam else []),
        history=history or {},
        sam_model=sam_model,
    )


# ---------------------------------------------------------------------- asserts
def assert_weights_close(got, want, rtol=5e-5, atol=5e-6):
    """The tolerance of a float32 trajectory against the float64 reference."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"weight {i}")


def assert_bitwise(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"array {i}")


# ------------------------------------------------------------------- resuming
# A run interrupted by a checkpoint and resumed must continue bitwise as the uninterrupted
# one: 5 batches an epoch, so that under accumulation a checkpoint falls between
# micro-batches; BatchNorm and Dropout, so that their state must come back too.
RESUME_OPTIMIZERS = {
    "SAM+Adam": lambda: keras_sam.SAM(keras.optimizers.Adam(0.01), rho=0.1),
    "LookSAM+SGD": lambda: keras_sam.LookSAM(
        keras.optimizers.SGD(0.05, momentum=0.9), rho=0.1, k=2
    ),
    "MomentumSAM+SGD": lambda: keras_sam.MomentumSAM(
        keras.optimizers.SGD(0.05, momentum=0.9), rho=0.5
    ),
    "SAM accumulating": lambda: keras_sam.SAM(
        keras.optimizers.SGD(0.05, momentum=0.9), rho=0.1, gradient_accumulation_steps=3
    ),
}


def resume_model(seed=7):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(12, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3, seed=11),
            keras.layers.Dense(3),
        ]
    )


def resume_data():
    rng = np.random.default_rng(5)
    return rng.normal(size=(40, 5)).astype("float32"), rng.integers(0, 3, 40)


def resume_compiled(make_optimizer, seed=7, **compile_kwargs):
    sam_model = keras_sam.SAMModel(resume_model(seed))
    sam_model.compile(
        optimizer=make_optimizer(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_kwargs,
    )
    return sam_model


def resume_fit(sam_model, epochs):
    x, y = resume_data()
    sam_model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)


def full_state(sam_model):
    """Everything that must match: every model variable (seed states too) and the
    optimizer's variables."""
    return snapshot(sam_model.model.variables) + snapshot(sam_model.optimizer.variables)


# The inner optimizers SAM must reduce to at rho=0 (one of each update rule).
INNER_OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01, amsgrad=True),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.05),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01, momentum=0.5),
    "lion": lambda: keras.optimizers.Lion(0.001),
}


# ------------------------------------------------ the backends' own custom-loop tests
def adapter_model():
    """Dense, BatchNormalization, Dropout, Dense: the model of tests/backends/."""
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(2),
        ]
    )


def adapter_batches(steps=4):
    rng = np.random.default_rng(5)
    return [
        (rng.normal(size=(16, 4)).astype("float32"), rng.normal(size=(16, 2)).astype("float32"))
        for _ in range(steps)
    ]


def check_loss_scale_inside_sam(quadratic_loop):
    """A `LossScaleOptimizer` inside SAM, through a backend's custom loop.

    `quadratic_loop(optimizer, steps, bad_steps=())` runs `steps` steps on a quadratic
    (a NaN loss at `bad_steps`) and returns `(variable, [(loss, weights), ...])`. Loss
    scaling in float32 is exact (the scales are powers of two): the trajectory is bitwise
    that of SAM without it, so both passes were scaled and unscaled once.
    """
    scaled = keras_sam.SAM(
        keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1, momentum=0.9), initial_scale=8.0, dynamic_growth_steps=2
        ),
        rho=0.2,
    )
    plain = keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.2)
    _, history = quadratic_loop(scaled, 5, bad_steps=(2,))
    _, want = quadratic_loop(plain, 4)
    good = [h for i, h in enumerate(history) if i != 2]
    for (_, got), (_, expected) in zip(good, want, strict=True):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(history[2][1], history[1][1])  # the NaN step: no change
    lso = scaled.inner_optimizer
    # 8 -> 16 after two finite steps, 8 after the NaN, 16 after two more.
    assert float(to_numpy(lso.dynamic_scale)) == 16.0
    assert int(to_numpy(lso.step_counter)) == 0
    assert int(to_numpy(scaled.iterations)) == 4
    assert int(to_numpy(scaled.skipped_steps)) == 1


# ------------------------------------------------------------- tf.distribute keys
_COLLECTIVE_KEY_BASES = iter(range(10_000, 10**9, 10_000))


def fresh_collective_keys():
    """Gives the `MirroredStrategy`s this test creates collective keys no earlier test used.

    Every `tf.distribute.MirroredStrategy` numbers its collective groups from
    `1 + MirroredStrategy._collective_key_base` (0 by default) and their instances from
    100, and TensorFlow keeps each (group, instance) key's tensor shape for the life of
    the process. A second strategy over the same devices thus reuses the first one's keys,
    and a collective of another shape aborts ("Shape mismatch in the collective instance
    100 ... expected shape [195] but another member ... [32]"; tensorflow/tensorflow#62790).
    The TensorFlow session's every test calls it first (tests/conftest.py), and so must a
    fixture that creates a strategy for a whole module.
    """
    import tensorflow as tf

    tf.distribute.MirroredStrategy._collective_key_base = next(_COLLECTIVE_KEY_BASES)


def trainer_state(trainer):
    """The state Keras's JAX trainer hands `train_step(state, data)`: the values of the
    trainable, non-trainable, optimizer and metrics variables."""
    groups = (
        trainer.trainable_variables,
        trainer.non_trainable_variables,
        trainer.optimizer.variables,
        trainer.metrics_variables,
    )
    return tuple([v.value for v in group] for group in groups)
