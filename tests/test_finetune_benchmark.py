"""benchmarks/finetune.py: its table's arithmetic on a record written by hand, the adapters it
enables, and a `--quick` run end to end (JSON and table shape, sane numbers)."""

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


def _finetune():
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("finetune")


def _run(method, condition, seed, accuracy, seconds):
    return {
        "method": method,
        "condition": condition,
        "seed": seed,
        "status": "complete",
        "test_accuracy": accuracy,
        "seconds_per_step": seconds,
    }


def test_the_table_s_gain_fraction_and_ratios_are_what_the_runs_say():
    finetune = _finetune()
    methods = ["adamw-lora", "sam-lora", "flat-lora", "adamw-full"]
    runs = {}
    # Seed 0 then seed 1: AdamW-LoRA 0.70 and 0.72, SAM 0.80 and 0.82 (a gain of 0.10),
    # Flat-LoRA 0.79 and 0.79 (0.08: 80 % of it), full fine-tuning 0.90 twice.
    for seed, shift, slow in ((0, 0.0, 1.0), (1, 0.02, 2.0)):
        runs |= {
            f"clean/adamw-lora/seed{seed}": _run("adamw-lora", "clean", seed, 0.70 + shift, slow),
            f"clean/sam-lora/seed{seed}": _run("sam-lora", "clean", seed, 0.80 + shift, 2 * slow),
            f"clean/flat-lora/seed{seed}": _run("flat-lora", "clean", seed, 0.79, 1.05 * slow),
            f"clean/adamw-full/seed{seed}": _run("adamw-full", "clean", seed, 0.90, 0.5 * slow),
        }
    runs["clean/flat-lora/seed1"]["seconds_per_step"] = 2.3  # 1.15x seed 1's AdamW-LoRA
    memory = {
        "adamw-lora": {"peak_bytes": 100 * 2**20},
        "sam-lora": {"peak_bytes": 150 * 2**20},
        "flat-lora": {"peak_bytes": 105 * 2**20, "peak_before_fit_bytes": 90 * 2**20},
    }
    record = {
        "protocol": {"conditions": ["clean"], "methods": methods},
        "runs": runs,
        "memory": memory,
    }
    table = finetune.summarize(record)
    flat = table["clean|flat-lora"]
    assert flat["runs"] == 2
    assert flat["accuracy"] == pytest.approx(0.79) and flat["accuracy_std"] == pytest.approx(0)
    assert flat["gain"] == pytest.approx(0.79 - 0.71)
    assert flat["fraction_of_sam_gain"] == pytest.approx(0.08 / 0.10)
    # The time ratio is per seed (the seed's runs are interleaved), then averaged.
    assert flat["time_ratio"] == pytest.approx((1.05 + 1.15) / 2)
    assert flat["memory_ratio"] == pytest.approx(1.05) and flat["peak_mb"] == pytest.approx(105)
    assert flat["fit_added_mb"] == pytest.approx(15)
    sam = table["clean|sam-lora"]
    assert sam["fraction_of_sam_gain"] == pytest.approx(1.0)
    assert sam["time_ratio"] == pytest.approx(2.0) and sam["memory_ratio"] == pytest.approx(1.5)
    assert sam["accuracy_std"] == pytest.approx(np.std([0.80, 0.82], ddof=1))
    assert table["clean|adamw-lora"]["gain"] == 0.0
    assert "memory_ratio" not in table["clean|adamw-full"]  # not measured


def test_a_missing_method_is_a_row_that_says_so_and_the_goal_is_judged():
    finetune = _finetune()
    methods = ["adamw-lora", "sam-lora", "flat-lora", "bar-lora"]
    runs = {}
    for condition in ("clean", "noisy40"):
        runs |= {
            f"{condition}/adamw-lora/seed0": _run("adamw-lora", condition, 0, 0.5, 1.0),
            f"{condition}/sam-lora/seed0": _run("sam-lora", condition, 0, 0.6, 2.0),
            f"{condition}/flat-lora/seed0": _run("flat-lora", condition, 0, 0.595, 1.1),
            f"{condition}/bar-lora/seed0": {
                "method": "bar-lora",
                "condition": condition,
                "seed": 0,
                "status": "unavailable: keras_sam.BAR does not exist in this keras_sam",
            },
        }
    record = {
        "protocol": {
            "conditions": ["clean", "noisy40"],
            "methods": methods,
            "patch": 7,
            "dim": 16,
            "depth": 1,
            "heads": 2,
            "train_size": 96,
            "epochs": 3,
            "batch_size": 32,
            "rank": 8,
            "seeds": [0],
        },
        "environment": {"backend": "jax", "devices": ["cpu:0"]},
        "runs": runs,
        "memory": {m: {"peak_bytes": 2**20} for m in ("adamw-lora", "sam-lora", "flat-lora")},
    }
    text = finetune.markdown(record)
    rows = [line for line in text.splitlines() if line.startswith("| clean") or "| noisy40" in line]
    assert len(rows) == 8 and all(row.count("|") == 12 for row in rows)
    assert "| clean | bar-lora | 0 | unavailable: keras_sam.BAR does not exist" in text
    assert "- flat-lora: meets it (fraction of SAM's gain 0.95, 0.95" in text
    assert "- bar-lora: not measured." in text
    record["runs"]["noisy40/flat-lora/seed0"]["seconds_per_step"] = 1.2
    assert "- flat-lora: does not meet it" in finetune.markdown(record)


def test_lora_is_on_the_blocks_dense_layers_and_the_rest_is_frozen_but_the_head(tmp_path):
    import keras

    finetune = _finetune()
    args = finetune.parse(["--quick", "--out", str(tmp_path / "x.json")])
    model = finetune.build(args)
    path = tmp_path / "w.weights.h5"
    model.save_weights(path)
    adapted = finetune.finetune_model(args, path, seed=0, adapters=True)
    trainable = {v.path for v in adapted.trainable_variables}
    head = adapted.layers[-1]
    lora = {p for p in trainable if "lora_kernel" in p}
    # Depth 1: query, key, value, output projections and the MLP's two layers, A and B each.
    assert len(lora) == 2 * 6
    layers = {p.rsplit("/", 1)[0] for p in lora}
    assert trainable == lora | {f"{layer}/bias" for layer in layers} | {
        head.kernel.path,
        head.bias.path,
    }
    # A new head: re-drawn per seed, not the pretrained one.
    reference = keras.ops.convert_to_numpy(model.layers[-1].kernel)
    assert not np.allclose(keras.ops.convert_to_numpy(head.kernel), reference)
    full = finetune.finetune_model(args, path, seed=0, adapters=False)
    assert len(full.trainable_variables) == len(model.trainable_variables)
    assert not any("lora" in v.path for v in full.variables)


@pytest.mark.slow
@needs_data
def test_a_quick_study_writes_its_json_and_table(tmp_path):
    finetune = _finetune()
    out = tmp_path / "quick.json"
    methods = "adamw-lora,sam-lora,flat-lora"
    record = finetune.main(["--quick", "--methods", methods, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert sorted(record["runs"]) == sorted(
        f"{c}/{m}/seed0" for c in ("clean", "noisy40") for m in methods.split(",")
    )
    for key, run in record["runs"].items():
        if run["status"].startswith("unavailable"):
            assert key.split("/")[1] == "flat-lora"  # not on this branch yet
            continue
        assert run["status"] == "complete", key
        assert 0 <= run["test_accuracy"] <= 1 and run["test_examples"] > 0
        assert run["seconds_per_step"] > 0 and run["train_steps"] == 3 * 3  # 96 images, batch 32
        assert np.isfinite(run["final_loss"])
        assert 0 < run["trainable_parameters"] < run["parameters"]  # adapters and head alone
    noisy = record["runs"]["noisy40/adamw-lora/seed0"]["noise_fraction"]
    assert noisy == pytest.approx(round(0.4 * 96) / 96)
    assert record["runs"]["clean/adamw-lora/seed0"]["noise_fraction"] == 0.0
    for method in ("adamw-lora", "sam-lora"):
        memory = record["memory"][method]
        assert memory["status"] == "complete" and memory["peak_bytes"] > 0
    assert record["pretrained"]["cached"] is False
    assert 0 <= record["pretrained"]["test_accuracy_classes0_4"] <= 1
    table = out.with_suffix(".md").read_text()
    assert table.count("| clean |") == table.count("| noisy40 |") == 3
    assert "fraction of SAM's gain" in table
    # A rerun keeps the finished runs and the cached pretrained weights.
    again = finetune.main(["--quick", "--methods", methods, "--out", str(out)])
    assert again["pretrained"]["cached"] is True
    assert again["runs"] == record["runs"]


def test_flat_lora_plugs_in_when_keras_sam_has_it_and_a_wrong_guess_is_unavailable(
    tmp_path, monkeypatch
):
    import keras

    import keras_sam

    finetune = _finetune()
    args = finetune.parse(["--quick", "--out", str(tmp_path / "x.json")])
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    # The class itself: the paper's sigma, its cosine rise over the run's own steps.
    trained, optimizer = finetune.make_trained("flat-lora", model, args, steps=10)
    assert isinstance(trained, keras_sam.SAMModel)
    assert isinstance(optimizer, keras_sam.FlatLoRA)
    assert (optimizer.sigma, optimizer.total_steps) == (0.05, 10)
    made = {}

    def flat_lora(inner, sigma, total_steps):  # a stand-in that takes no other argument
        made.update(sigma=sigma, total_steps=total_steps)
        return keras_sam.SAM(inner, rho=0.01)

    monkeypatch.setattr(keras_sam, "FlatLoRA", flat_lora, raising=False)
    trained, optimizer = finetune.make_trained("flat-lora", model, args, steps=10)
    assert isinstance(trained, keras_sam.SAMModel) and isinstance(optimizer, keras_sam.SAM)
    assert made == {"sigma": 0.05, "total_steps": 10}
    args = finetune.parse(
        ["--quick", "--out", str(tmp_path / "x.json"), "--method-args", 'flat-lora={"rho": 1}']
    )
    with pytest.raises(finetune.Unavailable, match="rho"):
        finetune.make_trained("flat-lora", model, args, steps=10)
    monkeypatch.delattr(keras_sam, "FlatLoRA")
    if not hasattr(keras_sam, "FlatLoRA"):
        with pytest.raises(finetune.Unavailable, match="does not exist"):
            finetune.make_trained("flat-lora", model, args, steps=10)
