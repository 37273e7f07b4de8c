"""Inspecting trained models: the engine behind `keras-sam inspect` and `compare --inspect`.

`inspect_model` runs every diagnostic on one model and returns a JSON-ready report:
loss and accuracy, sharpness (first-order, m-sharpness, multi-step ascent), the top
Hessian eigenvalues, the Hessian trace with its standard error, and the loss landscape
along one and two filter-normalized random directions. `plot_reports` draws one or
several reports side by side on the same axes and scales: `landscape_1d.png`,
`landscape_2d.png` and `spectrum.png`.
"""

import dataclasses
import time
import warnings
from pathlib import Path

import numpy as np

from keras_sam import files
from keras_sam.cli import options


@options.declared(options.INSPECT_OPTIONS)
class InspectSettings:
    """What `inspect_model` measures, and how much it spends on it: the fields of
    `options.INSPECT_OPTIONS`, with their defaults and rules (`rho`: the sharpness radius;
    `m`: the m-sharpness sub-batch size; `ascent_steps`: of the multi-step sharpness; `k`:
    the top Hessian eigenvalues, by Lanczos with at most `max_iterations` iterations and
    relative residual `tol`; `probes`: Hutchinson probes for the trace; `line_points`,
    `grid` and `span`: the 1-D and 2-D landscapes' points in [-span, span]; `seed`: the
    directions, probes and the Lanczos start)."""

    def __post_init__(self):
        options.validate(options.INSPECT_OPTIONS, self)


def load_model(path):
    """Loads a `.keras` model (keras_sam's classes registered); clear errors otherwise.

    The file is checked to be a Keras model archive (a zip file holding the model's
    `config.json`, as `model.save("x.keras")` writes) before Keras, and so TensorFlow, is
    imported: a wrong file is refused at once.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is not a Keras model archive, or Keras cannot load it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    problem = archive_problem(path)
    if problem:
        raise ValueError(f"{path} is not a Keras model archive: {problem}")
    import keras

    import keras_sam.methods.sam  # noqa: F401  (registers SAM)
    import keras_sam.trainers.sam_model  # noqa: F401  (registers SAMModel)

    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for a damaged archive
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"could not load {path} as a Keras model archive ({reason[:200]})"
        ) from None
    return model


def archive_problem(path):
    """Why the file at `path` is not a Keras model archive, or `None` if it looks like one.

    Reads only the file (no Keras import): the name must end in `.keras`, and the file must
    be an intact zip archive that holds `config.json`.
    """
    import zipfile

    path = Path(path)
    if path.suffix != ".keras":
        return (
            "the name does not end in .keras (save models with model.save('model.keras'); "
            "this command reads that format only)"
        )
    if not zipfile.is_zipfile(path):
        return "it is not a zip file, which a .keras file written by model.save() is"
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"the zip file is damaged ({error})"
    if damaged is not None:
        return f"the zip file is damaged (a bad checksum in {damaged})"
    if "config.json" not in names:
        return "the zip file holds no config.json, which every .keras model archive has"
    return None


def default_loss(model):
    """The model's compiled loss, else sparse categorical cross-entropy (on logits,
    unless the last layer applies a softmax)."""
    import keras

    compiled = getattr(model, "loss", None)
    if compiled is not None and not isinstance(compiled, (list, tuple, dict)):
        return keras.losses.get(compiled)
    activation = getattr(model.layers[-1], "activation", None) if model.layers else None
    from_logits = getattr(activation, "__name__", "") != "softmax"
    return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)


def measured_data(model_path, split, examples, seed, data_dir=None):
    """`keras-sam inspect`'s examples to measure on, and a sentence saying what they are:
    `examples` (0: all) of the `split` of Fashion-MNIST, a random subset drawn with `seed`;
    the training set of the run whose config.json lies next to `model_path`, when there is
    one and `split` is "train"."""
    import json

    from keras_sam.cli.training import RunConfig, prepare_data

    config_path = model_path.parent / "config.json"
    run = None
    if split == "train" and config_path.is_file():
        try:
            saved = json.loads(config_path.read_text())
            fields = {f.name for f in dataclasses.fields(RunConfig)}
            run = RunConfig(**{k: v for k, v in saved.items() if k in fields})
        except (json.JSONDecodeError, TypeError, ValueError):
            run = None
    if run is not None:
        data = prepare_data(run, data_dir)
        x, y = data.x_train, data.y_train
        where = (
            f"the run's training set ({len(y):,} examples, seed {run.seed}, "
            f"{100 * data.noise_fraction:.0f} % labels flipped as trained)"
        )
    else:
        data = prepare_data(RunConfig(train_size=0, seed=seed), data_dir)
        x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
        where = f"Fashion-MNIST {split} set (clean labels)"
    count = len(y) if examples == 0 else min(examples, len(y))
    if count < len(y):
        keep = np.random.default_rng(seed).permutation(len(y))[:count]
        x, y = x[keep], y[keep]
        where += f", a random subset of {count:,} (seed {seed})"
    return x, y, f"measured on {where}"


def inspect_model(model, x, y, loss, settings=None, verbose=1, log=print):
    """Runs every diagnostic on `model` over `(x, y)`; returns a JSON-ready dict."""
    from keras_sam import diagnostics

    s = settings or InspectSettings()
    quiet = 0 if verbose == 0 else 2 if verbose == 2 else 1
    seconds = {}

    objective = diagnostics.Objective(model, x, y, loss=loss, batch_size=s.batch_size)

    def timed(name, diagnostic, **kwargs):
        """`diagnostic(objective, **kwargs)`, its seconds recorded."""
        log(f"  {name} ...")
        start = time.perf_counter()
        result = diagnostic(objective, **kwargs)
        seconds[name] = round(time.perf_counter() - start, 2)
        return result

    report = {"parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables))}
    at_weights = diagnostics.loss_landscape(objective, coordinates=[0.0], verbose=0)
    report["loss"] = float(at_weights["loss"][0])
    report["accuracy"] = (
        None if at_weights["accuracy"] is None else float(at_weights["accuracy"][0])
    )
    report["sharpness"] = _sharpness_report(timed, s)
    axis = np.linspace(-s.span, s.span, s.line_points)
    line = timed("landscape (1-D)", diagnostics.loss_landscape, coordinates=axis, seed=s.seed,
                 verbose=quiet)  # fmt: skip
    report["hessian"] = _hessian_report(timed, s, quiet, log)
    axis = np.linspace(-s.span, s.span, s.grid)
    plane = timed("landscape (2-D)", diagnostics.loss_landscape, dimensions=2,
                  coordinates=axis, seed=s.seed, verbose=quiet)  # fmt: skip
    report["landscape"] = {
        "normalization": "filter",
        "seed": s.seed,
        "line": _landscape_json(line),
        "plane": _landscape_json(plane),
    }
    report["seconds"] = seconds
    return report


def _sharpness_report(timed, s):
    """First-order, m- and multi-step sharpness at `s.rho` (`timed`: `inspect_model`'s)."""
    from keras_sam import diagnostics

    first = timed("sharpness", diagnostics.sharpness, rho=s.rho)
    m_sharp = timed("m-sharpness", diagnostics.sharpness, rho=s.rho, m=s.m)
    multi = timed(
        "multi-step sharpness", diagnostics.sharpness, rho=s.rho, ascent_steps=s.ascent_steps
    )
    return {
        "rho": s.rho,
        "first_order": first["sharpness"],
        "m": s.m,
        "m_sharpness": m_sharp["sharpness"],
        "ascent_steps": s.ascent_steps,
        "multi_step": multi["sharpness"],
    }


def _hessian_report(timed, s, quiet, log):
    """The top `s.k` Hessian eigenvalues (Lanczos; whether they converged) and the trace
    (Hutchinson, `s.probes` probes, with its standard error)."""
    from keras_sam import diagnostics

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        eigenvalues = timed(
            "Hessian eigenvalues",
            diagnostics.hessian_eigenvalues,
            k=s.k,
            max_iterations=s.max_iterations,
            tol=s.tol,
            seed=s.seed,
            verbose=quiet,
        )
    converged = not any("did not reach" in str(w.message) for w in caught)
    if not converged:
        log(f"  note: Lanczos did not reach tol={s.tol:g} in {s.max_iterations} iterations")
    trace = timed(
        "Hessian trace", diagnostics.hessian_trace, num_probes=s.probes, seed=s.seed, verbose=quiet
    )
    return {
        "top_eigenvalues": [float(v) for v in eigenvalues],
        "eigenvalues_converged": converged,
        "trace": trace["trace"],
        "trace_standard_error": trace["standard_error"],
        "probes": s.probes,
    }


def _landscape_json(result):
    coordinates = result["coordinates"]
    if isinstance(coordinates, tuple):
        coordinates = [np.asarray(c).tolist() for c in coordinates]
    else:
        coordinates = np.asarray(coordinates).tolist()
    accuracy = result["accuracy"]
    return {
        "coordinates": coordinates,
        "loss": np.asarray(result["loss"]).tolist(),
        "accuracy": None if accuracy is None else np.asarray(accuracy).tolist(),
    }


def write_json(report, path):
    """Writes `report` as JSON to `path` atomically (creating its folder)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, report)


def plot_reports(reports, out_dir, title="", prefix="", interpolation=None):
    """Draws the reports (`label -> report`) side by side on shared axes and scales.

    Writes `{prefix}landscape_1d.png` (every model's curve on one axes; with
    `interpolation`, a second panel with the loss on the line between two models),
    `{prefix}landscape_2d.png` (one contour panel per model, same levels) and
    `{prefix}spectrum.png` (top eigenvalues, log scale). Returns the paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _plot_line(reports, interpolation, title, out_dir / f"{prefix}landscape_1d.png", plt),
        _plot_plane(reports, title, out_dir / f"{prefix}landscape_2d.png", plt),
        _plot_spectrum(reports, title, out_dir / f"{prefix}spectrum.png", plt),
    ]


def _plot_line(reports, interpolation, title, path, plt):
    """Every model's loss (and accuracy) along the first direction; with `interpolation`,
    the loss on the line between two models."""
    labels = list(reports)
    panels = 2 if interpolation is None else 3
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4), layout="constrained")
    for label in labels:
        line = reports[label]["landscape"]["line"]
        axes[0].plot(line["coordinates"], line["loss"], label=label)
        if line["accuracy"] is not None:
            axes[1].plot(line["coordinates"], 100 * np.asarray(line["accuracy"]), label=label)
    axes[0].set_ylabel("loss")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("accuracy (%)")
    for ax in axes[:2]:
        ax.set_xlabel("step along a filter-normalized random direction")
        ax.grid(alpha=0.3)
        ax.legend()
    if interpolation is not None:
        names, result = interpolation
        axes[2].plot(result["coordinates"], result["loss"], color="black")
        axes[2].set_yscale("log")
        axes[2].axvline(0, color="grey", lw=0.8)
        axes[2].axvline(1, color="grey", lw=0.8)
        axes[2].set_xlabel(f"t: (1 - t) {names[0]} + t {names[1]}")
        axes[2].set_ylabel("loss")
        axes[2].grid(alpha=0.3)
        _plain_log_axis(axes[2].yaxis)
    _plain_log_axis(axes[0].yaxis)
    _fit_title(fig, title)
    return _save(fig, path, plt)


def _plot_plane(reports, title, path, plt):
    """One contour panel per model, on shared log-spaced levels."""
    import matplotlib

    labels = list(reports)
    planes = [reports[label]["landscape"]["plane"] for label in labels]
    low = max(min(float(np.min(p["loss"])) for p in planes), 1e-4)
    high = max(float(np.max(p["loss"])) for p in planes)
    levels = np.geomspace(low, max(high, low * 1.01), 16)
    fig, axes = plt.subplots(
        1, len(labels), figsize=(4.6 * len(labels) + 1, 4.2), squeeze=False, layout="constrained"
    )
    norm = matplotlib.colors.LogNorm(vmin=levels[0], vmax=levels[-1])
    for ax, label, plane in zip(axes[0], labels, planes):
        a, b = (np.asarray(c) for c in plane["coordinates"])
        loss = np.clip(np.asarray(plane["loss"]).T, levels[0], levels[-1])
        filled = ax.contourf(a, b, loss, levels=levels, norm=norm, cmap="viridis")
        ax.contour(a, b, loss, levels=levels, colors="white", linewidths=0.4)
        ax.plot([0], [0], marker="+", color="red")
        ax.set_title(label)
        ax.set_xlabel("direction 1")
        ax.set_aspect("equal")
    axes[0][0].set_ylabel("direction 2")
    bar = fig.colorbar(filled, ax=axes[0].tolist(), label="loss (log scale)", ticks=levels[::3])
    bar.ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_plain_number))
    bar.ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    _fit_title(fig, title)
    return _save(fig, path, plt)


def _plot_spectrum(reports, title, path, plt):
    """The top eigenvalues of each model, and its trace in the legend."""
    import matplotlib

    labels = list(reports)
    fig, ax = plt.subplots(figsize=(7, 4.4), layout="constrained")
    everything = []
    for label in labels:
        hessian = reports[label]["hessian"]
        values = np.asarray(hessian["top_eigenvalues"])
        everything.extend(values)
        ax.plot(
            np.arange(1, len(values) + 1),
            values,
            marker="o",
            label=f"{label}: trace {hessian['trace']:.1f} ± {hessian['trace_standard_error']:.1f}",
        )
    if min(everything) > 0:
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
    else:  # negative eigenvalues (away from a minimum): linear near zero
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_plain_number))
    ax.set_xlabel("rank")
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_xticks(
        np.arange(1, max(len(reports[k]["hessian"]["top_eigenvalues"]) for k in labels) + 1)
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _fit_title(fig, title)
    return _save(fig, path, plt)


TITLE_FONT_SIZE = 10


def _fit_title(fig, title):
    """A figure title wrapped to the figure's width (the figure's layout must be constrained,
    so that the wrapped lines get the room they need above the panels)."""
    if not title:
        return
    import textwrap

    # About 0.6 of the font size per character, in points; 72 points an inch.
    width = int(fig.get_figwidth() * 72 / (0.6 * TITLE_FONT_SIZE))
    fig.suptitle(textwrap.fill(title, width=width), fontsize=TITLE_FONT_SIZE)


def _plain_number(value, _position=None):
    """A tick label as a plain decimal number ("0.001", "20"), never as a power of ten."""
    if value == 0:
        return "0"
    return np.format_float_positional(float(f"{value:.3g}"), trim="-")


def _plain_log_axis(axis):
    """Labels a log-scaled axis with plain numbers; with less than about two decades in view,
    also at 2 and 5 times the powers of ten, so that a short axis still gets labels."""
    import matplotlib.ticker as ticker

    limits = axis.axes.get_ylim() if axis is axis.axes.yaxis else axis.axes.get_xlim()
    low, high = sorted(abs(v) for v in limits)
    decades = np.log10(high / low) if low > 0 else np.inf
    subs = (1.0,) if decades > 2.5 else (1.0, 2.0, 5.0) if decades > 0.8 else np.arange(1, 10)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(_plain_number))
    axis.set_minor_formatter(ticker.NullFormatter())


def _save(fig, path, plt):
    try:
        files.save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)
    return path


def summary_lines(label, report):
    """A few human-readable lines for the terminal."""
    h, s = report["hessian"], report["sharpness"]
    accuracy = report["accuracy"]
    acc = "n/a" if accuracy is None else f"{100 * accuracy:.2f} %"
    return [
        f"{label}: loss {report['loss']:.4f}, accuracy {acc}",
        f"  sharpness (rho={s['rho']:g}): first-order {s['first_order']:.4f}, "
        f"m={s['m']} {s['m_sharpness']:.4f}, {s['ascent_steps']}-step {s['multi_step']:.4f}",
        "  top Hessian eigenvalues: " + ", ".join(f"{v:.3g}" for v in h["top_eigenvalues"]),
        f"  Hessian trace: {h['trace']:.4g} ± {h['trace_standard_error']:.2g} "
        f"({h['probes']} probes)",
    ]
