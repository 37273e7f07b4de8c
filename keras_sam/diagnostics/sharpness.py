"""First-order sharpness: `L(w + e) - L(w)` with SAM's `e = rho g / ||g||`."""

import keras
import tensorflow as tf

from keras_sam import maths
from keras_sam.methods.sam import adaptive_scales


def sharpness(model, x, y, *, loss=None, batch_size=256, rho=0.05, adaptive=False, eta=0.01):
    """The loss increase at SAM's worst-case point of radius `rho`, over the whole data.

    ```
    g = grad L(w)                  # L: mean loss over all of (x, y), in batches
    e = rho * g / ||g||            # ASAM: rho * T^2 g / ||T g||
    sharpness = L(w + e) - L(w)
    ```

    Args:
        model: a Keras model (run in inference mode, so BatchNorm uses its statistics).
        x, y: arrays of inputs and integer or one-hot targets.
        loss: a Keras loss; defaults to the model's compiled loss.
        batch_size: int, examples per forward pass. Defaults to 256.
        rho: float, the radius. Defaults to 0.05.
        adaptive: bool, ASAM's scaled neighbourhood. Defaults to `False`.
        eta: float, ASAM's offset. Defaults to 0.01.

    Returns:
        A dict: `loss` L(w), `perturbed_loss` L(w + e) and `sharpness`, Python floats.
    """
    loss_fn = _loss(model, loss)
    variables = model.trainable_variables
    n = len(x)
    gradients = [tf.zeros_like(v.value) for v in variables]
    clean = 0.0
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        with tf.GradientTape() as tape:
            batch_loss = keras.ops.mean(loss_fn(yb, model(xb, training=False)))
        weight = len(xb) / n
        clean += float(batch_loss) * weight
        for i, g in enumerate(tape.gradient(batch_loss, variables)):
            if g is not None:
                gradients[i] += tf.convert_to_tensor(g) * weight
    scales = adaptive_scales(variables, eta) if adaptive else None
    perturbation = maths.sam_perturbation(gradients, rho, scales=scales)
    mapping = [(v, v.value + e) for v, e in zip(variables, perturbation)]
    perturbed = 0.0
    with keras.StatelessScope(state_mapping=mapping):
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            batch_loss = keras.ops.mean(loss_fn(yb, model(xb, training=False)))
            perturbed += float(batch_loss) * len(xb) / n
    return {"loss": clean, "perturbed_loss": perturbed, "sharpness": perturbed - clean}


def _loss(model, loss):
    if loss is not None:
        return keras.losses.get(loss)
    compiled = getattr(model, "loss", None)
    if compiled is None:
        raise ValueError(
            "`loss` is required when the model is not compiled with a loss. "
            f"Received: loss=None for the uncompiled model {model.name!r}"
        )
    return keras.losses.get(compiled)
