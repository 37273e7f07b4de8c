"""SAM against SGD on all 60,000 Fashion-MNIST images, at the SAM paper's own protocol.

The SAM paper (Foret et al., ICLR 2021, arXiv 2010.01412, appendix, Table 5) reports
Fashion-MNIST test error for WRN-28-10 and Shake-Shake, SGD against SAM, over 5 seeds
(`PAPER_TABLE5`). This script runs that protocol, as the official code
(github.com/google-research/sam, `sam_jax/`) implements it for Fashion-MNIST:

- 200 epochs (`--epochs`) of batch 256, `floor(60,000 / 256) = 234` steps an epoch (the
  official pipeline drops the last partial batch when it augments);
- SGD with Nesterov momentum 0.9, learning rate 0.1 on a cosine schedule without warm-up
  (per step, to 0 at the last step), weight decay 5e-4 as `wd / 2 ||w||^2` in the loss on
  every trainable weight (kernels, biases and BatchNorm's scale and offset, as the official
  `forward_and_loss`), the final gradient clipped to global norm 5 (its
  `--gradient_clipping` default), also for plain SGD; SAM with rho 0.05 (the paper's tuned
  rho for the WRN);
- pixels scaled to [0, 1] and normalized with MNIST's mean and standard deviation
  (0.1307, 0.3081), as the official `FashionMnist` source does;
- `--augment basic` (the default) is the official `weak_image_augmentation`: a random
  horizontal flip, then the image padded by 4 pixels in `REFLECT` mode and randomly cropped
  back to 28 x 28; `--cutout` adds the official batch-level cutout: one 16 x 16 square per
  batch (one random centre for the whole batch, clipped at the borders) set to 0 after
  normalization (`--cutout_length` default 16).

The model is `--model wrn` (a pre-activation WRN-depth-widen, `--depth 16 --widen 4` by
default, the size that fits a GPU session; `--depth 28 --widen 10` is the paper's) or
`--model cnn`, the project's CNN (`keras_sam.models.cnn`), for a CPU. Each seed of
`--seeds` trains every method of `--methods` from the same initial weights on the same
batches (a paired comparison).

Resumable: after every epoch each run writes a checkpoint (`<out>.checkpoints/<run>.npz`:
the model's variables, BatchNorm statistics included, the optimizer's variables, hence the
schedule's position, momentum and SAM's counters, and the run's record) and then the JSON.
A rerun of the same command with the same `--out` continues every unfinished run from its
last finished epoch, bitwise as an uninterrupted run would have: each epoch's data order,
flips, crops and cutout squares are a function of `(seed, epoch)` alone, so there is no
random state to save. The JSON keeps the protocol; a rerun with another protocol is
refused. `--until-epoch K` stops every run after epoch K (a sitting), `--budget-seconds`
at the end of the epoch that spends the budget (runs not started are left for the next
sitting).

    # On a GPU (JAX, bfloat16): the WRN-16-4, two seeds, several sittings if need be.
    KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false \\
        python benchmarks/full_fashion_mnist.py --data-dir /usr/share/datasets/fashion-mnist \\
        --dtype bfloat16 --out full_fashion_mnist.json --budget-seconds 3000
    # On one CPU core (TensorFlow's oneDNN convolutions are the fastest there): the CNN.
    KERAS_BACKEND=tensorflow python benchmarks/full_fashion_mnist.py --model cnn \\
        --epochs 30 --out results/cpu_cnn.json
    python benchmarks/full_fashion_mnist.py --smoke --out /tmp/smoke.json   # seconds, CPU
    python benchmarks/results_sections.py --full full_fashion_mnist.json     # RESULTS.md

It needs Keras, NumPy and one backend (`KERAS_BACKEND`); nothing imports TensorFlow on
JAX or PyTorch.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

# The official code's normalization for Fashion-MNIST: MNIST's mean and standard deviation.
MEAN, STD = 0.1307, 0.3081
# Fashion-MNIST's own pixel statistics on its 60,000 training images (of x / 255): the
# normalization benchmarks/vit.py uses through `load`'s defaults.
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
CROP_PADDING = 4  # weak_image_augmentation's random_crop_pad
CUTOUT_LENGTH = 16  # the official --cutout_length default

PAPER = {
    "reference": "Foret, Kleiner, Mobahi, Neyshabur, Sharpness-Aware Minimization for "
    "Efficiently Improving Generalization, ICLR 2021, arXiv 2010.01412 (v3), appendix, "
    "Table 5: Fashion-MNIST test error (%), mean and standard deviation over 5 seeds; "
    "batch 256, learning rate 0.1, weight decay 5e-4, 200 epochs, rho 0.05 (WRN) and "
    "0.02 (Shake-Shake); the augmentation other than basic is cutout alone for "
    "Fashion-MNIST (appendix B.1).",
    "url": "https://arxiv.org/abs/2010.01412",
    "code": "https://github.com/google-research/sam",
}
# (model, augmentation) -> {method: (mean, standard deviation)}, test error in %.
PAPER_TABLE5 = {
    ("WRN-28-10", "basic"): {"sgd": (4.57, 0.07), "sam": (3.98, 0.05)},
    ("WRN-28-10", "cutout"): {"sgd": (3.86, 0.14), "sam": (3.61, 0.06)},
    ("Shake-Shake 26 2x96d", "basic"): {"sgd": (4.37, 0.06), "sam": (3.97, 0.09)},
    ("Shake-Shake 26 2x96d", "cutout"): {"sgd": (3.76, 0.07), "sam": (3.59, 0.01)},
}

# The arguments that define the protocol: a rerun onto the same JSON must repeat them.
PROTOCOL = (
    "model", "depth", "widen", "width", "batch_norm", "epochs", "batch_size", "lr",
    "momentum", "nesterov", "clip_norm", "weight_decay", "rho", "augment", "cutout",
    "cutout_length", "train_size", "test_size", "dtype",
)  # fmt: skip


# ----------------------------------------------------------------- data and augmentation
def load(data_dir, train_size=0, test_size=0, seed=0, mean=FASHION_MEAN, std=FASHION_STD):
    """Fashion-MNIST as normalized float32 `(n, 28, 28, 1)` images and int32 labels.

    `train_size` / `test_size` > 0 keep a seeded random subset (0: all); the subset does
    not depend on the runs' seeds. The default normalization is the one benchmarks/vit.py
    trained with (Fashion-MNIST's own statistics); this script passes MNIST's.
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
    return (normalize(x_train, mean, std), y_train.astype("int32")), (
        normalize(x_test, mean, std),
        y_test.astype("int32"),
    )


def normalize(images, mean=MEAN, std=STD):
    x = np.asarray(images, "float32") / np.float32(255.0)
    x = (x - np.float32(mean)) / np.float32(std)
    return x[..., None] if x.ndim == 3 else x


def augment(images, rng, pad=CROP_PADDING):
    """The official `weak_image_augmentation`, vectorized: each image flipped left-right
    with probability 1/2, then padded by `pad` pixels in REFLECT mode (`np.pad`'s
    "reflect", TensorFlow's "REFLECT": the edge pixel is not repeated) and cropped back to
    its size at a random offset in `[0, 2 pad]` on each axis (offset `pad`: no shift).

    `images`: `(n, h, w, c)`. Padding and cropping copy pixels, so augmenting normalized
    images gives exactly the normalized augmented ones.
    """
    n, h, w, _ = images.shape
    mirrored = rng.random(n) < 0.5
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    flipped = np.where(mirrored[:, None, None, None], images[:, :, ::-1], images)
    padded = np.pad(flipped, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    rows = dy[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None, :]  # (n, w)
    index = np.arange(n)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]]


def cutout(images, rng, batch_size, length=CUTOUT_LENGTH):
    """The official batch-level `cutout`, batch by batch of `batch_size` images: one centre
    `(cy, cx)` uniform over the pixels per batch, rows `[cy - length // 2, cy + length // 2)`
    and the same columns (clipped to the image) set to 0 in every image of the batch."""
    out = images.copy()
    _, h, w, _ = images.shape
    half = length // 2
    for start in range(0, len(images), batch_size):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        out[
            start : start + batch_size,
            max(0, cy - half) : min(h, cy + half),
            max(0, cx - half) : min(w, cx + half),
        ] = 0.0
    return out


def epoch_data(x, y, seed, epoch, batch_size, augmentation="basic", cut=False,
               cutout_length=CUTOUT_LENGTH):  # fmt: skip
    """Epoch `epoch`'s training batches for seed `seed`, in order: a permutation of the
    images without the last partial batch, augmented. A function of `(seed, epoch)` alone
    (NumPy's generator seeded with both), so a resumed run sees the batches it would have."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(x))[: len(x) // batch_size * batch_size]
    images, labels = x[order], y[order]
    if augmentation == "basic":
        images = augment(images, rng)
    if cut:
        images = cutout(images, rng, batch_size, cutout_length)
    return images, labels


# ---------------------------------------------------------------------------- the models
def wide_resnet(depth=16, widen=4, num_classes=10, input_shape=(28, 28, 1)):
    """Pre-activation wide ResNet (Zagoruyko and Komodakis, 2016), WRN-depth-widen.

    Three stages of `(depth - 4) / 6` blocks, widths 16·widen, 32·widen, 64·widen,
    BN-ReLU-conv3x3 twice per block, a 1x1 convolution on the shortcut where the shape
    changes. Weight decay is added by `decay_every_weight`.
    """
    import keras

    if (depth - 4) % 6 or depth < 10:
        raise ValueError(
            f"`depth` must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...). Received: {depth}"
        )
    layers = keras.layers
    blocks = (depth - 4) // 6

    def conv(filters, size, strides=1):
        return layers.Conv2D(
            filters, size, strides=strides, padding="same", use_bias=False,
            kernel_initializer="he_normal",
        )  # fmt: skip

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
    outputs = layers.Dense(num_classes, dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"wrn{depth}_{widen}")


def decay_every_weight(model, weight_decay):
    """Puts the penalty `weight_decay / 2 · ||w||^2` (gradient `weight_decay · w`) on every
    trainable weight of `model`, as the official code's loss does (kernels, biases,
    BatchNorm's scale and offset; not the moving statistics)."""
    import keras

    if weight_decay:
        for variable in model.trainable_variables:
            variable.regularizer = keras.regularizers.L2(weight_decay / 2)
    return model


def model_name(args):
    if args.model == "wrn":
        return f"WRN-{args.depth}-{args.widen}"
    norm = ", BatchNorm" if args.batch_norm else ""
    return f"CNN (keras_sam.models.cnn, width {args.width}{norm})"


def build_model(args, seed):
    from keras_sam.models import build_model as zoo
    from keras_sam.models import set_random_seed

    set_random_seed(seed)  # the same initial weights for every method of a seed
    if args.model == "wrn":
        model = wide_resnet(args.depth, args.widen)
    else:
        model = zoo("cnn", width=args.width, batch_norm=args.batch_norm)
    return decay_every_weight(model, args.weight_decay)


def make_optimizer(args, steps):
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(args.lr, decay_steps=steps)
    return keras.optimizers.SGD(
        schedule,
        momentum=args.momentum,
        nesterov=args.nesterov,
        global_clipnorm=args.clip_norm or None,
    )


# ------------------------------------------------------------------ JSON and checkpoints
class Budget:
    """Seconds left of `seconds` from now (None: no limit)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.start

    def exceeded(self):
        return self.seconds is not None and self.elapsed() >= self.seconds


def _replace_atomically(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def write_json(path, record):
    """Writes `record` to `path` atomically (a temporary file moved into place)."""
    _replace_atomically(path, (json.dumps(record, indent=1) + "\n").encode())


def checkpoint_dir(out):
    out = Path(out)
    return out.with_name(out.stem + ".checkpoints")


def checkpoint_path(out, key):
    return checkpoint_dir(out) / (key.replace("/", "-") + ".npz")


def _state(model, optimizer):
    return list(model.variables), list(optimizer.variables)


def save_checkpoint(path, model, optimizer, run):
    """The run's exact state after an epoch: every variable of the model and optimizer, by
    position (with their names and shapes, checked on restore), and the run's record."""
    import keras

    weights, slots = _state(model, optimizer)
    arrays = {f"model_{i}": keras.ops.convert_to_numpy(v.value) for i, v in enumerate(weights)}
    arrays |= {f"optimizer_{i}": keras.ops.convert_to_numpy(v.value) for i, v in enumerate(slots)}
    arrays["names"] = np.array(json.dumps([[v.name for v in weights], [v.name for v in slots]]))
    arrays["run"] = np.array(json.dumps(run))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    _replace_atomically(path, buffer.getvalue())


def restore_checkpoint(path, model, optimizer):
    """Loads a checkpoint of `save_checkpoint` into a model and optimizer built as the run's
    were (the optimizer is built here); returns the run's record at that epoch."""
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    weights, slots = _state(model, optimizer)
    with np.load(path, allow_pickle=False) as data:
        # Names, not paths: TensorFlow puts the wrapped optimizer's slots under SAM's name
        # scope when `fit` builds them ("sam/sgd/..."), not when they are built here.
        names = json.loads(str(data["names"]))
        if names != [[v.name for v in weights], [v.name for v in slots]]:
            raise ValueError(
                f"The checkpoint {path} holds other variables than this run's model and "
                "optimizer (another protocol or Keras version?)."
            )
        for prefix, variables in (("model", weights), ("optimizer", slots)):
            for i, variable in enumerate(variables):
                value = data[f"{prefix}_{i}"]
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(f"{path}: {variable.path} has shape {value.shape}")
                variable.assign(value)
        return json.loads(str(data["run"]))


def sitting(args):
    """What runs this sitting: backend, devices, versions, thread settings, arguments."""
    import keras

    import keras_sam

    try:
        devices = [str(d) for d in keras.distribution.list_devices()]
    except Exception:  # noqa: BLE001 (not every backend lists its devices)
        devices = []
    threads = {
        k: os.environ[k]
        for k in (
            "XLA_FLAGS",
            "OMP_NUM_THREADS",
            "TF_NUM_INTRAOP_THREADS",
            "TF_NUM_INTEROP_THREADS",
        )
        if k in os.environ
    }
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count()
    return {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "keras_sam": os.path.dirname(os.path.abspath(keras_sam.__file__)),
        "devices": devices,
        "cpu_cores_allowed": cores,
        "threads": threads,
        "arguments": {k: v for k, v in vars(args).items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "epochs_trained": 0,
    }


def test_accuracy(model, x, y, batch_size=1000):
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


# ------------------------------------------------- benchmarks/vit.py's helpers (it imports them)
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
                entry["train_seconds"] = time.perf_counter() - self.started - self.eval_seconds
                run["history"].append(entry)
                run["epochs_done"] = epoch + 1
                run["train_seconds"] = entry["train_seconds"]
                if stopping:
                    run["status"] = f"stopped after epoch {epoch + 1}: --budget-seconds spent"
                    self.model.stop_training = True
                write_json(out, record)

        return Log()


# ------------------------------------------------------------------------------ training
def total_train_seconds(run):
    """The run's training time: its epochs' together (each epoch's is in its history entry;
    a record written before the entries were summed kept the last epoch's as the total)."""
    return sum(entry["train_seconds"] for entry in run["history"])


def run_key(method, seed):
    return f"{method}/seed{seed}"


def new_run(method, seed, epochs):
    return {
        "method": method, "seed": seed, "status": "not started", "epochs": epochs,
        "epochs_done": 0, "history": [], "train_seconds": 0.0, "eval_seconds": 0.0,
        "sittings": 0,
    }  # fmt: skip


def train_run(method, seed, args, data, record, budget, now):
    """Trains (or continues) one run up to `args.until_epoch` or the budget; returns it."""
    import keras

    import keras_sam

    key = run_key(method, seed)
    (x_train, y_train), (x_test, y_test) = data
    steps = len(x_train) // args.batch_size
    keras.backend.clear_session()  # the same layer names every run (and compilation cache)
    model = build_model(args, seed)
    optimizer = make_optimizer(args, steps * args.epochs)
    sam = method in ("sam", "asam")
    if sam:
        optimizer = keras_sam.SAM(optimizer, rho=args.rho, adaptive=method == "asam")
    wrapped = keras_sam.SAMModel(model) if sam else model
    wrapped.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    path = checkpoint_path(args.out, key)
    run = restore_checkpoint(path, wrapped, optimizer) if path.exists() else None
    if run is None:
        run = new_run(method, seed, args.epochs)
    run["parameters"] = int(model.count_params())
    record["runs"][key] = run
    until = min(args.until_epoch or args.epochs, args.epochs)
    if run["epochs_done"] >= until:
        return run
    run["sittings"] += 1  # the sittings that trained it
    print(f"== {key}: epochs {run['epochs_done'] + 1} to {until} of {args.epochs}", flush=True)
    for epoch in range(run["epochs_done"], until):
        x, y = epoch_data(x_train, y_train, seed, epoch, args.batch_size, args.augment,
                          args.cutout, args.cutout_length)  # fmt: skip
        started = time.perf_counter()
        logs = wrapped.fit(
            x, y, batch_size=args.batch_size, epochs=1, shuffle=False,
            verbose=2 if args.verbose else 0,
        ).history  # fmt: skip
        trained = time.perf_counter() - started
        entry = {
            "epoch": epoch + 1,
            "loss": float(logs["loss"][-1]),
            "train_accuracy": float(logs["accuracy"][-1]),
            "train_seconds": trained,
        }
        run["status"] = "running"
        last = epoch + 1 == args.epochs
        stopping = not last and (epoch + 1 == until or budget.exceeded())
        if (epoch + 1) % args.eval_every == 0 or last or stopping:
            started = time.perf_counter()
            accuracy = test_accuracy(model, x_test, y_test)
            entry["eval_seconds"] = time.perf_counter() - started
            entry["test_accuracy"] = accuracy
            entry["test_error"] = 1.0 - accuracy
            run["eval_seconds"] += entry["eval_seconds"]
            run["test_error"] = entry["test_error"]
            run["best_test_error"] = min(run.get("best_test_error", 1.0), entry["test_error"])
        run["history"].append(entry)
        run["epochs_done"] = epoch + 1
        run["train_seconds"] += trained
        run["train_steps"] = run["epochs_done"] * steps
        run["gradient_evaluations"] = run["train_steps"] * (2 if sam else 1)
        now["epochs_trained"] += 1
        if last:
            run["status"] = "complete"
        elif stopping:
            run["status"] = (
                f"paused after epoch {epoch + 1} of {args.epochs} "
                f"({'--budget-seconds spent' if budget.exceeded() else '--until-epoch'}): "
                "rerun the same command to continue"
            )
        save_checkpoint(path, wrapped, optimizer, run)  # before the JSON: never behind it
        now["elapsed_seconds"] = budget.elapsed()
        write_json(args.out, record)
        error = entry.get("test_error")
        print(
            f"   {key} epoch {epoch + 1}/{args.epochs}: loss {entry['loss']:.4f}, "
            f"train acc. {entry['train_accuracy']:.4f}, test error "
            f"{'-' if error is None else f'{100 * error:.2f} %'}, {trained:.1f} s",
            flush=True,
        )
        if stopping:
            break
    return run


def run_all(args, data, record):
    """Trains each (seed, method) in turn within the budget, rewriting the JSON."""
    budget = Budget(args.budget_seconds)
    now = sitting(args)
    record.setdefault("sittings", []).append(now)
    for seed in args.seeds:  # every planned run in the JSON from the start, in order
        for method in args.methods:
            record["runs"].setdefault(run_key(method, seed), new_run(method, seed, args.epochs))
    for seed in args.seeds:
        for method in args.methods:
            key = run_key(method, seed)
            run = record["runs"][key]
            if run["status"] == "complete":
                continue
            if budget.exceeded():
                run["status"] = (
                    f"not finished: --budget-seconds spent before this sitting reached it "
                    f"(epoch {run['epochs_done']} of {args.epochs}); rerun to continue"
                )
                continue
            train_run(method, seed, args, data, record, budget, now)
    now["elapsed_seconds"] = budget.elapsed()
    now["ended"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    write_json(args.out, record)
    return record


def parse(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None, help="folder of the four IDX files (.gz)")
    parser.add_argument("--out", default="full_fashion_mnist.json", help="the JSON written")
    parser.add_argument("--model", choices=["wrn", "cnn"], default="wrn")
    parser.add_argument("--depth", type=int, default=16, help="WRN depth, 6n + 4")
    parser.add_argument("--widen", type=int, default=4, help="WRN widening factor")
    parser.add_argument("--width", type=int, default=32, help="CNN: first layer's filters")
    parser.add_argument("--batch-norm", action="store_true", help="CNN: with BatchNorm")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (cosine)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--no-nesterov", dest="nesterov", action="store_false")
    parser.add_argument("--clip-norm", type=float, default=5.0, help="global norm; 0: none")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="L2, in the loss")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--methods", default="sgd,sam", help="comma-separated: sgd, sam, asam")
    parser.add_argument("--seeds", default="0,1", help="comma-separated")
    parser.add_argument("--augment", choices=["basic", "none"], default="basic")
    parser.add_argument("--cutout", action="store_true", help="the official batch cutout")
    parser.add_argument("--cutout-length", type=int, default=CUTOUT_LENGTH)
    parser.add_argument("--train-size", type=int, default=0, help="0: all 60,000")
    parser.add_argument("--test-size", type=int, default=0, help="0: all 10,000")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument(
        "--until-epoch",
        type=int,
        default=None,
        help="stop every run after this epoch (a sitting); rerun to continue",
    )
    parser.add_argument("--budget-seconds", type=float, default=None)
    parser.add_argument("--verbose", action="store_true", help="Keras's line per epoch")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few seconds on a CPU: 256 training and 256 test images, WRN-10-1, 2 epochs "
        "of batch 64, seed 0 (overrides those options)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_size, args.test_size, args.epochs, args.batch_size = 256, 256, 2, 64
        args.depth, args.widen, args.seeds = 10, 1, "0"
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in args.methods:
        if method not in ("sgd", "sam", "asam"):
            parser.error(f"--methods: unknown method {method!r} (sgd, sam, asam)")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    return args


def protocol(args):
    return {name: getattr(args, name) for name in PROTOCOL}


def main(argv=None):
    args = parse(argv)
    set_precision(args.dtype)
    data = load(args.data_dir, args.train_size, args.test_size, mean=MEAN, std=STD)
    out = Path(args.out)
    if out.exists():
        record = json.loads(out.read_text())
        if record.get("protocol") != protocol(args):
            raise SystemExit(
                f"{out} holds runs of another protocol: {record.get('protocol')}; this "
                f"command's is {protocol(args)}. Use another --out (or delete {out} and "
                f"{checkpoint_dir(out)})."
            )
    else:
        record = {
            "benchmark": "full_fashion_mnist",
            "model": model_name(args),
            "protocol": protocol(args),
            "train_examples": len(data[0][0]),
            "test_examples": len(data[1][0]),
            "steps_per_epoch": len(data[0][0]) // args.batch_size,
            "normalization": {"mean": MEAN, "std": STD},
            "paper": PAPER,
            "sittings": [],
            "runs": {},
        }
    run_all(args, data, record)
    return record


if __name__ == "__main__":
    main()
    sys.exit(0)
