"""Accuracy against cost: the cheaper SAM methods on Fashion-MNIST, in a section of RESULTS.md.

Every method trains in the regime of `benchmarks/fashion_mnist.py` (the same data, model,
seeds, schedule and rho) at 40 % label noise and on clean labels, for E epochs. For each
method the section reports the final clean test accuracy, the forward-backward passes per
step actually taken, and the wall-clock time of a training epoch relative to plain SGD.

The times are not the runs' own (those share the machine with evaluations and with
whatever else runs): after the runs, every method's model trains single epochs in turn,
interleaved over `--rounds` rounds, timed from the first batch's start to the last
batch's end of each epoch, and the ratio to plain SGD is the median over the rounds.
Late-phase SAM is timed in both of its phases; its epoch time is the mix of the two.

MomentumSAM's `rho` is chosen by a small sweep on one seed at 40 % noise (the best final
clean test accuracy), then trained on every seed: the sweep selects on test accuracy, as
the paper's own sweeps did, which favours it a little.

    python benchmarks/frontier.py                 # runs, timing, section and picture
    python benchmarks/frontier.py --epochs 2 --seeds 0 --noise 0.4 --out /tmp/f  # a look
"""

import argparse
import dataclasses
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fashion_mnist  # noqa: E402
import inspect_results  # noqa: E402
import timing  # noqa: E402

from keras_sam.cli.training import RunConfig, prepare_data, train  # noqa: E402

# method[:field=value,...] as in fashion_mnist.py's --variants; the sweep's best rho is
# substituted for MSAM_RHO.
MSAM_RHO = "{msam_rho}"
METHODS = (
    "plain",
    "sam",
    "looksam:alpha=0.2",
    "looksam:alpha=0.2,k=10",
    "looksam:alpha=0.2,k=15",
    "periodic_sam",
    "aesam",
    f"momentum_sam:rho={MSAM_RHO}",
    "sam:sam_start=0.9",
    "sam:sam_start=0.75",
    "mesa:rho=0",  # the runs' rho (--rho) is SAM's: MESA alone takes none
)
NAMES = {
    "plain": "plain SGD",
    "sam": "SAM",
    "looksam_alpha0.2": "LookSAM (k 5, alpha 0.2)",
    "looksam_alpha0.2_k10": "LookSAM (k 10, alpha 0.2)",
    "looksam_alpha0.2_k15": "LookSAM (k 15, alpha 0.2)",
    "periodic_sam": "SAM every 5 steps",
    "aesam": "AESAM (margin 0)",
    "momentum_sam": "MomentumSAM (rho {rho:g})",
    "sam_sam_start0.9": "late-phase SAM (last 10 %)",
    "sam_sam_start0.75": "late-phase SAM (last 25 %)",
    "mesa_rho0": "MESA (lambda 0.8, tau 5)",
}
START = "<!-- frontier: start (written by benchmarks/frontier.py) -->"
END = "<!-- frontier: end -->"


def base_config(args, noise, seed):
    return RunConfig(
        method="plain",
        rho=args.rho,
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        num_batch_splits=args.num_batch_splits,
        label_noise=noise,
        train_size=args.train_size,
        seed=seed,
        eval_every=args.eval_every,
    )


def run(config, folder, data_for):
    history = fashion_mnist._load_finished(folder, config)
    if history is None:
        print(
            f"[{time.strftime('%H:%M:%S')}] {folder.parent.name}: {folder.name} "
            f"({config.epochs} epochs)",
            flush=True,
        )
        _, history = train(config, data_for(), out_dir=folder, verbose=0)
    accuracy = 100 * history["test_accuracy"][-1]
    print(f"    {folder.name:<28} final clean test accuracy {accuracy:.2f} %", flush=True)
    return history


def run_all(args):
    """Trains what is not in --runs yet; returns {(noise, seed, spec): (config, history)}."""
    results, data = {}, {}

    def data_for(noise, seed):
        key = (noise, seed)
        return lambda: data.setdefault(key, prepare_data(base_config(args, noise, seed)))

    def folder(noise, seed, label):
        return Path(args.runs) / f"noise{int(round(100 * noise)):02d}_seed{seed}" / label

    # MomentumSAM's rho: a sweep on the first seed at the first noise rate.
    noise, seed = args.noise[0], args.seeds[0]
    sweep, msam_rho = {}, None
    for rho in args.msam_rhos:
        spec = f"momentum_sam:rho={rho:g}"
        config = fashion_mnist._variant(base_config(args, noise, seed), spec)
        history = run(
            config, folder(noise, seed, fashion_mnist._label(spec)), data_for(noise, seed)
        )
        sweep[rho] = history["test_accuracy"][-1]
    if sweep:
        msam_rho = max(sweep, key=sweep.get)
        specs = [spec.replace(MSAM_RHO, f"{msam_rho:g}") for spec in METHODS]
    else:  # --msam-rhos with no value: without MomentumSAM
        specs = [spec for spec in METHODS if MSAM_RHO not in spec]
    if args.methods:
        specs = [spec for spec in specs if spec.split(":")[0] in args.methods]
    for noise in args.noise:
        for seed in args.seeds:
            for spec in specs:
                config = fashion_mnist._variant(base_config(args, noise, seed), spec)
                label = fashion_mnist._label(spec)
                history = run(config, folder(noise, seed, label), data_for(noise, seed))
                results[(noise, seed, spec)] = (config, history)
    return results, specs, sweep, msam_rho


# ------------------------------------------------------------------------ timing
class _EpochTimer:
    """Times an epoch from its first batch's start to its last batch's end."""

    def __init__(self):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_batch_begin(inner, batch, logs=None):
                if batch == 0:
                    inner.start = time.perf_counter()

            def on_train_batch_end(inner, batch, logs=None):
                inner.end = time.perf_counter()

        self.callback = Timer()

    def seconds(self):
        return self.callback.end - self.callback.start


def _timed_model(config, data, steps_total):
    import keras

    from keras_sam.cli.training import build_optimizer
    from keras_sam.models import build_model
    from keras_sam.trainers.sam_model import SAMModel

    model = build_model(config.model, seed=config.seed)
    splits = config.num_batch_splits if config.is_sam else None
    sam_model = SAMModel(model, num_batch_splits=splits)
    with warnings.catch_warnings():  # the plain run goes through SAMModel on purpose
        warnings.filterwarnings("ignore", "`SAMModel` was compiled with", UserWarning)
        sam_model.compile(
            optimizer=build_optimizer(config, steps_total),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    return sam_model


def time_epochs(args, specs):
    """The median, over interleaved rounds, of each method's epoch time over plain's."""
    base = base_config(args, args.noise[0], args.seeds[0])
    data = prepare_data(base)
    steps_per_epoch = -(-len(data.x_train) // base.batch_size)
    # A late-phase run is timed in each phase: before SAM starts (its schedule's boundary
    # beyond the timed epochs) and after (the boundary at the first step).
    timed = {}
    for spec in specs:
        config = fashion_mnist._variant(base, spec)
        if config.sam_start:
            fraction = config.sam_start
            before = dataclasses.replace(config, sam_start=0.999)
            after = dataclasses.replace(config, sam_start=1e-9)
            total = 1000 * steps_per_epoch  # the boundary of `before` lies far ahead
            timed[spec + " before"] = (before, total, None)
            timed[spec + " after"] = (after, steps_per_epoch, None)
            timed[spec] = (None, None, fraction)
        else:
            timed[spec] = (config, steps_per_epoch * (args.rounds + 1), None)
    models = {
        key: _timed_model(config, data, total)
        for key, (config, total, _) in timed.items()
        if config is not None
    }
    timer = _EpochTimer()
    fit = dict(x=data.x_train, y=data.y_train, batch_size=base.batch_size, verbose=0)
    timing.warm_up([lambda m=m: m.fit(epochs=1, **fit) for m in models.values()], 1)

    def epoch(model):
        model.fit(epochs=1, callbacks=[timer.callback], **fit)
        return timer.seconds()

    timers = {key: (lambda m=model: epoch(m)) for key, model in models.items()}
    seconds = timing.interleave(timers, args.rounds)
    ratios = {}
    for spec, (_, _, fraction) in timed.items():
        if spec.endswith((" before", " after")):
            continue
        if fraction is None:
            per_round = timing.ratios(seconds[spec], seconds["plain"])
        else:
            # `fraction` of the steps before SAM starts (one pass), the rest with SAM.
            per_round = [
                (fraction * b + (1 - fraction) * a) / p
                for b, a, p in zip(
                    seconds[spec + " before"], seconds[spec + " after"], seconds["plain"]
                )
            ]
            ratios[spec + " before"] = timing.ratio(
                seconds[spec + " before"], seconds["plain"]
            ).median
        ratios[spec] = statistics.median(per_round)
    plain_ms = 1000 * statistics.median(seconds["plain"]) / steps_per_epoch
    return ratios, plain_ms


# ------------------------------------------------------------------------ report
def _name(spec, msam_rho):
    label = fashion_mnist._label(spec)
    if label.startswith("momentum_sam"):
        return NAMES["momentum_sam"].format(rho=msam_rho)
    return NAMES.get(label, label)


def summarize(results, specs, args):
    rows = {}
    for noise in args.noise:
        for spec in specs:
            runs = [results[(noise, s, spec)] for s in args.seeds]
            plain = [results[(noise, s, "plain")][1] for s in args.seeds]
            passes = statistics.mean(
                h["gradient_evaluations"][-1] / p["gradient_evaluations"][-1]
                for (_, h), p in zip(runs, plain)
            )
            final = [100 * h["test_accuracy"][-1] for _, h in runs]
            rows[(noise, spec)] = {"passes": passes, "final": final}
    return rows


def section(args, rows, specs, sweep, msam_rho, ratios, plain_ms):
    lines = [
        START,
        "## Accuracy against cost: SAM at about the price of plain training",
        "",
        f"Produced by `python benchmarks/frontier.py` (runs in `{args.runs}/`, not committed). "
        f"The regime above: the `{args.model}` model, {args.train_size:,} training images, "
        f"SGD with momentum, cosine learning rate, batch {args.batch_size}, rho "
        f"{args.rho:g}, m-sharpness with {args.num_batch_splits} parts, {args.epochs} epochs; "
        f"seeds {', '.join(map(str, args.seeds))} (mean ± standard deviation). "
        "Passes: forward-backward passes per step, counted in the runs. Time: a training "
        "epoch's wall-clock time over plain SGD's, measured after the runs with every "
        f"method's model training one epoch in turn, {args.rounds} interleaved rounds, "
        f"median (plain SGD: {plain_ms:.1f} ms a step); late-phase SAM's is the mix of its "
        "two phases' epochs. \"Kept of SAM's gain\": (method - plain) / (SAM - plain), from "
        "the seeds' means.",
        "",
    ]
    if sweep:
        lines += [
            "MomentumSAM's rho was chosen on seed "
            f"{args.seeds[0]} at {args.noise[0]:.0%} noise by final clean test accuracy: "
            + ", ".join(f"rho {r:g}: {100 * a:.2f} %" for r, a in sorted(sweep.items()))
            + f" (chosen: {msam_rho:g}).",
            "",
        ]
    for noise in args.noise:
        sam = statistics.mean(rows[(noise, "sam")]["final"])
        plain = statistics.mean(rows[(noise, "plain")]["final"])
        lines += [
            f"### {'clean labels' if noise == 0 else f'{noise:.0%} label noise'}",
            "",
            "| method | passes per step | time per epoch (x plain) | final clean test acc. (%) "
            "| per seed | kept of SAM's gain |",
            "|---|---|---|---|---|---|",
        ]
        for spec in specs:
            row = rows[(noise, spec)]
            mean, spread = fashion_mnist._stats(row["final"])
            if spec == "plain":
                kept_cell = ""
            elif abs(sam - plain) < 1:  # no gain to keep: the ratio would be noise
                kept_cell = f"n/a (SAM {sam - plain:+.2f})"
            else:
                kept_cell = f"{100 * (mean - plain) / (sam - plain):.0f} %"
            lines.append(
                f"| {_name(spec, msam_rho)} | {row['passes']:.2f} | {ratios[spec]:.2f} "
                f"| {mean:.2f} ± {spread:.2f} | {', '.join(f'{a:.2f}' for a in row['final'])} "
                f"| {kept_cell} |"
            )
        lines.append("")
    lines += [
        "![accuracy against cost](results/frontier.png)",
        "",
        "Late-phase SAM before its start ran at "
        + ", ".join(f"{ratios[s + ' before']:.3f}" for s in specs if s + " before" in ratios)
        + " times plain's epoch time (the rho-0 steps take one pass).",
        "",
        "{verdict}",
        END,
    ]
    return "\n".join(lines) + "\n"


def plot(rows, specs, ratios, msam_rho, args, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.noise), figsize=(6.2 * len(args.noise), 4.4))
    axes = [axes] if len(args.noise) == 1 else list(axes)
    for ax, noise in zip(axes, args.noise):
        for spec in specs:
            mean, spread = fashion_mnist._stats(rows[(noise, spec)]["final"])
            marker = {"plain": "s", "sam": "D"}.get(spec, "o")
            ax.errorbar(ratios[spec], mean, yerr=spread, marker=marker, capsize=3, ms=7)
            ax.annotate(
                _name(spec, msam_rho),
                (ratios[spec], mean),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
            )
        ax.axvline(1.1, color="gray", linestyle="--", linewidth=1)
        ax.annotate(
            "1.1 x plain",
            (1.1, 0),
            xycoords=("data", "axes fraction"),
            xytext=(3, 4),
            textcoords="offset points",
            fontsize=8,
            color="gray",
        )
        ax.set_xlabel("time per training epoch (x plain SGD)")
        ax.set_ylabel("final clean test accuracy (%)")
        ax.set_title("clean labels" if noise == 0 else f"{noise:.0%} label noise")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdict(rows, specs, ratios, args, msam_rho):
    """Which methods reach the goal: at most 1.1x plain's time, 90 % of SAM's gain, every seed."""
    noise = args.noise[0]
    plain = rows[(noise, "plain")]["final"]
    sam = rows[(noise, "sam")]["final"]
    reached, closest = [], None
    for spec in specs:
        if spec in ("plain", "sam"):
            continue
        kept = [(m - p) / (s - p) for m, p, s in zip(rows[(noise, spec)]["final"], plain, sam)]
        if ratios[spec] <= 1.1 and min(kept) >= 0.9:
            reached.append(spec)
        score = min(kept) if ratios[spec] <= 1.1 else -1
        if closest is None or score > closest[1]:
            closest = (spec, score, kept)
    head = f"**The goal** (at {noise:.0%} noise, at most 1.1 times plain's time and 90 % of SAM's "
    head += "gain on every seed): "
    if reached:
        return head + "reached by " + ", ".join(_name(s, msam_rho) for s in reached) + "."
    spec, _, kept = closest
    return (
        head
        + "not reached. Closest within the time budget: "
        + f"{_name(spec, msam_rho)}, keeping "
        + ", ".join(f"{100 * k:.0f} %" for k in kept)
        + " of SAM's gain per seed."
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.4, 0.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=RunConfig.epochs)
    parser.add_argument("--train-size", type=int, default=RunConfig.train_size)
    parser.add_argument("--model", default=RunConfig.model)
    parser.add_argument("--batch-size", type=int, default=RunConfig.batch_size)
    parser.add_argument("--rho", type=float, default=0.1, help="SAM's rho (0.1)")
    parser.add_argument("--num-batch-splits", type=int, default=RunConfig.num_batch_splits)
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate every k epochs (5)")
    parser.add_argument(
        "--msam-rhos",
        type=float,
        nargs="*",
        default=[0.3, 0.5, 1.0, 1.5],
        help="MomentumSAM's rho sweep (seed --seeds[0], noise --noise[0]); none: leave "
        "MomentumSAM out",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=sorted({spec.split(":")[0] for spec in METHODS}),
        help="only these methods (their names before any ':'; default: every one)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (7)")
    parser.add_argument("--runs", default="runs/frontier")
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()

    results, specs, sweep, msam_rho = run_all(args)
    print(f"[{time.strftime('%H:%M:%S')}] timing {args.rounds} interleaved rounds", flush=True)
    ratios, plain_ms = time_epochs(args, specs)
    rows = summarize(results, specs, args)
    docs = Path(args.out)
    (docs / "results").mkdir(parents=True, exist_ok=True)
    plot(rows, specs, ratios, msam_rho, args, docs / "results" / "frontier.png")
    text = section(args, rows, specs, sweep, msam_rho, ratios, plain_ms)
    text = text.replace("{verdict}", verdict(rows, specs, ratios, args, msam_rho))
    inspect_results.write_section(docs / "RESULTS.md", text, START, END)
    print(text)


if __name__ == "__main__":
    main()
