"""Toy problems that show what SAM does, small enough to run in seconds on a CPU.

- `two_minima`: a 2-D loss with a deep, sharp minimum at (0, 0) and a shallower, flat
  one at (2, 0). From the same start, plain gradient descent settles in the sharp one
  and SAM in the flat one.
- `uniform_vs_normal`: the seed project's example, a small Dense network telling
  uniform from normal samples, trained with and without SAM.

Both run on every Keras backend: each step takes its gradients from the backend's
autodiff (`keras_sam.backends`) and asks the SAM object what to do with them.
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

    from keras_sam.methods.sam import SAM

    results = {}
    for method in ("sgd", "sam"):
        w = keras.Variable(np.asarray(start, "float32"), name="w")
        optimizer = SAM(keras.optimizers.SGD(learning_rate), rho=rho if method == "sam" else 0)
        step = _sam_step(optimizer, [w], lambda values: two_minima_loss(values[0]))
        for _ in range(steps):
            step()
        point = keras.ops.convert_to_numpy(w.value).astype("float64")
        results[method] = {
            "point": point.tolist(),
            "loss": _loss_at(point),
            "curvature": _top_curvature(point),
            "minimum": _nearest_minimum(point),
        }
    return results


def uniform_vs_normal(rho=0.05, steps=1500, batch_size=16, learning_rate=0.05, seed=0):
    """The seed project's toy problem, step by step with SGD and with SAM.

    Tells 16-vectors drawn from U[0, 1) (label 1) from N(0, 1) (label 0) with a
    Dense(8, relu) -> Dense(1, sigmoid) network and binary cross-entropy, trained with
    SGD and with SAM from the same initial weights and the same batches, all drawn from
    `seed` by NumPy: the same numbers on every backend.

    Returns:
        A dict per method (`"sgd"`, `"sam"`): the test loss and accuracy on 4,000
        fresh examples, and the test sharpness `L(w + e) - L(w)` at `rho`.
    """
    import keras

    from keras_sam.diagnostics import Objective, sharpness
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
    # Glorot-uniform kernels and zero biases drawn by NumPy, not by the backend (whose
    # random numbers differ from backend to backend): the same start everywhere.
    initial = []
    for fan_in, fan_out in [(16, 8), (8, 1)]:
        limit = np.sqrt(6 / (fan_in + fan_out))
        initial += [rng.uniform(-limit, limit, (fan_in, fan_out)), np.zeros(fan_out)]
    results = {}
    for method in ("sgd", "sam"):
        model = keras.Sequential(
            [
                keras.Input((16,)),
                keras.layers.Dense(8, activation="relu"),
                keras.layers.Dense(1, activation="sigmoid"),
            ]
        )
        model.set_weights([w.astype("float32") for w in initial])
        optimizer = SAM(keras.optimizers.SGD(learning_rate), rho=rho if method == "sam" else 0)
        variables = model.trainable_variables

        def batch_loss(values, x, y, model=model, variables=variables):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return loss_fn(y, model(x, training=True))

        step = _sam_step(optimizer, variables, batch_loss)
        for index in batches:
            step(x_train[index], y_train[index])
        pred = keras.ops.convert_to_numpy(model(x_test))
        test = Objective(model, x_test, y_test, loss=loss_fn)
        results[method] = {
            "test_loss": float(loss_fn(y_test, pred)),
            "test_accuracy": float(np.mean((pred > 0.5) == (y_test > 0.5))),
            "test_sharpness": sharpness(test, rho=rho)["sharpness"],
        }
    return results


def _sam_step(optimizer, variables, loss):
    """One step of `optimizer` (SAM or a variant) on `loss(values, *batch)`, written out.

    ```
    g = grad L(w)                                  # at the variables' values
    e = optimizer.perturbation(g)                  # SAM: rho g / ||g||
    g_sam = grad L(w + e)                          # the perturbed pass
    w <- inner_optimizer.apply(optimizer.descent_gradients(g, g_sam))
    ```

    The descent gradient is a pure function of the weights, compiled by the backend with
    its autodiff (`keras_sam.backends`), so the toy problems run on every Keras backend;
    the method's hooks say what to do with the gradients, and the inner optimizer
    applies the result. A toy: no m-sharpness, no finite check, no mixed precision
    (`SAMModel` and the custom loops have them).
    """
    import keras

    from keras_sam import backends

    autodiff = backends.autodiff.current()

    def descent_gradients(values, *batch):
        def gradient(at):
            return autodiff.value_and_gradient(lambda w: loss(w, *batch), at)[1]

        clean = gradient(values)
        # The method's hooks read the variables (ASAM: |w|): let them read `values`.
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            two_passes = optimizer.needs_second_pass(clean, variables)
            if two_passes:
                perturbation = optimizer.perturbation(clean, variables)
        if two_passes:
            point = [w if e is None else w + e for w, e in zip(values, perturbation)]
            perturbed = gradient(point)
            descent = optimizer.descent_gradients(clean, perturbed, variables)
        else:
            descent = optimizer.one_pass_gradients(clean, variables)
        return descent

    compiled = autodiff.compile_function(descent_gradients)

    def step(*batch):
        descent = compiled([v.value for v in variables], *batch)
        optimizer.inner_optimizer.apply(descent, variables)

    return step


def _loss_at(point):
    """`two_minima_loss` at `point` in NumPy float64, as a Python float (the backends may
    compute in float32 only: JAX does by default)."""
    w = np.asarray(point, np.float64)
    q_sharp = 0.5 * SHARP_CURVATURE * np.sum(w**2)
    q_flat = 0.5 * np.sum(np.asarray(FLAT_CURVATURE) * (w - FLAT_MINIMUM) ** 2) + FLAT_HEIGHT
    return float(-TEMPERATURE * np.logaddexp(-q_sharp / TEMPERATURE, -q_flat / TEMPERATURE))


def _top_curvature(point, step=1e-3):
    """Largest eigenvalue of the Hessian of `two_minima_loss` at `point` (float64)."""
    loss = _loss_at
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


def print_report(rho=0.3, steps=600, seed=0):
    """`keras-sam playground`: runs both problems and prints what happened; 0 if SAM ended
    in the flat minimum and SGD in the sharp one, else 1."""
    print("keras-sam playground\n")
    print("1. Two minima: L(w) = softmin(sharp paraboloid at (0, 0), flat one at (2, 0))")
    print(
        f"   Hessian at the sharp minimum: {SHARP_CURVATURE:g} I;"
        f" at the flat one: diag{FLAT_CURVATURE}."
        f" The flat one is {FLAT_HEIGHT:g} higher."
    )
    result = two_minima(rho=rho, steps=steps)
    print(
        f"   From (0.05, 0.1), {steps} steps of SGD(lr=0.016), plain and with SAM(rho={rho:g}):\n"
    )
    print("   method  final point          loss      top Hessian eigenvalue  minimum")
    for method, r in result.items():
        x, y = r["point"]
        print(
            f"   {method:<6}  ({x:7.4f}, {y:7.4f})   {r['loss']:8.5f}"
            f"  {r['curvature']:22.2f}  {r['minimum']}"
        )
    print()
    print("2. A toy network: U[0,1) vs N(0,1) samples, Dense(8) -> sigmoid,")
    print("   trained step by step from the same weights and batches, SGD vs SAM(rho=0.05):\n")
    toy = uniform_vs_normal(seed=seed)
    print("   method  test loss  test accuracy  test sharpness (rho=0.05)")
    for method, r in toy.items():
        print(
            f"   {method:<6}  {r['test_loss']:9.4f}  {r['test_accuracy']:13.4f}"
            f"  {r['test_sharpness']:25.5f}"
        )
    print()
    ok = result["sgd"]["minimum"] == "sharp" and result["sam"]["minimum"] == "flat"
    if ok:
        print("SGD settled in the sharp minimum and SAM in the flat one.")
    else:
        print("Unexpected: SAM did not end in the flat minimum with these settings.")
    return 0 if ok else 1
