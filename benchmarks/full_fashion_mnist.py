"""SAM against SGD on all 60,000 Fashion-MNIST images: a wide ResNet, the paper's recipe.

The SAM paper (Foret et al., ICLR 2021, arXiv 2010.01412) reports Fashion-MNIST test error
rates for WRN-28-10 and Shake-Shake, SAM against SGD, in its appendix (the table of results
on SVHN and Fashion-MNIST). This script trains the same comparison at a scale that fits a
few minutes of one GPU: a WRN-16-4 (pre-activation wide ResNet, depth 16, widening 4;
2.7 M weights) for 10 epochs instead of the paper's 28-10 for 200, with the paper's
other settings: SGD with momentum 0.9, a cosine learning rate from 0.1, L2 weight decay
5e-4 (in the loss, so through the momentum, as in the paper's code), batch 128, rho 0.05,
basic augmentation (random crops of the image padded by 4 pixels, horizontal flips).
Both runs see the same initial weights and the same augmented batches (the same seed).

It needs Keras, NumPy and one backend: JAX (XLA, preferred on a GPU) or PyTorch, chosen
by `KERAS_BACKEND`; TensorFlow is never imported on those backends. Results go to a JSON
file, rewritten after every epoch, so that a run cut short still leaves its figures;
`--budget-seconds` stops training at the end of the epoch that passes the budget, and
skips a run that would start after it (each is marked as such in the JSON).

    KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false \\
        python benchmarks/full_fashion_mnist.py --data-dir /usr/share/datasets/fashion-mnist \\
        --dtype bfloat16 --out full_fashion_mnist.json --budget-seconds 300
    python benchmarks/full_fashion_mnist.py --smoke --out /tmp/smoke.json   # seconds, CPU
    python benchmarks/results_sections.py --full full_fashion_mnist.json     # RESULTS.md

Estimated cost on one H200 (JAX, bfloat16, batch 128): about 0.6 GFLOP a forward pass
of one image, so 10 epochs of SGD are 1.1 PFLOP and of SAM 2.2 PFLOP; at a realistic
100-200 TFLOP/s for these small convolutions that is 5-20 s of arithmetic per run, and
in practice per-step overhead (470 steps an epoch) and compilation (20-60 s a run)
dominate: about 1-2 minutes for both runs together.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

# Fashion-MNIST's pixel statistics on its 60,000 training images (of x / 255).
MEAN, STD = 0.2860, 0.3530

PAPER = {
    "reference": "Foret, Kleiner, Mobahi, Neyshabur, Sharpness-Aware Minimization for "
    "Efficiently Improving Generalization, ICLR 2021, arXiv 2010.01412, appendix: "
    "results on SVHN and Fashion-MNIST (test error rates, WRN-28-10 and "
    "Shake-Shake (26 2x96d), SGD against SAM, basic augmentation and AutoAugment, "
    "200 epochs at least).",
    "url": "https://arxiv.org/abs/2010.01412",
}


# ----------------------------------------------------------------- data and augmentation
def load(data_dir, train_size=0, test_size=0, seed=0):
    """Fashion-MNIST as normalized float32 `(n, 28, 28, 1)` images and int32 labels.

    `train_size` / `test_size` > 0 keep a seeded random subset (0: all).
    """
    from keras_sam.datasets import fashion_mnist

    (x_train, y_train), (x_test, y_test) = fashion_mnist.load_data(data_dir)
    rng = np.random.default_rng(seed)
    if train_size and train_size < len(x_train):
        keep = np.sort(rng.permutation(len(x_train))[:train_size])
        x_train, y_train = x_train[keep], y_train[keep]
    if test_size and test_size < len(x_test):
        keep = np.sort(rng.permutation(len(x_test))[:test_size])
        x_test, y_test = x_test[keep], y_test[keep]
    return (normalize(x_train), y_train.astype("int32")), (
        normalize(x_test),
        y_test.astype("int32"),
    )


def normalize(images):
    x = (np.asarray(images, "float32") / 255.0 - MEAN) / STD
    return x[..., None] if x.ndim == 3 else x


def augment(images, rng, pad=4, flip=True):
    """Random crops of the images zero-padded by `pad` pixels, and random horizontal flips.

    `images`: `(n, h, w, c)`. Each image gets its own offsets in `[0, 2 pad]` (offset `pad`
    on both axes is the image itself) and, with `flip`, a coin for its mirror image. The
    padding is the normalized value of a black pixel, as padding the raw image would give.
    """
    n, h, w, _ = images.shape
    black = (0.0 - MEAN) / STD
    padded = np.pad(
        images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=np.float32(black)
    )
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    rows = dy[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None, :]  # (n, w)
    if flip:
        mirrored = rng.random(n) < 0.5
        cols = np.where(mirrored[:, None], cols[:, ::-1], cols)
    index = np.arange(n)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]]


# ------------------------------------------------------------------------------ the model
def wide_resnet(depth=16, widen=4, num_classes=10, weight_decay=5e-4, input_shape=(28, 28, 1)):
    """Pre-activation wide ResNet (Zagoruyko and Komodakis, 2016), WRN-depth-widen.

    Three stages of `(depth - 4) / 6` blocks, widths 16·widen, 32·widen, 64·widen,
    BN-ReLU-conv3x3 twice per block, a 1x1 convolution on the shortcut where the shape
    changes; every kernel has the L2 penalty `weight_decay / 2 · ||w||^2` (gradient
    `weight_decay · w`, the paper's weight decay).
    """
    import keras

    if (depth - 4) % 6 or depth < 10:
        raise ValueError(
            f"`depth` must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...). Received: {depth}"
        )
    layers = keras.layers
    l2 = keras.regularizers.L2(weight_decay / 2) if weight_decay else None
    blocks = (depth - 4) // 6

    def conv(filters, size, strides=1):
        return layers.Conv2D(
            filters,
            size,
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            kernel_regularizer=l2,
        )

    def bn_relu(x):
        x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
        return layers.ReLU()(x)

    inputs = keras.Input(input_shape)
    x = conv(16, 3)(inputs)
    for stage, filters in enumerate((16 * widen, 32 * widen, 64 * widen)):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            activated = bn_relu(x)
            y = conv(filters, 3, strides)(activated)
            y = conv(filters, 3)(bn_relu(y))
            if strides != 1 or x.shape[-1] != filters:
                x = conv(filters, 1, strides)(activated)
            x = layers.Add()([x, y])
    x = layers.GlobalAveragePooling2D()(bn_relu(x))
    outputs = layers.Dense(num_classes, kernel_regularizer=l2, dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"wrn{depth}_{widen}")


# ------------------------------------------------------------------- the JSON and budget
class Budget:
    """Seconds left of `seconds` from now (None: no limit)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.start

    def exceeded(self):
        return self.seconds is not None and self.elapsed() >= self.seconds


def write_json(path, record):
    """Writes `record` to `path` atomically (a temporary file moved into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(temporary, path)


def environment(args_dict):
    """What produced the results: backend, devices, versions, the arguments."""
    import keras

    devices = []
    try:
        devices = [str(d) for d in keras.distribution.list_devices()]
    except Exception:  # noqa: BLE001 (not every backend lists its devices)
        devices = []
    return {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "devices": devices,
        "arguments": args_dict,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def set_precision(dtype):
    import keras

    keras.config.set_dtype_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32")


class EpochLog:
    """A Keras callback, built lazily: after each epoch, evaluates on the test set (every
    `eval_every` epochs and the last), appends to `run["history"]`, rewrites the JSON, and
    stops training once the budget is spent."""

    def __new__(cls, run, record, out, budget, x_test, y_test, eval_every, epochs):
        import keras

        class Log(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.started = time.perf_counter()
                self.eval_seconds = 0.0

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                entry = {
                    "epoch": epoch + 1,
                    "loss": float(logs.get("loss", float("nan"))),
                    "train_accuracy": float(logs.get("accuracy", float("nan"))),
                }
                stopping = budget.exceeded() and epoch + 1 < epochs
                if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs or stopping:
                    now = time.perf_counter()
                    accuracy = test_accuracy(self.model, x_test, y_test)
                    self.eval_seconds += time.perf_counter() - now
                    entry["test_accuracy"] = accuracy
                    entry["test_error"] = 1.0 - accuracy
                # This epoch's: `fit` runs once per epoch (fresh augmentation), and each
                # call starts the clock again in `on_train_begin`.
                entry["train_seconds"] = time.perf_counter() - self.started - self.eval_seconds
                run["history"].append(entry)
                run["epochs_done"] = epoch + 1
                run["train_seconds"] = total_train_seconds(run)
                if stopping:
                    run["status"] = f"stopped after epoch {epoch + 1}: --budget-seconds spent"
                    self.model.stop_training = True
                write_json(out, record)

        return Log()


def total_train_seconds(run):
    """The run's training time: its epochs' together (each epoch's is in its history entry;
    a record written before the entries were summed kept the last epoch's as the total)."""
    return sum(entry["train_seconds"] for entry in run["history"])


def test_accuracy(model, x, y, batch_size=1000):
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


# ------------------------------------------------------------------------------ training
def train_run(method, args, data, record, budget, build_model, make_optimizer):
    """Trains one run in place of `record["runs"][method]`; returns the run's record."""
    import keras

    import keras_sam
    from keras_sam.models import set_random_seed

    (x_train, y_train), (x_test, y_test) = data
    run = {"method": method, "status": "running", "epochs_done": 0, "history": []}
    record["runs"][method] = run
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    keras.backend.clear_session()  # the same layer names every run (and compilation cache)
    set_random_seed(args.seed)
    model = build_model()
    run["parameters"] = int(model.count_params())
    optimizer = make_optimizer(steps_per_epoch * args.epochs)
    sam = method in ("sam", "asam")
    if sam:
        optimizer = keras_sam.SAM(optimizer, rho=args.rho, adaptive=method == "asam")
    wrapped = keras_sam.SAMModel(model) if sam else model
    wrapped.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    log = EpochLog(run, record, args.out, budget, x_test, y_test, args.eval_every, args.epochs)
    rng = np.random.default_rng(args.seed)  # the same augmented batches for every run
    started = time.perf_counter()
    for epoch in range(args.epochs):
        x = augment(x_train, rng) if args.augment else x_train
        set_random_seed(args.seed + epoch)  # the same shuffling for every run
        wrapped.fit(
            x,
            y_train,
            batch_size=args.batch_size,
            epochs=epoch + 1,
            initial_epoch=epoch,
            callbacks=[log],
            verbose=2 if args.verbose else 0,
        )
        if run["status"] != "running":
            break
    if run["status"] == "running":
        run["status"] = "complete"
    run["wall_seconds"] = time.perf_counter() - started
    run["train_steps"] = run["epochs_done"] * steps_per_epoch
    run["gradient_evaluations"] = run["train_steps"] * (2 if sam else 1)
    finals = [e for e in run["history"] if "test_error" in e]
    if finals:
        run["test_error"] = finals[-1]["test_error"]
        run["best_test_error"] = min(e["test_error"] for e in finals)
    return run


def run_all(args, build_model, make_optimizer, data, record):
    """Trains each of `args.methods` in turn within the budget, rewriting the JSON."""
    budget = Budget(args.budget_seconds)
    for method in args.methods:
        if budget.exceeded():
            record["runs"][method] = {
                "method": method,
                "status": "skipped: --budget-seconds spent before it started",
                "epochs_done": 0,
                "history": [],
            }
            write_json(args.out, record)
            continue
        print(f"== {method}: {args.epochs} epochs", flush=True)
        run = train_run(method, args, data, record, budget, build_model, make_optimizer)
        record["elapsed_seconds"] = budget.elapsed()
        write_json(args.out, record)
        print(
            f"   {run['status']}: test error {100 * run.get('test_error', float('nan')):.2f} % "
            f"after {run['epochs_done']} epochs, {run['wall_seconds']:.1f} s",
            flush=True,
        )
    record["elapsed_seconds"] = budget.elapsed()
    write_json(args.out, record)
    return record


def parse(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None, help="folder of the four IDX files (.gz)")
    parser.add_argument("--out", default="full_fashion_mnist.json", help="the JSON written")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--depth", type=int, default=16, help="WRN depth, 6n + 4")
    parser.add_argument("--widen", type=int, default=4, help="WRN widening factor")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (cosine)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="L2, in the loss")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--methods", default="sgd,sam", help="comma-separated: sgd, sam, asam")
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    parser.add_argument("--train-size", type=int, default=0, help="0: all 60,000")
    parser.add_argument("--test-size", type=int, default=0, help="0: all 10,000")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-seconds", type=float, default=None)
    parser.add_argument("--verbose", action="store_true", help="Keras's line per epoch")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few seconds on a CPU: 256 training and 256 test images, WRN-10-1, 2 epochs "
        "of batch 64 (overrides those options)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_size, args.test_size, args.epochs, args.batch_size = 256, 256, 2, 64
        args.depth, args.widen = 10, 1
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in args.methods:
        if method not in ("sgd", "sam", "asam"):
            parser.error(f"--methods: unknown method {method!r} (sgd, sam, asam)")
    return args


def main(argv=None):
    args = parse(argv)
    set_precision(args.dtype)
    import keras

    data = load(args.data_dir, args.train_size, args.test_size, args.seed)
    record = {
        "benchmark": "full_fashion_mnist",
        "model": f"WRN-{args.depth}-{args.widen}",
        "train_examples": len(data[0][0]),
        "test_examples": len(data[1][0]),
        "paper": PAPER,
        "environment": environment(vars(args)),
        "runs": {},
    }

    def build_model():
        return wide_resnet(args.depth, args.widen, weight_decay=args.weight_decay)

    def make_optimizer(steps):
        schedule = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=steps)
        return keras.optimizers.SGD(schedule, momentum=args.momentum)

    run_all(args, build_model, make_optimizer, data, record)
    return record


if __name__ == "__main__":
    main()
    sys.exit(0)
