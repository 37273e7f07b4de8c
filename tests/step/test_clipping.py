"""The wrapped optimizer's clipping applies to the final (SAM) gradient only."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from tests import harness, reference

CLIPPINGS = [{"clipnorm": 0.05}, {"global_clipnorm": 0.08}, {"clipvalue": 0.02}]


@pytest.mark.parametrize("clipping", CLIPPINGS, ids=lambda c: next(iter(c)))
def test_clipping_applies_to_the_final_gradient_only(rng, clipping):
    params = reference.mlp_init(rng)
    x, t = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    model = harness.mlp(params)
    optimizer = keras_sam.SAM(keras.optimizers.SGD(0.1, momentum=0.9, **clipping), rho=0.1)

    @tf.function
    def step():
        def grad_func():
            with tf.GradientTape() as tape:
                pred = model(x.astype("float32"), training=True)
                loss = tf.reduce_mean((pred - t.astype("float32")) ** 2)
            return pred, loss, tape

        return optimizer.optimize(grad_func, model.trainable_variables)

    want, velocities = params, [np.zeros_like(p) for p in params]
    for _ in range(3):
        step()
        # The perturbation from the unclipped clean gradient; the step with the clipped
        # SAM gradient.
        _, _, g_sam = reference.mlp_sam_gradient(want, x, t, 0.1)
        clipped = reference.clip(g_sam, **clipping)
        assert max(np.max(np.abs(a - b)) for a, b in zip(clipped, g_sam)) > 1e-3  # it clips
        want, velocities = reference.sgd_momentum(want, clipped, velocities, 0.1, 0.9)
    for got, expected in zip(model.get_weights(), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    # Clipping the clean gradient too would give another perturbation (per-tensor and
    # per-value clipping change its direction): not what happened.
    if "global_clipnorm" not in clipping:
        g = reference.mlp_loss_and_grads(params, x, t)[1]
        e_clipped = reference.perturbation(reference.clip(g, **clipping), 0.1)
        e = reference.perturbation(g, 0.1)
        assert max(np.max(np.abs(a - b)) for a, b in zip(e, e_clipped)) > 1e-3
