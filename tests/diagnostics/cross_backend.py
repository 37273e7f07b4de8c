"""Every diagnostic on one small model, with weights and data read from a file, on the
backend `KERAS_BACKEND` names; the numbers go to another file. `test_cross_backend.py`
runs it once per backend, each in its own process, and compares.

    KERAS_BACKEND=jax python -m tests.diagnostics.cross_backend inputs.npz outputs.npz
"""

import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_sam import diagnostics  # noqa: E402

RHO = 0.5
BATCH_SIZE = 16


def build_model():
    """Convolution, BatchNorm (in inference mode: its moving statistics), ReLU, Dense."""
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Conv2D(3, 3)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(4)(h)
    return keras.Model(inputs, outputs)


def weights_like(model, rng):
    """Weights for `build_model()`, drawn from `rng` (BatchNorm's variance positive)."""
    return [
        (
            np.abs(rng.normal(size=w.shape)) + 0.5
            if "variance" in w.path
            else 0.5 * rng.normal(size=w.shape)
        ).astype("float32")
        for w in model.weights
    ]


def measure(inputs):
    """The diagnostics' numbers, a dict of arrays."""
    x, y = inputs["x"], inputs["y"]
    model, other = build_model(), build_model()
    model.set_weights([inputs[f"weights_{i}"] for i in range(len(model.weights))])
    other.set_weights([inputs[f"other_{i}"] for i in range(len(other.weights))])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    objective = diagnostics.Objective(model, x, y, loss=loss, batch_size=BATCH_SIZE)
    out = {}
    for name, kwargs in {
        "first_order": {},
        "m_sharpness": {"m": 7},
        "multi_step_adaptive": {"ascent_steps": 3, "adaptive": True},
    }.items():
        result = diagnostics.sharpness(objective, rho=RHO, **kwargs)
        out[f"{name}_loss"] = result["loss"]
        out[f"{name}_perturbed_loss"] = result["perturbed_loss"]
    vector = [inputs[f"vector_{i}"] for i in range(len(model.trainable_variables))]
    product = diagnostics.hessian_vector_product(objective, vector)
    out["hvp"] = np.concatenate([p.ravel() for p in product])
    with warnings.catch_warnings():
        # A fixed number of Lanczos iterations on every backend: tol is out of reach.
        warnings.simplefilter("ignore", RuntimeWarning)
        out["eigenvalues"] = diagnostics.hessian_eigenvalues(
            objective, k=2, max_iterations=20, tol=1e-12, verbose=0
        )
    out["trace_samples"] = diagnostics.hessian_trace(objective, num_probes=4, verbose=0)["samples"]
    plane = diagnostics.loss_landscape(
        objective, dimensions=2, coordinates=[-0.5, 0.0, 0.5], verbose=0
    )
    out["plane_loss"], out["plane_accuracy"] = plane["loss"], plane["accuracy"]
    line = diagnostics.loss_landscape(
        objective, to_model=other, coordinates=[-0.5, 0.5, 1.0], verbose=0
    )
    out["line_loss"], out["line_accuracy"] = line["loss"], line["accuracy"]
    out["backend"] = keras.backend.backend()
    out["tensorflow_imported"] = "tensorflow" in sys.modules
    return out


if __name__ == "__main__":
    inputs_path, outputs_path = sys.argv[1:]
    np.savez(outputs_path, **measure(dict(np.load(inputs_path))))
