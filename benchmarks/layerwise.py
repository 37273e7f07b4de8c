"""How SAM's perturbation is spread over the layers of a GPT-2 transformer, with one global
norm and with `perturbation_norm="layerwise"`, at several widths.

For each width: a KerasHub GPT2CausalLM built from a config (no download), one batch of
token ids, the clean gradient, and the perturbation `e` that `keras_sam.SAM` takes from it
with each `perturbation_norm`. It reports each layer's share of ||e||^2 (a layer: the
variables that share a path up to the last `/`, as `SAM` groups them) and draws them.

Haas et al. (NeurIPS 2024, arXiv 2411.00075) show that with one global norm the
perturbation of a wide network concentrates in its last layer. With `"layerwise"` every
layer with a gradient has the share 1/L by construction.

    KERAS_BACKEND=jax python benchmarks/layerwise.py \
        --out docs/results/layerwise_perturbation.json \
        --plot docs/results/layerwise_perturbation.png
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

from keras_sam import maths  # noqa: E402
from keras_sam.methods.hooks import layer_of  # noqa: E402


def gradients(model, x, y):
    """The clean gradient of the mean cross-entropy, one tensor per trainable weight."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]

        def loss(trainable):
            logits, _ = model.stateless_call(trainable, frozen, x)
            return loss_fn(y, logits)

        return jax.grad(loss)(trainable)
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = loss_fn(y, model(x))
        return tape.gradient(value, model.trainable_variables)
    raise SystemExit(f"Run with KERAS_BACKEND=jax or tensorflow (not {backend}).")


def shares(perturbation, layers):
    """Each layer's fraction of ||e||^2, in the order the layers first appear."""
    squares = {}
    for e, layer in zip(perturbation, layers, strict=True):
        value = np.asarray(keras.ops.convert_to_numpy(e), np.float64)
        squares[layer] = squares.get(layer, 0.0) + float(np.sum(value * value))
    total = sum(squares.values())
    return {layer: s / total for layer, s in squares.items()}


def measure(width, num_layers, vocabulary, sequence, batch, rho, seed):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary,
        num_layers=num_layers,
        num_heads=4,
        hidden_dim=width,
        intermediate_dim=4 * width,
        max_sequence_length=sequence,
        dropout=0.0,
    )
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    tokens = np.random.default_rng(seed).integers(1, vocabulary, (batch, sequence + 1))
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((batch, sequence), bool)}
    grads = gradients(model, x, tokens[:, 1:])
    layers = [layer_of(v) for v in model.trainable_variables]
    result = {}
    for norm in ("global", "layerwise"):
        if norm == "global":
            e = maths.sam_perturbation(grads, rho)
        else:
            e = maths.layerwise_sam_perturbation(grads, rho, layers)
        total = float(maths.global_norm(e))
        result[norm] = {"norm": total, "shares": shares(e, layers)}
    result["parameters"] = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    return result


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = list(results)
    layers = list(results[widths[0]]["global"]["shares"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    positions = np.arange(len(layers))
    bar = 0.8 / len(widths)
    for ax, norm in zip(axes, ("global", "layerwise"), strict=True):
        for i, width in enumerate(widths):
            values = [results[width][norm]["shares"][layer] for layer in layers]
            ax.barh(positions + i * bar, values, height=bar, label=f"width {width}")
        ax.set_xscale("log")
        ax.set_xlim(1e-6, 1)
        ax.set_title(f'perturbation_norm="{norm}"')
        ax.set_xlabel("share of ||e||^2")
    axes[0].set_yticks(positions + bar * (len(widths) - 1) / 2)
    axes[0].set_yticklabels(layers, fontsize=7)
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(widths))
    fig.suptitle("SAM's perturbation per layer of a GPT-2 transformer, at initialization")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--vocabulary", type=int, default=512)
    parser.add_argument("--sequence", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="a JSON file for the shares")
    parser.add_argument("--plot", default=None, help="a PNG file for the picture")
    args = parser.parse_args(argv)
    results = {}
    for width in args.widths:
        results[width] = measure(
            width, args.num_layers, args.vocabulary, args.sequence, args.batch, args.rho, args.seed
        )
        for norm in ("global", "layerwise"):
            shares_ = results[width][norm]["shares"]
            top = max(shares_, key=shares_.get)
            print(
                f"width {width:5d} ({results[width]['parameters']:,} parameters) {norm:9s}: "
                f"||e|| = {results[width][norm]['norm']:.4f}, {len(shares_)} layers, "
                f"largest share {shares_[top]:.3f} ({top})"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"arguments": vars(args), "results": results}, f, indent=1)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
