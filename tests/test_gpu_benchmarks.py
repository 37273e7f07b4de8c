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


def test_augment_is_the_official_flip_then_reflect_pad_and_crop():
    full = _module("full_fashion_mnist")
    rng = np.random.default_rng(0)
    images = rng.random((64, 28, 28, 1)).astype("float32")

    out = full.augment(images, _Offsets(4, 4, mirror=False))
    np.testing.assert_array_equal(out, images)  # offset = padding: the image itself
    shifted = full.augment(images, _Offsets(0, 8, mirror=False))
    # Offset (0, 8): the image moved down 4 rows and left 4 columns; the rows above it are
    # its rows 4, 3, 2, 1 (REFLECT: the edge row is not repeated), as TensorFlow's pad.
    np.testing.assert_array_equal(shifted[:, 4:, :24], images[:, :24, 4:])
    np.testing.assert_array_equal(shifted[:, :4, :24], images[:, [4, 3, 2, 1], 4:])
    np.testing.assert_array_equal(shifted[:, 4:, 24:], images[:, :24, [26, 25, 24, 23]])
    mirrored = full.augment(images, _Offsets(4, 4, mirror=True))
    np.testing.assert_array_equal(mirrored, images[:, :, ::-1])
    # The flip comes first (weak_image_augmentation): the crop is of the mirrored image.
    both = full.augment(images, _Offsets(0, 8, mirror=True))
    np.testing.assert_array_equal(both[:, 4:, :24], images[:, :24, ::-1][:, :, 4:])
    random = full.augment(images, np.random.default_rng(1))
    assert random.shape == images.shape and not np.array_equal(random, images)


class _Offsets:
    def __init__(self, dy, dx, mirror):
        self.values, self.mirror = [dy, dx], mirror

    def integers(self, low, high, n):
        return np.full(n, self.values.pop(0))

    def random(self, n):
        return np.full(n, 0.0 if self.mirror else 0.9)


def test_cutout_is_one_square_per_batch_clipped_at_the_border():
    full = _module("full_fashion_mnist")
    images = np.ones((6, 28, 28, 1), "float32")
    centres = iter([10, 20, 0, 27])  # (cy, cx) of the first batch, then the second

    class Centres:
        def integers(self, low, high):
            assert (low, high) == (0, 28)
            return next(centres)

    out = full.cutout(images, Centres(), batch_size=4, length=16)
    expected = np.ones_like(images)
    expected[:4, 2:18, 12:28] = 0.0  # rows [10 - 8, 10 + 8), columns [20 - 8, 28)
    expected[4:, 0:8, 19:28] = 0.0  # the second batch (2 images): its own square
    np.testing.assert_array_equal(out, expected)
    assert np.all(images == 1.0)  # a copy


def test_an_epoch_s_batches_are_a_function_of_seed_and_epoch_alone():
    full = _module("full_fashion_mnist")
    x = np.random.default_rng(0).random((100, 28, 28, 1)).astype("float32")
    y = np.arange(100, dtype="int32")
    a = full.epoch_data(x, y, seed=3, epoch=5, batch_size=32, augmentation="basic", cut=True)
    b = full.epoch_data(x, y, seed=3, epoch=5, batch_size=32, augmentation="basic", cut=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (96, 28, 28, 1) and len(set(a[1].tolist())) == 96  # no partial batch
    plain = full.epoch_data(x, y, seed=3, epoch=5, batch_size=32, augmentation="none")
    np.testing.assert_array_equal(plain[0], x[plain[1]])  # the labels follow their images
    other = full.epoch_data(x, y, seed=3, epoch=6, batch_size=32)
    assert not np.array_equal(other[1], a[1])
    assert not np.array_equal(full.epoch_data(x, y, 4, 5, 32)[1], a[1])


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
    assert wrn.losses == []
    # The official code's weight decay: every trainable weight, BatchNorm's included.
    full.decay_every_weight(wrn, 5e-4)
    assert len(wrn.losses) == len(wrn.trainable_variables) == 9 + 2 * 7 + 2
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
    assert list(runs) == ["sgd/seed0", "sam/seed0"]
    assert all(r["status"].startswith("not finished") for r in runs.values())
    assert all(r["epochs_done"] == 0 for r in runs.values())
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
    sgd, sam = record["runs"]["sgd/seed0"], record["runs"]["sam/seed0"]
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


# A tiny CNN on 64 images, batches of 32: 2 steps an epoch, with basic augmentation, cutout
# and BatchNorm, so that data order, augmentation, moving statistics, momentum, the
# schedule's position and SAM's counters all have to come back for the weights to match.
TINY = [
    "--model", "cnn", "--width", "2", "--batch-norm", "--train-size", "64",
    "--test-size", "32", "--batch-size", "32", "--epochs", "3", "--seeds", "0",
    "--cutout",
]  # fmt: skip


def _checkpoint(full, out, key):
    with np.load(full.checkpoint_path(out, key)) as data:
        return {name: data[name] for name in data.files if name != "run"}, json.loads(
            str(data["run"])
        )


@pytest.mark.slow
@needs_data
def test_a_run_resumed_after_2_epochs_is_bitwise_the_3_epoch_run(tmp_path):
    full = _module("full_fashion_mnist")
    straight, resumed = tmp_path / "straight.json", tmp_path / "resumed.json"
    full.main([*TINY, "--out", str(straight)])
    first = full.main([*TINY, "--out", str(resumed), "--until-epoch", "2"])
    assert all(r["status"].startswith("paused after epoch 2") for r in first["runs"].values())
    assert all(r["epochs_done"] == 2 for r in first["runs"].values())
    second = full.main([*TINY, "--out", str(resumed)])  # a fresh model and optimizer
    assert [s["epochs_trained"] for s in second["sittings"]] == [4, 2]  # 2 runs x (2, 1)
    for key in ("sgd/seed0", "sam/seed0"):
        expected, expected_run = _checkpoint(full, straight, key)
        got, got_run = _checkpoint(full, resumed, key)
        assert sorted(got) == sorted(expected)
        for name in expected:  # weights, BatchNorm statistics, optimizer slots, iterations
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{key} {name}")
        assert got_run["status"] == "complete" and got_run["sittings"] == 2
        for a, b in zip(got_run["history"], expected_run["history"], strict=True):
            assert a["loss"] == b["loss"] and a.get("test_error") == b.get("test_error")
    iterations = json.loads(str(got["names"]))[1].index("iteration", 1)  # SGD's, after SAM's
    assert int(got[f"optimizer_{iterations}"]) == 3 * 2  # 3 epochs of 2 steps
    # Another protocol onto the same JSON is refused rather than mixed in.
    with pytest.raises(SystemExit, match="another protocol"):
        full.main([*TINY, "--out", str(resumed), "--rho", "0.1"])


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


def _full_record(errors, epochs=30):
    """A JSON of full_fashion_mnist.py: `errors` maps (method, seed) to the test error of
    each finished epoch; a run with fewer than `epochs` is unfinished."""
    runs = {}
    for (method, seed), history in errors.items():
        done = len(history)
        runs[f"{method}/seed{seed}"] = {
            "method": method, "seed": seed, "epochs": epochs, "epochs_done": done,
            "status": "complete" if done == epochs else "running",
            "history": [{"epoch": i + 1, "test_error": e} for i, e in enumerate(history)],
            "test_error": history[-1], "best_test_error": min(history),
            "train_seconds": 60.0 * done, "parameters": 421642,
        }  # fmt: skip
    protocol = {
        "model": "cnn", "depth": 16, "widen": 4, "width": 32, "batch_norm": False,
        "epochs": epochs, "batch_size": 256, "lr": 0.1, "momentum": 0.9, "nesterov": True,
        "clip_norm": 5.0, "weight_decay": 5e-4, "rho": 0.05, "augment": "basic",
        "cutout": False, "cutout_length": 16, "train_size": 0, "test_size": 0,
        "dtype": "float32",
    }  # fmt: skip
    sitting = {
        "backend": "tensorflow", "keras": "3", "devices": ["cpu:0"], "cpu_cores_allowed": 1,
        "started": "then", "arguments": {"seeds": [0, 1], "methods": ["sgd", "sam"]},
    }  # fmt: skip
    return {
        "model": "CNN", "protocol": protocol, "train_examples": 60000, "test_examples": 10000,
        "steps_per_epoch": 234, "sittings": [sitting], "runs": runs,
    }  # fmt: skip


def test_the_full_section_sets_sam_against_sgd_beside_the_paper_and_labels_partial_runs(
    tmp_path,
):
    sections = _module("results_sections")
    full = _module("full_fashion_mnist")
    assert sections.PAPER_TABLE5 == full.PAPER_TABLE5
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n")
    path = tmp_path / "cpu.json"
    # Seed 0 complete; seed 1: SGD complete, SAM 2 epochs in.
    record = _full_record(
        {
            ("sgd", 0): [0.2, 0.1] + [0.090] * 28,
            ("sam", 0): [0.3, 0.1] + [0.085] * 28,
            ("sgd", 1): [0.2, 0.1] + [0.092] * 28,
            ("sam", 1): [0.3, 0.12],
        }
    )
    path.write_text(json.dumps(record))
    sections.main(["--full", str(path), "--results", str(results)])
    text = results.read_text()
    assert "<!-- full_fashion_mnist-cnn32-basic: start" in text
    assert "CPU scale, not the paper's scale" in text
    assert "**Partial results:** 3 of 4 runs complete" in text
    assert "| SGD | 2 of 2 | 9.10 ± 0.14 | 9.00, 9.20 | 9.10 ± 0.14 | 30 min |" in text
    assert "| SAM(SGD) | 1 of 2 | 8.50 | 8.50 | 8.50 | 30 min |" in text
    assert "**SAM - SGD** in final test error (points; negative: SAM better): -0.60 " in text
    assert "per seed, the same start and batches: -0.50)" in text
    assert "One seed a method: no spread" in text
    assert "| SAM(SGD) | 1 | running | 2 of 30 | 12.00 | 60 |" in text
    assert (
        "- Seed 1 at epoch 2 of 30 (mid-schedule, not final): SGD 10.00 %, SAM(SGD) 12.00 %" in text
    )
    assert "| WRN-28-10 | basic | 4.57 ± 0.07 | 3.98 ± 0.05 | -0.59 |" in text
    # Complete: no partial label; the gap against the seeds' spread; a run not started yet
    # (planned by the sitting's --seeds) counts as not complete.
    record["runs"]["sam/seed1"] = _full_record({("sam", 1): [0.3] + [0.087] * 29})["runs"][
        "sam/seed1"
    ]
    path.write_text(json.dumps(record))
    sections.main(["--full", str(path), "--results", str(results)])
    text = results.read_text()
    assert text.count("<!-- full_fashion_mnist-cnn32-basic: start") == 1
    assert "Partial" not in text and "Every run, as far" not in text
    assert (
        "-0.50 (difference of the means; per seed, the same start and batches: -0.50, -0.50)"
        in text
    )
    assert "SAM is below SGD by more than the seeds' spread (0.14)." in text
    record["sittings"][0]["arguments"]["seeds"] = [0, 1, 2]
    path.write_text(json.dumps(record))
    sections.main(["--full", str(path), "--results", str(results)])
    assert "| SGD | 2 of 3 |" in results.read_text()
    # The first version's JSON keeps its own section.
    sections.main(["--full", str(BENCHMARKS.parent / "docs/results/gpu/full_fashion_mnist.json"),
                   "--results", str(results)])  # fmt: skip
    assert "<!-- full_fashion_mnist: start" in results.read_text()
