"""Toy problems that show what SAM does, small enough to run in seconds on a CPU.

- `two_minima`: a 2-D loss with a deep, sharp minimum at (0, 0) and a shallower, flat
  one at (2, 0). From the same start, plain gradient descent settles in the sharp one
  and SAM in the flat one.
- `uniform_vs_normal`: the seed project's example, a small Dense network telling
  uniform from normal samples, trained with and without SAM by the custom-loop call.
"""

import numpy as np

SHARP_MINIMUM = (0.0, 0.0)
FLAT_MINIMUM = (2.0, 0.0)
SHARP_CURVATURE = 100.0  # the Hessian at (0, 0) is 100 * I
FLAT_CURVATURE = (0.5, 2.0)  # the Hessian at (2, 0) is diag(0.5, 2)
FLAT_HEIGHT = 0.1  # the flat minimum is 0.1 higher: plain descent has every reason to stay
TEMPERATURE = 0.02


def two_minima_loss(w):
    """A smooth minimum of two paraboloids, one sharp and one flat.

    ```
    q_sharp(w) = 100/2 |w|^2
    q_flat(w)  = 1/2 (0.5 (x - 2)^2 + 2 y^2) + 0.1
    L(w)       = -T log(exp(-q_sharp / T) + exp(-q_flat / T)),   T = 0.02
    ```

    Works on a backend tensor of shape `(2,)`, in any float dtype.
    """
    from keras import ops

    dtype = w.dtype
    flat = ops.convert_to_tensor(np.asarray(FLAT_MINIMUM), dtype=dtype)
    curvature = ops.convert_to_tensor(np.asarray(FLAT_CURVATURE), dtype=dtype)
    q_sharp = 0.5 * SHARP_CURVATURE * ops.sum(ops.square(w))
    q_flat = 0.5 * ops.sum(curvature * ops.square(w - flat)) + FLAT_HEIGHT
    both = ops.stack([-q_sharp / TEMPERATURE, -q_flat / TEMPERATURE])
    return -TEMPERATURE * ops.logsumexp(both)


def two_minima(rho=0.3, learning_rate=0.016, steps=600, start=(0.05, 0.1)):
    """Descends `two_minima_loss` from `start` with SGD and with SAM.

    Why SAM leaves the sharp minimum: near a minimum of curvature `a`, the perturbed
    gradient `a (w + e)` never vanishes, since `|e| = rho`, so SAM's iterates hover at
    a distance of about `lr a rho / (2 - lr a)` from it. With `lr a = 1.6` in the
    sharp well (gradient descent still converges there) that is 4 rho, outside the
    well; in the flat well (`lr a <= 0.032`) it is under 0.005.

    Returns:
        A dict per method (`"sgd"`, `"sam"`): the final point, its loss, the largest
        Hessian eigenvalue there (finite differences, float64), and the nearest
        minimum (`"sharp"` or `"flat"`).
    """
    import keras
    import tensorflow as tf

    from keras_sam.methods.sam import SAM

    results = {}
    for method in ("sgd", "sam"):
        w = keras.Variable(np.asarray(start, "float32"), name="w")
        optimizer = SAM(keras.optimizers.SGD(learning_rate), rho=rho if method == "sam" else 0)

        @tf.function
        def step():
            def grad_func():
                with tf.GradientTape() as tape:
                    loss = two_minima_loss(w.value)
                return w.value, loss, tape

            return optimizer.optimize(grad_func, [w])

        for _ in range(steps):
            step()
        point = w.numpy().astype("float64")
        results[method] = {
            "point": point.tolist(),
            "loss": float(two_minima_loss(tf.constant(point, "float64"))),
            "curvature": _top_curvature(point),
            "minimum": _nearest_minimum(point),
        }
    return results


def uniform_vs_normal(rho=0.05, steps=1500, batch_size=16, learning_rate=0.05, seed=0):
    """The seed project's toy problem, through the seed's custom-loop call.

    Tells 16-vectors drawn from U[0, 1) (label 1) from N(0, 1) (label 0) with a
    Dense(8, relu) -> Dense(1, sigmoid) network and binary cross-entropy, trained by
    `optimizer.optimize(grad_func, model.trainable_variables)` with SGD and with SAM
    from the same initial weights and the same batches.

    Returns:
        A dict per method (`"sgd"`, `"sam"`): the test loss and accuracy on 4,000
        fresh examples, and the test sharpness `L(w + e) - L(w)` at `rho`.
    """
    import keras
    import tensorflow as tf

    from keras_sam.diagnostics import sharpness
    from keras_sam.methods.sam import SAM

    rng = np.random.default_rng(seed)

    def sample(n):
        x = np.concatenate([rng.uniform(size=(n, 16)), rng.normal(size=(n, 16))])
        y = np.concatenate([np.ones((n, 1)), np.zeros((n, 1))])
        return x.astype("float32"), y.astype("float32")

    x_train, y_train = sample(1000)
    x_test, y_test = sample(2000)
    batches = rng.integers(0, len(x_train), size=(steps, batch_size))
    loss_fn = keras.losses.BinaryCrossentropy()
    results = {}
    for method in ("sgd", "sam"):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(8, activation="relu"),
                keras.layers.Dense(1, activation="sigmoid"),
            ]
        )
        optimizer = SAM(keras.optimizers.SGD(learning_rate), rho=rho if method == "sam" else 0)

        @tf.function
        def train_step(x, y):
            def grad_func():
                with tf.GradientTape() as tape:
                    pred = model(x, training=True)
                    loss = loss_fn(y, pred)
                return pred, loss, tape

            return optimizer.optimize(grad_func, model.trainable_variables)

        for index in batches:
            train_step(x_train[index], y_train[index])
        pred = model(x_test)
        results[method] = {
            "test_loss": float(loss_fn(y_test, pred)),
            "test_accuracy": float(np.mean((np.asarray(pred) > 0.5) == (y_test > 0.5))),
            "test_sharpness": sharpness(model, x_test, y_test, loss=loss_fn, rho=rho)["sharpness"],
        }
    return results


def _top_curvature(point, step=1e-3):
    """Largest eigenvalue of the Hessian of `two_minima_loss` at `point` (float64)."""
    import tensorflow as tf

    def loss(p):
        return float(two_minima_loss(tf.constant(p, "float64")))

    hessian = np.zeros((2, 2))
    for i in range(2):
        for j in range(2):
            di, dj = np.eye(2)[i] * step, np.eye(2)[j] * step
            hessian[i, j] = (
                loss(point + di + dj)
                - loss(point + di - dj)
                - loss(point - di + dj)
                + loss(point - di - dj)
            ) / (4 * step * step)
    return float(np.linalg.eigvalsh(hessian)[-1])


def _nearest_minimum(point):
    sharp = np.linalg.norm(np.asarray(point) - SHARP_MINIMUM)
    flat = np.linalg.norm(np.asarray(point) - FLAT_MINIMUM)
    return "sharp" if sharp < flat else "flat"
