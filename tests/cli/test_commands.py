"""The `keras-sam` command line: `train` and `compare` end to end on a tiny real-data
subset; help, version, argument errors, defaults; the output written to a log file."""

import json
import os
import re

import pytest

from keras_sam.cli import commands as cli
from keras_sam.datasets import fashion_mnist
from tests import processes

DATA = fashion_mnist.find_data_dir()
needs_data = pytest.mark.skipif(
    not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte.gz"))
    and not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte")),
    reason="Fashion-MNIST is not installed: `apt-get install dataset-fashion-mnist` "
    "(make test does it where apt is available)",
)
TINY = ["--train-size", "200", "--epochs", "2", "--batch-size", "50", "--quiet"]
TINY += ["--eval-every", "1"]  # evaluate every epoch (the command line's default: every 5)
TINY += ["--hessian-examples", "50", "--hessian-iterations", "5"]  # a cheap top eigenvalue


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


@pytest.mark.slow
@needs_data
def test_compare_writes_table_and_png_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", *TINY, "--label-noise", "0.4", "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["plain", "sam", "plain equal compute"]
    assert [r.split("|")[2].strip() for r in rows[1:]] == ["2", "2", "4"]
    assert [r.split("|")[3].strip() for r in rows[1:]] == ["8", "16", "16"]
    # Training time and evaluation time are separate columns, equal to each run's history.
    header = [cell.strip() for cell in rows[0].split("|")[1:-1]]
    columns = {name: header.index(name) + 1 for name in ("train s", "train CPU s", "eval s")}
    for row, run in zip(rows[1:], ("plain", "sam", "plain_equal_compute")):
        history = json.loads((out / run / "history.json").read_text())
        cells = row.split("|")
        for name, key in [("train s", "train_seconds"), ("eval s", "eval_seconds")]:
            assert float(cells[columns[name]]) == pytest.approx(history[key][-1], abs=0.051)
            assert history[key][-1] > 0
        assert float(cells[columns["train CPU s"]]) > 0
    assert "evaluations excluded" in table
    # The two flatness columns, each the last value its run recorded; each explained.
    assert header[-2:] == ["first-order sharpness", "top Hessian eigenvalue"]
    for row, run in zip(rows[1:], ("plain", "sam", "plain_equal_compute")):
        history = json.loads((out / run / "history.json").read_text())
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert history["hessian_top_eigenvalue"][:-1] == [None] * (len(history["epoch"]) - 1)
        top = history["hessian_top_eigenvalue"][-1]
        assert top > 0 and float(cells[-1]) == pytest.approx(top, abs=0.0051)
        assert float(cells[-2]) == pytest.approx(history["measured_sharpness"][-1], abs=5.1e-5)
    assert "it vanishes wherever the gradient does" in table
    assert "Lanczos, 50 training examples" in table
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


@pytest.mark.slow
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


# ------------------------------------------------ the output folder, checked before training
@pytest.fixture
def no_training(monkeypatch):
    """Replaces data loading and training; records the calls to `train`."""
    import numpy as np

    from keras_sam.cli import training

    calls = []

    def prepare_data(config, data_dir=None):
        x = np.zeros((4, 28, 28, 1), "float32")
        y = np.zeros(4, "int64")
        return training.Data(x, y, y, x, y, noise_fraction=0.0)

    def train(
        config,
        data,
        out_dir=None,
        verbose=1,
        callbacks=(),
        resume=False,
        max_consecutive_skips=None,
    ):
        calls.append({"out_dir": str(out_dir), "resume": resume, "method": config.method})
        history = {"test_accuracy": [0.5], "accuracy": [0.5], "measured_sharpness": [0.0]}
        history |= {"epoch": [1], "gradient_evaluations": [1], "seconds": [0.0]}
        history |= {"train_seconds": [0.0], "train_cpu_seconds": [0.0], "eval_seconds": [0.0]}
        return None, history

    monkeypatch.setattr(training, "prepare_data", prepare_data)
    monkeypatch.setattr(training, "train", train)
    return calls


def _one_line_error(capsys, command):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"keras-sam {command}: error: "), err
    assert "Traceback" not in err
    return err


def test_an_out_that_is_a_file_is_refused_before_training(tmp_path, capsys, no_training):
    (tmp_path / "taken").write_text("a file")
    assert cli.main(["train", "--out", str(tmp_path / "taken")]) == 1
    err = _one_line_error(capsys, "train")
    assert f"--out {tmp_path / 'taken'} is a file, not a folder" in err
    assert no_training == [] and (tmp_path / "taken").read_text() == "a file"


def test_an_out_below_a_file_is_a_one_line_error_naming_it(tmp_path, capsys, no_training):
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" / "run"
    assert cli.main(["compare", "--out", str(out)]) == 1
    err = _one_line_error(capsys, "compare")
    assert f"{out}: Not a directory" in err
    assert no_training == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_a_one_line_error_before_training(tmp_path, capsys, no_training):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o500)
    try:
        assert cli.main(["train", "--out", str(parent / "run")]) == 1
    finally:
        parent.chmod(0o700)
    err = _one_line_error(capsys, "train")
    assert f"{parent / 'run'}: Permission denied" in err
    assert no_training == []


def test_an_oserror_while_training_is_one_line_naming_the_path(
    tmp_path, capsys, no_training, monkeypatch
):
    from keras_sam.cli import training

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/runs/x/model.keras")

    monkeypatch.setattr(training, "train", denied)
    assert cli.main(["train", "--out", str(tmp_path / "run")]) == 1
    err = _one_line_error(capsys, "train")
    assert err == "keras-sam train: error: /runs/x/model.keras: Permission denied\n"


def test_an_existing_run_is_refused_without_overwrite_or_resume(tmp_path, capsys, no_training):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.keras").write_bytes(b"good model")
    assert cli.main(["train", "--out", str(out)]) == 1
    err = _one_line_error(capsys, "train")
    assert f"{out} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "model.keras").read_bytes() == b"good model"
    assert no_training == []


def test_overwrite_deletes_only_the_runs_files(tmp_path, capsys, no_training):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "model.keras").write_bytes(b"old model")
    (out / "notes.txt").write_text("mine")
    assert cli.main(["train", "--out", str(out), "--overwrite"]) == 0
    assert no_training == [{"out_dir": str(out), "resume": False, "method": "sam"}]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_resume_keeps_the_run_and_asks_train_to_resume(tmp_path, capsys, no_training):
    out = tmp_path / "cmp"
    (out / "sam" / "checkpoint").mkdir(parents=True)
    (out / "plain").mkdir()
    (out / "plain" / "model.keras").write_bytes(b"done")
    assert cli.main(["compare", "--out", str(out), "--resume"]) == 0
    assert [c["resume"] for c in no_training] == [True, True, True]
    assert [c["out_dir"] for c in no_training] == [
        str(out / "plain"),
        str(out / "sam"),
        str(out / "plain_equal_compute"),
    ]
    assert (out / "plain" / "model.keras").read_bytes() == b"done"
    assert (out / "results.md").exists()


def test_compare_refuses_its_previous_results(tmp_path, capsys, no_training):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "results.md").write_text("old table")
    assert cli.main(["compare", "--out", str(out)]) == 1
    assert f"{out} already holds a run ({out / 'results.md'})" in _one_line_error(capsys, "compare")
    assert cli.main(["compare", "--out", str(out), "--overwrite"]) == 0
    assert (out / "results.md").read_text().startswith("# ")


def test_overwrite_and_resume_together_are_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--out", str(tmp_path), "--overwrite", "--resume"])
    assert info.value.code == 2


@needs_data
@pytest.mark.slow
def test_a_killed_train_resumes_bitwise(tmp_path):
    # SIGKILL `keras-sam train` after its first epoch's checkpoint; `--resume` must then
    # write the same model and history as the uninterrupted run (all but the seconds).
    import signal
    import time

    import keras
    import numpy as np

    argv = [*TINY, "--epochs", "3", "--method", "looksam", "--k", "2"]
    assert cli.main(["train", *argv, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    process = processes.start(["-m", "keras_sam.cli", "train", *argv, "--out", out])
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint" / "progress.json").exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        processes.kill([process])
    assert not (out / "model.keras").exists() and (out / "checkpoint").is_dir()
    assert cli.main(["train", *argv, "--out", str(out)]) == 1  # refused: a run is there
    assert cli.main(["train", *argv, "--out", str(out), "--resume"]) == 0
    assert not (out / "checkpoint").exists()
    histories = [
        json.loads((tmp_path / r / "history.json").read_text()) for r in ("whole", "killed")
    ]
    for history in histories:
        for key in ("seconds", "train_seconds", "train_cpu_seconds", "eval_seconds"):
            history.pop(key)
    assert histories[0] == histories[1]
    whole, resumed = (
        keras.saving.load_model(tmp_path / r / "model.keras") for r in ("whole", "killed")
    )
    for a, b in zip(whole.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def _help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _option_helps(text):
    """`--option` -> its help text, from argparse's help output."""
    helps, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        match = re.match(r"  (-\S+)", line)
        if match:
            current = match.group(1).rstrip(",")
            helps[current] = line
        elif current:
            helps[current] += " " + line.strip()
    return {name: " ".join(words.split()) for name, words in helps.items()}


@pytest.mark.parametrize("command", ["train", "compare", "inspect", "playground"])
def test_help_states_every_options_default(command, capsys):
    helps = _option_helps(_help([command], capsys))
    flags = {"-h", "--quiet", "--inspect", "--overwrite", "--resume"}
    assert len(helps) >= (4 if command == "playground" else 12)
    for name, text in helps.items():
        if name not in flags:
            assert "default" in text, f"{command} {name}: {text}"
    if command == "train":
        for name, shown in [
            ("--lr", "(default: 0.05)"),
            ("--epochs", "(default: 40)"),
            ("--batch-size", "(default: 128)"),
            ("--momentum", "(default: 0.9)"),
            ("--weight-decay", "(default: 0.0005)"),
            ("--method", "(default: sam)"),
        ]:
            assert helps[name].endswith(shown), helps[name]
        # The defaults that differ from the library's say so, and why.
        assert "0.05" in helps["--rho"] and "asam" in helps["--rho"]
        assert "SAMModel" in helps["--num-batch-splits"]


def test_version(capsys):
    import keras_sam

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"keras-sam {keras_sam.__version__}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--rho", "abc"], "argument --rho: expected a number >= 0, got 'abc'"),
        (["train", "--rho", "nan"], "argument --rho: expected a number >= 0, got 'nan'"),
        (["train", "--epochs", "1.5"], "argument --epochs: expected a whole number >= 1"),
        (["train", "--seed", "x"], "argument --seed: expected a whole number, got 'x'"),
        (["train", "--label-noise", "2"], "expected a fraction in [0, 1], got '2'"),
        (["compare", "--method", "sgd"], "compare trains the plain runs itself"),
    ],
)
def test_argument_errors_are_in_plain_words(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "invalid" not in err and "_non_negative" not in err


def _parsed(argv, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "_train", lambda args: seen.append(args) or 0)
    assert cli.main(argv) == 0
    return seen[0]


def test_sgd_is_still_accepted_for_the_plain_method(monkeypatch):
    args = _parsed(["train", "--method", "sgd"], monkeypatch)
    assert args.method == "plain"
    assert cli._config(args, args.method).method == "plain"


@pytest.mark.parametrize(
    "argv, rho",
    [
        (["train"], 0.1),
        (["train", "--method", "asam"], 1.0),
        (["train", "--method", "asam", "--rho", "0.5"], 0.5),
        (["train", "--method", "looksam"], 0.1),
    ],
)
def test_asams_default_rho_is_scaled(argv, rho, monkeypatch):
    args = _parsed(argv, monkeypatch)
    assert cli._config(args, args.method).rho == pytest.approx(rho)


@pytest.mark.slow
@needs_data
def test_output_to_a_file_is_one_line_per_epoch_with_the_test_accuracy(tmp_path):
    """Not a terminal (a pipe here, a log file in `make demo > log`): Keras's one-line
    epochs, no carriage returns, and the clean test accuracy where it was measured."""
    argv = ["train", "--train-size", "200", "--epochs", "3", "--batch-size", "50"]
    argv += ["--eval-every", "2", "--out", str(tmp_path / "run")]
    result = processes.run(["-m", "keras_sam.cli", *argv], timeout=600)
    assert "\r" not in result.stdout and "\r" not in result.stderr
    lines = result.stdout.splitlines()
    epochs = [i for i, line in enumerate(lines) if re.match(r"Epoch \d+/3$", line)]
    assert len(epochs) == 3
    summaries = [lines[i + 1] for i in epochs]  # Keras's verbose=2: one summary line each
    assert all(line.startswith("4/4 - ") and " - loss: " in line for line in summaries)
    # Evaluated after epochs 2 and 3 only.
    assert ["test_accuracy:" in line for line in summaries] == [False, True, True]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    shown = float(summaries[-1].split("test_accuracy:")[1].split()[0])
    assert shown == pytest.approx(history["test_accuracy"][-1], abs=5e-5)
    assert "final clean test accuracy" in lines[-1]


def test_a_run_of_skipped_steps_exits_non_zero_with_the_causes(tmp_path, capsys, monkeypatch):
    # Training images that are all NaN: every step is skipped; after 3 in a row (the
    # second epoch's first step) `keras-sam train` stops with one line and exit status 1.
    import numpy as np

    from keras_sam.cli import training

    def prepare_data(config, data_dir=None):
        x = np.full((16, 28, 28, 1), np.nan, "float32")
        y = np.arange(16, dtype="int64") % 10
        return training.Data(x, y, y, np.zeros_like(x), y, noise_fraction=0.0)

    monkeypatch.setattr(training, "prepare_data", prepare_data)
    argv = ["train", "--batch-size", "8", "--epochs", "3", "--quiet"]
    argv += ["--max-consecutive-skips", "3", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 1
    err = _one_line_error(capsys, "train")
    assert "3 training steps in a row were skipped" in err
    assert "NaN or inf in the inputs or labels" in err and "--max-consecutive-skips" in err
    assert not (tmp_path / "run" / "model.keras").exists()


# ------------------------------------------------------------------ docs/cli.md
def _help_of(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]+)")


@pytest.mark.parametrize("command", ["train", "compare", "playground"])
def test_docs_cli_names_every_option_of_help_and_its_choices(capsys, command):
    """docs/cli.md against `--help`: every option of the command is named on the page, every
    option the page names exists, and each `--option a|b|c` list is the option's choices."""
    root = processes.ROOT
    page = (root / "docs" / "cli.md").read_text()
    help_text = _help_of(capsys, command)
    options = set(_OPTION.findall(help_text)) - {"--help"}
    assert options, help_text
    assert sorted(o for o in options if o not in page) == []
    every = set()
    for other in ("train", "compare", "inspect", "playground"):
        every |= set(_OPTION.findall(_help_of(capsys, other)))
    assert sorted(set(_OPTION.findall(page)) - every) == []
    choices = {m[0]: m[1].split(",") for m in re.findall(r"(--[a-z-]+) \{([^}]*)\}", help_text)}
    for option, listed in re.findall(r"`(--[a-z-]+) ([\w]+(?:\|[\w]+)+)`", page):
        if option in choices and command == "train":
            assert listed.split("|") == choices[option], option


# ------------------------------------------------------------------ the option tables
def test_the_option_tables_the_parser_and_the_configs_agree():
    """Each option once, in `cli.options`: each command's parser takes exactly its table's
    options with its table's defaults; `RunConfig` and `InspectSettings` have the tables'
    fields in order with their defaults; the command line's defaults differ from
    `RunConfig`'s only where the table says so; the parser refuses a value exactly where
    the config does."""
    import argparse
    import dataclasses
    import math

    from keras_sam.cli import options
    from keras_sam.cli.inspection import InspectSettings
    from keras_sam.cli.training import RunConfig

    run, inspect = options.RUN_OPTIONS, options.INSPECT_OPTIONS
    tables = {"train": run, "compare": run, "inspect": inspect}
    for command, table in (tables | {"playground": options.PLAYGROUND_OPTIONS}).items():
        parsed = vars(cli.parser().parse_args([command] + ["m.keras"] * (command == "inspect")))
        assert parsed.pop("command") == command
        rows = [o for o in table if command in o.commands]
        if command == "inspect":
            assert parsed.pop("model") == "m.keras"
            rows = rows[1:]  # the positional MODEL
        assert parsed == {o.dest: o.default_for(command) for o in rows}, command
    for config, table in [(RunConfig, run), (InspectSettings, inspect)]:
        first = {}
        for option in table:
            if option.field:
                first.setdefault(option.field, option.default)
        assert [(f.name, f.default) for f in dataclasses.fields(config)] == list(first.items())
    assert {o.field: o.command_default for o in run if o.command_default} == {
        "label_noise": {"compare": 0.4},
        "hessian_examples": {"train": 256, "compare": 256},
        "eval_every": {"train": 5, "compare": 5},
        "eval_examples": {"train": 2000, "compare": 2000},
    }
    values = {"-1": -1, "0": 0, "0.5": 0.5, "1": 1, "70000": 70000, "nan": math.nan, "x": "x"}
    for option in run + inspect:
        if not isinstance(option.check, (options.Number, options.Integer)):
            continue
        for text, value in values.items():
            refused = []
            for check, given in [(option.check.parse, text), (option.check.validate, value)]:
                try:
                    check(given) if check == option.check.parse else check("x", given)
                    refused.append(False)
                except (ValueError, argparse.ArgumentTypeError):
                    refused.append(True)
            assert refused[0] == refused[1], (option.flag, option.field, text)
