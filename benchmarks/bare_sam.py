"""A bare two-pass SAM step, written by hand as a user would, for `fit` on any backend.

The floor that `regimes.py` measures keras-sam against: the clean gradient, `e = rho g
/ ||g||`, `w += e` in place, the gradient at `w + e`, `w -= e`, and the optimizer's
step, with nothing else: no finite check, no skipped steps, no m-sharpness, the
weights perturbed in place (davda54/sam's design). One `train_step` per backend, each
as Keras's own trainer writes a plain step.

The benchmarks' other bare SAM, `torch_reference.SAM`, is the same algorithm outside Keras:
davda54's optimizer on a `torch.nn` model, the reference for what Keras and keras-sam add on
PyTorch (`backends.py`). This one runs inside Keras's `fit` on every backend, the floor for
what keras-sam's step adds over the same trainer; neither can stand in for the other.
"""

import keras

RHO_EPSILON = 1e-12


class BareSAM(keras.Model):
    def __init__(self, model, rho=0.05, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.rho = rho

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def train_step(self, *args):
        backend = keras.backend.backend()
        return getattr(self, f"_{backend}_train_step")(*args)

    # --------------------------------------------------------------- TensorFlow
    def _tensorflow_train_step(self, data):
        import tensorflow as tf

        x, y = data[0], data[1]
        variables = self.trainable_variables

        def gradients(training):  # `training`: whether the loss is logged
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred, training=training)
            return loss, tape.gradient(loss, variables)

        loss, grads = gradients(True)
        scale = self.rho / (tf.linalg.global_norm(grads) + RHO_EPSILON)
        perturbation = [g * scale for g in grads]
        for v, e in zip(variables, perturbation):
            v.assign_add(e)
        _, grads = gradients(False)
        for v, e in zip(variables, perturbation):
            v.assign_sub(e)
        self.optimizer.apply(grads, variables)
        return {"loss": loss}

    # ---------------------------------------------------------------------- JAX
    def _jax_train_step(self, state, data):
        import jax

        trainable, non_trainable, optimizer_values, metrics = state
        x, y = data[0], data[1]
        value_and_grad = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)

        def gradients(values):
            (_, (loss, y_pred, new_non_trainable, new_metrics)), grads = value_and_grad(
                values,
                non_trainable,
                metrics,
                x,
                y,
                None,
                training=True,
                optimizer_variables=optimizer_values,
            )
            return loss, y_pred, grads, new_non_trainable, new_metrics

        loss, y_pred, grads, non_trainable, new_metrics = gradients(trainable)
        norm = jax.numpy.sqrt(sum(jax.numpy.sum(jax.numpy.square(g)) for g in grads))
        scale = self.rho / (norm + RHO_EPSILON)
        grads = gradients([w + scale * g for w, g in zip(trainable, grads)])[2]
        trainable, optimizer_values = self.optimizer.stateless_apply(
            optimizer_values, grads, trainable
        )
        logs, metrics = self._update_metrics_variables(new_metrics, loss, x, y, y_pred, None)
        return logs, (trainable, non_trainable, optimizer_values, metrics)

    # ------------------------------------------------------------------ PyTorch
    def _torch_train_step(self, data):
        import torch

        x, y = data[0], data[1]
        variables = self.trainable_weights
        weights = [v.value for v in variables]

        def gradients(training):  # `training`: whether the loss is logged
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, training=training)
            self.zero_grad()
            loss.backward()
            return loss.detach(), [w.grad for w in weights]

        loss, grads = gradients(True)
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            perturbation = torch._foreach_mul(grads, self.rho / (norm + RHO_EPSILON))
            torch._foreach_add_(weights, perturbation)
        _, grads = gradients(False)
        with torch.no_grad():
            torch._foreach_sub_(weights, perturbation)
            self.optimizer.apply(grads, variables)
        return {"loss": loss}
