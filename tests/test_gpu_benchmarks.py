"""The GPU benchmarks (benchmarks/full_fashion_mnist.py, vit.py, results_sections.py): their
augmentation, model and budget logic, a smoke run of each, and the RESULTS.md writer."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_sam.datasets import fashion_mnist

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
DATA = fashion_mnist.find_data_dir()
needs_data = pytest.mark.skipif(
    not (Path(DATA) / "train-images-idx3-ubyte.gz").exists()
    and not (Path(DATA) / "train-images-idx3-ubyte").exists(),
    reason="Fashion-MNIST is not installed: `apt-get install dataset-fashion-mnist`",
)

# The scripts are written for a GPU's backends (their docstrings: JAX, or PyTorch): the
# module runs in the PyTorch session alone (tests/conftest.py's `NEUTRAL`).


def _module(name):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def test_augment_crops_the_padded_image_and_flips_it():
    full = _module("full_fashion_mnist")
    rng = np.random.default_rng(0)
    images = rng.random((64, 28, 28, 1)).astype("float32")
    black = (0.0 - full.MEAN) / full.STD

    out = full.augment(images, _Offsets(4, 4, mirror=False))
    np.testing.assert_array_equal(out, images)  # offset = padding: the image itself
    shifted = full.augment(images, _Offsets(0, 8, mirror=False))
    # Offset (0, 8): the image moved down 4 rows and left 4 columns, black where it came from.
    np.testing.assert_array_equal(shifted[:, 4:, :24], images[:, :24, 4:])
    assert np.all(shifted[:, :4] == np.float32(black)) and np.all(shifted[:, :, 24:] == black)
    mirrored = full.augment(images, _Offsets(4, 4, mirror=True))
    np.testing.assert_array_equal(mirrored, images[:, :, ::-1])
    random = full.augment(images, np.random.default_rng(1))
    assert random.shape == images.shape and not np.array_equal(random, images)


class _Offsets:
    def __init__(self, dy, dx, mirror):
        self.values, self.mirror = [dy, dx], mirror

    def integers(self, low, high, n):
        return np.full(n, self.values.pop(0))

    def random(self, n):
        return np.full(n, 0.0 if self.mirror else 0.9)


def test_the_models_have_the_weights_their_formulas_say():
    full = _module("full_fashion_mnist")
    vit = _module("vit")
    # WRN-10-1: one block a stage, widths 16, 32, 64; convolutions without biases.
    convs = 9 * 16 + (9 * 16 * 16 * 2) + (9 * 16 * 32 + 9 * 32 * 32 + 16 * 32)
    convs += 9 * 32 * 64 + 9 * 64 * 64 + 32 * 64
    # Before each block's convolutions and at the end: gamma, beta, mean and variance.
    norms = 4 * ((16 + 16) + (16 + 32) + (32 + 64) + 64)
    wrn = full.wide_resnet(depth=10, widen=1)
    assert wrn.count_params() == convs + norms + 64 * 10 + 10
    assert len(wrn.losses) == 10  # the L2 penalty of every kernel: 9 convolutions, 1 dense
    # ViT: patch embedding, positions, per block 2 norms, attention (4 d^2 + 4 d), MLP.
    d, tokens, blocks = 32, 16, 2
    per_block = 2 * 2 * d + (4 * d * d + 4 * d) + (d * 2 * d + 2 * d + 2 * d * d + d)
    model = vit.vision_transformer(patch=7, dim=d, depth=blocks, heads=2)
    expected = (49 * d + d) + tokens * d + blocks * per_block + 2 * d + d * 10 + 10
    assert model.count_params() == expected
    assert model.output_shape == (None, 10)
    with pytest.raises(ValueError, match="`patch` must divide"):
        vit.vision_transformer(patch=5)


@needs_data
def test_a_spent_budget_skips_every_run_and_still_writes_the_json(tmp_path):
    full = _module("full_fashion_mnist")
    vit = _module("vit")
    out = tmp_path / "full.json"
    full.main(["--smoke", "--budget-seconds", "0", "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert list(runs) == ["sgd", "sam"]
    assert all(r["status"].startswith("skipped") and r["epochs_done"] == 0 for r in runs.values())
    out = tmp_path / "vit.json"
    vit.main(["--smoke", "--budget-seconds", "0", "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert list(runs) == ["noise40/adamw/seed0", "noise40/sam/seed0"]
    assert all(r["status"].startswith("skipped") for r in runs.values())


@pytest.mark.slow
@needs_data
def test_full_fashion_mnist_smoke_trains_both_runs_on_the_same_batches(tmp_path):
    full = _module("full_fashion_mnist")
    out = tmp_path / "full.json"
    record = full.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    sgd, sam = record["runs"]["sgd"], record["runs"]["sam"]
    for run in (sgd, sam):
        assert run["status"] == "complete" and run["epochs_done"] == 2
        assert [e["epoch"] for e in run["history"]] == [1, 2]
        assert run["train_steps"] == 2 * 4  # 256 images in batches of 64
        errors = [e["test_error"] for e in run["history"]]
        assert run["test_error"] == errors[-1] and run["best_test_error"] == min(errors)
        assert all(0 <= e <= 1 and e * 256 == round(e * 256) for e in errors)  # of 256 images
        assert np.isfinite(run["history"][-1]["loss"])
    assert sam["gradient_evaluations"] == 2 * sgd["gradient_evaluations"] == 16
    assert sgd["parameters"] == sam["parameters"]
    assert record["train_examples"] == 256 and record["test_examples"] == 256


@pytest.mark.slow
@needs_data
def test_vit_smoke_trains_on_the_cnn_study_subset_and_measures_the_hessian(tmp_path):
    from keras_sam.cli.training import RunConfig, prepare_data

    vit = _module("vit")
    out = tmp_path / "vit.json"
    record = vit.main(["--smoke", "--out", str(out)])
    runs = record["runs"]
    assert list(runs) == ["noise40/adamw/seed0", "noise40/sam/seed0"]
    for run in runs.values():
        assert run["status"] == "complete" and run["epochs_done"] == 2
        assert run["noise_fraction"] == 0.4 and run["train_examples"] == 200
        assert 0 <= run["final_test_accuracy"] <= run["best_test_accuracy"] <= 1
        assert np.isfinite(run["hessian_top_eigenvalue"]) and run["hessian_examples"] == 50
    assert runs["noise40/sam/seed0"]["rho"] == 0.1
    # A rerun keeps the finished runs instead of training them again.
    again = vit.main(["--smoke", "--out", str(out)])
    assert again["runs"] == json.loads(json.dumps(runs))
    # The subset and its noisy labels are those of keras_sam.cli.training (the CNN's study).
    data = prepare_data(RunConfig(train_size=200, label_noise=0.4, seed=0))
    assert data.noise_fraction == runs["noise40/sam/seed0"]["noise_fraction"]


def test_results_sections_replace_their_own_markers_only(tmp_path):
    sections = _module("results_sections")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nkept text\n")
    history = [{"epoch": 1, "test_accuracy": 0.8, "train_accuracy": 0.5, "loss": 1.0}]
    env = {
        "backend": "jax",
        "keras": "3",
        "devices": ["gpu:0"],
        "started": "now",
        "arguments": {
            "train_size": 2000, "epochs": 40, "batch_size": 128, "lr": 1e-3,
            "warmup_steps": 100, "weight_decay": 0.05, "rho": 0.1, "dtype": "float32",
            "hessian_examples": 500, "hessian_iterations": 20, "patch": 4, "dim": 128,
            "depth": 6,
        },
    }  # fmt: skip

    def run(method, seed, accuracy, top):
        return {
            "noise": 0.4, "method": method, "seed": seed, "status": "complete",
            "epochs_done": 40, "history": history, "final_test_accuracy": accuracy,
            "best_test_accuracy": accuracy + 0.01, "final_train_accuracy": 0.6,
            "hessian_top_eigenvalue": top, "parameters": 1234,
        }  # fmt: skip

    record = {
        "model": "ViT",
        "environment": env,
        "runs": {
            "a": run("adamw", 0, 0.70, 50.0),
            "b": run("adamw", 1, 0.72, 60.0),
            "c": run("sam", 0, 0.80, 5.0),
            "d": run("sam", 1, 0.82, 7.0),
        },
    }
    path = tmp_path / "vit.json"
    path.write_text(json.dumps(record))
    sections.main(["--vit", str(path), "--results", str(results)])
    text = results.read_text()
    assert text.startswith("# Results\n\nkept text\n")
    assert "| 40 % | AdamW | 2 | 71.00 ± 1.41 | 72.00 ± 1.41 | 60.00 ± 0.00 | 55.0 ± 7.1 |" in text
    assert "| 40 % | SAM(AdamW) | 2 | 81.00 ± 1.41 |" in text
    assert "- 40 % label noise: ViT +10.00 (per seed: +10.00, +10.00), CNN +16.46." in text
    # Written again, the section is replaced, not added.
    record["runs"]["d"]["final_test_accuracy"] = 0.84
    path.write_text(json.dumps(record))
    sections.main(["--vit", str(path), "--results", str(results)])
    text = results.read_text()
    assert text.count("<!-- vit-p4-d128-l6: start") == 1
    assert "ViT +11.00 (per seed: +10.00, +12.00)" in text
    # Another shape gets a section of its own; a seed without its AdamW run has no pair.
    record["environment"]["arguments"]["patch"] = 7
    del record["runs"]["a"]
    other = tmp_path / "vit_p7.json"
    other.write_text(json.dumps(record))
    sections.main(["--vit", str(path), str(other), "--results", str(results)])
    text = results.read_text()
    assert text.count("<!-- vit-p4-d128-l6: start") == text.count("<!-- vit-p7-d128-l6: end") == 1
    assert "ViT +10.00 (per seed: +12.00)" in text  # means 82 - 72; seed 1 alone paired: 84 - 72


def test_full_section_reports_the_epochs_training_time_together():
    """`fit` runs once per epoch there, and each call starts the callback's clock again: the
    run's training time is its epochs' summed, not the last epoch's."""
    sections = _module("results_sections")
    args = {
        "epochs": 2, "batch_size": 256, "momentum": 0.9, "lr": 0.1, "weight_decay": 5e-4,
        "augment": True, "dtype": "bfloat16", "rho": 0.05, "seed": 0,
    }  # fmt: skip
    history = [
        {"epoch": 1, "train_seconds": 15.5, "test_error": 0.2},
        {"epoch": 2, "train_seconds": 1.25, "test_error": 0.1},
    ]
    run = {"status": "complete", "epochs_done": 2, "history": history, "train_seconds": 1.25,
           "test_error": 0.1, "best_test_error": 0.1, "parameters": 10}  # fmt: skip
    record = {
        "model": "WRN", "train_examples": 60000, "test_examples": 10000, "runs": {"sgd": run},
        "environment": {"backend": "jax", "keras": "3", "started": "now", "arguments": args},
    }  # fmt: skip
    text = sections.full_section(record, "one GPU")
    assert "| 16.8 (15.5) |" in text
    assert _module("full_fashion_mnist").total_train_seconds(run) == 16.75
