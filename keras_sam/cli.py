"""The `keras-sam` command line."""

import argparse
import os
import sys

from keras_sam.models import MODELS
from keras_sam.training import METHODS, OPTIMIZERS, SCHEDULES, RunConfig


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="keras-sam",
        description="Sharpness-Aware Minimization for Keras 3: demos and tools.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    playground = commands.add_parser(
        "playground",
        help="toy problems: a sharp and a flat minimum in 2-D, and the seed's toy network",
        description="Runs SGD and SAM side by side on two toy problems and prints a report.",
    )
    playground.add_argument(
        "--rho", type=_non_negative, default=0.3, help="SAM radius on the 2-D problem (0.3)"
    )
    playground.add_argument(
        "--steps", type=_positive_int, default=600, help="steps on the 2-D problem (600)"
    )
    playground.add_argument("--seed", type=int, default=0, help="seed of the toy network (0)")

    train = commands.add_parser(
        "train",
        help="train one model on Fashion-MNIST (optionally with label noise)",
        description="Trains one model on Fashion-MNIST and writes config.json, history.json "
        "(loss, accuracy, sharpness and clean test accuracy per epoch) and model.keras.",
    )
    _add_run_arguments(train)
    train.add_argument(
        "--method", choices=METHODS, default="sam", help=f"{', '.join(METHODS)} (sam)"
    )
    train.add_argument("--out", default="runs/train", help="output folder (runs/train)")

    compare = commands.add_parser(
        "compare",
        help="plain optimizer vs SAM at equal epochs and at equal compute",
        description="Trains the same model on the same data and seed three times: the plain "
        "optimizer for E epochs, SAM for E epochs, and the plain optimizer for 2E epochs "
        "(equal compute: SAM takes two passes a step). Writes results.md, test_accuracy.png, "
        "sharpness.png and each run's files.",
    )
    _add_run_arguments(compare, label_noise=0.4)
    compare.add_argument(
        "--method",
        choices=METHODS[1:],
        default="sam",
        help=f"the SAM method: {', '.join(METHODS[1:])} (sam)",
    )
    compare.add_argument("--out", default="runs/compare", help="output folder (runs/compare)")
    _add_compare_inspect_argument(compare)
    _add_inspect_parser(commands)

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    if args.command == "playground":
        return _playground(args)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "inspect":
            return _inspect(args)
        return _compare(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"keras-sam {args.command}: error: {error}", file=sys.stderr)
        return 1


def _add_run_arguments(parser, label_noise=0.0):
    defaults = RunConfig()
    parser.add_argument(
        "--dataset", choices=["fashion_mnist"], default="fashion_mnist", help="fashion_mnist"
    )
    parser.add_argument(
        "--data-dir", default=None, help="folder with the four IDX files (default: search)"
    )
    parser.add_argument("--model", choices=MODELS, default=defaults.model, help="cnn or resnet")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    parser.add_argument("--lr", type=_non_negative, default=defaults.learning_rate)
    parser.add_argument("--momentum", type=_non_negative, default=defaults.momentum)
    parser.add_argument("--weight-decay", type=_non_negative, default=defaults.weight_decay)
    parser.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule)
    parser.add_argument("--rho", type=_non_negative, default=defaults.rho)
    parser.add_argument(
        "--alpha",
        type=_non_negative,
        default=None,
        help="gsam: weight of the orthogonal correction (0.4); looksam: weight of the "
        "reused component (0.7)",
    )
    parser.add_argument(
        "--k",
        type=_positive_int,
        default=defaults.k,
        help=f"looksam, periodic_sam: a two-pass step every k steps ({defaults.k})",
    )
    parser.add_argument(
        "--num-batch-splits",
        type=_positive_int,
        default=defaults.num_batch_splits,
        help="m-sharpness: SAM perturbs each of this many parts of a batch separately "
        f"({defaults.num_batch_splits})",
    )
    parser.add_argument("--epochs", type=_positive_int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size)
    parser.add_argument(
        "--label-noise",
        type=_fraction,
        default=label_noise,
        help=f"fraction of training labels corrupted, in [0, 1] ({label_noise:g})",
    )
    parser.add_argument("--noise-mode", choices=["flip", "uniform"], default=defaults.noise_mode)
    parser.add_argument(
        "--train-size",
        type=int,
        default=defaults.train_size,
        help=f"training examples, 0 for all 60,000 ({defaults.train_size})",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--quiet", action="store_true", help="one line per epoch instead of progress bars"
    )


def _config(args, method, epochs=None):
    return RunConfig(
        method=method,
        rho=args.rho,
        alpha=args.alpha,
        k=args.k,
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
    )


def _describe_data(config, data):
    corrupted = int(round(data.noise_fraction * len(data.y_train)))
    print(
        f"Fashion-MNIST: {len(data.x_train):,} training examples "
        f"({corrupted:,} labels corrupted, {100 * data.noise_fraction:.1f} %, "
        f"mode {config.noise_mode!r}, seed {config.seed}); "
        f"{len(data.x_test):,} clean test examples."
    )


def _train(args):
    from keras_sam.training import prepare_data, train

    config = _config(args, args.method)
    data = prepare_data(config, args.data_dir)
    _describe_data(config, data)
    _, history = train(config, data, out_dir=args.out, verbose=2 if args.quiet else 1)
    print(
        f"final clean test accuracy: {100 * history['test_accuracy'][-1]:.2f} % "
        f"(best {100 * max(history['test_accuracy']):.2f} %); files in {args.out}/"
    )
    return 0


def _compare(args):
    from pathlib import Path

    from keras_sam import report
    from keras_sam.training import prepare_data, train

    out = Path(args.out)
    plans = [
        ("plain", _config(args, "sgd")),
        (args.method, _config(args, args.method)),
        ("plain_equal_compute", _config(args, "sgd", epochs=2 * args.epochs)),
    ]
    data = prepare_data(plans[0][1], args.data_dir)
    _describe_data(plans[0][1], data)
    runs, models = {}, {}
    for label, config in plans:
        print(f"\n== {label}: {config.method}, {config.epochs} epochs ==")
        model, history = train(config, data, out_dir=out / label, verbose=2 if args.quiet else 1)
        runs[label] = (config, history)
        models[label] = model
    table = report.comparison_table(runs)
    title = (
        f"{args.model} on {len(data.x_train):,} Fashion-MNIST examples, "
        f"{100 * args.label_noise:g} % label noise, seed {args.seed}"
    )
    report.comparison_plots(runs, out, title=title)
    text = f"# {title}\n\n{table}\nPlots: test_accuracy.png, sharpness.png\n"
    (out / "results.md").write_text(text)
    print("\n" + table)
    print(f"Written: {out}/results.md, {out}/test_accuracy.png, {out}/sharpness.png")
    if args.inspect:
        _compare_inspection(args, {k: models[k] for k, _ in plans[:2]}, data, out, title)
    return 0


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
    from keras_sam.inspection import InspectSettings

    defaults = InspectSettings()
    inspect = commands.add_parser(
        "inspect",
        help="measure a saved model: sharpness, Hessian eigenvalues and trace, loss landscape",
        description="Loads MODEL (a .keras file, e.g. a run's model.keras) and measures it on "
        "Fashion-MNIST: loss and accuracy, sharpness (first-order, m-sharpness, multi-step), "
        "the top Hessian eigenvalues (Lanczos), the Hessian trace (Hutchinson) and the loss "
        "landscape along filter-normalized random directions. Writes report.json, "
        "landscape_1d.png, landscape_2d.png and spectrum.png. When a keras-sam run's "
        "config.json lies next to MODEL, --split train rebuilds that run's training set "
        "with the labels it was trained on (noisy ones included).",
    )
    inspect.add_argument("model", help="the .keras model file")
    inspect.add_argument(
        "--dataset",
        type=lambda text: text.replace("-", "_"),
        choices=["fashion_mnist"],
        default="fashion_mnist",
        help="fashion_mnist (or fashion-mnist)",
    )
    inspect.add_argument(
        "--data-dir", default=None, help="folder with the four IDX files (default: search)"
    )
    inspect.add_argument(
        "--split", choices=["train", "test"], default="train", help="data to measure on (train)"
    )
    inspect.add_argument(
        "--examples",
        type=int,
        default=2000,
        help="examples measured on, a seeded random subset; 0 for all (2000)",
    )
    inspect.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size)
    inspect.add_argument(
        "--rho", type=_non_negative, default=defaults.rho, help=f"sharpness radius ({defaults.rho})"
    )
    inspect.add_argument(
        "--m", type=_positive_int, default=defaults.m, help=f"m-sharpness sub-batch ({defaults.m})"
    )
    inspect.add_argument(
        "--ascent-steps",
        type=_positive_int,
        default=defaults.ascent_steps,
        help=f"steps of the multi-step sharpness ({defaults.ascent_steps})",
    )
    inspect.add_argument(
        "--k", type=_positive_int, default=defaults.k, help=f"top eigenvalues ({defaults.k})"
    )
    inspect.add_argument(
        "--max-iterations",
        type=_positive_int,
        default=defaults.max_iterations,
        help=f"Lanczos iterations at most ({defaults.max_iterations})",
    )
    inspect.add_argument(
        "--probes",
        type=_positive_int,
        default=defaults.probes,
        help=f"Hutchinson probes for the trace ({defaults.probes})",
    )
    inspect.add_argument(
        "--grid",
        type=_positive_int,
        default=defaults.grid,
        help=f"points per axis of the 2-D landscape ({defaults.grid})",
    )
    inspect.add_argument(
        "--line-points",
        type=_positive_int,
        default=defaults.line_points,
        help=f"points of the 1-D landscape ({defaults.line_points})",
    )
    inspect.add_argument(
        "--span",
        type=_non_negative,
        default=defaults.span,
        help=f"landscape coordinates in [-span, span] ({defaults.span})",
    )
    inspect.add_argument("--seed", type=int, default=defaults.seed, help="seed (0)")
    inspect.add_argument("--out", default="runs/inspect", help="output folder (runs/inspect)")
    inspect.add_argument("--quiet", action="store_true", help="no progress bars")


def _inspect_settings(args):
    from keras_sam.inspection import InspectSettings

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

    from keras_sam import inspection

    if args.examples < 0:
        raise ValueError(f"--examples must be >= 0 (0: all). Received: {args.examples}")
    model_path = Path(args.model)
    model = inspection.load_model(model_path)
    x, y, description = _inspect_data(args, model_path)
    loss = inspection.default_loss(model)
    print(f"{model_path}: {model.name}; {description}")
    report = inspection.inspect_model(
        model, x, y, loss, _inspect_settings(args), verbose=0 if args.quiet else 1
    )
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

    from keras_sam.training import RunConfig, prepare_data

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
    from keras_sam import inspection
    from keras_sam.diagnostics import loss_landscape

    settings = inspection.InspectSettings()
    reports = {}
    for label, model in models.items():
        print(f"\n== inspecting {label} on its {len(data.y_train):,} training examples ==")
        loss = inspection.default_loss(model)
        reports[label] = inspection.inspect_model(
            model, data.x_train, data.y_train, loss, settings, verbose=2 if args.quiet else 1
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
        verbose=2 if args.quiet else 1,
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
    from keras_sam import playground

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
    print("2. The seed's toy network: U[0,1) vs N(0,1) samples, Dense(8) -> sigmoid,")
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


def _non_negative(text):
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
