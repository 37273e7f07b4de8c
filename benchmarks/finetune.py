"""Fine-tuning LoRA adapters with flatness: AdamW, SAM, Flat-LoRA and BAR against full fine-tuning.

The question (issue 30): is there an adapter method that keeps at least 90 % of
SAM-over-adapters' gain over plain AdamW on the adapters, with clean and with noisy labels,
at no more than 1.1x LoRA's time per step and memory? SAM over the adapters costs two
forward-backward passes a step; Flat-LoRA (Li et al., arXiv 2409.14396) replaces SAM's
adversarial perturbation by a random one in the full weight space, one pass a step; BAR
(Li et al., arXiv 2410.14802) replaces it by a regularizer on the adapters' balancedness.

The protocol, all on Fashion-MNIST read from disk (`keras_sam.datasets.fashion_mnist`; no
download where the Debian package or a copy is installed):

- **Pretraining**, once, shared by every seed and method: the ViT of benchmarks/vit.py
  (a strided-convolution patch embedding, pre-norm blocks of multi-head self-attention and
  a GELU MLP, a linear head) trained with AdamW on classes 0-4 of the training set
  (`--pretrain-size` images, `--pretrain-epochs`). One shared checkpoint, because the
  study asks how the fine-tuning methods differ from one given pretrained model (as one
  downloads one public checkpoint), and pretraining three times would spend most of a CPU
  budget on what is not compared. It is cached on disk (`--cache-dir`, a file named by the
  hash of the pretraining arguments), so reruns and later seeds load it.
- **Fine-tuning** on classes 5-9 (relabelled 0-4): per seed a random subset of
  `--train-size` training images, the labels clean or with 40 % of them flipped to
  another of the 5 classes (`keras_sam.datasets.label_noise.corrupt_labels`, mode
  "flip"); a new head (5 logits, initialized per seed), always fully trained. Tested on
  every test image of classes 5-9 (5,000) after the last epoch.
- **LoRA**: Keras's `enable_lora(rank)` on every Dense and EinsumDense layer of the
  transformer blocks (the attention's query, key, value and output projections, the
  MLP's two layers); everything else frozen (patch embedding, position embedding, layer
  norms), the adapted layers' biases trainable (Keras freezes the kernel only). The ViT is
  chosen over the CNN because its weights are almost all in Dense/EinsumDense layers, where
  LoRA is defined and is the usual practice (attention and MLP projections), while the
  CNN's only LoRA-able layers would be its two-layer head.

The methods (`METHODS`; interleaved within each seed and condition, so that the machine's
drift hits all alike):

- `adamw-lora`: AdamW on the adapters (and the head), plain `fit`: the baseline;
- `sam-lora`: `keras_sam.SAM(AdamW, rho)` through `keras_sam.SAMModel`, over the adapters
  (and the head): the perturbation and the update touch only the trainable variables;
- `flat-lora`: `keras_sam.FlatLoRA(AdamW, **kwargs)` through `SAMModel`;
- `bar-lora`: `keras_sam.BAR(AdamW, **kwargs)` through `SAMModel`;
- `adamw-full`: full fine-tuning with AdamW (every weight trainable, no adapters), the
  reference.

Flat-LoRA's and BAR's classes are looked up by name in `keras_sam`; where one does not
exist (or does not accept the arguments), its runs are recorded as unavailable with the
reason, and the table says so. Their arguments are guesses from the papers (Flat-LoRA: the
noise strength `sigma`; BAR: a coefficient `alpha`); fix them in `METHODS` or with
`--method-args flat-lora='{"sigma": 0.05}'`.

Measured per run: the test accuracy; the time per step, the median over the epochs after
the first (compilation) of the epoch's time between its first and last step ends over the
steps between (each step's loss is read, which waits for the device); and per method the
peak memory of a fine-tuning run in a fresh process, as benchmarks/regimes.py measures it
(on a CPU the process's peak resident memory, on a GPU the device's peak allocation),
with the peak before `fit` beside it. The JSON (`--out`) is rewritten after every run; a
rerun with the same `--out` and protocol keeps the finished runs. The markdown table
(`<out>.md`, and printed) gives the mean and standard deviation over the seeds, the gain
over AdamW-LoRA, the fraction of SAM-LoRA's gain, and time and memory over AdamW-LoRA's.

    # CPU (2 cores, JAX): the budget of docs/RESULTS.md's "Fine-tuning with flatness"
    KERAS_BACKEND=jax python benchmarks/finetune.py --out finetune.json
    # GPU: a larger ViT and more data
    KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/finetune.py \\
        --gpu --out finetune_gpu.json
    python benchmarks/finetune.py --quick --out /tmp/finetune_quick.json   # seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import timing  # noqa: E402
from full_fashion_mnist import FASHION_MEAN, FASHION_STD, environment, normalize, write_json  # noqa: E402

PAPERS = {
    "flat-lora": "Li, Dai, Wen, Ye, Ye, Flat-LoRA: Low-Rank Adaptation over a Flat Loss "
    "Landscape, arXiv 2409.14396",
    "bar-lora": "Li, Zhang, He, Implicit Regularization of Sharpness-Aware Minimization for "
    "Scale-Invariant Problems (BAR), NeurIPS 2024, arXiv 2410.14802",
}

# name -> how the run is built. `adapters`: LoRA on the blocks (else full fine-tuning);
# `optimizer`: None for plain AdamW and `fit`, else the name of a keras_sam class wrapping
# the AdamW, trained through `SAMModel`; `kwargs`: its arguments (`rho` from `--rho`).
METHODS = {
    "adamw-lora": {"adapters": True, "optimizer": None, "kwargs": {}},
    "sam-lora": {"adapters": True, "optimizer": "SAM", "kwargs": {"rho": None}},
    # Guesses from the papers, to be checked against the classes when they are merged.
    # `total_steps=None` here: the run's own number of steps (the paper's cosine rise).
    "flat-lora": {
        "adapters": True,
        "optimizer": "FlatLoRA",
        "kwargs": {"sigma": 0.05, "total_steps": None},
    },
    "bar-lora": {"adapters": True, "optimizer": "BAR", "kwargs": {"alpha": 0.1}},
    "adamw-full": {"adapters": False, "optimizer": None, "kwargs": {}},
}
BASELINE, SAM_METHOD = "adamw-lora", "sam-lora"
CONDITIONS = {"clean": 0.0, "noisy40": 0.4}
PRETRAIN_CLASSES, FINETUNE_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)

# The arguments that define the protocol: a rerun onto the same JSON must repeat them.
PROTOCOL = (
    "patch", "dim", "depth", "heads", "mlp_ratio", "pretrain_size", "pretrain_epochs",
    "pretrain_lr", "train_size", "test_size", "epochs", "batch_size", "lr", "full_lr",
    "weight_decay", "rank", "rho", "method_args",
)  # fmt: skip
PRETRAIN = ("patch", "dim", "depth", "heads", "mlp_ratio", "pretrain_size", "pretrain_epochs",
            "pretrain_lr", "batch_size", "weight_decay")  # fmt: skip

# Shapes: the CPU default (the measured budget of docs/RESULTS.md), --gpu and --quick.
CPU_SHAPE = {
    "patch": 7, "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2, "pretrain_size": 10000,
    "pretrain_epochs": 5, "train_size": 1000, "test_size": 0, "epochs": 20, "batch_size": 50,
}  # fmt: skip
GPU_SHAPE = {
    "patch": 4, "dim": 128, "depth": 6, "heads": 4, "mlp_ratio": 2, "pretrain_size": 0,
    "pretrain_epochs": 20, "train_size": 1000, "test_size": 0, "epochs": 40, "batch_size": 50,
}  # fmt: skip
QUICK_SHAPE = {
    "patch": 7, "dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2, "pretrain_size": 256,
    "pretrain_epochs": 1, "train_size": 96, "test_size": 200, "epochs": 3, "batch_size": 32,
}  # fmt: skip


# ------------------------------------------------------------------------------- data
def load(data_dir, test_size):
    """Fashion-MNIST as uint8 images and labels (`test_size` > 0: a seeded test subset);
    `class_split` normalizes the images it keeps, so that no float copy of the whole set is
    made (which would set the process's peak memory before any training)."""
    from keras_sam.datasets import fashion_mnist

    (x_train, y_train), (x_test, y_test) = fashion_mnist.load_data(data_dir)
    if test_size and test_size < len(x_test):
        keep = np.sort(np.random.default_rng(0).permutation(len(x_test))[:test_size])
        x_test, y_test = x_test[keep], y_test[keep]
    return (x_train, y_train), (x_test, y_test)


def class_split(x, y, classes, size, rng):
    """The images of `classes`, normalized as benchmarks/vit.py's (Fashion-MNIST's own
    statistics), labels relabelled `0..len(classes)-1`; `size` > 0 keeps a random subset
    of that many (drawn with `rng`)."""
    keep = np.flatnonzero(np.isin(y, classes))
    if size and size < len(keep):
        keep = np.sort(rng.permutation(keep)[:size])
    relabel = np.full(10, -1, "int64")
    relabel[list(classes)] = np.arange(len(classes))
    return normalize(x[keep], FASHION_MEAN, FASHION_STD), relabel[y[keep]]


def finetune_data(arrays, args, seed, noise):
    """The seed's fine-tuning subset of classes 5-9 (labels as trained, with `noise` of them
    flipped) and the test images of classes 5-9; the subset and noise depend on the seed."""
    from keras_sam.datasets import label_noise

    (x_all, y_all), (x_test, y_test) = arrays
    rng = np.random.default_rng(seed)
    x, y = class_split(x_all, y_all, FINETUNE_CLASSES, args.train_size, rng)
    noisy = label_noise.corrupt_labels(
        y, noise, num_classes=len(FINETUNE_CLASSES), seed=seed, mode="flip"
    )
    test = class_split(x_test, y_test, FINETUNE_CLASSES, 0, rng)
    return x, noisy.labels.astype("int32"), float(noisy.fraction), test


# ------------------------------------------------------------------------------ model
def build(args):
    from vit import vision_transformer

    return vision_transformer(
        args.patch,
        args.dim,
        args.depth,
        args.heads,
        args.mlp_ratio,
        num_classes=len(PRETRAIN_CLASSES),
    )


def pretrained_path(args):
    spec = {k: getattr(args, k) for k in PRETRAIN}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return Path(args.cache_dir) / f"vit-classes0-4-{digest}.weights.h5", spec


def pretrain(args, arrays):
    """The pretrained weights' file (trained now if not cached) and what it records."""
    import keras

    from keras_sam.models import set_random_seed

    path, spec = pretrained_path(args)
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        return path, json.loads(info_path.read_text()) | {"cached": True}
    (x_all, y_all), (x_test, y_test) = arrays
    rng = np.random.default_rng(12345)
    x, y = class_split(x_all, y_all, PRETRAIN_CLASSES, args.pretrain_size, rng)
    xt, yt = class_split(x_test, y_test, PRETRAIN_CLASSES, 0, rng)
    keras.backend.clear_session()
    set_random_seed(0)
    model = build(args)
    steps = args.pretrain_epochs * math.ceil(len(x) / args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(args.pretrain_lr, max(1, steps))
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    started = time.perf_counter()
    model.fit(x, y, batch_size=args.batch_size, epochs=args.pretrain_epochs, verbose=0)
    info = {
        "classes": list(PRETRAIN_CLASSES),
        "examples": len(x),
        "arguments": spec,
        "parameters": int(model.count_params()),
        "seconds": time.perf_counter() - started,
        "test_accuracy_classes0_4": accuracy(model, xt, yt),
        "backend": keras.backend.backend(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(path)
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return path, info | {"cached": False}


def accuracy(model, x, y):
    logits = model.predict(x, batch_size=1000, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def adapted_layers(model):
    """The Dense and EinsumDense layers of the transformer blocks (not the head)."""
    import keras

    head = model.layers[-1]
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)) and layer is not head
    ]


def finetune_model(args, weights, seed, adapters):
    """The pretrained ViT with a new head (seeded), LoRA on the blocks when `adapters`."""
    import keras

    from keras_sam.models import set_random_seed

    keras.backend.clear_session()
    set_random_seed(seed)
    model = build(args)
    model.load_weights(weights)
    head = model.layers[-1]
    rng = np.random.default_rng(seed)
    fan_in, fan_out = head.kernel.shape
    limit = math.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform, Dense's default
    head.kernel.assign(rng.uniform(-limit, limit, (fan_in, fan_out)).astype("float32"))
    head.bias.assign(np.zeros(fan_out, "float32"))
    if adapters:
        targets = adapted_layers(model)
        for layer in model._flatten_layers(include_self=False):
            if layer is not head and not layer._layers and layer not in targets:
                layer.trainable = False  # patch and position embeddings, layer norms
        for layer in targets:
            layer.enable_lora(args.rank)
    return model


def make_trained(method, model, args, steps):
    """`(trained, optimizer)` of `method`, or raises `Unavailable`."""
    import keras

    import keras_sam

    spec = METHODS[method]
    lr = args.lr if spec["adapters"] else args.full_lr
    schedule = keras.optimizers.schedules.CosineDecay(lr, max(1, steps))
    inner = keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay)
    if spec["optimizer"] is None:
        return model, inner
    try:
        cls = getattr(keras_sam, spec["optimizer"], None)
    except ImportError:  # named in keras_sam's table, its module not there
        cls = None
    if cls is None:
        raise Unavailable(f"keras_sam.{spec['optimizer']} does not exist in this keras_sam")
    kwargs = method_kwargs(method, args, steps)
    try:
        optimizer = cls(inner, **kwargs)
    except TypeError as error:  # a guessed argument the class does not take
        raise Unavailable(f"keras_sam.{spec['optimizer']}(AdamW, **{kwargs}): {error}") from error
    return keras_sam.SAMModel(model), optimizer


class Unavailable(Exception):
    """A method whose class is not (yet) in keras_sam, or does not take its arguments."""


def method_kwargs(method, args, steps=None):
    """The method's arguments: `rho` from `--rho`, `total_steps` the run's `steps`, then
    `--method-args`."""
    kwargs = dict(METHODS[method]["kwargs"])
    if "rho" in kwargs and kwargs["rho"] is None:
        kwargs["rho"] = args.rho
    if "total_steps" in kwargs and kwargs["total_steps"] is None:
        kwargs["total_steps"] = steps
    kwargs.update(args.method_args.get(method, {}))
    return kwargs


def finetune_run(method, condition, seed, args, arrays, weights):
    """Trains one run; returns its record (status "unavailable" where the method is)."""
    import keras

    x, y, fraction, (x_test, y_test) = finetune_data(arrays, args, seed, CONDITIONS[condition])
    run = {"method": method, "condition": condition, "seed": seed, "noise_fraction": fraction}
    spec = METHODS[method]
    model = finetune_model(args, weights, seed, spec["adapters"])
    steps = math.ceil(len(x) / args.batch_size) * args.epochs
    try:
        trained, optimizer = make_trained(method, model, args, steps)
    except Unavailable as error:
        return run | {"status": f"unavailable: {error}"}
    if spec["optimizer"] is not None:
        kwargs = method_kwargs(method, args, steps)
        run["optimizer"] = {"class": spec["optimizer"], "kwargs": kwargs}
    run["trainable_parameters"] = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    run["parameters"] = int(model.count_params())
    trained.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    times = timing.StepClock()
    started = time.perf_counter()
    history = trained.fit(
        x,
        y,
        batch_size=args.batch_size,
        epochs=args.epochs,
        callbacks=[times],
        verbose=0,
    )
    run["wall_seconds"] = time.perf_counter() - started
    run["seconds_per_step"] = times.seconds_per_step()
    run["train_steps"] = steps
    run["final_loss"] = float(history.history["loss"][-1])
    run["final_train_accuracy"] = float(history.history["accuracy"][-1])  # labels as trained
    run["test_accuracy"] = accuracy(model, x_test, y_test)
    run["test_examples"] = len(x_test)
    run["status"] = "complete"
    return run


def time_methods(args, arrays, weights):
    """Each method's time per step measured apart from the study's runs, which share the
    machine with whatever else runs: `--time-rounds` rounds, each a 3-epoch run of every
    method in turn (clean labels, seed 0), so that the machine's drift hits all alike.
    Returns, per method, the rounds' times per step and the median over the rounds of the
    ratio to AdamW-LoRA's time in the same round."""
    short = argparse.Namespace(**{**vars(args), "epochs": 3})
    times = {method: [] for method in args.methods}
    for round_ in range(args.time_rounds):
        for method in args.methods:
            run = finetune_run(method, "clean", 0, short, arrays, weights)
            if run["status"] == "complete":
                times[method].append(run["seconds_per_step"])
                print(
                    f"timing round {round_}: {method} {1e3 * run['seconds_per_step']:.1f} ms/step",
                    flush=True,
                )
    result = {}
    for method, seconds in times.items():
        if len(seconds) == len(times[BASELINE]) == args.time_rounds:
            ratio = timing.ratio(seconds, times[BASELINE]).median
            result[method] = {"seconds_per_step": seconds, "ratio": ratio}
    return result


# ----------------------------------------------------------------------------- memory
def memory_worker(method, args):
    """Prints one fine-tuning run's peak memory (seed 0, clean labels), in a fresh process."""
    arrays = load(args.data_dir, args.test_size)
    weights, _ = pretrain(args, arrays)
    x, y, _, _ = finetune_data(arrays, args, 0, 0.0)
    model = finetune_model(args, weights, 0, METHODS[method]["adapters"])
    epochs = 1  # compilation and an epoch's steps: the peak of every later epoch
    try:
        steps = epochs * math.ceil(len(x) / args.batch_size)
        trained, optimizer = make_trained(method, model, args, steps)
    except Unavailable as error:
        print(json.dumps({"status": f"unavailable: {error}"}), flush=True)
        return
    import keras

    trained.compile(
        optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    del arrays  # the fine-tuning set is all `fit` needs from here
    on_host = timing.peak_bytes() == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = _reset_host_peak() if on_host else timing.peak_bytes()
    trained.fit(x, y, batch_size=args.batch_size, epochs=epochs, verbose=0)
    peak = _host_bytes("VmHWM") if on_host and before is not None else timing.peak_bytes()
    result = {"status": "complete", "peak_bytes": peak, "peak_before_fit_bytes": before}
    print(json.dumps(result), flush=True)


def _reset_host_peak():
    """Sets this process's resident high-water mark to its resident size now (Linux's
    `/proc/self/clear_refs`), so that the peak read after `fit` is `fit`'s own and not the
    data loading's before it; returns that size in bytes, or None where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _host_bytes("VmRSS")
    except OSError:
        return None


def _host_bytes(field):
    """A size from `/proc/self/status` (`VmRSS`, `VmHWM`), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def measure_memory(method, args, argv):
    """Runs `memory_worker` in a fresh process with the same arguments."""
    command = [sys.executable, __file__, *argv, "--memory-worker", method]
    out = subprocess.run(command, env=timing.worker_env(), capture_output=True, text=True)
    if out.returncode:
        return {"status": f"failed: exit {out.returncode}: {out.stderr.strip()[-500:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ table
def _mean_std(values):
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(record):
    """Per condition and method: accuracy mean and std, gain over AdamW-LoRA, fraction of
    SAM-LoRA's gain, and time and memory over AdamW-LoRA's (time: the mean over seeds of the
    per-seed ratio, the runs of a seed being interleaved)."""
    runs = record["runs"]
    memory = record.get("memory", {})
    base_memory = memory.get(BASELINE, {}).get("peak_bytes")
    table = {}
    for condition in record["protocol"]["conditions"]:
        done = {
            m: {
                r["seed"]: r
                for r in runs.values()
                if r["method"] == m and r["condition"] == condition and r["status"] == "complete"
            }
            for m in record["protocol"]["methods"]
        }

        def mean_accuracy(method, done=done):
            return _mean_std([r["test_accuracy"] for r in done[method].values()])[0]

        base, sam = mean_accuracy(BASELINE), mean_accuracy(SAM_METHOD)
        for method in record["protocol"]["methods"]:
            row = {"runs": len(done[method])}
            statuses = {
                r["status"]
                for r in runs.values()
                if r["method"] == method and r["condition"] == condition
            }
            if not done[method]:
                row["status"] = "; ".join(sorted(statuses)) or "not run"
                table[f"{condition}|{method}"] = row
                continue
            accuracies = [r["test_accuracy"] for r in done[method].values()]
            row["accuracy"], row["accuracy_std"] = _mean_std(accuracies)
            if base is not None:
                row["gain"] = row["accuracy"] - base
                if sam is not None and sam - base > 0:
                    row["fraction_of_sam_gain"] = row["gain"] / (sam - base)
            row["ms_per_step"] = 1e3 * statistics.fmean(
                r["seconds_per_step"] for r in done[method].values()
            )
            ratios = [
                r["seconds_per_step"] / done[BASELINE][s]["seconds_per_step"]
                for s, r in done[method].items()
                if s in done.get(BASELINE, {})
            ]
            if ratios:
                row["time_ratio"] = statistics.fmean(ratios)
            timed = record.get("timing", {}).get(method, {})
            if "ratio" in timed:  # measured apart, interleaved (`--time-rounds`)
                row["ms_per_step"] = 1e3 * statistics.median(timed["seconds_per_step"])
                row["time_ratio"] = timed["ratio"]
            peak = memory.get(method, {}).get("peak_bytes")
            if peak:
                row["peak_mb"] = peak / 2**20
                before = memory[method].get("peak_before_fit_bytes")
                if before is not None:
                    row["fit_added_mb"] = (peak - before) / 2**20
                if base_memory:
                    row["memory_ratio"] = peak / base_memory
            table[f"{condition}|{method}"] = row
    return table


def markdown(record):
    table = summarize(record)
    p = record["protocol"]
    lines = [
        f"Fine-tuning a ViT (patch {p['patch']}, dim {p['dim']}, depth {p['depth']}, "
        f"heads {p['heads']}) pretrained on Fashion-MNIST classes 0-4, on classes 5-9: "
        f"{p['train_size']} images, {p['epochs']} epochs of batch {p['batch_size']}, LoRA "
        f"rank {p['rank']}; seeds {', '.join(map(str, p['seeds']))}; "
        f"{record['environment']['backend']} on {', '.join(record['environment']['devices'])}.",
        "",
        "| labels | method | runs | test acc. (%) | gain over AdamW-LoRA (points) |"
        " fraction of SAM's gain | ms / step | time / AdamW-LoRA | peak memory (MiB) |"
        " fit adds (MiB) | memory / AdamW-LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row, key, fmt, scale=1.0):
        return fmt.format(scale * row[key]) if key in row else "-"

    for key, row in table.items():
        condition, method = key.split("|")
        if "accuracy" not in row:
            lines.append(
                f"| {condition} | {method} | 0 | {row['status']} | - | - | - | - | - | - | - |"
            )
            continue
        lines.append(
            f"| {condition} | {method} | {row['runs']} | "
            f"{100 * row['accuracy']:.2f} ± {100 * row['accuracy_std']:.2f} | "
            f"{cell(row, 'gain', '{:+.2f}', 100)} | "
            f"{cell(row, 'fraction_of_sam_gain', '{:.2f}')} | "
            f"{cell(row, 'ms_per_step', '{:.1f}')} | {cell(row, 'time_ratio', '{:.2f}')} | "
            f"{cell(row, 'peak_mb', '{:.0f}')} | {cell(row, 'fit_added_mb', '{:.0f}')} | "
            f"{cell(row, 'memory_ratio', '{:.2f}')} |"
        )
    lines += ["", "The goal (at least 90 % of SAM-LoRA's gain in both conditions, at most "
              "1.1x AdamW-LoRA's time per step and peak memory):", ""]  # fmt: skip
    for method in p["methods"]:
        if method in (BASELINE, SAM_METHOD) or not METHODS[method]["adapters"]:
            continue
        rows = [table.get(f"{c}|{method}", {}) for c in p["conditions"]]
        if not all("accuracy" in r for r in rows):
            lines.append(f"- {method}: not measured.")
            continue
        fractions = [r.get("fraction_of_sam_gain") for r in rows]
        gain = all(f is not None and f >= 0.9 for f in fractions)
        time_ok = all(r.get("time_ratio", math.inf) <= 1.1 for r in rows)
        memory_ok = all(r.get("memory_ratio", math.inf) <= 1.1 for r in rows)
        verdict = "meets it" if gain and time_ok and memory_ok else "does not meet it"
        lines.append(
            f"- {method}: {verdict} (fraction of SAM's gain "
            + ", ".join("n/a" if f is None else f"{f:.2f}" for f in fractions)
            + f"; time {'ok' if time_ok else 'over 1.1x'}; "
            f"memory {'ok' if memory_ok else 'over 1.1x or not measured'})."
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- main
def parse(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", default=None, help="folder of the four IDX files (.gz)")
    parser.add_argument("--out", default="finetune.json", help="the JSON written")
    parser.add_argument(
        "--cache-dir", default=None, help="pretrained weights (default: beside --out)"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help="clean, noisy40")
    parser.add_argument("--gpu", action="store_true", help="the larger shape (GPU_SHAPE)")
    parser.add_argument("--quick", action="store_true", help="seconds: QUICK_SHAPE, seed 0")
    for name, value in CPU_SHAPE.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"default {value} (CPU), {GPU_SHAPE[name]} (--gpu)")  # fmt: skip
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW's, on the adapters")
    parser.add_argument("--full-lr", type=float, default=3e-4, help="AdamW's, full fine-tuning")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--rho", type=float, default=0.05, help="SAM's radius over the adapters")
    parser.add_argument(
        "--method-args",
        action="append",
        default=[],
        metavar="METHOD=JSON",
        help="constructor arguments of a method, e.g. flat-lora='{\"sigma\": 0.05}'",
    )
    parser.add_argument(
        "--time-rounds",
        type=int,
        default=0,
        help="time each method apart from the study's runs: this many rounds of a 3-epoch "
        "run of every method in turn (clean labels, seed 0); the table's times are then "
        "these (the median over the rounds of each round's ratio to AdamW-LoRA)",
    )
    parser.add_argument(
        "--memory",
        choices=["process", "off"],
        default="process",
        help="peak memory per method in a fresh process (or not measured)",
    )
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = QUICK_SHAPE if args.quick else GPU_SHAPE if args.gpu else CPU_SHAPE
    for name, value in shape.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick and args.seeds == "0,1,2":
        args.seeds = "0"
    args.seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    for method in args.methods:
        if method not in METHODS:
            parser.error(f"--methods: unknown method {method!r} ({', '.join(METHODS)})")
    for condition in args.conditions:
        if condition not in CONDITIONS:
            parser.error(f"--conditions: unknown {condition!r} ({', '.join(CONDITIONS)})")
    method_args = {}
    for item in args.method_args:
        name, _, text = item.partition("=")
        if name not in METHODS:
            parser.error(f"--method-args: unknown method {name!r} in {item!r}")
        try:
            method_args[name] = json.loads(text)
        except json.JSONDecodeError as error:
            parser.error(f"--method-args: {item!r} is not METHOD=JSON: {error}")
        if not isinstance(method_args[name], dict):
            parser.error(f"--method-args: {item!r}: the JSON must be an object")
    args.method_args = method_args
    if args.cache_dir is None:
        out = Path(args.out)
        args.cache_dir = str(out.with_name(out.stem + ".pretrained"))
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.memory_worker:
        return memory_worker(args.memory_worker, args)
    arrays = load(args.data_dir, args.test_size)
    protocol = {k: getattr(args, k) for k in PROTOCOL}
    protocol |= {"seeds": args.seeds, "methods": args.methods, "conditions": args.conditions}
    previous = {}
    if Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        if {k: old["protocol"].get(k) for k in PROTOCOL} == {k: protocol[k] for k in PROTOCOL}:
            previous = old.get("runs", {})
            protocol_memory = old.get("memory", {})
        else:
            raise SystemExit(f"{args.out} holds another protocol; choose another --out")
    else:
        protocol_memory = {}
    started = time.perf_counter()
    weights, pretrained = pretrain(args, arrays)
    print(
        f"pretrained ({'cached' if pretrained['cached'] else 'trained'}): "
        f"{100 * pretrained['test_accuracy_classes0_4']:.2f} % on classes 0-4",
        flush=True,
    )
    record = {
        "benchmark": "finetune",
        "protocol": protocol,
        "papers": PAPERS,
        "environment": environment({k: v for k, v in vars(args).items() if k != "memory_worker"}),
        "pretrained": pretrained | {"path": str(weights)},
        "memory": dict(protocol_memory),
        "runs": {},
    }
    write_json(args.out, record)
    for seed in args.seeds:
        for condition in args.conditions:
            for method in args.methods:  # interleaved within the seed and condition
                key = f"{condition}/{method}/seed{seed}"
                if previous.get(key, {}).get("status") == "complete":
                    record["runs"][key] = previous[key]
                    continue
                run = finetune_run(method, condition, seed, args, arrays, weights)
                record["runs"][key] = run
                record["elapsed_seconds"] = time.perf_counter() - started
                write_json(args.out, record)
                if run["status"] == "complete":
                    print(
                        f"{key}: {100 * run['test_accuracy']:.2f} %, "
                        f"{1e3 * run['seconds_per_step']:.1f} ms/step, "
                        f"{run['wall_seconds']:.1f} s",
                        flush=True,
                    )
                else:
                    print(f"{key}: {run['status']}", flush=True)
    if args.memory == "process":
        for method in args.methods:
            statuses = [r["status"] for r in record["runs"].values() if r["method"] == method]
            if statuses and all(s.startswith("unavailable") for s in statuses):
                record["memory"][method] = {"status": statuses[0]}  # no process to start
            elif record["memory"].get(method, {}).get("status") != "complete":
                record["memory"][method] = measure_memory(method, args, argv)
            write_json(args.out, record)
    if args.time_rounds:
        record["timing"] = time_methods(args, arrays, weights)
        write_json(args.out, record)
    for run in record["runs"].values():  # the method's (one process: the same shapes)
        measured = record["memory"].get(run["method"], {})
        if run["status"] == "complete" and measured.get("status") == "complete":
            run["peak_memory_bytes"] = measured["peak_bytes"]
    record["elapsed_seconds"] = time.perf_counter() - started
    record["table"] = summarize(record)
    write_json(args.out, record)
    text = markdown(record)
    Path(args.out).with_suffix(".md").write_text(text)
    print(text, flush=True)
    return record


if __name__ == "__main__":
    main()
