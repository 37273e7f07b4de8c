"""`SAMModel`: trains any Keras model with SAM through `fit`."""

import inspect
import os
import warnings
from typing import Any

import keras

from keras_sam import backends, files
from keras_sam._validation import check_integer
from keras_sam.methods.hooks import unwrap_loss_scale
from keras_sam.methods.sam import SAM
from keras_sam.trainers.skipped_steps import (
    DEFAULT_MAX_CONSECUTIVE_SKIPS,
    StopOnSkippedSteps,
    check_max_consecutive_skips,
)


@keras.saving.register_keras_serializable(package="keras_sam")
class SAMModel(keras.Model):
    """Wraps a Keras model so that `fit` trains it with SAM.

    Compile it with a `keras_sam.SAM` optimizer (or a variant): each training step then
    runs the clean pass at `w` and the perturbed pass at `w + e`, both with
    `training=True`, and descends with the perturbed gradient. BatchNorm moving
    statistics, dropout seeds and metrics are updated by the clean pass only, and the
    logs gain `sharpness`, the perturbed loss minus the clean loss, averaged over the
    epoch's two-pass steps; methods that skip the perturbed pass on some steps
    (`LookSAM`, `PeriodicSAM`, `AESAM`, and every method whose `rho` is a schedule,
    which skips it where `rho` is 0) also log `second_pass_rate`, the fraction of
    steps that took it. `MomentumSAM` takes one pass, at a perturbed point: its `loss`
    is the loss there, and it logs no `sharpness`. Regularization losses
    (`model.losses`) are part of both passes.

    Compiled with a plain Keras optimizer it trains exactly as the unwrapped model
    would, and `compile` warns once (most often a forgotten `keras_sam.SAM`). A model
    with no trainable weights is refused at `fit` with a `ValueError`. `evaluate` and
    `predict` are the inner model's, and `sam_model.model` is the plain inner model, for
    export without keras_sam.

    Mixed precision: under the `mixed_float16` policy `compile` wraps the SAM optimizer
    in a `keras.optimizers.LossScaleOptimizer`; both passes are then loss-scaled, and a
    step with a non-finite value in either pass is skipped and lowers the scale. Under
    `tf.distribute` strategies, build and compile the `SAMModel` in `strategy.scope()`;
    on PyTorch, each process of an initialized `torch.distributed` group is a replica
    training on its own shard. The SAM optimizer's `distributed_perturbation` says how
    the replicas perturb.

    Checkpoints: besides the weights, a `SAMModel` saves the inner model's random-seed
    state (dropout masks), in `.keras` files and in `tf.train.Checkpoint`s, which Keras
    leaves out (keras-team/keras#19796): training resumed from a checkpoint continues
    bitwise as the uninterrupted run.

    Args:
        model: a built `keras.Model` (Sequential, functional or subclassed; several
            inputs and outputs are fine).
        num_batch_splits: int >= 1 or `None`, m-sharpness: each batch is split into this
            many parts, each part gets its own perturbation, and the parts' SAM gradients
            are averaged, weighted by part size. A batch that the number does not divide
            (an epoch's last batch, say) is split into parts whose sizes differ by at
            most one; a batch smaller than the number into parts of one example (the
            same eagerly, compiled and under XLA). BatchNorm statistics are then updated
            once per part. Defaults to `None` (one perturbation for the
            whole batch).
        max_consecutive_skips: int >= 1 or `None`. A step whose loss, gradients or
            updates are NaN or infinite is skipped (nothing changes but
            `optimizer.skipped_steps`, which the logs show as `skipped_steps`); after
            this many skipped steps in a row `fit` stops with a
            `keras_sam.SkippedStepsError` saying so, the weights as after the last
            applied step. An epoch whose every step was skipped logs `loss: nan` (and
            NaN metrics), as plain Keras would on NaN data. `None` never stops.
            Defaults to 100: a few skips are normal (a bad batch; under
            `mixed_float16`, the loss scale halving from 2**15 to where the gradients
            fit in float16, at most about 30 skips), 100 in a row are not (the loss
            scale would be 2**-85).
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Example:

    ```python
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.01, momentum=0.9), rho=0.05),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    sam_model.fit(x, y, epochs=10)  # logs loss, accuracy and sharpness
    model.save("model.keras")       # the inner model, with no keras_sam dependency,
                                    # uncompiled: compile it again to `evaluate` it
    ```
    """

    def __init__(
        self,
        model: keras.Model,
        num_batch_splits: int | None = None,
        max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model):
            raise ValueError(f"`model` must be a `keras.Model` instance. Received: model={model!r}")
        if isinstance(model, SAMModel):
            raise ValueError("`model` is already a `SAMModel`: wrap the plain model once.")
        if not model.built:
            raise ValueError(
                "`model` must be built before it is wrapped: call it on a batch, or call "
                "`model.build(input_shape)`, or give a Sequential model a `keras.Input`. "
                f"Received the unbuilt model {model.name!r}."
            )
        num_batch_splits = check_integer(
            "num_batch_splits", num_batch_splits, minimum=1, optional=True
        )
        self.model = model
        self.num_batch_splits = None if num_batch_splits is None else int(num_batch_splits)
        self.max_consecutive_skips = check_max_consecutive_skips(max_consecutive_skips)
        self.step_statistics = StepStatistics()
        checkpointable = backends.current().checkpointable(self._rng_states())
        if checkpointable is not None:
            # Tracked by `tf.train.Checkpoint`, which does not follow seed generators.
            self.rng_checkpoint = checkpointable
        self.built = True

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def compile(self, optimizer="rmsprop", **kwargs):
        """`keras.Model.compile`; warns when `optimizer` is not a keras-sam method.

        A plain optimizer is allowed (the model then trains exactly as the unwrapped one
        would, a baseline with the same code path), but it is most often a forgotten
        `keras_sam.SAM(...)`, which only the missing `sharpness` log would show: a
        `UserWarning` says so at compile, once.
        """
        super().compile(optimizer=optimizer, **kwargs)
        if not isinstance(self._sam_optimizer(), SAM):
            name = type(self._sam_optimizer()).__name__
            warnings.warn(
                f"`SAMModel` was compiled with `{name}`, not a keras-sam optimizer: it "
                "trains as the plain model would (one pass, no `sharpness`). For SAM, wrap "
                f"the optimizer: `optimizer=keras_sam.SAM(keras.optimizers.{name}(...), "
                "rho=0.05)`. For plain training on purpose, compile the inner model "
                "(`sam_model.model`) instead, or filter this warning.",
                UserWarning,
                stacklevel=2,
            )

    def compile_from_config(self, config):
        """Compiles a model loaded from a `.keras` file as it was saved: Keras's own
        `compile_from_config`, which skips a model whose `compile` is overridden (this
        one's only adds a warning)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if hasattr(self, "optimizer") and self.built:
            self.optimizer.build(self.trainable_variables)

    def make_train_function(self, force=False):
        # PyTorch prepares `jit_compile=True` (`torch.compile`) here, before any step.
        backends.current().check_compile(self)
        if isinstance(self._sam_optimizer(), SAM) and not self.trainable_weights:
            # As the custom loops refuse empty `variables` (plain Keras only warns).
            raise ValueError(
                f"The model {self.model.name!r} has no trainable weights: SAM has nothing "
                "to perturb or train. Make the layers to train trainable "
                "(`layer.trainable = True`), then compile with a new optimizer and `fit`."
            )
        result = super().make_train_function(force=force)
        self.train_function = backends.current().compiled_train_function(self, self.train_function)
        return result

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`, stopped after `max_consecutive_skips` skipped steps in a row.

        Raises:
            keras_sam.SkippedStepsError: when `max_consecutive_skips` steps in a row were
                skipped (see the class's `max_consecutive_skips`).
        """
        if self.max_consecutive_skips is not None and isinstance(self._sam_optimizer(), SAM):
            bound = inspect.signature(super().fit).bind(*args, **kwargs)
            callbacks = bound.arguments.get("callbacks")
            check = StopOnSkippedSteps(self.max_consecutive_skips)
            if callbacks is None or isinstance(callbacks, (list, tuple)):
                # First, so that a callback after it (a checkpoint) never runs on a
                # batch that stopped the run.
                bound.arguments["callbacks"] = [check, *(callbacks or ())]
            else:  # a `keras.callbacks.CallbackList`
                check.set_model(self)
                callbacks.callbacks.insert(0, check)
            args, kwargs = bound.args, bound.kwargs
        return super().fit(*args, **kwargs)

    def _sam_optimizer(self):
        return unwrap_loss_scale(getattr(self, "optimizer", None))

    def train_step(self, *args):
        # TensorFlow and PyTorch call `train_step(data)`; JAX calls the stateless
        # `train_step(state, data)` and takes `(logs, state)` back. The backend answers
        # both forms (`Backend.train_step`, `Backend.logs_of`): the trainer never tells
        # them apart.
        if isinstance(self._sam_optimizer(), SAM):
            # The step's logs as `fit` shows them (`keras_sam.step.model_step`).
            return backends.current().train_step(self, *args)
        result = super().train_step(*args)
        _drop_step_logs(backends.current().logs_of(result))
        return result

    def test_step(self, *args):
        result = super().test_step(*args)
        _drop_step_logs(backends.current().logs_of(result))
        return result

    # ------------------------------------------------------------- checkpoints
    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """`keras.Model.save`, written atomically to a `.keras` file.

        Keras writes the archive in place, so a kill mid-save would leave a truncated
        file where the last good one was. Here a `.keras` path is written to a
        temporary file in the same folder, then moved over `filepath`
        (`keras_sam.files.replace_atomically`): a kill leaves the previous file whole.
        Other targets (an unzipped save, a file object, `overwrite=False` over an
        existing file, which asks first) are Keras's own save.
        """
        path = os.fspath(filepath) if isinstance(filepath, (str, os.PathLike)) else None
        if (
            path is None
            or not path.endswith(".keras")
            or zipped is False
            or (not overwrite and os.path.exists(path))
        ):
            return super().save(filepath, overwrite=overwrite, zipped=zipped, **kwargs)
        with files.replace_atomically(path) as temporary:
            super().save(temporary, overwrite=True, zipped=zipped, **kwargs)

    def _rng_states(self):
        """The inner model's seed-generator states: its variables that are not weights."""
        weights = {id(w) for w in self.model.weights}
        return [v for v in self.model.variables if id(v) not in weights]

    def save_own_variables(self, store):
        super().save_own_variables(store)
        for i, state in enumerate(self._rng_states()):
            store[f"{_RNG_KEY}{i}"] = state

    def load_own_variables(self, store):
        rng_keys = [k for k in store.keys() if k.startswith(_RNG_KEY)]
        super().load_own_variables(_Without(store, rng_keys))
        states = self._rng_states()
        if len(rng_keys) != len(states):  # a file written by another version
            warnings.warn(
                f"The file holds {len(rng_keys)} random-seed states for the "
                f"{len(states)} of this model's layers: they are not restored, so dropout "
                "masks will differ from those of the run that saved it.",
                stacklevel=2,
            )
            return
        for i, state in enumerate(states):
            state.assign(store[f"{_RNG_KEY}{i}"])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "num_batch_splits": self.num_batch_splits,
                "max_consecutive_skips": self.max_consecutive_skips,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        return cls(model, **config)


_RNG_KEY = "rng_state_"


def _drop_step_logs(logs):
    """The logs of a step that is not a SAM step (a plain optimizer's, `evaluate`'s)
    without the SAM step's own, `sharpness` and `second_pass_rate`."""
    logs.pop("sharpness", None)
    logs.pop("second_pass_rate", None)


class StepStatistics(keras.metrics.Metric):
    """The SAM step's own logs, `sharpness` and `second_pass_rate`, in one metric.

    `sharpness` is the mean of `loss_sam - loss` over the steps that took the perturbed
    pass (weighted by the fraction of the step that took it, under m-sharpness);
    `second_pass_rate` the mean of that fraction over the steps. Both are kept in one
    float32 vector of sums, `[sum of sharpness x fraction, sum of fractions, steps]`:
    a step adds to it with one operation, and the logs are read with one division
    (two `keras.metrics.Mean`s take several small operations each, per step).
    Each is 0 before any step adds to it, as a `Mean` is.
    """

    def __init__(self, name="step_statistics", **kwargs):
        super().__init__(name=name, **kwargs)
        self.sums = self.add_variable(shape=(3,), initializer="zeros", name="sums")

    def update_state(self, sharpness, second_pass):
        sharpness = keras.ops.cast(sharpness, "float32")
        second_pass = keras.ops.cast(second_pass, "float32")
        step = keras.ops.stack([sharpness * second_pass, second_pass, 1.0])
        self.sums.assign(self.sums.value + step)

    def result(self):
        # A denominator of 0 has a numerator of 0 (a sum of terms weighted by its own
        # terms): 0 / 1e-30 is 0, and 1e-30 is below a float32 ulp of any other.
        sums = self.sums.value
        ratios = sums[:2] / (sums[1:] + 1e-30)
        sharpness, second_pass_rate = keras.ops.unstack(ratios)
        return {"sharpness": sharpness, "second_pass_rate": second_pass_rate}

    def reset_state(self):
        self.sums.assign(keras.ops.zeros_like(self.sums.value))


class _Without:
    """A read-only view of a Keras weights store without some of its keys."""

    def __init__(self, store, keys):
        self._store = store
        self._keys = [k for k in store.keys() if k not in set(keys)]

    def keys(self):
        return list(self._keys)

    def __getitem__(self, key):
        return self._store[key]

    def __len__(self):
        return len(self._keys)
