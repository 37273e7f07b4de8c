"""The `keras-sam` command line."""

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

from keras_sam import __version__
from keras_sam.cli.training import (
    ASAM_RHO_SCALE,
    DEFAULT_RHO,
    MAX_CONSECUTIVE_SKIPS,
    METHOD_ALIASES,
    METHODS,
    MOMENTUM_SAM_RHO,
    OPTIMIZERS,
    SCHEDULES,
    RunConfig,
)
from keras_sam.models import MODELS


class _HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default, unless its help already states it in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text
            or action.nargs == 0
            or action.default in (None, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="keras-sam",
        description="Sharpness-Aware Minimization for Keras 3: demos and tools.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the version"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    playground = commands.add_parser(
        "playground",
        help="toy problems: a sharp and a flat minimum in 2-D, and a small network that "
        "tells uniform from normal samples",
        description="Runs SGD and SAM side by side on two toy problems and prints a report.",
        formatter_class=_HelpFormatter,
    )
    playground.add_argument(
        "--rho", type=_non_negative, default=0.3, help="SAM radius on the 2-D problem"
    )
    playground.add_argument(
        "--steps", type=_positive_int, default=600, help="steps on the 2-D problem"
    )
    playground.add_argument("--seed", type=_integer, default=0, help="seed of the toy network")

    train = commands.add_parser(
        "train",
        help="train one model on Fashion-MNIST (optionally with label noise)",
        description="Trains one model on Fashion-MNIST and writes config.json, history.json "
        "(loss, accuracy, sharpness and clean test accuracy per evaluated epoch, training and "
        "evaluation time) and model.keras (the plain Keras model, saved uncompiled). "
        "--method picks SAM or a variant, or plain for the inner optimizer alone; "
        "--optimizer picks the inner optimizer, which takes the steps in every case.",
        formatter_class=_HelpFormatter,
    )
    _add_run_arguments(train)
    train.add_argument(
        "--method",
        type=_method_name,
        choices=METHODS,
        default="sam",
        help="plain: the inner optimizer alone; the others wrap it in SAM or a variant "
        "(sgd, the old name of plain, is still accepted)",
    )
    train.add_argument("--out", default="runs/train", help="output folder")
    _add_existing_run_arguments(train)

    compare = commands.add_parser(
        "compare",
        help="plain optimizer vs SAM at equal epochs and at equal compute",
        description="Trains the same model on the same data and seed three times: the plain "
        "optimizer for E epochs, SAM for E epochs, and the plain optimizer for 2E epochs "
        "(equal compute: SAM takes two passes a step). Writes results.md, test_accuracy.png, "
        "sharpness.png and each run's files. The table keeps training time apart from "
        "evaluation time, and counts the gradient evaluations each run took.",
        formatter_class=_HelpFormatter,
    )
    _add_run_arguments(compare, label_noise=0.4)
    compare.add_argument(
        "--method",
        type=_sam_method_name,
        choices=METHODS[1:],
        default="sam",
        help="the SAM method of the second run",
    )
    compare.add_argument("--out", default="runs/compare", help="output folder")
    _add_existing_run_arguments(compare)
    _add_compare_inspect_argument(compare)
    _add_inspect_parser(commands)

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    if args.command == "playground":
        return _playground(args)
    if args.command in ("compare", "inspect") and not _plots_available():
        # Said before any training: the pictures are drawn at the end of the run.
        print(
            f"keras-sam {args.command}: error: its pictures need matplotlib, which is not "
            "installed. Install it with: pip install matplotlib (the `plots` extra: "
            "pip install '.[plots]' in a clone of keras-sam)",
            file=sys.stderr,
        )
        return 1
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "inspect":
            return _inspect(args)
        return _compare(args)
    except (ValueError, OSError) as error:
        print(f"keras-sam {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        from keras_sam.trainers.skipped_steps import SkippedStepsError

        if not isinstance(error, SkippedStepsError):
            raise
        text = _one_line(error).replace(
            "(`SAMModel(model, max_consecutive_skips=None)` disables it)",
            "(--max-consecutive-skips; 0 disables it)",
        )
        print(f"keras-sam {args.command}: error: {text}", file=sys.stderr)
        return 1


def _one_line(error):
    """The error as one line; an `OSError` as `PATH: what went wrong`."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        paths = " -> ".join(os.fspath(f) for f in (error.filename, error.filename2) if f)
        text = f"{paths}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def _add_existing_run_arguments(parser):
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (its files are deleted first)",
    )
    existing.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last epoch checkpoint, bitwise as if "
        "uninterrupted (same arguments as the run; a finished run is not trained again)",
    )


def _output_folder(out, runs, own_files=(), overwrite=False, resume=False):
    """Checks `out` before anything trains: creates it, proves it writable, and refuses
    to overwrite the runs (sub-folders `runs` of `out`) and files already there unless
    `overwrite` (then deletes them) or `resume`."""
    from keras_sam.cli import training

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".keras-sam-write-test-{os.getpid()}"
    probe.touch()
    probe.unlink()
    existing = [out / name for name in own_files if (out / name).exists()]
    for run in runs:
        existing += [run / name for name in training.RUN_FILES if (run / name).exists()]
    if not existing or resume:
        return
    if not overwrite:
        raise ValueError(
            f"{out} already holds a run ({', '.join(str(p) for p in existing[:3])}"
            f"{', ...' if len(existing) > 3 else ''}): pass --resume to continue it from its "
            "last epoch checkpoint, --overwrite to replace it, or another --out."
        )
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _plots_available():
    """Whether matplotlib (the `plots` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# What the command line evaluates by default: every few epochs on a fixed subset of the test
# set, and the whole test set after the last epoch (the evaluations would otherwise cost
# more than the training on the 2,000-image runs).
EVAL_EVERY = 5
EVAL_EXAMPLES = 2000
HESSIAN_EXAMPLES = 256  # a fixed batch: seconds a model (the cnn, 2 CPU cores)


def _add_run_arguments(parser, label_noise=0.0):
    defaults = RunConfig()
    parser.add_argument(
        "--dataset", choices=["fashion_mnist"], default="fashion_mnist", help="the data set"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with the four IDX files (default: search $KERAS_SAM_FASHION_MNIST, "
        "/usr/share/datasets/fashion-mnist and the Keras cache, then download)",
    )
    parser.add_argument("--model", choices=MODELS, default=defaults.model, help="the model")
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=defaults.optimizer,
        help="the inner optimizer, which takes every step (with SAM or without)",
    )
    parser.add_argument(
        "--lr",
        type=_non_negative,
        default=defaults.learning_rate,
        help="learning rate of the inner optimizer (the start of the cosine schedule)",
    )
    parser.add_argument(
        "--momentum", type=_non_negative, default=defaults.momentum, help="momentum (sgd only)"
    )
    parser.add_argument(
        "--weight-decay",
        type=_non_negative,
        default=defaults.weight_decay,
        help="weight decay of the inner optimizer, 0 for none",
    )
    parser.add_argument(
        "--schedule", choices=SCHEDULES, default=defaults.schedule, help="learning-rate schedule"
    )
    parser.add_argument(
        "--rho",
        type=_non_negative,
        default=None,
        help=f"SAM radius (default: {DEFAULT_RHO:g}, and {ASAM_RHO_SCALE * DEFAULT_RHO:g} for "
        f"asam: ASAM's scale-invariant radius wants about {ASAM_RHO_SCALE:g} times SAM's. "
        f"keras_sam.SAM defaults to the paper's 0.05 for clean data; {DEFAULT_RHO:g} is the "
        "value of the label-noise runs in docs/RESULTS.md. momentum_sam: the distance of its "
        f"one pass along the momentum, default {MOMENTUM_SAM_RHO:g}: its paper's 3 stalled on "
        "the cnn model. mesa: 0 by default (one pass and a teacher forward pass a step); a "
        "positive rho adds SAM's perturbed pass)",
    )
    parser.add_argument(
        "--alpha",
        type=_non_negative,
        default=None,
        help="gsam: weight of the orthogonal correction; looksam: weight of the reused "
        "component (default: the method's own, as in the API: the papers' 0.4 for gsam and "
        "0.7 for looksam, which stalled at chance level on the cnn model at 40 %% label "
        "noise with --num-batch-splits 4, where 0.1 for gsam and 0.2 for looksam trained: "
        "docs/methods.md)",
    )
    parser.add_argument(
        "--k",
        type=_positive_int,
        default=defaults.k,
        help="looksam, periodic_sam: a two-pass step every k steps",
    )
    parser.add_argument(
        "--sam-start",
        type=_fraction,
        default=defaults.sam_start,
        help="late-phase SAM: the fraction of the training steps taken with rho 0, one "
        "pass each, before the method's rho starts (0.9: SAM in the last 10 %% of the steps)",
    )
    parser.add_argument(
        "--num-batch-splits",
        type=_positive_int,
        default=defaults.num_batch_splits,
        help="m-sharpness: SAM perturbs each of this many parts of a batch separately "
        f"(default: {defaults.num_batch_splits}, parts of 32 examples at batch 128, as in the "
        "label-noise runs of docs/RESULTS.md; keras_sam.SAMModel's own default is none, "
        "one perturbation per batch, which 1 gives here)",
    )
    parser.add_argument(
        "--epochs", type=_positive_int, default=defaults.epochs, help="epochs of training"
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=defaults.batch_size, help="batch size"
    )
    parser.add_argument(
        "--label-noise",
        type=_fraction,
        default=label_noise,
        help="fraction of training labels corrupted, in [0, 1]",
    )
    parser.add_argument(
        "--noise-mode",
        choices=["flip", "uniform"],
        default=defaults.noise_mode,
        help="flip: each corrupted label becomes another class; uniform: any class",
    )
    parser.add_argument(
        "--train-size",
        type=_integer,
        default=defaults.train_size,
        help="training examples, 0 for all 60,000",
    )
    parser.add_argument(
        "--eval-every",
        type=_positive_int,
        default=EVAL_EVERY,
        help="measure clean test accuracy and sharpness every this many epochs, and after the last",
    )
    parser.add_argument(
        "--eval-examples",
        type=_integer,
        default=EVAL_EXAMPLES,
        help="test images of the evaluations before the last (a fixed random subset); the "
        "last one takes all 10,000; 0 for all every time",
    )
    parser.add_argument(
        "--hessian-examples",
        type=_integer,
        default=HESSIAN_EXAMPLES,
        help="training examples (labels as trained) on which the top Hessian eigenvalue of "
        "the final weights is measured, by Lanczos; 0: not measured",
    )
    parser.add_argument(
        "--hessian-iterations",
        type=_positive_int,
        default=defaults.hessian_iterations,
        help="Lanczos iterations at most (Hessian-vector products) for that eigenvalue",
    )
    parser.add_argument("--seed", type=_integer, default=defaults.seed, help="seed")
    parser.add_argument(
        "--max-consecutive-skips",
        type=_skip_limit,
        default=MAX_CONSECUTIVE_SKIPS,
        help="stop with an error (exit status 1) after this many training steps in a row were "
        "skipped for a NaN or infinite loss or gradient; 0 for no limit",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="one line per epoch even on a terminal (the default when the output is not a "
        "terminal: a log file or a pipe)",
    )


def _config(args, method, epochs=None):
    return RunConfig(
        method=method,
        rho=args.rho,  # None: the method's default (ASAM's scaled)
        alpha=args.alpha,
        k=args.k,
        sam_start=args.sam_start,
        num_batch_splits=args.num_batch_splits,
        model=args.model,
        optimizer=args.optimizer,
        learning_rate=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        epochs=epochs or args.epochs,
        batch_size=args.batch_size,
        label_noise=args.label_noise,
        noise_mode=args.noise_mode,
        train_size=args.train_size,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_examples=args.eval_examples,
        hessian_examples=args.hessian_examples,
        hessian_iterations=args.hessian_iterations,
    )


def _verbose(args):
    """Keras's live progress bars on a terminal, one line per epoch anywhere else."""
    return 2 if args.quiet or not sys.stdout.isatty() else 1


def _describe_data(config, data):
    corrupted = int(round(data.noise_fraction * len(data.y_train)))
    print(
        f"Fashion-MNIST: {len(data.x_train):,} training examples "
        f"({corrupted:,} labels corrupted, {100 * data.noise_fraction:.1f} %, "
        f"mode {config.noise_mode!r}, seed {config.seed}); "
        f"{len(data.x_test):,} clean test examples."
    )


def _train(args):
    from keras_sam.cli.training import prepare_data, train

    config = _config(args, args.method)
    _output_folder(args.out, [Path(args.out)], overwrite=args.overwrite, resume=args.resume)
    data = prepare_data(config, args.data_dir)
    _describe_data(config, data)
    _, history = train(
        config,
        data,
        out_dir=args.out,
        verbose=_verbose(args),
        resume=args.resume,
        max_consecutive_skips=args.max_consecutive_skips,
    )
    print(
        f"final clean test accuracy: {100 * history['test_accuracy'][-1]:.2f} % "
        f"(best {100 * max(history['test_accuracy']):.2f} %); training "
        f"{history['train_seconds'][-1]:.1f} s, evaluation {history['eval_seconds'][-1]:.1f} s; "
        f"files in {args.out}/"
    )
    return 0


def _compare(args):
    from pathlib import Path

    from keras_sam import files
    from keras_sam.cli import report
    from keras_sam.cli.training import prepare_data, train

    out = Path(args.out)
    plans = [
        ("plain", _config(args, "plain")),
        (args.method, _config(args, args.method)),
        ("plain_equal_compute", _config(args, "plain", epochs=2 * args.epochs)),
    ]
    own_files = ("results.md", "test_accuracy.png", "sharpness.png", *_COMPARE_INSPECT_FILES)
    run_folders = [out / label for label, _ in plans]
    _output_folder(out, run_folders, own_files, overwrite=args.overwrite, resume=args.resume)
    data = prepare_data(plans[0][1], args.data_dir)
    _describe_data(plans[0][1], data)
    runs, models = {}, {}
    for label, config in plans:
        what = (
            f"{config.method} (rho {config.rho:g}) wrapping {config.optimizer}"
            if config.is_sam or config.method != "plain"
            else f"{config.optimizer} alone"
        )
        print(f"\n== {label}: {what}, {config.epochs} epochs ==", flush=True)
        model, history = train(
            config,
            data,
            out_dir=out / label,
            verbose=_verbose(args),
            resume=args.resume,
            max_consecutive_skips=args.max_consecutive_skips,
        )
        runs[label] = (config, history)
        models[label] = model
    table = report.comparison_table(runs)
    title = (
        f"{args.model} on {len(data.x_train):,} Fashion-MNIST examples, "
        f"{100 * args.label_noise:g} % label noise, seed {args.seed}"
    )
    report.comparison_plots(runs, out, title=title)
    note = _table_note(args)
    text = f"# {title}\n\n{table}\n{note}\n\nPlots: test_accuracy.png, sharpness.png\n"
    files.write_text(out / "results.md", text)
    print("\n" + table + "\n" + note)
    print(f"Written: {out}/results.md, {out}/test_accuracy.png, {out}/sharpness.png")
    if args.inspect:
        _compare_inspection(args, {k: models[k] for k, _ in plans[:2]}, data, out, title)
    return 0


_COMPARE_INSPECT_FILES = (
    "inspect.json",
    "inspect_landscape_1d.png",
    "inspect_landscape_2d.png",
    "inspect_spectrum.png",
)


def _table_note(args):
    subset = (
        f", and on a fixed subset of {args.eval_examples:,} test images at the epochs before"
        if 0 < args.eval_examples < 10000
        else ""
    )
    hessian = (
        "the largest curvature of the training loss at the final weights (Lanczos, "
        f"{args.hessian_examples:,} training examples, at most {args.hessian_iterations} "
        "iterations), the paper's measure; the cross-entropy's curvature also shrinks as "
        "predictions saturate, so it too is low for a model that has memorized its labels."
        if args.hessian_examples
        else "not measured (--hessian-examples 0)."
    )
    return (
        "gradient evaluations: forward-backward passes over a batch (a SAM step takes two). "
        "train s, train CPU s: wall-clock and process CPU seconds of training, evaluations "
        "excluded; eval s: seconds spent measuring test accuracy, sharpness and the Hessian (every "
        f"{args.eval_every} epochs and after the last). Clean test accuracy: on all 10,000 "
        f"test images after the last epoch{subset}; the best column is over every "
        "evaluated epoch. First-order sharpness: L(w + rho g/||g||) - L(w), rho 0.05, on "
        f"{RunConfig().sharpness_examples:,} training examples; it vanishes wherever the "
        "gradient does, so a model that fits every training label reads flat. Top Hessian "
        f"eigenvalue: {hessian}"
    )


def _add_compare_inspect_argument(compare):
    compare.add_argument(
        "--inspect",
        action="store_true",
        help="also inspect the plain and the SAM model on their training data (Hessian "
        "eigenvalues and trace, sharpness, landscapes; a few minutes more) and draw them side "
        "by side: inspect.json, inspect_landscape_1d.png, inspect_landscape_2d.png, "
        "inspect_spectrum.png",
    )


def _add_inspect_parser(commands):
    from keras_sam.cli.inspection import InspectSettings

    defaults = InspectSettings()
    inspect = commands.add_parser(
        "inspect",
        formatter_class=_HelpFormatter,
        help="measure a saved model: sharpness, Hessian eigenvalues and trace, loss landscape",
        description="Loads MODEL (a .keras file, e.g. a run's model.keras) and measures it on "
        "Fashion-MNIST: loss and accuracy, sharpness (first-order, m-sharpness, multi-step), "
        "the top Hessian eigenvalues (Lanczos), the Hessian trace (Hutchinson) and the loss "
        "landscape along filter-normalized random directions. Writes report.json, "
        "landscape_1d.png, landscape_2d.png and spectrum.png. When a keras-sam run's "
        "config.json lies next to MODEL, --split train rebuilds that run's training set "
        "with the labels it was trained on (noisy ones included).",
    )
    inspect.add_argument("model", help="the .keras model file (a Keras model archive)")
    inspect.add_argument(
        "--dataset",
        type=lambda text: text.replace("-", "_"),
        choices=["fashion_mnist"],
        default="fashion_mnist",
        help="the data set (fashion_mnist or fashion-mnist)",
    )
    inspect.add_argument(
        "--data-dir", default=None, help="folder with the four IDX files (default: search)"
    )
    inspect.add_argument(
        "--split", choices=["train", "test"], default="train", help="data to measure on"
    )
    inspect.add_argument(
        "--examples",
        type=_integer,
        default=2000,
        help="examples measured on, a seeded random subset; 0 for all",
    )
    inspect.add_argument(
        "--batch-size", type=_positive_int, default=defaults.batch_size, help="batch size"
    )
    inspect.add_argument("--rho", type=_non_negative, default=defaults.rho, help="sharpness radius")
    inspect.add_argument(
        "--m", type=_positive_int, default=defaults.m, help="m-sharpness sub-batch size"
    )
    inspect.add_argument(
        "--ascent-steps",
        type=_positive_int,
        default=defaults.ascent_steps,
        help="steps of the multi-step sharpness",
    )
    inspect.add_argument(
        "--k", type=_positive_int, default=defaults.k, help="top Hessian eigenvalues"
    )
    inspect.add_argument(
        "--max-iterations",
        type=_positive_int,
        default=defaults.max_iterations,
        help="Lanczos iterations at most",
    )
    inspect.add_argument(
        "--probes",
        type=_positive_int,
        default=defaults.probes,
        help="Hutchinson probes for the trace",
    )
    inspect.add_argument(
        "--grid",
        type=_positive_int,
        default=defaults.grid,
        help="points per axis of the 2-D landscape",
    )
    inspect.add_argument(
        "--line-points",
        type=_positive_int,
        default=defaults.line_points,
        help="points of the 1-D landscape",
    )
    inspect.add_argument(
        "--span",
        type=_non_negative,
        default=defaults.span,
        help="landscape coordinates in [-span, span]",
    )
    inspect.add_argument(
        "--seed", type=_integer, default=defaults.seed, help="seed of the subset and directions"
    )
    inspect.add_argument("--out", default="runs/inspect", help="output folder")
    inspect.add_argument("--quiet", action="store_true", help="no progress output")


def _inspect_settings(args):
    from keras_sam.cli.inspection import InspectSettings

    return InspectSettings(
        batch_size=args.batch_size,
        rho=args.rho,
        m=args.m,
        ascent_steps=args.ascent_steps,
        k=args.k,
        max_iterations=max(args.max_iterations, args.k),
        probes=max(args.probes, 2),
        line_points=args.line_points,
        grid=args.grid,
        span=args.span,
        seed=args.seed,
    )


def _inspect(args):
    from pathlib import Path

    from keras_sam.cli import inspection

    if args.examples < 0:
        raise ValueError(f"--examples must be >= 0 (0: all). Received: {args.examples}")
    model_path = Path(args.model)
    model = inspection.load_model(model_path)
    _output_folder(args.out, [])
    x, y, description = _inspect_data(args, model_path)
    loss = inspection.default_loss(model)
    print(f"{model_path}: {model.name}; {description}")
    verbose = 0 if args.quiet else 1 if sys.stdout.isatty() else 2
    report = inspection.inspect_model(model, x, y, loss, _inspect_settings(args), verbose=verbose)
    report = {
        "model": str(model_path),
        "data": {"dataset": args.dataset, "split": args.split, "examples": len(y)}
        | {"description": description},
        "loss_function": type(loss).__name__,
        **report,
    }
    out = Path(args.out)
    inspection.write_json(report, out / "report.json")
    inspection.plot_reports({model_path.parent.name or model.name: report}, out, title=description)
    print("\n".join(inspection.summary_lines(model.name, report)))
    print(f"Written: {out}/report.json, landscape_1d.png, landscape_2d.png, spectrum.png")
    return 0


def _inspect_data(args, model_path):
    """The examples to measure on, and a sentence saying what they are."""
    import dataclasses
    import json

    import numpy as np

    from keras_sam.cli.training import RunConfig, prepare_data

    config_path = model_path.parent / "config.json"
    run = None
    if args.split == "train" and config_path.is_file():
        try:
            saved = json.loads(config_path.read_text())
            fields = {f.name for f in dataclasses.fields(RunConfig)}
            run = RunConfig(**{k: v for k, v in saved.items() if k in fields})
        except (json.JSONDecodeError, TypeError, ValueError):
            run = None
    if run is not None:
        data = prepare_data(run, args.data_dir)
        x, y = data.x_train, data.y_train
        where = (
            f"the run's training set ({len(y):,} examples, seed {run.seed}, "
            f"{100 * data.noise_fraction:.0f} % labels flipped as trained)"
        )
    else:
        data = prepare_data(RunConfig(train_size=0, seed=args.seed), args.data_dir)
        x, y = (data.x_train, data.y_train) if args.split == "train" else (data.x_test, data.y_test)
        where = f"Fashion-MNIST {args.split} set (clean labels)"
    count = len(y) if args.examples == 0 else min(args.examples, len(y))
    if count < len(y):
        keep = np.random.default_rng(args.seed).permutation(len(y))[:count]
        x, y = x[keep], y[keep]
        where += f", a random subset of {count:,} (seed {args.seed})"
    return x, y, f"measured on {where}"


def _compare_inspection(args, models, data, out, title):
    from keras_sam.cli import inspection
    from keras_sam.diagnostics import loss_landscape

    settings = inspection.InspectSettings()
    reports = {}
    for label, model in models.items():
        print(f"\n== inspecting {label} on its {len(data.y_train):,} training examples ==")
        loss = inspection.default_loss(model)
        reports[label] = inspection.inspect_model(
            model, data.x_train, data.y_train, loss, settings, verbose=_verbose(args)
        )
        print("\n".join(inspection.summary_lines(label, reports[label])))
    (first, model_a), (second, model_b) = models.items()
    print(f"\n== the line from {first} to {second} ==")
    line = loss_landscape(
        model_a,
        data.x_train,
        data.y_train,
        loss=inspection.default_loss(model_a),
        batch_size=settings.batch_size,
        to_model=model_b,
        verbose=_verbose(args),
    )
    inspection.write_json(
        {
            "data": f"the {len(data.y_train):,} training examples, with the labels trained on",
            "models": reports,
            "interpolation": {
                "from": first,
                "to": second,
                "coordinates": line["coordinates"].tolist(),
                "loss": line["loss"].tolist(),
                "accuracy": None if line["accuracy"] is None else line["accuracy"].tolist(),
            },
        },
        out / "inspect.json",
    )
    inspection.plot_reports(
        reports, out, title=title, prefix="inspect_", interpolation=((first, second), line)
    )
    print(
        f"Written: {out}/inspect.json, inspect_landscape_1d.png, inspect_landscape_2d.png, "
        "inspect_spectrum.png"
    )


def _playground(args):
    from keras_sam.cli import playground

    print("keras-sam playground\n")
    print("1. Two minima: L(w) = softmin(sharp paraboloid at (0, 0), flat one at (2, 0))")
    print(
        f"   Hessian at the sharp minimum: {playground.SHARP_CURVATURE:g} I;"
        f" at the flat one: diag{playground.FLAT_CURVATURE}."
        f" The flat one is {playground.FLAT_HEIGHT:g} higher."
    )
    result = playground.two_minima(rho=args.rho, steps=args.steps)
    print(
        f"   From (0.05, 0.1), {args.steps} steps of SGD(lr=0.016),"
        f" plain and with SAM(rho={args.rho:g}):\n"
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
    toy = playground.uniform_vs_normal(seed=args.seed)
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


# Argument types: each failure says in plain words what was expected and what was given
# (argparse prefixes the option's name: "argument --rho: expected a number >= 0, got 'abc'").


def _number(text, rule):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}")
    return value


def _non_negative(text):
    value = _number(text, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _fraction(text):
    value = _number(text, "a fraction in [0, 1]")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def _integer(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _skip_limit(text):
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value or None


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _method_name(text):
    """The method's name, its old spelling mapped to the new one (`sgd` -> `plain`)."""
    return METHOD_ALIASES.get(text, text)


def _sam_method_name(text):
    name = _method_name(text)
    if name == "plain":
        raise argparse.ArgumentTypeError(
            f"compare trains the plain runs itself; expected a SAM method ("
            f"{', '.join(METHODS[1:])}), got {text!r}"
        )
    return name
