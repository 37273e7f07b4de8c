"""The `keras-sam train` and `compare` commands, end to end on a tiny real-data subset."""

import json
import os

import pytest

from keras_sam import cli
from keras_sam.datasets import fashion_mnist

DATA = fashion_mnist.find_data_dir()
needs_data = pytest.mark.skipif(
    not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte.gz"))
    and not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte")),
    reason="Fashion-MNIST is not installed: `apt-get install dataset-fashion-mnist` "
    "(make test does it where apt is available)",
)
TINY = ["--train-size", "200", "--epochs", "2", "--batch-size", "50", "--quiet"]


@needs_data
def test_train_writes_history_model_and_reports_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--label-noise", "0.2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "40 labels corrupted, 20.0 %" in printed
    assert "final clean test accuracy" in printed
    history = json.loads((out / "history.json").read_text())
    assert len(history["test_accuracy"]) == 2 and history["sharpness"][0] is not None
    assert (out / "model.keras").stat().st_size > 10_000


@needs_data
def test_compare_writes_table_and_png_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", *TINY, "--label-noise", "0.4", "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["plain", "sam", "plain equal compute"]
    assert [r.split("|")[2].strip() for r in rows[1:]] == ["2", "2", "4"]
    assert [r.split("|")[3].strip() for r in rows[1:]] == ["8", "16", "16"]
    for name in ("test_accuracy.png", "sharpness.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in ("plain", "sam", "plain_equal_compute"):
        assert (out / run / "history.json").exists()


def test_a_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    code = cli.main(
        ["train", *TINY, "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "keras-sam train: error:" in err and "nowhere" in err


@needs_data
def test_train_a_variant_with_its_own_options(tmp_path):
    out = tmp_path / "looksam"
    argv = ["train", *TINY, "--method", "looksam", "--k", "3", "--alpha", "0.5"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["method"], config["k"], config["alpha"]) == ("looksam", 3, 0.5)
    history = json.loads((out / "history.json").read_text())
    # 4 steps per epoch; two-pass steps at iterations 0, 3 and 6.
    assert history["gradient_evaluations"] == [6, 11]
    assert history["second_pass_rate"] == [0.5, 0.25]


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--method", "looksam", "--k", "0"],
        ["train", "--method", "lookahead"],
        ["train", "--label-noise", "1.5"],
        ["compare", "--method", "sgd"],
        ["train", "--epochs", "0"],
        ["train", "--model", "vgg"],
    ],
)
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
