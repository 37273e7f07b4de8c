"""Tables and pictures for training runs: Markdown and PNG (matplotlib, no display)."""

from pathlib import Path

import numpy as np

from keras_sam import files


def run_label(name):
    return name.replace("_", " ")


def comparison_table(runs):
    """A Markdown table, one row per run: `runs` maps a label to (config, history).

    The cost columns keep training and evaluation apart: `gradient evaluations` counts
    the forward-backward passes over a batch that training took (SAM: two a step), `train
    s` and `train CPU s` are the wall-clock and process CPU seconds spent in `fit`
    without the evaluations, and `eval s` the seconds spent measuring test accuracy and
    sharpness, which every run pays alike.
    """
    lines = [
        "| run | epochs | gradient evaluations | train s | train CPU s | eval s "
        "| final clean test acc. | best clean test acc. | final train acc. (noisy labels) "
        "| first-order sharpness | top Hessian eigenvalue |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, (config, history) in runs.items():
        lines.append(
            f"| {run_label(label)} | {config.epochs} | {history['gradient_evaluations'][-1]:,} "
            f"| {_seconds(history, 'train_seconds')} | {_seconds(history, 'train_cpu_seconds')} "
            f"| {_seconds(history, 'eval_seconds')} "
            f"| {100 * history['test_accuracy'][-1]:.2f} % "
            f"| {100 * max(history['test_accuracy']):.2f} % "
            f"| {100 * history['accuracy'][-1]:.2f} % "
            f"| {history['measured_sharpness'][-1]:.4f} "
            f"| {_top_eigenvalue(history)} |"
        )
    return "\n".join(lines) + "\n"


def _seconds(history, key):
    """The last value of a cumulative time, or n/a for runs recorded before it existed."""
    values = history.get(key)
    return f"{values[-1]:.1f}" if values else "n/a"


def _top_eigenvalue(history):
    """The last measured top Hessian eigenvalue, or n/a when none was measured."""
    values = [v for v in history.get("hessian_top_eigenvalue") or () if v is not None]
    return f"{values[-1]:.2f}" if values else "n/a"


def comparison_plots(runs, out_dir, title=""):
    """Writes `test_accuracy.png` and `sharpness.png` into `out_dir`; returns the paths.

    Each has the quantity against epochs and against gradient evaluations. `sharpness.png`
    shows the first-order sharpness, and beside it, when any run measured it, a bar per run
    of the top Hessian eigenvalue of its final weights.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    eigenvalues = {label: _top_eigenvalue(history) for label, (_, history) in runs.items()}
    eigenvalues = {label: float(v) for label, v in eigenvalues.items() if v != "n/a"}
    for key, ylabel, name in [
        ("test_accuracy", "clean test accuracy", "test_accuracy.png"),
        ("measured_sharpness", "first-order sharpness L(w+e) - L(w), rho=0.05", "sharpness.png"),
    ]:
        bars = key == "measured_sharpness" and eigenvalues
        fig = plt.figure(figsize=(16 if bars else 11, 4))
        grid = fig.add_gridspec(1, 3 if bars else 2)
        axes = [fig.add_subplot(grid[0, 0])]
        axes.append(fig.add_subplot(grid[0, 1], sharey=axes[0]))
        for label, (_, history) in runs.items():
            values = np.asarray(history[key], dtype=float)
            axes[0].plot(history["epoch"], values, marker="o", markersize=3, label=run_label(label))
            axes[1].plot(
                history["gradient_evaluations"],
                values,
                marker="o",
                markersize=3,
                label=run_label(label),
            )
        axes[0].set_xlabel("epoch")
        axes[1].set_xlabel("gradient evaluations (forward-backward passes over a batch)")
        axes[0].set_ylabel(ylabel)
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[1].legend()
        if bars:
            ax = fig.add_subplot(grid[0, 2])
            labels = [run_label(label) for label in eigenvalues]
            colors = [f"C{i}" for i, label in enumerate(runs) if label in eigenvalues]
            ax.bar(labels, list(eigenvalues.values()), color=colors)
            for i, value in enumerate(eigenvalues.values()):
                ax.annotate(f"{value:.2f}", (i, value), ha="center", va="bottom")
            ax.set_ylabel("top Hessian eigenvalue, final weights")
            ax.tick_params(axis="x", labelrotation=15)
            ax.grid(alpha=0.3, axis="y")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path = out_dir / name
        try:
            files.save_figure(fig, path, dpi=100)
        finally:
            plt.close(fig)
        paths.append(path)
    return paths
