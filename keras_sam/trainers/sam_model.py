"""`SAMModel`: trains any Keras model with SAM through `fit`."""

import numbers

import keras

from keras_sam.methods.sam import SAM


@keras.saving.register_keras_serializable(package="keras_sam")
class SAMModel(keras.Model):
    """Wraps a Keras model so that `fit` trains it with SAM.

    Compile it with a `keras_sam.SAM` optimizer (or a variant): each training step then
    runs the clean pass at `w` and the perturbed pass at `w + e`, both with
    `training=True`, and descends with the perturbed gradient. BatchNorm moving
    statistics, dropout seeds and metrics are updated by the clean pass only, and the
    logs gain `sharpness`, the perturbed loss minus the clean loss, averaged over the
    epoch's two-pass steps; methods that skip the perturbed pass on some steps
    (`LookSAM`, `PeriodicSAM`, `AESAM`) also log `second_pass_rate`, the fraction of
    steps that took it. Regularization losses (`model.losses`) are part of both passes.

    Compiled with a plain Keras optimizer it trains exactly as the unwrapped model
    would. `evaluate` and `predict` are the inner model's, and `sam_model.model` is the
    plain inner model, for export without keras_sam.

    Args:
        model: a built `keras.Model` (Sequential, functional or subclassed; several
            inputs and outputs are fine).
        num_batch_splits: int >= 1 or `None`, m-sharpness: each batch is split into this
            many parts, each part gets its own perturbation, and the parts' SAM gradients
            are averaged, weighted by part size. A batch that the number does not divide
            (an epoch's last batch, say) is split into parts whose sizes differ by at
            most one; a batch smaller than the number is an error. BatchNorm statistics
            are then updated once per part. Defaults to `None` (one perturbation for the
            whole batch).
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Example:

    ```python
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=0.05),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    sam_model.fit(x, y, epochs=10)  # logs loss, accuracy and sharpness
    model.save("model.keras")       # the inner model, with no keras_sam dependency
    ```
    """

    def __init__(self, model, num_batch_splits=None, **kwargs):
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
        if num_batch_splits is not None and (
            isinstance(num_batch_splits, bool)
            or not isinstance(num_batch_splits, numbers.Integral)
            or num_batch_splits < 1
        ):
            raise ValueError(
                "`num_batch_splits` must be None or an integer >= 1. "
                f"Received: num_batch_splits={num_batch_splits!r}"
            )
        self.model = model
        self.num_batch_splits = None if num_batch_splits is None else int(num_batch_splits)
        self.sharpness_tracker = keras.metrics.Mean(name="sharpness")
        self.second_pass_tracker = keras.metrics.Mean(name="second_pass_rate")
        self.built = True

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def train_step(self, data):
        optimizer = self.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # `compile` wraps the optimizer so under the `mixed_float16` policy.
            optimizer = optimizer.inner_optimizer
        if not isinstance(optimizer, SAM):
            logs = super().train_step(data)
            logs.pop("sharpness", None)
            logs.pop("second_pass_rate", None)
            return logs
        from keras_sam.trainers import tensorflow as tf_trainer

        logs = tf_trainer.train_step(self, data)
        if not optimizer.skips_second_pass:
            logs.pop("second_pass_rate", None)
        return logs

    def test_step(self, data):
        logs = super().test_step(data)
        logs.pop("sharpness", None)
        logs.pop("second_pass_rate", None)
        return logs

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "num_batch_splits": self.num_batch_splits,
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
