"""The `keras-sam` command line."""

import argparse
import os
import shutil
import sys
from pathlib import Path

from keras_sam import __version__
from keras_sam.cli import options
from keras_sam.cli.options import INSPECT_OPTIONS, PLAYGROUND_OPTIONS, RUN_OPTIONS
from keras_sam.cli.training import RunConfig

# Each command: its help in the list of commands, its description, and its options.
COMMANDS = {
    "playground": (
        "toy problems: a sharp and a flat minimum in 2-D, and a small network that "
        "tells uniform from normal samples",
        "Runs SGD and SAM side by side on two toy problems and prints a report.",
        PLAYGROUND_OPTIONS,
    ),
    "train": (
        "train one model on Fashion-MNIST (optionally with label noise)",
        "Trains one model on Fashion-MNIST and writes config.json, history.json "
        "(loss, accuracy, sharpness and clean test accuracy per evaluated epoch, training and "
        "evaluation time) and model.keras (the plain Keras model, saved uncompiled). "
        "--method picks SAM or a variant, or plain for the inner optimizer alone; "
        "--optimizer picks the inner optimizer, which takes the steps in every case.",
        RUN_OPTIONS,
    ),
    "compare": (
        "plain optimizer vs SAM at equal epochs and at equal compute",
        "Trains the same model on the same data and seed three times: the plain "
        "optimizer for E epochs, SAM for E epochs, and the plain optimizer for 2E epochs "
        "(equal compute: SAM takes two passes a step). Writes results.md, test_accuracy.png, "
        "sharpness.png and each run's files. The table keeps training time apart from "
        "evaluation time, and counts the gradient evaluations each run took.",
        RUN_OPTIONS,
    ),
    "inspect": (
        "measure a saved model: sharpness, Hessian eigenvalues and trace, loss landscape",
        "Loads MODEL (a .keras file, e.g. a run's model.keras) and measures it on "
        "Fashion-MNIST: loss and accuracy, sharpness (first-order, m-sharpness, multi-step), "
        "the top Hessian eigenvalues (Lanczos), the Hessian trace (Hutchinson) and the loss "
        "landscape along filter-normalized random directions. Writes report.json, "
        "landscape_1d.png, landscape_2d.png and spectrum.png. When a keras-sam run's "
        "config.json lies next to MODEL, --split train rebuilds that run's training set "
        "with the labels it was trained on (noisy ones included).",
        INSPECT_OPTIONS,
    ),
}


def parser():
    """The `keras-sam` argument parser, made from the option tables (`cli.options`)."""
    top = argparse.ArgumentParser(
        prog="keras-sam",
        description="Sharpness-Aware Minimization for Keras 3: demos and tools.",
        formatter_class=options.HelpFormatter,
    )
    top.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the version"
    )
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (summary, description, table) in COMMANDS.items():
        command = commands.add_parser(
            name, help=summary, description=description, formatter_class=options.HelpFormatter
        )
        options.add_arguments(command, table, name)
    return top


def main(argv=None):
    parser_ = parser()
    args = parser_.parse_args(argv)
    if args.command is None:
        parser_.print_help()
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


def _config(args, method, epochs=None):
    """The `RunConfig` of `method` that the parsed `args` describe (`epochs`: instead of
    `--epochs`)."""
    values = options.config_values(RUN_OPTIONS, args, args.command)
    return RunConfig(**values | {"method": method, "epochs": epochs or args.epochs})


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


def _inspect_settings(args):
    from keras_sam.cli.inspection import InspectSettings

    values = options.config_values(INSPECT_OPTIONS, args, "inspect")
    values["max_iterations"] = max(args.max_iterations, args.k)
    values["probes"] = max(args.probes, 2)
    return InspectSettings(**values)


def _inspect(args):
    from pathlib import Path

    from keras_sam.cli import inspection

    model_path = Path(args.model)
    model = inspection.load_model(model_path)
    _output_folder(args.out, [])
    x, y, description = inspection.measured_data(
        model_path, args.split, args.examples, args.seed, args.data_dir
    )
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


def _compare_inspection(args, models, data, out, title):
    from keras_sam.cli import inspection
    from keras_sam.diagnostics import Objective, loss_landscape

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
    objective = Objective(
        model_a,
        data.x_train,
        data.y_train,
        loss=inspection.default_loss(model_a),
        batch_size=settings.batch_size,
    )
    line = loss_landscape(objective, to_model=model_b, verbose=_verbose(args))
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

    return playground.print_report(rho=args.rho, steps=args.steps, seed=args.seed)
