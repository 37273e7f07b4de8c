"""Is SAM's minimum flatter? Inspects the label-noise runs' models; writes a RESULTS section.

Reads the models that `benchmarks/fashion_mnist.py` (`make results`) trained and saved
under --runs (`noise40_seed0/plain/model.keras`, ...), rebuilds each run's training
set exactly as it was trained (the seeded 2,000-example subset, with its noisy labels),
and measures every model on it with `keras_sam.cli.inspection.inspect_model`: top Hessian
eigenvalues (Lanczos), the Hessian trace (Hutchinson, with its standard error),
sharpness (first-order, m-sharpness, multi-step), and the loss landscape. Per cell it
also measures the loss on the line between the plain and the SAM model.

Each model's report is kept under --out, and a model already measured is not measured
again, so the script can be interrupted and rerun. It then draws the pictures of one
cell into docs/results/ and writes the section "Is SAM's minimum flatter?" into
docs/RESULTS.md: appended the first time, replaced (between its markers) afterwards,
leaving the other sections as they are.

    python benchmarks/inspect_results.py --runs runs/results          # about 45 minutes
    python benchmarks/inspect_results.py --runs runs/results --noise 0.4 --seeds 0
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from keras_sam.cli import inspection  # noqa: E402
from keras_sam.cli.training import RunConfig, prepare_data  # noqa: E402

START = "<!-- inspect_results: start (written by benchmarks/inspect_results.py) -->"
END = "<!-- inspect_results: end -->"
LABELS = {"plain": "plain SGD", "sam": "SAM", "plain_equal_compute": "plain SGD, 2E epochs"}


def measure(args):
    settings = inspection.InspectSettings(
        k=args.k, probes=args.probes, grid=args.grid, m=args.m, rho=args.rho, seed=0
    )
    reports, lines = {}, {}
    for noise in args.noise:
        for seed in args.seeds:
            cell = f"noise{int(round(100 * noise)):02d}_seed{seed}"
            data = None
            for label in args.labels:
                folder = Path(args.runs) / cell / label
                saved = Path(args.out) / cell / f"{label}.json"
                if saved.is_file():
                    reports[(noise, seed, label)] = json.loads(saved.read_text())
                    continue
                if not (folder / "model.keras").is_file():
                    print(f"skipped: no {folder / 'model.keras'}", file=sys.stderr)
                    continue
                config = _run_config(folder)
                data = data or prepare_data(config, args.data_dir)
                model = inspection.load_model(folder / "model.keras")
                print(f"[{time.strftime('%H:%M:%S')}] {cell}/{label}", flush=True)
                report = inspection.inspect_model(
                    model,
                    data.x_train,
                    data.y_train,
                    inspection.default_loss(model),
                    settings,
                    verbose=0,
                    log=lambda text: None,
                )
                history = json.loads((folder / "history.json").read_text())
                report["clean_test_accuracy"] = history["test_accuracy"][-1]
                report["epochs"] = config.epochs
                report["examples"] = len(data.y_train)
                report["noise_fraction"] = data.noise_fraction
                inspection.write_json(report, saved)
                reports[(noise, seed, label)] = report
                print("\n".join(inspection.summary_lines(label, report)), flush=True)
            lines[(noise, seed)] = _interpolation(args, cell, data, settings)
    return reports, lines


def _interpolation(args, cell, data, settings):
    """The loss on the line from the plain to the SAM model of one cell (cached)."""
    saved = Path(args.out) / cell / "plain_to_sam.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    folders = [Path(args.runs) / cell / label for label in ("plain", "sam")]
    if not all((f / "model.keras").is_file() for f in folders):
        return None
    from keras_sam.diagnostics import Objective, loss_landscape

    if data is None:
        data = prepare_data(_run_config(folders[0]), args.data_dir)
    plain, sam = (inspection.load_model(f / "model.keras") for f in folders)
    objective = Objective(
        plain,
        data.x_train,
        data.y_train,
        loss=inspection.default_loss(plain),
        batch_size=settings.batch_size,
    )
    result = loss_landscape(objective, to_model=sam, verbose=0)
    line = {
        "coordinates": result["coordinates"].tolist(),
        "loss": result["loss"].tolist(),
        "accuracy": result["accuracy"].tolist(),
    }
    inspection.write_json(line, saved)
    return line


def _run_config(folder):
    saved = json.loads((folder / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{k: v for k, v in saved.items() if k in fields})


def pictures(args, reports, lines, docs):
    noise, seed = args.picture_noise, args.picture_seed
    chosen = {
        LABELS[label]: reports[(noise, seed, label)]
        for label in args.labels
        if (noise, seed, label) in reports
    }
    if not chosen:
        return []
    line = lines.get((noise, seed))
    interpolation = None
    if line is not None:
        interpolation = (("plain", "SAM"), {k: line[k] for k in ("coordinates", "loss")})
    title = (
        f"cnn, Fashion-MNIST, {100 * noise:g} % label noise, seed {seed}: "
        "on its 2,000 training examples (labels as trained)"
    )
    prefix = f"inspect_noise{int(round(100 * noise)):02d}_seed{seed}_"
    return inspection.plot_reports(
        chosen, docs / "results", title=title, prefix=prefix, interpolation=interpolation
    )


def section(args, reports, lines, paths):
    rows = [
        "| label noise | run | clean test acc. | train acc. (labels as trained) | train loss "
        f"| top Hessian eigenvalue λ1 | λ1 / λ{args.k} | Hessian trace | sharpness ρ={args.rho:g} "
        f"| m-sharpness (m={args.m}) | 5-step sharpness | 1-D landscape: L(w ± d) - L(w) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for noise in args.noise:
        for label in args.labels:
            cell = [reports[(noise, s, label)] for s in args.seeds if (noise, s, label) in reports]
            if not cell:
                continue
            rows.append(
                f"| {100 * noise:g} % | {LABELS[label]} "
                f"| {_stat([100 * r['clean_test_accuracy'] for r in cell], '.1f')} % "
                f"| {_stat([100 * r['accuracy'] for r in cell], '.1f')} % "
                f"| {_stat([r['loss'] for r in cell], '.3f')} "
                f"| **{_stat([r['hessian']['top_eigenvalues'][0] for r in cell], '.1f')}** "
                f"| {_stat([_ratio(r) for r in cell], '.1f')} "
                f"| {_stat([r['hessian']['trace'] for r in cell], '.0f')} "
                f"| {_stat([r['sharpness']['first_order'] for r in cell], '.4f')} "
                f"| {_stat([r['sharpness']['m_sharpness'] for r in cell], '.4f')} "
                f"| {_stat([r['sharpness']['multi_step'] for r in cell], '.4f')} "
                f"| {_stat([_rise(r) for r in cell], '.2f')} |"
            )
    per_seed = [
        "| label noise | seed | run | λ1 ... λ5 | trace ± standard error | Lanczos converged |",
        "|---|---|---|---|---|---|",
    ]
    for (noise, seed, label), r in sorted(reports.items()):
        if noise not in args.noise or seed not in args.seeds or label not in args.labels:
            continue
        h = r["hessian"]
        per_seed.append(
            f"| {100 * noise:g} % | {seed} | {LABELS[label]} "
            f"| {', '.join(f'{v:.2f}' for v in h['top_eigenvalues'])} "
            f"| {h['trace']:.0f} ± {h['trace_standard_error']:.0f} "
            f"| {'yes' if h.get('eigenvalues_converged', True) else 'no'} |"
        )
    barrier = []
    for (noise, seed), line in sorted(lines.items()):
        if line is None:
            continue
        losses = line["loss"]
        t = line["coordinates"]
        inside = [v for c, v in zip(t, losses) if 0 <= c <= 1 + 1e-9]
        barrier.append(
            f"| {100 * noise:g} % | {seed} | {losses[t.index(min(t, key=abs))]:.3f} "
            f"| {losses[min(range(len(t)), key=lambda i: abs(t[i] - 1))]:.3f} "
            f"| {max(inside):.3f} |"
        )
    figures = "\n".join(f"![{p.stem}](results/{p.name})" for p in paths)
    seconds = [sum(r["seconds"].values()) for r in reports.values() if "seconds" in r]
    return TEMPLATE.format(
        start=START,
        end=END,
        table="\n".join(rows),
        per_seed="\n".join(per_seed),
        barrier="\n".join(barrier),
        figures=figures,
        summary=_summary(args, reports),
        seeds=", ".join(str(s) for s in args.seeds),
        noises=", ".join(f"{100 * n:g} %" for n in args.noise),
        k=args.k,
        probes=args.probes,
        m=args.m,
        rho=f"{args.rho:g}",
        grid=args.grid,
        picture_noise=f"{100 * args.picture_noise:g} %",
        picture_seed=args.picture_seed,
        minutes=f"{sum(seconds) / 60:.0f}",
        count=len(seconds),
    )


def _rise(report):
    """The mean loss at the two ends of the 1-D landscape, minus the loss at the weights."""
    line = report["landscape"]["line"]
    return (line["loss"][0] + line["loss"][-1]) / 2 - report["loss"]


def _summary(args, reports):
    """Sentences with the ratios plain / SAM at equal epochs, computed from the reports."""
    sentences = []
    for noise in args.noise:
        plain = [reports.get((noise, s, "plain")) for s in args.seeds]
        sam = [reports.get((noise, s, "sam")) for s in args.seeds]
        if None in plain or None in sam:
            continue

        def mean(cell, key):
            return statistics.mean(key(r) for r in cell)

        top = mean(plain, lambda r: r["hessian"]["top_eigenvalues"][0]) / mean(
            sam, lambda r: r["hessian"]["top_eigenvalues"][0]
        )
        trace = mean(plain, lambda r: r["hessian"]["trace"]) / mean(
            sam, lambda r: r["hessian"]["trace"]
        )
        sentences.append(
            f"{top:.1f}x smaller λ1 and {trace:.1f}x smaller trace at {100 * noise:g} %"
        )
    if not sentences:
        return ""
    return (
        "At equal epochs SAM's minimum is flatter than plain SGD's by the Hessian: "
        + "; ".join(sentences)
        + " label noise (ratios of the means over the seeds)."
    )


def _ratio(report):
    values = report["hessian"]["top_eigenvalues"]
    return values[0] / values[-1] if values[-1] > 0 else float("nan")


def _stat(values, spec):
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def write_section(path, text, start=START, end=END):
    """Replaces the section between the markers `start` and `end` of `path` by `text`
    (which carries them), or appends `text` the first time."""
    path = Path(path)
    current = path.read_text() if path.is_file() else ""
    if start in current and end in current:
        before = current[: current.index(start)]
        after = current[current.index(end) + len(end) :]
        updated = before + text.strip() + after
    else:
        updated = current.rstrip() + "\n\n" + text.strip() + "\n"
    path.write_text(updated)


TEMPLATE = """{start}
## Is SAM's minimum flatter? Hessian eigenvalues, trace, sharpness and landscapes

Produced by `python benchmarks/inspect_results.py --runs runs/results` from the models of the
runs above (`runs/results/noiseNN_seedS/RUN/model.keras`), with `keras_sam.diagnostics`.

**Scale.** Every model is measured on its own training set, rebuilt exactly as it was trained:
the seeded 2,000-example subset of Fashion-MNIST with its labels as trained (the noisy ones
included), in inference mode. Label noise {noises}; seeds {seeds} (mean ± standard deviation
over the seeds). Top {k} Hessian eigenvalues by Lanczos (relative residual 1e-3), the trace
by Hutchinson's estimator with {probes} Rademacher probes, sharpness at ρ = {rho} (first-order,
m-sharpness with m = {m}, and 5 projected ascent steps), all on the data loss (cross-entropy,
without weight decay). {count} models took {minutes} minutes on 2 CPU cores.

{table}

Per seed:

{per_seed}

{summary}

**Reading.** Equal epochs (40) is the comparison the paper makes, and there every measure
but one says SAM's minimum is flatter, and flatter still where plain SGD memorizes noisy
labels: the top eigenvalue, the trace, m-sharpness, the 5-step ascent and the rise of the loss
along filter-normalized random directions. The exception is the first-order, full-batch
sharpness, which puts plain SGD at or below SAM at 0 % and 20 % noise (0.004 against 0.007,
0.012 against 0.012): at a minimum that fits its training labels the gradient vanishes, and
with it the first-order estimate `L(w + rho g/||g||) - L(w)`. The multi-step ascent and
m-sharpness do not vanish and agree with the Hessian, which is why the library offers them.

The plain models trained twice as long (80 epochs, equal compute) are a warning. They fit
every label, the noisy ones included, their training loss is about 0.005, and by the top
eigenvalue, the trace and m-sharpness they are the flattest models here, although at 20 %
and 40 % noise they generalize worst (on clean labels the three runs are within 0.2 points).
The Hessian of the cross-entropy shrinks as the predictions saturate (its Gauss-Newton part is
weighted by p(1 - p)), so curvature at minima of very different training loss is not
comparable, and flatness alone does not rank generalization (the general point of Dinh et al.,
2017). What does separate them is the width of the basin at a larger scale: along the same
filter-normalized random directions their loss rises more than anyone's (last column, and the
1-D picture), and that rise ranks the three runs as their clean test accuracy does at 20 % and
40 % noise.

**For orientation, the paper** (Foret et al., 2021, Section 4, its Hessian spectra) reports a
top Hessian eigenvalue of about 24 for a WideResNet trained on CIFAR-10 with plain SGD against
about 1.0 with SAM: 24 times smaller. The closest cell here, clean labels at equal epochs,
gives a plain SGD value of the same size (25.0) and a SAM value 5.4 times smaller (4.6). It is
a different model, data set and budget, and the agreement of the plain values is a
coincidence of scale.

**The line between the two minima** (Goodfellow et al., 2015): the training loss at
w(t) = (1 - t) w_plain + t w_SAM, and its highest point between them:

| label noise | seed | loss at t = 0 (plain) | loss at t = 1 (SAM) | highest loss for t in [0, 1] |
|---|---|---|---|---|
{barrier}

**Pictures** ({picture_noise} noise, seed {picture_seed}): the loss along one filter-normalized
random direction (Li et al., 2018; the same seeded direction for every model, rescaled to each
model's filters), with the interpolation from the plain to the SAM model; the loss on a
{grid} x {grid} plane of two such directions (shared logarithmic contour levels); and the top
eigenvalues.

{figures}
{end}
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/results", help="the runs' folder (runs/results)")
    parser.add_argument("--out", default="runs/inspect_results", help="reports' folder")
    parser.add_argument("--docs", default="docs", help="where RESULTS.md and results/ live")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--labels", nargs="+", choices=list(LABELS), default=["plain", "sam", "plain_equal_compute"]
    )
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--probes", type=int, default=50)
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--grid", type=int, default=21)
    parser.add_argument("--picture-noise", type=float, default=0.4)
    parser.add_argument("--picture-seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true", help="measure only")
    args = parser.parse_args()

    reports, lines = measure(args)
    if args.no_docs or not reports:
        return
    docs = Path(args.docs)
    paths = pictures(args, reports, lines, docs)
    write_section(docs / "RESULTS.md", section(args, reports, lines, paths))
    print(f"Written: {docs / 'RESULTS.md'} and {len(paths)} pictures in {docs / 'results'}/")


if __name__ == "__main__":
    main()
