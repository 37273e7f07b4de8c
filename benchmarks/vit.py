"""A small vision transformer on Fashion-MNIST: AdamW against SAM(AdamW), clean and noisy labels.

SAM's largest published gains are on vision transformers trained from scratch (Chen, Hsieh
and Gong, When Vision Transformers Outperform ResNets without Pretraining or Strong Data
Augmentations, ICLR 2022, arXiv 2106.01548: ViT-B/16 on ImageNet 74.6 -> 79.9 top-1 with
SAM, where ResNets gain about 1 point). This script asks whether the pattern shows at the
scale of keras-sam's CNN results (docs/RESULTS.md): the same seeded 2,000-image subset of
Fashion-MNIST, clean labels and 40 % flipped labels, the full clean test set.

The model is a plain ViT written with Keras layers: non-overlapping patches (4x4: 49
tokens, or 7x7: 16) embedded by a strided convolution, a learned position embedding,
pre-norm transformer blocks (multi-head self-attention and a GELU MLP), a final layer
norm, the mean over tokens and a linear head. No dropout, no class token. AdamW with a
cosine learning rate; SAM and ASAM wrap the same AdamW. For each run it records the final
and best clean test accuracy, the final training accuracy on the labels trained on, and the
top Hessian eigenvalue of the final weights (Lanczos, on a fixed set of training examples,
labels as trained). Results go to a JSON file, rewritten after every epoch;
`--budget-seconds` stops cleanly (the runs not started are marked skipped), and a rerun
with the same `--out` keeps the finished runs and trains only the others.

    # GPU (the lead's command; see docs/RESULTS.md for the figures it produced)
    KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false \\
        python benchmarks/vit.py --data-dir /usr/share/datasets/fashion-mnist --out vit.json
    # 2 CPU cores, reduced: one seed, a smaller ViT with 7x7 patches
    python benchmarks/vit.py --seeds 0 --patch 7 --dim 64 --depth 4 --out vit_cpu.json
    python benchmarks/vit.py --smoke --out /tmp/vit_smoke.json      # seconds
    python benchmarks/results_sections.py --vit vit.json            # docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from full_fashion_mnist import (  # noqa: E402
    Budget,
    EpochLog,
    environment,
    load,
    set_precision,
    write_json,
)

PAPER = {
    "reference": "Chen, Hsieh, Gong, When Vision Transformers Outperform ResNets without "
    "Pretraining or Strong Data Augmentations, ICLR 2022, arXiv 2106.01548: ViT-B/16 on "
    "ImageNet from scratch, 74.6 % top-1 with AdamW, 79.9 % with SAM (+5.3); ResNets gain "
    "about 1 point.",
    "url": "https://arxiv.org/abs/2106.01548",
}


def vision_transformer(
    patch=4, dim=128, depth=6, heads=4, mlp_ratio=2, num_classes=10, input_shape=(28, 28, 1)
):
    """ViT: patch embedding, position embedding, `depth` pre-norm blocks, mean over tokens."""
    import keras

    if input_shape[0] % patch or input_shape[1] % patch:
        raise ValueError(f"`patch` must divide the image side (28). Received: patch={patch}")
    if dim % heads:
        raise ValueError(f"`dim` must be a multiple of `heads`. Received: dim={dim}, heads={heads}")
    layers = keras.layers
    tokens = (input_shape[0] // patch) * (input_shape[1] // patch)

    class PositionEmbedding(layers.Layer):
        """Adds a learned vector to each token position."""

        def build(self, input_shape):
            self.embedding = self.add_weight(
                shape=(1, input_shape[1], input_shape[2]),
                initializer=keras.initializers.TruncatedNormal(stddev=0.02),
                name="embedding",
            )

        def call(self, x):
            return x + keras.ops.cast(self.embedding, x.dtype)

    inputs = keras.Input(input_shape)
    x = layers.Conv2D(dim, patch, strides=patch, name="patch_embedding")(inputs)
    x = layers.Reshape((tokens, dim))(x)
    x = PositionEmbedding(name="position_embedding")(x)
    for i in range(depth):
        y = layers.LayerNormalization(epsilon=1e-6)(x)
        # With the scores returned, Keras computes attention with plain ops rather than a
        # fused kernel: PyTorch's CPU flash attention has no second derivative, which the
        # Hessian-vector products need.
        y, _ = layers.MultiHeadAttention(heads, dim // heads, name=f"attention_{i}")(
            y, y, return_attention_scores=True
        )
        x = layers.Add()([x, y])
        y = layers.LayerNormalization(epsilon=1e-6)(x)
        y = layers.Dense(mlp_ratio * dim, activation="gelu")(y)
        y = layers.Dense(dim)(y)
        x = layers.Add()([x, y])
    x = layers.LayerNormalization(epsilon=1e-6)(x)
    x = layers.GlobalAveragePooling1D()(x)
    outputs = layers.Dense(num_classes, dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"vit_p{patch}_d{dim}_l{depth}")


def run_key(noise, method, seed):
    return f"noise{round(100 * noise):02d}/{method}/seed{seed}"


def train_run(key, noise, method, seed, args, arrays, record, budget):
    import keras

    import keras_sam
    from keras_sam.cli.training import ASAM_RHO_SCALE
    from keras_sam.datasets import label_noise
    from keras_sam.diagnostics import Objective, hessian_eigenvalues
    from keras_sam.models import set_random_seed

    (x_all, y_all), (x_test, y_test) = arrays
    rng = np.random.default_rng(seed)  # the subset and the noise: as keras_sam.cli.training
    keep = rng.permutation(len(x_all))[: args.train_size] if args.train_size else None
    x_train = x_all if keep is None else x_all[keep]
    y_clean = (y_all if keep is None else y_all[keep]).astype("int64")
    noisy = label_noise.corrupt_labels(y_clean, noise, num_classes=10, seed=seed, mode="flip")
    y_train = noisy.labels
    run = {
        "noise": noise,
        "method": method,
        "seed": seed,
        "status": "running",
        "epochs_done": 0,
        "history": [],
        "noise_fraction": float(noisy.fraction),
        "train_examples": len(x_train),
    }
    record["runs"][key] = run
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    keras.backend.clear_session()
    set_random_seed(seed)
    model = vision_transformer(args.patch, args.dim, args.depth, args.heads, args.mlp_ratio)
    run["parameters"] = int(model.count_params())
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=max(1, steps_per_epoch * args.epochs - args.warmup_steps),
        warmup_target=args.lr,
        warmup_steps=args.warmup_steps,
    )
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay)
    if method in ("sam", "asam"):
        rho = args.rho * (ASAM_RHO_SCALE if method == "asam" else 1.0)
        run["rho"] = rho
        optimizer = keras_sam.SAM(optimizer, rho=rho, adaptive=method == "asam")
        trained = keras_sam.SAMModel(model, num_batch_splits=args.num_batch_splits)
    else:
        trained = model
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trained.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    log = EpochLog(run, record, args.out, budget, x_test, y_test, args.eval_every, args.epochs)
    set_random_seed(seed)
    started = time.perf_counter()
    trained.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        callbacks=[log],
        verbose=2 if args.verbose else 0,
    )
    run["wall_seconds"] = time.perf_counter() - started
    if run["status"] == "running":
        run["status"] = "complete"
    run["train_steps"] = run["epochs_done"] * steps_per_epoch
    tested = [e for e in run["history"] if "test_accuracy" in e]
    if tested:
        run["final_test_accuracy"] = tested[-1]["test_accuracy"]
        run["best_test_accuracy"] = max(e["test_accuracy"] for e in tested)
    run["final_train_accuracy"] = run["history"][-1]["train_accuracy"] if run["history"] else None
    if args.hessian_examples and run["epochs_done"]:
        probe = np.random.default_rng(seed + 1).permutation(len(x_train))[: args.hessian_examples]
        now = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the best estimate if unconverged
            objective = Objective(
                model, x_train[probe], y_train[probe], loss=loss, batch_size=min(500, len(probe))
            )
            top = hessian_eigenvalues(
                objective,
                k=1,
                max_iterations=args.hessian_iterations,
                tol=1e-2,
                seed=seed,
                verbose=0,
            )
        run["hessian_top_eigenvalue"] = float(top[0])
        run["hessian_examples"] = len(probe)
        run["hessian_seconds"] = time.perf_counter() - now
    write_json(args.out, record)
    return run


def parse(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None, help="folder of the four IDX files (.gz)")
    parser.add_argument("--out", default="vit.json", help="the JSON written")
    parser.add_argument("--noise", default="0,0.4", help="comma-separated label-noise rates")
    parser.add_argument("--methods", default="adamw,sam", help="comma-separated: adamw, sam, asam")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--train-size", type=int, default=2000, help="0: all 60,000")
    parser.add_argument("--test-size", type=int, default=0, help="0: all 10,000")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW's, decoupled")
    parser.add_argument(
        "--rho", type=float, default=0.1, help="SAM radius (ASAM: 10 times it), as the CNN's"
    )
    parser.add_argument("--num-batch-splits", type=int, default=None, help="m-sharpness parts")
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mlp-ratio", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--hessian-examples", type=int, default=500, help="0: not measured")
    parser.add_argument("--hessian-iterations", type=int, default=20)
    parser.add_argument("--budget-seconds", type=float, default=None)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds on a CPU: 200 training and 200 test images, a 2-block ViT with 7x7 "
        "patches, 2 epochs, seed 0, 40 %% noise (overrides those options)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_size, args.test_size, args.epochs, args.batch_size = 200, 200, 2, 50
        args.patch, args.dim, args.depth, args.heads = 7, 32, 2, 2
        args.seeds, args.noise, args.eval_every = "0", "0.4", 1
        args.hessian_examples, args.hessian_iterations, args.warmup_steps = 50, 10, 2
    args.noise = [float(v) for v in args.noise.split(",") if v.strip()]
    args.seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in args.methods:
        if method not in ("adamw", "sam", "asam"):
            parser.error(f"--methods: unknown method {method!r} (adamw, sam, asam)")
    return args


def main(argv=None):
    args = parse(argv)
    set_precision(args.dtype)
    arrays = load(args.data_dir, 0, args.test_size, 0)
    previous = {}
    if Path(args.out).is_file():
        previous = json.loads(Path(args.out).read_text()).get("runs", {})
    record = {
        "benchmark": "vit",
        "model": f"ViT, patch {args.patch}, dim {args.dim}, depth {args.depth}, "
        f"heads {args.heads}, MLP {args.mlp_ratio}x",
        "test_examples": len(arrays[1][0]),
        "paper": PAPER,
        "environment": environment(vars(args)),
        "runs": {},
    }
    budget = Budget(args.budget_seconds)
    # Seed by seed, so that a spent budget leaves whole seeds (every noise rate and method).
    for seed in args.seeds:
        for noise in args.noise:
            for method in args.methods:
                key = run_key(noise, method, seed)
                if previous.get(key, {}).get("status") == "complete":
                    record["runs"][key] = previous[key]  # finished by an earlier call
                    continue
                if budget.exceeded():
                    record["runs"][key] = {
                        "noise": noise,
                        "method": method,
                        "seed": seed,
                        "status": "skipped: --budget-seconds spent before it started",
                        "epochs_done": 0,
                        "history": [],
                    }
                    write_json(args.out, record)
                    continue
                print(f"== {key}", flush=True)
                run = train_run(key, noise, method, seed, args, arrays, record, budget)
                record["elapsed_seconds"] = budget.elapsed()
                write_json(args.out, record)
                print(
                    f"   {run['status']}: final {100 * run.get('final_test_accuracy', 0):.2f} %"
                    f", best {100 * run.get('best_test_accuracy', 0):.2f} %, "
                    f"lambda1 {run.get('hessian_top_eigenvalue', float('nan')):.2f}, "
                    f"{run['wall_seconds']:.1f} s",
                    flush=True,
                )
    record["elapsed_seconds"] = budget.elapsed()
    write_json(args.out, record)
    return record


if __name__ == "__main__":
    main()
