"""How SGD, SAM and BAR change the balancedness of a LoRA adapter: the paper's toy problem.

Li, Zhang & He (NeurIPS 2024, arXiv 2410.14802, eq. 11 and Fig. 1a): a rank-1 factorization
`x y^T` fitted to a noisy 3x3 target `diag(0.5, 0, 0) + alpha N`, from the imbalanced start
`y0 = -3 x0`. Here it is a Keras Dense(3) layer whose kernel is frozen at zero, with
`enable_lora(1)` (`A = x`, `B = y^T`), trained by `SAMModel.fit` on a linear regression whose
targets carry that noise. SGD keeps `|‖A‖² - ‖B‖²|` where it started (their Theorem 1); SAM
shrinks it (Theorem 2); BAR shrinks it explicitly, at one pass a step.

    KERAS_BACKEND=tensorflow python benchmarks/bar_balancedness.py
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402


def data(seed, n=512, noise=0.5):
    rng = np.random.default_rng(seed)
    target = np.diag([0.5, 0.0, 0.0])
    x = rng.normal(size=(n, 3))
    per_example = rng.normal(size=(n, 3, 3)) * np.array([1.0, 0.8, 0.5])[:, None]
    y = np.einsum("ni,nij->nj", x, target + noise * per_example)
    return x.astype("float32"), y.astype("float32")


def balancedness(a, b):
    return float(abs(np.sum(a * a) - np.sum(b * b)))


def run(optimizer, x, y, epochs, batch_size):
    x0 = np.array([[0.2], [-0.1], [0.3]], "float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, use_bias=False)])
    layer = model.layers[0]
    layer.kernel.assign(np.zeros((3, 3), "float32"))
    layer.enable_lora(1, lora_alpha=1)
    layer.lora_kernel_a.assign(x0)
    layer.lora_kernel_b.assign(-3.0 * x0.T)
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(optimizer=optimizer, loss="mse")
    history = sam_model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
    a, b = (keras.ops.convert_to_numpy(v) for v in (layer.lora_kernel_a, layer.lora_kernel_b))
    return {"balancedness": balancedness(a, b), "loss": history.history["loss"][-1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--out", help="write the figures to this JSON file")
    args = parser.parse_args()
    x, y = data(args.seed)

    def sgd():
        return keras.optimizers.SGD(args.lr)

    methods = {
        "SGD": lambda: keras_sam.SAM(sgd(), rho=0.0),
        "SAM, rho 0.1": lambda: keras_sam.SAM(sgd(), rho=0.1),
        "nBAR, alpha 0.1": lambda: keras_sam.BAR(sgd(), alpha=0.1),
        "oBAR, alpha 0.1": lambda: keras_sam.BAR(sgd(), alpha=0.1, variant="obar"),
    }
    x0 = np.array([0.2, -0.1, 0.3])
    results = {
        "start": balancedness(x0, -3.0 * x0),
        "steps": args.epochs * len(x) // args.batch_size,
    }
    print(f"|‖A‖² - ‖B‖²| at the start: {results['start']:.4f} ({results['steps']} steps)")
    for name, make in methods.items():
        keras.utils.set_random_seed(args.seed)
        results[name] = run(make(), x, y, args.epochs, args.batch_size)
        print(f"{name:16s} {results[name]['balancedness']:.4f}   loss {results[name]['loss']:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
