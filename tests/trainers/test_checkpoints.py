"""Exact resume from `.keras` files and `tf.train.Checkpoint`s, dropout masks included;
and what a SAM checkpoint holds."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from tests import processes
from tests.harness import RESUME_OPTIMIZERS as OPTIMIZERS
from tests.harness import full_state as _state
from tests.harness import resume_compiled as _compiled
from tests.harness import resume_data as _data
from tests.harness import resume_fit as _fit
from tests.harness import resume_model as _model

FIRST_EPOCHS, MORE_EPOCHS = 2, 2


def _save(sam_model, directory, form):
    if form == "keras":
        sam_model.save(directory / "run.keras")
        return directory / "run.keras"
    return tf.train.Checkpoint(model=sam_model, optimizer=sam_model.optimizer).save(
        str(directory / "ckpt")
    )


def _load(path, form, make_optimizer):
    if form == "keras":
        return keras.saving.load_model(path)
    sam_model = _compiled(make_optimizer, seed=99)  # other initial weights and seeds
    sam_model.optimizer.build(sam_model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=sam_model, optimizer=sam_model.optimizer)
    checkpoint.restore(path).assert_existing_objects_matched()
    return sam_model


def _assert_bitwise(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("form", ["tf_checkpoint"])  # `.keras` files: test_contract.py
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_is_bitwise_the_uninterrupted_run(tmp_path, form, name):
    make_optimizer = OPTIMIZERS[name]
    straight = _compiled(make_optimizer)
    _fit(straight, FIRST_EPOCHS + MORE_EPOCHS)

    first = _compiled(make_optimizer)
    _fit(first, FIRST_EPOCHS)
    path = _save(first, tmp_path, form)
    resumed = _load(path, form, make_optimizer)
    _fit(resumed, MORE_EPOCHS)
    _assert_bitwise(_state(resumed), _state(straight))


def test_resume_under_mixed_float16_keeps_the_loss_scale(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    make_optimizer = OPTIMIZERS["SAM+Adam"]
    straight = _compiled(make_optimizer)
    _fit(straight, FIRST_EPOCHS + MORE_EPOCHS)
    first = _compiled(make_optimizer)
    _fit(first, FIRST_EPOCHS)
    first.optimizer.dynamic_scale.assign(64.0)  # an unusual scale, to see it restored
    first.save(tmp_path / "run.keras")
    resumed = keras.saving.load_model(tmp_path / "run.keras")
    assert float(resumed.optimizer.dynamic_scale.numpy()) == 64.0
    assert int(resumed.optimizer.step_counter.numpy()) == 2 * 5


@pytest.mark.xfail(
    strict=True,
    reason="Keras does not save a layer's seed-generator state (keras-team/keras#19796): a "
    "plain model resumes with other dropout masks, which is why SAMModel saves them. This "
    "test passes, and so fails as strict xfail, once Keras restores them itself.",
)
def test_plain_keras_restores_the_dropout_seed(tmp_path):
    model = _model()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(True))
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "plain.keras")
    loaded = keras.saving.load_model(tmp_path / "plain.keras")
    states = [v for v in model.variables if "seed_generator" in v.path]
    loaded_states = [v for v in loaded.variables if "seed_generator" in v.path]
    assert states and len(states) == len(loaded_states)
    for a, b in zip(states, loaded_states, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _checkpoint_entries(sam_model, directory):
    path = tf.train.Checkpoint(model=sam_model, optimizer=sam_model.optimizer).save(
        str(directory / "ckpt")
    )
    return {
        name: int(np.prod(shape))
        for name, shape in tf.train.list_variables(path)
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
    }


@pytest.mark.parametrize("name", ["SAM", "LookSAM"])
def test_a_sam_checkpoint_is_a_plain_one_plus_the_methods_real_state(tmp_path, name):
    x, y = _data()
    targets = np.eye(3, dtype="float32")[y]
    plain = keras_sam.SAMModel(_model())
    plain.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
    sam = keras_sam.SAMModel(_model())
    method = getattr(keras_sam, name)
    sam.compile(optimizer=method(keras.optimizers.SGD(0.05, momentum=0.9)), loss="mse")
    for model in (plain, sam):
        model.fit(x, targets, batch_size=8, epochs=1, verbose=0)
    plain_entries = _checkpoint_entries(plain, tmp_path / "plain")
    sam_entries = _checkpoint_entries(sam, tmp_path / "sam")

    def part(entries, prefix, exclude=()):
        return {
            k[len(prefix) :]: v
            for k, v in entries.items()
            if k.startswith(prefix) and not k.startswith(exclude)
        }

    # The model (with its seed states) and the wrapped optimizer are stored as a plain
    # run stores them; the weights once, as the optimizer's `_trainable_variables`.
    assert part(sam_entries, "model/") == part(plain_entries, "model/")
    inner = part(sam_entries, "optimizer/inner_optimizer/")
    plain_optimizer = part(plain_entries, "optimizer/")
    assert inner == {
        k: v for k, v in plain_optimizer.items() if not k.startswith("_trainable_variables/")
    }
    assert part(sam_entries, "optimizer/_trainable_variables/") == part(
        plain_entries, "optimizer/_trainable_variables/"
    )
    # What SAM adds: the base class's (unused) iterations and learning rate, the count
    # of skipped steps; a variant adds its own state, here LookSAM's pass counter and
    # its stored direction, one slot per weight.
    own = part(sam_entries, "optimizer/", ("optimizer/inner_optimizer/", "optimizer/_trainable"))
    bookkeeping = {f"_{n}/.ATTRIBUTES/VARIABLE_VALUE": 1 for n in ("iterations", "learning_rate")}
    bookkeeping["_skipped_steps/.ATTRIBUTES/VARIABLE_VALUE"] = 1
    assert {k: v for k, v in own.items() if k in bookkeeping} == bookkeeping
    state = sum(v for k, v in own.items() if k not in bookkeeping)
    n_weights = sum(int(np.prod(v.shape)) for v in sam.trainable_variables)
    assert state == (0 if name == "SAM" else n_weights + 1)
    assert sum(sam_entries.values()) == sum(plain_entries.values()) + 3 + state


RESUME_SCRIPT = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, {root!r})
import numpy as np
import tensorflow as tf
import keras
from keras_sam import SAM, SAMModel  # keras_sam's names are lazy: import them to register
from tests.trainers import test_checkpoints as t

directory = {directory!r}
for form in ("keras", "tf_checkpoint"):
    path = os.path.join(directory, "run.keras" if form == "keras" else "ckpt-1")
    resumed = t._load(path, form, t.OPTIMIZERS["SAM+Adam"])
    t._fit(resumed, t.MORE_EPOCHS)
    np.savez(os.path.join(directory, form + ".npz"), *t._state(resumed))
"""


@pytest.mark.slow
def test_resume_in_a_fresh_process_is_bitwise(tmp_path):
    make_optimizer = OPTIMIZERS["SAM+Adam"]
    straight = _compiled(make_optimizer)
    _fit(straight, FIRST_EPOCHS + MORE_EPOCHS)
    first = _compiled(make_optimizer)
    _fit(first, FIRST_EPOCHS)
    _save(first, tmp_path, "keras")
    _save(first, tmp_path, "tf_checkpoint")

    root = str(Path(__file__).parents[2])
    script = RESUME_SCRIPT.format(root=root, directory=str(tmp_path))
    processes.run_code(script)
    want = _state(straight)
    for form in ("keras", "tf_checkpoint"):
        saved = np.load(tmp_path / f"{form}.npz")
        _assert_bitwise([saved[f"arr_{i}"] for i in range(len(saved.files))], want)


def test_custom_loop_resume_with_the_seed_states_in_the_checkpoint(tmp_path):
    # The README's recipe for a custom loop: add the seed states to the checkpoint.
    x, y = _data()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def setup(seed):
        model = _model(seed)
        optimizer = keras_sam.SAM(keras.optimizers.Adam(0.01), rho=0.1)
        optimizer.build(model.trainable_variables)
        seeds = [v.value for v in model.variables if "seed_generator" in v.path]
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, seeds=seeds)

        @tf.function
        def step(x_batch, y_batch):
            def grad_func():
                with tf.GradientTape() as tape:
                    pred = model(x_batch, training=True)
                    loss = loss_fn(y_batch, pred)
                return pred, loss, tape

            return optimizer.optimize(grad_func, model.trainable_variables)[1]

        def train(epochs):
            for _ in range(epochs):
                for start in range(0, len(x), 8):
                    step(x[start : start + 8], y[start : start + 8])

        return model, optimizer, checkpoint, train

    model, optimizer, _, train = setup(7)
    train(FIRST_EPOCHS + MORE_EPOCHS)
    first_model, _, first_checkpoint, first_train = setup(7)
    first_train(FIRST_EPOCHS)
    path = first_checkpoint.save(str(tmp_path / "loop"))
    resumed, resumed_optimizer, checkpoint, resumed_train = setup(99)
    checkpoint.restore(path).assert_consumed()
    resumed_train(MORE_EPOCHS)
    want = [v.numpy() for v in model.variables + optimizer.variables]
    _assert_bitwise([v.numpy() for v in resumed.variables + resumed_optimizer.variables], want)
