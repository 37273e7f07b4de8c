"""The `keras-sam` command line."""

import argparse
import os
import sys


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
        "--rho", type=_non_negative, default=0.3, help="SAM radius on the 2-D problem (default 0.3)"
    )
    playground.add_argument(
        "--steps", type=_positive_int, default=600, help="steps on the 2-D problem (default 600)"
    )
    playground.add_argument(
        "--seed", type=int, default=0, help="seed of the toy network (default 0)"
    )
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    if args.command == "playground":
        return _playground(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


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


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
