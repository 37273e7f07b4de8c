"""Writes the JSON of `full_fashion_mnist.py` and `vit.py` into docs/RESULTS.md sections.

Each section sits between its own markers (`<!-- NAME: start ... -->` and
`<!-- NAME: end -->`) and replaces the previous one, or is appended the first time; the
rest of the file is kept. NAME is, for the full data set, one per model and augmentation
(e.g. `full_fashion_mnist-cnn32-basic`; `full_fashion_mnist` for the first version's JSON)
and, for a ViT, one per model shape (e.g. `vit-p7-d64-l4`). The full data set's section
puts the final test errors of SGD and SAM (mean and spread over seeds, time taken) beside
the SAM paper's Table 5, labelled with the scale it was run at and as partial while runs
are unfinished. The ViT table puts the CNN's figures of the label-noise study (the
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

# The SAM paper's Table 5 (arXiv 2010.01412 v3, appendix): Fashion-MNIST test error (%),
# mean and standard deviation over 5 seeds, 200 epochs; the same as full_fashion_mnist.py's.
PAPER_TABLE5 = {
    ("WRN-28-10", "basic"): {"sgd": (4.57, 0.07), "sam": (3.98, 0.05)},
    ("WRN-28-10", "cutout"): {"sgd": (3.86, 0.14), "sam": (3.61, 0.06)},
    ("Shake-Shake 26 2x96d", "basic"): {"sgd": (4.37, 0.06), "sam": (3.97, 0.09)},
    ("Shake-Shake 26 2x96d", "cutout"): {"sgd": (3.76, 0.07), "sam": (3.59, 0.01)},
}

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


def full_section_name(record):
    """The section's marker name: `full_fashion_mnist` for the JSON of the first version
    (one seed, no protocol recorded), else one per model and augmentation, so that a CPU
    run and a GPU run keep a section each."""
    protocol = record.get("protocol")
    if protocol is None:
        return "full_fashion_mnist"
    if protocol["model"] == "wrn":
        model = f"wrn{protocol['depth']}-{protocol['widen']}"
    else:
        model = f"cnn{protocol['width']}{'-bn' if protocol['batch_norm'] else ''}"
    return f"full_fashion_mnist-{model}-{_augmentation(protocol).replace(' + ', '-')}"


def _augmentation(protocol):
    return protocol["augment"] + (" + cutout" if protocol["cutout"] else "")


def full_section(record, where=None):
    """The Table 5 comparison: final test error of SGD and SAM, mean and spread over the
    seeds, beside the paper's, with the time taken; partial runs are labelled as such."""
    if "protocol" not in record:
        return legacy_full_section(record, where)
    protocol = record["protocol"]
    sittings = record.get("sittings", [])
    runs = _planned_runs(record)
    first = sittings[0] if sittings else {}
    devices = ", ".join(first.get("devices", []))
    gpu = any(word in devices.lower() for word in ("gpu", "cuda", "tpu"))
    place = where or (devices if gpu else f"CPU, {first.get('cpu_cores_allowed', '?')} core(s)")
    paper_scale = protocol["model"] == "wrn" and (protocol["depth"], protocol["widen"]) == (
        28,
        10,
    )
    paper_scale = paper_scale and protocol["epochs"] >= 200
    scale = "the paper's scale" if paper_scale else ("GPU scale" if gpu else "CPU scale")
    methods = list(dict.fromkeys(r["method"] for r in runs.values()))
    seeds = sorted({r["seed"] for r in runs.values()})
    complete = {m: _complete(runs, m) for m in methods}
    partial = any(r["status"] != "complete" for r in runs.values())
    parameters = _parameters(runs)
    lines = [
        f"## Clean labels at the paper's protocol (Table 5), {scale}: {record['model']}, "
        "SGD against SAM",
        "",
    ]
    if not paper_scale:
        lines += [
            f"**{scale[0].upper() + scale[1:]}, not the paper's scale.** The paper trains "
            "WRN-28-10 (36.5 M weights) and Shake-Shake 26 2x96d for 200 epochs, 5 seeds; this "
            f"is the {record['model']}, {parameters} weights, for {protocol['epochs']} epochs, "
            f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}. The rest of the protocol is "
            "the paper's.",
            "",
        ]
    if partial:
        done = sum(r["status"] == "complete" for r in runs.values())
        lines += [
            f"**Partial results:** {done} of {len(runs)} runs complete (written "
            f"{_last_write(sittings)}); the others show their last finished epoch, which is "
            "mid-schedule (the cosine learning rate has not reached 0), not a final error. "
            "Rerunning the same command continues them.",
            "",
        ]
    lines += [
        f"Produced by `python benchmarks/full_fashion_mnist.py` (Keras "
        f"{first.get('keras', '?')} on {first.get('backend', '?')}, {place}; started "
        f"{first.get('started', '?')}, {len(sittings)} sitting"
        f"{'s' if len(sittings) != 1 else ''}). {record['train_examples']:,} training and "
        f"{record['test_examples']:,} test images, {protocol['epochs']} epochs of batch "
        f"{protocol['batch_size']} ({record.get('steps_per_epoch', '?')} steps, the last "
        f"partial batch dropped), SGD with {'Nesterov ' if protocol['nesterov'] else ''}"
        f"momentum {protocol['momentum']:g}, cosine learning rate from {protocol['lr']:g} "
        f"to 0, weight decay {protocol['weight_decay']:g} on every weight, gradient "
        f"clipped to global norm {protocol['clip_norm']:g}, SAM rho {protocol['rho']:g}, "
        f"{_augmentation(protocol)} augmentation (the official code's), MNIST's "
        f"normalization, {protocol['dtype']}; seeds {', '.join(map(str, seeds))}: each seed's "
        "runs start from the same weights and see the same batches.",
        "",
        "| run | complete runs | final test error (%) | per seed | best test error (%) "
        "| training time per run |",
        "|---|---|---|---|---|---|",
    ]
    for method in methods:
        group = complete[method]
        finals = [r["test_error"] for r in group]
        lines.append(
            f"| {FULL_NAMES.get(method, method)} | {len(group)} of "
            f"{sum(r['method'] == method for r in runs.values())} "
            f"| {_mean_sd(finals, 100)} "
            f"| {', '.join(f'{100 * e:.2f}' for e in finals) or '—'} "
            f"| {_mean_sd([r['best_test_error'] for r in group], 100)} "
            f"| {_duration([r['train_seconds'] for r in group])} |"
        )
    lines += ["", *_gap_lines(runs, complete, protocol), ""]
    if partial:
        lines += [
            "Every run, as far as it has got:",
            "",
            "| run | seed | status | epochs | test error at its last epoch (%) "
            "| training s per epoch |",
            "|---|---|---|---|---|---|",
        ]
        for run in runs.values():
            error = run.get("test_error")
            per_epoch = run["train_seconds"] / run["epochs_done"] if run["epochs_done"] else None
            lines.append(
                f"| {FULL_NAMES.get(run['method'], run['method'])} | {run['seed']} "
                f"| {run['status'].split(':')[0]} | {run['epochs_done']} of {run['epochs']} "
                f"| {'—' if error is None else f'{100 * error:.2f}'} "
                f"| {'—' if per_epoch is None else f'{per_epoch:.0f}'} |"
            )
        matched = _matched_epoch_lines(runs, methods)
        lines += ["", *matched, ""] if matched else [""]
    lines += [
        "**The paper's Table 5** (Foret et al., 2021, arXiv 2010.01412 v3, appendix; test "
        "error %, mean ± standard deviation over 5 seeds, 200 epochs):",
        "",
        "| model | augmentation | SGD | SAM | SAM - SGD |",
        "|---|---|---|---|---|",
    ]
    for (model, augmentation), row in PAPER_TABLE5.items():
        lines.append(
            f"| {model} | {augmentation} | {row['sgd'][0]:.2f} ± {row['sgd'][1]:.2f} "
            f"| {row['sam'][0]:.2f} ± {row['sam'][1]:.2f} "
            f"| {row['sam'][0] - row['sgd'][0]:+.2f} |"
        )
    return "\n".join(lines)


def _planned_runs(record):
    """The record's runs, and those its sittings' `--seeds` and `--methods` planned but
    no sitting has started, as "not started"."""
    runs = dict(record["runs"])
    for sitting in record.get("sittings", []):
        arguments = sitting.get("arguments", {})
        for seed in arguments.get("seeds", []):
            for method in arguments.get("methods", []):
                runs.setdefault(
                    f"{method}/seed{seed}",
                    {
                        "method": method, "seed": seed, "status": "not started",
                        "epochs": record["protocol"]["epochs"], "epochs_done": 0,
                        "history": [], "train_seconds": 0.0,
                    },
                )  # fmt: skip
    return runs


def _complete(runs, method):
    return [r for r in runs.values() if r["method"] == method and r["status"] == "complete"]


def _last_write(sittings):
    if not sittings:
        return "?"
    last = sittings[-1]
    return last.get("ended") or f"during the sitting started {last.get('started', '?')}"


def _duration(seconds):
    if not seconds:
        return "—"
    mean = statistics.mean(seconds)
    return f"{mean / 60:.0f} min" if mean >= 600 else f"{mean:.0f} s"


def _gap_lines(runs, complete, protocol):
    """SAM minus SGD in final test error: means, seed by seed, against the seeds' spread
    and the paper's gap at the same augmentation."""
    sgd = {r["seed"]: r["test_error"] for r in complete.get("sgd", [])}
    sam = {r["seed"]: r["test_error"] for r in complete.get("sam", [])}
    paper = PAPER_TABLE5[("WRN-28-10", "cutout" if protocol["cutout"] else "basic")]
    paper_gap = paper["sam"][0] - paper["sgd"][0]
    reference = (
        f"The paper's gap (WRN-28-10, {'cutout' if protocol['cutout'] else 'basic'}): "
        f"{paper_gap:+.2f} points."
    )
    if not sgd or not sam:
        return [f"**SAM - SGD:** no complete pair of runs yet. {reference}"]
    gap = 100 * (statistics.mean(sam.values()) - statistics.mean(sgd.values()))
    paired = [100 * (sam[s] - sgd[s]) for s in sorted(sam.keys() & sgd.keys())]
    per_seed = ", ".join(f"{g:+.2f}" for g in paired) or "none"
    text = (
        f"**SAM - SGD** in final test error (points; negative: SAM better): {gap:+.2f} "
        f"(difference of the means; per seed, the same start and batches: {per_seed}). "
    )
    if len(sgd) >= 2 and len(sam) >= 2:
        spread = 100 * max(statistics.stdev(sgd.values()), statistics.stdev(sam.values()))
        if gap < 0 and -gap > spread:
            verdict = f"SAM is below SGD by more than the seeds' spread ({spread:.2f})."
        elif gap < 0:
            verdict = f"SAM is below SGD, but by less than the seeds' spread ({spread:.2f})."
        else:
            verdict = f"SAM is not below SGD (seeds' spread {spread:.2f})."
    else:
        verdict = "One seed a method: no spread to compare the gap with."
    return [text + verdict + " " + reference]


def _matched_epoch_lines(runs, methods):
    """Both methods at the last epoch that every run of a seed has finished (evaluated):
    the only like-for-like comparison while runs are unfinished."""
    lines = []
    for seed in sorted({r["seed"] for r in runs.values()}):
        group = [r for r in runs.values() if r["seed"] == seed]
        if {r["method"] for r in group} != set(methods):
            continue
        tested = [{e["epoch"]: e["test_error"] for e in r["history"] if "test_error" in e}
                  for r in group]  # fmt: skip
        common = set.intersection(*(set(t) for t in tested))
        if not common or all(r["status"] == "complete" for r in group):
            continue
        epoch = max(common)
        values = ", ".join(
            f"{FULL_NAMES.get(r['method'], r['method'])} {100 * t[epoch]:.2f} %"
            for r, t in zip(group, tested, strict=True)
        )
        lines.append(
            f"- Seed {seed} at epoch {epoch} of {group[0]['epochs']} (mid-schedule, not "
            f"final): {values}."
        )
    return lines


def legacy_full_section(record, where=None):
    """The section of the first version's JSON (one seed, no protocol recorded)."""
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
        name = full_section_name(record) if kind == "full" else vit_section_name(record)
        text = make(record, args.where)
        write_section(args.results, name, text)
        if args.print:
            print(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
