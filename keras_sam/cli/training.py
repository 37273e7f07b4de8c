"""Training runs on real data: the engine behind `keras-sam train` and `compare`.

A run is described by a `RunConfig`; `prepare_data` loads Fashion-MNIST, takes the
training subset and corrupts its labels; `train` fits one model and records, per epoch,
the training loss and accuracy (on the labels it was given), the clean test loss and
accuracy, the sharpness of the weights (measured the same way for every method), the
number of gradient evaluations so far, and the time spent training and evaluating,
kept apart so that a method's cost is its training time alone.

`method="plain"` trains the inner optimizer alone (no SAM); `"sgd"`, its old name, is
still accepted. The inner optimizer itself is `optimizer` (sgd, adam or adamw).
"""

import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from keras_sam import files
from keras_sam.cli import options
from keras_sam.cli.options import MAX_CONSECUTIVE_SKIPS, OPTIMIZERS, SCHEDULES  # noqa: F401
from keras_sam.cli.recipes import (  # noqa: F401 (the names runs and benchmarks import from here)
    ASAM_RHO_SCALE,
    DEFAULT_RHO,
    MESA_LMBDA,
    MESA_START_SHARE,
    MESA_TEMPERATURE,
    METHOD_ALIASES,
    METHODS,
    MOMENTUM_SAM_RHO,
    build_method,
    default_rho,
)


@options.declared(options.RUN_OPTIONS)
class RunConfig:
    """Everything that defines one training run: the fields of `options.RUN_OPTIONS`, with
    their defaults and rules (`method`: one of `METHODS`, "sgd", the old name of "plain",
    accepted; `rho`: None for the method's default, `default_rho`; `alpha`: None for the
    method's own; `sam_start`: late-phase SAM, the fraction of the steps taken with rho 0
    first; `num_batch_splits`: m-sharpness, m = batch_size / num_batch_splits, for SAM
    methods; `train_size`: 0 for all 60,000; `sharpness_examples` and `sharpness_rho`: the
    first-order sharpness measured every evaluation; `hessian_examples`: the top Hessian
    eigenvalue of the final weights, by Lanczos on that many of the same examples, labels
    as trained, 0: not measured; `eval_every`: evaluate every k epochs and after the last;
    `eval_examples`: the test images of the evaluations before the last, a fixed seeded
    subset, 0: the whole test set every time)."""

    def __post_init__(self):
        self.method = METHOD_ALIASES.get(self.method, self.method)
        options.validate(options.RUN_OPTIONS, self)
        if self.rho is None:
            self.rho = default_rho(self.method)

    @property
    def is_sam(self):
        """Whether the run takes perturbed passes at all (MESA alone: no, rho is 0)."""
        return self.method != "plain" and self.rho > 0


@dataclasses.dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray  # the labels trained on (noisy)
    y_train_clean: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    noise_fraction: float  # the fraction of training labels actually corrupted


def prepare_data(config, data_dir=None, arrays=None):
    """Loads Fashion-MNIST (or takes `arrays`), subsets and corrupts the training labels.

    The subset is the first `train_size` examples of a seeded permutation, so that it is
    balanced in expectation and the same for every method at a given seed.
    """
    from keras_sam.datasets import fashion_mnist, label_noise

    if arrays is None:
        arrays = fashion_mnist.load_data(data_dir)
    (x_train, y_train), (x_test, y_test) = arrays
    rng = np.random.default_rng(config.seed)
    if config.train_size and config.train_size < len(x_train):
        keep = rng.permutation(len(x_train))[: config.train_size]
        x_train, y_train = x_train[keep], y_train[keep]
    y_train = y_train.astype("int64")
    noisy = label_noise.corrupt_labels(
        y_train, config.label_noise, num_classes=10, seed=config.seed, mode=config.noise_mode
    )
    return Data(
        x_train=_images(x_train),
        y_train=noisy.labels,
        y_train_clean=y_train,
        x_test=_images(x_test),
        y_test=y_test.astype("int64"),
        noise_fraction=float(noisy.fraction),
    )


def build_optimizer(config, steps):
    """The inner optimizer with its schedule, wrapped in the run's method (`recipes.RECIPES`)."""
    import keras

    lr = config.learning_rate
    if config.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=steps)
    weight_decay = config.weight_decay or None
    if config.optimizer == "sgd":
        inner = keras.optimizers.SGD(lr, momentum=config.momentum, weight_decay=weight_decay)
    elif config.optimizer == "adam":
        inner = keras.optimizers.Adam(lr, weight_decay=weight_decay)
    else:
        inner = keras.optimizers.AdamW(lr, weight_decay=config.weight_decay)
    return build_method(config, inner, steps)


def train(
    config,
    data,
    out_dir=None,
    verbose=1,
    callbacks=(),
    resume=False,
    max_consecutive_skips=MAX_CONSECUTIVE_SKIPS,
):
    """Trains one model; returns `(model, history)`.

    `history` maps each per-epoch quantity to a list: `loss`, `accuracy` (on the labels
    trained on), `sharpness` (SAM's own, only for SAM methods), `second_pass_rate` (the
    fraction of steps that took the perturbed pass, for methods that skip it), `test_loss`,
    `test_accuracy` (clean test labels, on `test_examples` images: a fixed subset of
    `eval_examples` before the last evaluation, the whole test set at the last),
    `measured_sharpness` (first-order, at `sharpness_rho`, on a fixed set of training
    examples, the same for every method), `hessian_top_eigenvalue` (the top eigenvalue of
    the Hessian of the training loss, at the last evaluation only, on the first
    `hessian_examples` of those examples, when `hessian_examples` > 0; None elsewhere),
    `gradient_evaluations` (forward-backward passes
    over a batch so far, counting the perturbed passes actually taken), `train_seconds`
    and `train_cpu_seconds` (wall-clock and process CPU time in `fit` so far, evaluations
    excluded), `eval_seconds` (time spent evaluating so far) and `seconds` (both together);
    one entry per evaluated epoch (every `eval_every` epochs and the last).

    With `out_dir`, writes `config.json` there first, keeps the last two epochs'
    checkpoints in `out_dir/checkpoint/` while training
    (`keras.callbacks.BackupAndRestore(double_checkpoint=True)`, with the history so
    far), then writes `history.json` and `model.keras` and deletes the checkpoints. Every
    file is written atomically (`keras_sam.files`): a kill leaves the previous file whole.
    A fresh run (`resume=False`) first deletes a previous run's files from `out_dir`.
    `resume=True` continues the run in `out_dir` from its last epoch checkpoint, bitwise as
    the uninterrupted run (the configuration must be the one saved there); a complete run
    is loaded, not trained again.
    Each evaluated epoch's `test_accuracy` is also added to the epoch's logs, so that
    Keras's progress line shows it. `max_consecutive_skips` is `SAMModel`'s: after that
    many skipped steps in a row (NaN or infinite losses or gradients), training stops
    with a `keras_sam.SkippedStepsError`; `None` never stops.
    """
    import keras

    from keras_sam.models import build_model, set_random_seed
    from keras_sam.trainers.sam_model import SAMModel

    out = None if out_dir is None else Path(out_dir)
    if resume and out is None:
        raise ValueError("`resume=True` needs the run's folder: pass `out_dir`.")
    if out is not None and _start(out, config, data, resume) == "complete":
        return load_run(out)
    model = build_model(config.model, seed=config.seed)
    steps_per_epoch = math.ceil(len(data.x_train) / config.batch_size)
    splits = config.num_batch_splits if config.is_sam else None
    sam_model = SAMModel(
        model, num_batch_splits=splits, max_consecutive_skips=max_consecutive_skips
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with warnings.catch_warnings():
        # A plain run goes through `SAMModel` on purpose (the same code path, checkpoints
        # and seeds as SAM's): no warning about its plain optimizer.
        warnings.filterwarnings("ignore", "`SAMModel` was compiled with", UserWarning)
        sam_model.compile(
            optimizer=build_optimizer(config, steps_per_epoch * config.epochs),
            loss=loss,
            metrics=["accuracy"],
        )
    progress = None if out is None else out / CHECKPOINT / "progress.json"
    recorder = _EpochRecorder(config, data, model, loss, steps_per_epoch, progress)
    backup = []
    if out is not None:
        if resume:
            _restorable(out / CHECKPOINT / "keras")
        # After the recorder, so that the history saved is never behind the checkpoint.
        backup = [
            keras.callbacks.BackupAndRestore(
                os.fspath(out / CHECKPOINT / "keras"),
                double_checkpoint=True,
                delete_checkpoint=False,  # deleted once model.keras is written
            )
        ]
    set_random_seed(config.seed)  # Keras's imports TensorFlow whenever it is installed
    sam_model.fit(
        data.x_train,
        data.y_train,
        batch_size=config.batch_size,
        epochs=config.epochs,
        verbose=verbose,
        callbacks=[recorder.callback(), *backup, *callbacks],
    )
    history = recorder.history
    if out is not None:
        files.write_json(out / "history.json", history)
        files.save_model(model, out / "model.keras")
        shutil.rmtree(out / CHECKPOINT)
    return model, history


def _start(out, config, data, resume):
    """Prepares the run's folder `out`: a resumed run's configuration must be the one saved
    there (returns "complete" when that run has finished); a fresh run deletes a previous
    run's files. Then writes `config.json`."""
    import keras

    out.mkdir(parents=True, exist_ok=True)
    if resume:
        _check_same_config(out, config)
        if run_state(out) == "complete":
            return "complete"
    else:
        delete_run(out)
    record = dataclasses.asdict(config) | {"noise_fraction": data.noise_fraction}
    record["backend"] = keras.backend.backend()
    files.write_json(out / "config.json", record)
    return "started"


# The files of a run in its folder; `checkpoint/` exists while it trains.
CHECKPOINT = "checkpoint"
RUN_FILES = ("config.json", "history.json", "model.keras", CHECKPOINT)


def run_state(out_dir):
    """What `out_dir` holds: `"empty"` (no run's files; the folder may not exist),
    `"complete"` (`model.keras` and `history.json` written, no checkpoint left) or
    `"partial"` (a run started there and has not finished: `train(..., resume=True)`
    continues it)."""
    out = Path(out_dir)
    present = {name for name in RUN_FILES if (out / name).exists()}
    if not present:
        return "empty"
    if {"model.keras", "history.json"} <= present and CHECKPOINT not in present:
        return "complete"
    return "partial"


def load_run(out_dir):
    """A complete run's `(model, history)`, read from `out_dir`."""
    import keras

    out = Path(out_dir)
    history = json.loads((out / "history.json").read_text())
    return keras.saving.load_model(out / "model.keras"), history


def _restorable(folder):
    """Leaves `BackupAndRestore`'s folder in a state it restores from.

    A kill while it writes its checkpoint can leave the weights file truncated or the
    epoch file missing or cut. With `double_checkpoint=True` it falls back to the previous
    checkpoint when the weights cannot be read, but not when the epoch file cannot, nor
    when the checkpoint cut was the first (there is no previous one: the restart fails).
    Here: a latest checkpoint that cannot be read is replaced by the previous one, or,
    without a readable previous one, the folder is emptied, and the run starts over.
    """
    latest = (folder / "latest.weights.h5", folder / "training_metadata.json")
    if not any(path.exists() for path in latest) or _readable(*latest):
        return
    previous = tuple(path.with_name(path.name + ".bkp") for path in latest)
    if _readable(*previous):
        for source, target in zip(previous, latest):
            shutil.copyfile(source, target)
    else:
        shutil.rmtree(folder)


def _readable(weights, metadata):
    import h5py

    try:
        with h5py.File(weights, "r"):
            pass
        return isinstance(json.loads(metadata.read_text())["epoch"], int)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _check_same_config(out, config):
    path = out / "config.json"
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}), so the run cannot be resumed."
        ) from None
    wanted = dataclasses.asdict(config)
    differences = [
        f"{name}={saved.get(name)!r} there, {value!r} here"
        for name, value in wanted.items()
        if saved.get(name, value) != value
    ]
    if differences:
        raise ValueError(
            f"The run in {out} was started with another configuration "
            f"({'; '.join(differences)}): resume it with the same arguments."
        )


def delete_run(out_dir):
    """Deletes a run's files (only those: `RUN_FILES`) from `out_dir`."""
    for name in RUN_FILES:
        path = Path(out_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class _EpochRecorder:
    """Records a run's history, epoch by epoch, from Keras's callback calls.

    A plain class, so that importing this module does not import Keras: `callback()` hands
    Keras its methods as a `keras.callbacks.LambdaCallback`.

    With `progress` (a path), it saves after each epoch what a resumed run needs to go on
    recording as the uninterrupted run would: the history, and the gradient evaluations
    and seconds at the end of each epoch; a resumed run starts from the entries up to the
    epoch it resumes at.
    """

    def __init__(self, config, data, model, loss, steps_per_epoch, progress=None):
        self.config = config
        self.data = data
        self.model = model
        self.loss = loss
        self.steps_per_epoch = steps_per_epoch
        self.progress = progress
        self.history = {k: [] for k in _HISTORY_KEYS}
        rng = np.random.default_rng(config.seed + 1)
        count = max(config.sharpness_examples, config.hessian_examples)
        count = min(count, len(data.x_train))
        self.probe = rng.permutation(len(data.x_train))[:count]
        subset = config.eval_examples
        if subset and subset < len(data.x_test):
            rng = np.random.default_rng(config.seed + 2)
            self.test_subset = np.sort(rng.permutation(len(data.x_test))[:subset])
        else:
            self.test_subset = None
        self.evaluations = 0.0
        self.eval_seconds = 0.0
        self.eval_cpu_seconds = 0.0
        # Per epoch done, the totals at its end: what a resumed run starts from.
        self.totals = {k: [] for k in _TOTALS}
        self.saved = None
        if progress is not None and progress.exists():
            self.saved = json.loads(progress.read_text())
            self.history = self.saved["history"]
            self.totals = self.saved["totals"]
            for key in _HISTORY_KEYS:  # saved before the key existed
                self.history.setdefault(key, [None] * len(self.history["epoch"]))

    def callback(self):
        """This recorder as a Keras callback (Keras is imported here, not with the module)."""
        import keras

        return keras.callbacks.LambdaCallback(
            on_train_begin=self.on_train_begin,
            on_epoch_begin=self.on_epoch_begin,
            on_epoch_end=self.on_epoch_end,
        )

    def on_train_begin(self, logs=None):
        self.started = time.perf_counter()
        self.started_cpu = time.process_time()

    def on_epoch_begin(self, epoch, logs=None):
        if self.saved is None:
            return
        # The first epoch of a resumed run: keep what the epochs before it recorded.
        self.saved = None
        self.history = {
            k: [v for v, e in zip(values, self.history["epoch"]) if e <= epoch]
            for k, values in self.history.items()
        }
        self.totals = {k: v[:epoch] for k, v in self.totals.items()}
        if epoch:
            last = {k: v[-1] for k, v in self.totals.items()}
            self.evaluations = last["evaluations"]
            self.eval_seconds = last["eval_seconds"]
            self.eval_cpu_seconds = last["eval_cpu_seconds"]
            self.started -= last["seconds"]
            self.started_cpu -= last["cpu_seconds"]

    def on_epoch_end(self, epoch, logs=None):
        self.record(epoch, logs)
        totals = self.totals
        totals["evaluations"].append(self.evaluations)
        totals["eval_seconds"].append(self.eval_seconds)
        totals["eval_cpu_seconds"].append(self.eval_cpu_seconds)
        totals["seconds"].append(time.perf_counter() - self.started)
        totals["cpu_seconds"].append(time.process_time() - self.started_cpu)
        if self.progress is not None:
            self.progress.parent.mkdir(parents=True, exist_ok=True)
            files.write_json(self.progress, {"history": self.history, "totals": totals})

    def record(self, epoch, logs=None):
        now, now_cpu = time.perf_counter(), time.process_time()
        logs = {} if logs is None else logs
        # MomentumSAM: one pass a step; MESA alone (rho 0) too, and a forward pass.
        two_pass = self.config.is_sam and self.config.method != "momentum_sam"
        rate = logs.get("second_pass_rate", 1.0 if two_pass else 0.0)
        self.evaluations += self.steps_per_epoch * (1.0 + float(rate))
        last = epoch + 1 == self.config.epochs
        if (epoch + 1) % self.config.eval_every and not last:
            return
        h = self.history
        h["epoch"].append(epoch + 1)
        h["loss"].append(float(logs.get("loss", float("nan"))))
        h["accuracy"].append(float(logs.get("accuracy", float("nan"))))
        h["sharpness"].append(float(logs["sharpness"]) if "sharpness" in logs else None)
        h["second_pass_rate"].append(
            float(logs["second_pass_rate"]) if "second_pass_rate" in logs else None
        )
        h["gradient_evaluations"].append(round(self.evaluations))
        # Training time so far: time in fit, less the evaluations before this one.
        h["train_seconds"].append(now - self.started - self.eval_seconds)
        h["train_cpu_seconds"].append(now_cpu - self.started_cpu - self.eval_cpu_seconds)
        self._evaluate(h, last)
        # One clock reading ends the evaluation and the epoch's total, so that training
        # and evaluation add up to the total exactly (two readings differ under load).
        end = time.perf_counter()
        self.eval_seconds += end - now
        self.eval_cpu_seconds += time.process_time() - now_cpu
        h["eval_seconds"].append(self.eval_seconds)
        h["seconds"].append(end - self.started)
        logs["test_accuracy"] = h["test_accuracy"][-1]

    def _evaluate(self, h, last):
        from keras_sam.diagnostics import Objective, sharpness

        x_test, y_test = self.data.x_test, self.data.y_test
        if self.test_subset is not None and not last:
            x_test, y_test = x_test[self.test_subset], y_test[self.test_subset]
        logits = self.model.predict(x_test, batch_size=1000, verbose=0)
        h["test_examples"].append(len(y_test))
        h["test_loss"].append(float(self.loss(y_test, logits)))
        h["test_accuracy"].append(float(np.mean(logits.argmax(-1) == y_test)))
        probe = self.probe[: self.config.sharpness_examples]
        objective = Objective(
            self.model,
            self.data.x_train[probe],
            self.data.y_train[probe],
            loss=self.loss,
            batch_size=500,
        )
        measured = sharpness(objective, rho=self.config.sharpness_rho)
        h["measured_sharpness"].append(measured["sharpness"])
        h["hessian_top_eigenvalue"].append(
            self._top_eigenvalue() if last and self.config.hessian_examples else None
        )

    def _top_eigenvalue(self):
        import warnings

        from keras_sam.diagnostics import Objective, hessian_eigenvalues

        probe = self.probe[: self.config.hessian_examples]
        with warnings.catch_warnings():
            # Not converged within the iterations: the best estimate is reported.
            warnings.simplefilter("ignore", RuntimeWarning)
            objective = Objective(
                self.model,
                self.data.x_train[probe],
                self.data.y_train[probe],
                loss=self.loss,
                batch_size=500,
            )
            values = hessian_eigenvalues(
                objective,
                k=1,
                max_iterations=self.config.hessian_iterations,
                tol=1e-2,
                seed=self.config.seed,
                verbose=0,
            )
        return float(values[0])


# What `_EpochRecorder` saves at the end of each epoch, for a resumed run.
_TOTALS = ("evaluations", "eval_seconds", "eval_cpu_seconds", "seconds", "cpu_seconds")

_HISTORY_KEYS = (
    "epoch",
    "loss",
    "accuracy",
    "sharpness",
    "second_pass_rate",
    "test_examples",
    "test_loss",
    "test_accuracy",
    "measured_sharpness",
    "hessian_top_eigenvalue",
    "gradient_evaluations",
    "train_seconds",
    "train_cpu_seconds",
    "eval_seconds",
    "seconds",
)


def _images(x):
    x = np.asarray(x, "float32") / 255.0
    return x[..., None] if x.ndim == 3 else x
