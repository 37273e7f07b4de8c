"""Writes the JSON of `full_fashion_mnist.py` and `vit.py` into docs/RESULTS.md sections.

Each section sits between its own markers (`<!-- full_fashion_mnist: start ... -->` and
`<!-- full_fashion_mnist: end -->`; for a ViT, one section per model shape, e.g.
`vit-p7-d64-l4`) and replaces the previous one, or is appended the first time; the rest of
the file is kept. The ViT table puts the CNN's figures of the label-noise study (the
section above it in RESULTS.md, same subset, seeds and noise) beside the transformer's.

    python benchmarks/results_sections.py --full full_fashion_mnist.json --vit vit.json
    python benchmarks/results_sections.py --vit vit_small.json vit_large.json
    python benchmarks/results_sections.py --vit vit.json --where "2 CPU cores" --print
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "RESULTS.md"

# The CNN's figures (docs/RESULTS.md, label-noise study and its Hessian section: the cnn
# model, 2,000 images, 40 epochs, SGD, seeds 0 and 1): final clean test accuracy (%),
# mean and standard deviation, and the top Hessian eigenvalue.
CNN = {
    0.0: {"plain": (84.59, 0.56, 25.0), "sam": (84.44, 0.11, 4.6)},
    0.4: {"plain": (65.10, 0.23, 73.2), "sam": (81.56, 0.01, 4.5)},
}
FULL_NAMES = {"sgd": "SGD", "sam": "SAM(SGD)", "asam": "ASAM(SGD)"}
METHOD_NAMES = {"adamw": "AdamW", "sam": "SAM(AdamW)", "asam": "ASAM(AdamW)", "sgd": "SGD"}


def write_section(path, name, text):
    """Replaces the `name` section of `path` by `text` (without markers), or appends it."""
    start = f"<!-- {name}: start (written by benchmarks/results_sections.py) -->"
    end = f"<!-- {name}: end -->"
    path = Path(path)
    current = path.read_text() if path.is_file() else ""
    block = f"{start}\n{text.strip()}\n{end}"
    prefix = f"<!-- {name}: start"
    if prefix in current and end in current:
        before = current[: current.index(prefix)]
        after = current[current.index(end) + len(end) :]
        updated = before + block + after
    else:
        updated = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(updated)
    return updated


def _mean_sd(values, scale=1.0, spec=".2f"):
    values = [scale * v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def _where(record, where):
    env = record.get("environment", {})
    devices = ", ".join(env.get("devices", [])) or "unknown devices"
    place = where or devices
    return f"Keras {env.get('keras', '?')} on {env.get('backend', '?')}, {place}"


def _train_seconds(run):
    """The run's total training time (its epochs' together, from the history: records
    written before the script summed them kept only the last epoch's), and the first
    epoch's, which holds the compilation."""
    epochs = [e["train_seconds"] for e in run.get("history", []) if "train_seconds" in e]
    if not epochs:
        return f"{run.get('train_seconds', float('nan')):.1f}"
    return f"{sum(epochs):.1f} ({epochs[0]:.1f})"


def full_section(record, where=None):
    args = record["environment"]["arguments"]
    runs = record["runs"]
    lines = [
        "## The full data set: a wide ResNet on all 60,000 images, SAM against SGD",
        "",
        f"Produced by `python benchmarks/full_fashion_mnist.py` ({_where(record, where)}; "
        f"{record['environment'].get('started', '')}). {record['model']} "
        f"({_parameters(runs)} weights), {record['train_examples']:,} training and "
        f"{record['test_examples']:,} test images, {args['epochs']} epochs of batch "
        f"{args['batch_size']}, SGD momentum {args['momentum']:g}, cosine learning rate from "
        f"{args['lr']:g}, L2 weight decay {args['weight_decay']:g}, "
        f"{'random crops (padding 4) and flips' if args['augment'] else 'no augmentation'}, "
        f"{args['dtype']}, SAM rho {args['rho']:g}, seed {args['seed']}: one run each.",
        "",
        "| run | status | epochs | test error | best test error | training s (first epoch) |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        error = run.get("test_error")
        best = run.get("best_test_error")
        lines.append(
            f"| {FULL_NAMES.get(name, name)} | {run['status']} | {run['epochs_done']} "
            f"| {'—' if error is None else f'{100 * error:.2f} %'} "
            f"| {'—' if best is None else f'{100 * best:.2f} %'} "
            f"| {_train_seconds(run)} |"
        )
    lines += [
        "",
        "**The paper** (Foret et al., 2021, arXiv 2010.01412, appendix: results on SVHN and "
        "Fashion-MNIST) trains WRN-28-10 and Shake-Shake (26 2x96d) on Fashion-MNIST for 200 "
        "epochs or more, SAM against SGD; see its table for the error rates. This run is a "
        f"smaller model for {args['epochs']} epochs: a check that the direction holds on the "
        "full data set, not a reproduction.",
    ]
    return "\n".join(lines)


def _parameters(runs):
    counts = [r["parameters"] for r in runs.values() if "parameters" in r]
    return f"{counts[0]:,}" if counts else "?"


def vit_section_name(record):
    """The section's marker name: one per ViT shape, so that two shapes keep two sections."""
    args = record["environment"]["arguments"]
    return f"vit-p{args['patch']}-d{args['dim']}-l{args['depth']}"


def paired_gains(runs, noise, method="sam", baseline="adamw"):
    """`method`'s final clean test accuracy minus `baseline`'s, seed by seed (the same
    subset and noisy labels), for the seeds where both runs are complete."""

    def finals(name):
        return {
            r["seed"]: r["final_test_accuracy"]
            for r in runs.values()
            if r["noise"] == noise and r["method"] == name and r["status"] == "complete"
        }

    ours, theirs = finals(method), finals(baseline)
    return [ours[seed] - theirs[seed] for seed in sorted(ours.keys() & theirs.keys())]


def vit_section(record, where=None):
    args = record["environment"]["arguments"]
    runs = record["runs"]
    noises = sorted({r["noise"] for r in runs.values()})
    methods = list(dict.fromkeys(r["method"] for r in runs.values()))
    seeds = sorted({r["seed"] for r in runs.values()})
    lines = [
        f"## Vision transformers ({record['model']}): AdamW against SAM(AdamW)",
        "",
        f"Produced by `python benchmarks/vit.py` ({_where(record, where)}; "
        f"{record['environment'].get('started', '')}). {record['model']} "
        f"({_vit_parameters(runs)} weights), trained from scratch on the same seeded "
        f"{args['train_size']:,}-image subsets and flipped labels as the CNN above, "
        f"{args['epochs']} epochs of batch {args['batch_size']}, AdamW (peak learning rate "
        f"{args['lr']:g}, {args['warmup_steps']} warm-up steps, cosine, weight decay "
        f"{args['weight_decay']:g}), SAM rho {args['rho']:g}, {args['dtype']}; seeds "
        f"{', '.join(map(str, seeds))} (mean ± standard deviation over the complete runs). "
        "Top Hessian eigenvalue: Lanczos on "
        f"{args['hessian_examples']} training examples (labels as trained), at most "
        f"{args['hessian_iterations']} iterations. The CNN columns are the label-noise study's "
        "(SGD and SAM(SGD), 40 epochs, seeds 0 and 1).",
        "",
        "| label noise | run | complete runs | final clean test acc. | best clean test acc. "
        "| final train acc. (labels as trained) | top Hessian eigenvalue | CNN: final clean "
        "test acc. | CNN: top Hessian eigenvalue |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    gains = {}
    for noise in noises:
        for method in methods:
            group = [
                r
                for r in runs.values()
                if r["noise"] == noise and r["method"] == method and r["status"] == "complete"
            ]
            cnn = CNN.get(noise, {}).get("plain" if method == "adamw" else "sam")
            if method == "asam":
                cnn = None
            final = [r.get("final_test_accuracy") for r in group]
            gains.setdefault(noise, {})[method] = final
            lines.append(
                f"| {100 * noise:g} % | {METHOD_NAMES[method]} | {len(group)} "
                f"| {_mean_sd(final, 100)} "
                f"| {_mean_sd([r.get('best_test_accuracy') for r in group], 100)} "
                f"| {_mean_sd([r.get('final_train_accuracy') for r in group], 100)} "
                f"| {_mean_sd([r.get('hessian_top_eigenvalue') for r in group], 1, '.1f')} "
                f"| {'—' if cnn is None else f'{cnn[0]:.2f} ± {cnn[1]:.2f}'} "
                f"| {'—' if cnn is None else f'{cnn[2]:.1f}'} |"
            )
    lines += [
        "",
        "**SAM's gain in final clean test accuracy** (points: difference of the means; then "
        "seed by seed, SAM's run minus AdamW's on the same subset and labels):",
        "",
    ]
    for noise in noises:
        base = [v for v in gains[noise].get("adamw", []) if v is not None]
        sam = [v for v in gains[noise].get("sam", []) if v is not None]
        cnn = CNN.get(noise)
        vit_gain = (
            f"{100 * (statistics.mean(sam) - statistics.mean(base)):+.2f}"
            if base and sam
            else "n/a"
        )
        paired = paired_gains(runs, noise)
        per_seed = ", ".join(f"{100 * g:+.2f}" for g in paired) or "none"
        cnn_gain = f"{cnn['sam'][0] - cnn['plain'][0]:+.2f}" if cnn else "n/a"
        lines.append(
            f"- {100 * noise:g} % label noise: ViT {vit_gain} (per seed: {per_seed}), "
            f"CNN {cnn_gain}."
        )
    skipped = [k for k, r in runs.items() if r["status"] != "complete"]
    if skipped:
        lines += ["", f"Not complete (budget): {', '.join(skipped)}."]
    lines += [
        "",
        "**The paper** (Chen, Hsieh and Gong, ICLR 2022, arXiv 2106.01548) reports SAM's "
        "gain from scratch on ImageNet: ViT-B/16 74.6 -> 79.9 top-1 (+5.3), ResNets about +1.",
    ]
    return "\n".join(lines)


def _vit_parameters(runs):
    counts = [r["parameters"] for r in runs.values() if "parameters" in r]
    return f"{counts[0]:,}" if counts else "?"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", help="the JSON of full_fashion_mnist.py")
    parser.add_argument("--vit", nargs="+", default=[], help="the JSON of vit.py (one a shape)")
    parser.add_argument("--results", default=str(RESULTS), help="the Markdown file written")
    parser.add_argument("--where", default=None, help="the machine, in words (e.g. 'one H200')")
    parser.add_argument("--print", action="store_true", help="print the sections too")
    args = parser.parse_args(argv)
    sections = [("full", args.full, full_section)] if args.full else []
    sections += [("vit", path, vit_section) for path in args.vit]
    for kind, path, make in sections:
        record = json.loads(Path(path).read_text())
        name = "full_fashion_mnist" if kind == "full" else vit_section_name(record)
        text = make(record, args.where)
        write_section(args.results, name, text)
        if args.print:
            print(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
