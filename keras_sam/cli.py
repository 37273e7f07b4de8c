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
    runs = {}
    for label, config in plans:
        print(f"\n== {label}: {config.method}, {config.epochs} epochs ==")
        _, history = train(config, data, out_dir=out / label, verbose=2 if args.quiet else 1)
        runs[label] = (config, history)
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
    return 0


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
    print("   trained through optimizer.optimize(grad_func, variables), SGD vs SAM(rho=0.05):\n")
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
