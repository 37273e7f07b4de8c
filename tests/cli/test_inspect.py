"""`keras-sam inspect` on tiny saved models, and `compare --inspect`."""

import json
import os
import zipfile

import keras
import numpy as np
import pytest

from keras_sam import cli
from keras_sam.cli import inspection
from keras_sam.datasets import fashion_mnist
from tests import processes

DATA = fashion_mnist.find_data_dir()
needs_data = pytest.mark.skipif(
    not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte.gz"))
    and not os.path.exists(os.path.join(DATA, "train-images-idx3-ubyte")),
    reason="Fashion-MNIST is not installed: `apt-get install dataset-fashion-mnist`",
)
FAST = [
    "--examples", "64", "--batch-size", "32", "--k", "2", "--max-iterations", "8",
    "--probes", "3", "--grid", "3", "--line-points", "3", "--m", "16", "--ascent-steps", "2",
    "--quiet",
]  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


def _tiny_classifier():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.AveragePooling2D(4),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )


@needs_data
def test_inspect_writes_a_report_and_three_pictures(tmp_path, capsys):
    path = tmp_path / "model.keras"
    _tiny_classifier().save(path)
    out = tmp_path / "inspect"
    assert cli.main(["inspect", str(path), *FAST, "--split", "test", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["examples"] == 64 and report["data"]["split"] == "test"
    assert report["loss_function"] == "SparseCategoricalCrossentropy"
    # The loss and accuracy are the model's own on the same 64 test images.
    (_, _), (x_test, y_test) = fashion_mnist.load_data()
    keep = np.random.default_rng(0).permutation(len(y_test))[:64]
    x = (x_test[keep].astype("float32") / 255.0)[..., None]
    logits = keras.saving.load_model(path).predict(x, verbose=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y_test[keep], logits)
    assert report["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert report["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == y_test[keep]))
    values = report["hessian"]["top_eigenvalues"]
    assert len(values) == 2 and values[0] >= values[1]
    assert np.isfinite(report["hessian"]["trace"]) and report["hessian"]["probes"] == 3
    assert report["sharpness"]["m"] == 16 and report["sharpness"]["ascent_steps"] == 2
    assert report["sharpness"]["multi_step"] >= report["sharpness"]["first_order"] - 1e-6
    assert np.asarray(report["landscape"]["plane"]["loss"]).shape == (3, 3)
    assert report["landscape"]["line"]["loss"][1] == pytest.approx(report["loss"], rel=1e-5)
    for name in ("landscape_1d.png", "landscape_2d.png", "spectrum.png"):
        assert (out / name).read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    assert "top Hessian eigenvalues" in printed and "Fashion-MNIST test set" in printed


@needs_data
def test_inspect_rebuilds_a_runs_training_set_and_loads_a_sam_model(tmp_path, capsys):
    import keras_sam

    inner = _tiny_classifier()
    wrapped = keras_sam.SAMModel(inner)
    wrapped.compile(
        optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    run = tmp_path / "run"
    run.mkdir()
    wrapped.save(run / "model.keras")
    config = {"train_size": 300, "label_noise": 0.4, "seed": 2, "method": "sam"}
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "inspect"
    argv = ["inspect", str(run / "model.keras"), *FAST, "--examples", "0", "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["examples"] == 300
    assert "40 % labels flipped as trained" in report["data"]["description"]


def test_a_missing_model_file_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "absent.keras"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"keras-sam inspect: error: no model file at {tmp_path / 'absent.keras'}"


def test_a_corrupt_model_file_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "broken.keras"
    path.write_bytes(b"this is not a zip archive")
    assert cli.main(["inspect", str(path), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"keras-sam inspect: error: {path} is not a Keras model archive: it is not a zip "
        "file, which a .keras file written by model.save() is"
    )


def test_a_file_that_is_not_a_keras_archive_is_refused(tmp_path, capsys):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"\x89HDF")
    assert cli.main(["inspect", str(path), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "is not a Keras model archive: the name does not end in .keras" in err


def test_a_text_file_named_keras_is_refused_before_tensorflow_is_imported(tmp_path):
    path = tmp_path / "x.keras"
    path.write_text("hello\n")
    code = (
        "import sys; from keras_sam import cli; "
        f"code = cli.main(['inspect', {str(path)!r}]); "
        "print(code, 'tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    result = processes.run_code(code, check=False)
    assert result.stdout.split() == ["1", "False", "False"], result.stderr[-2000:]
    assert f"{path} is not a Keras model archive: it is not a zip file" in result.stderr


def test_a_damaged_or_foreign_zip_is_not_a_keras_model_archive(tmp_path, capsys):
    good = tmp_path / "good.keras"
    _tiny_classifier().save(good)
    assert inspection.archive_problem(good) is None
    # Truncated (a copy cut short), and a zip of something else.
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.keras"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    # One flipped byte inside a stored member: the zip's checksum catches it.
    flipped = tmp_path / "flipped.keras"
    with zipfile.ZipFile(flipped, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("config.json", "{}" + " " * 200)
    data = bytearray(flipped.read_bytes())
    data[60] ^= 0x01
    flipped.write_bytes(bytes(data))
    for path, reason in [
        (truncated, "it is not a zip file"),
        (foreign, "the zip file holds no config.json"),
        (flipped, "the zip file is damaged"),
    ]:
        assert cli.main(["inspect", str(path), "--out", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert f"{path} is not a Keras model archive: {reason}" in err, err


def test_the_dataset_may_be_spelled_with_a_hyphen(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "a.keras"), "--dataset", "fashion-mnist"]) == 1
    assert "no model file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["inspect", "a.keras", "--dataset", "mnist"])


@pytest.mark.slow
@needs_data
def test_compare_inspect_draws_both_models_side_by_side(tmp_path, capsys, monkeypatch):
    small = inspection.InspectSettings(
        batch_size=100, k=2, max_iterations=6, probes=2, line_points=3, grid=3, m=50,
        ascent_steps=2,
    )  # fmt: skip
    monkeypatch.setattr(inspection, "InspectSettings", lambda: small)
    out = tmp_path / "cmp"
    argv = ["compare", "--train-size", "200", "--epochs", "1", "--batch-size", "50", "--quiet"]
    assert cli.main([*argv, "--inspect", "--out", str(out)]) == 0
    combined = json.loads((out / "inspect.json").read_text())
    assert list(combined["models"]) == ["plain", "sam"]
    assert combined["interpolation"]["from"] == "plain" and combined["interpolation"]["to"] == "sam"
    losses = combined["interpolation"]["loss"]
    coordinates = combined["interpolation"]["coordinates"]
    at = {round(t, 6): v for t, v in zip(coordinates, losses)}
    assert at[0.0] == pytest.approx(combined["models"]["plain"]["loss"], rel=1e-5)
    assert at[1.0] == pytest.approx(combined["models"]["sam"]["loss"], rel=1e-5)
    for name in ("inspect_landscape_1d.png", "inspect_landscape_2d.png", "inspect_spectrum.png"):
        assert (out / name).read_bytes()[:8] == PNG


def _fake_report(scale):
    coordinates = np.linspace(-1, 1, 5)
    line = 0.05 + scale * coordinates**2
    plane = 0.05 + scale * (coordinates[:, None] ** 2 + coordinates[None] ** 2)
    return {
        "landscape": {
            "line": {"coordinates": coordinates, "loss": line, "accuracy": 0.9 - 0.1 * line},
            "plane": {"coordinates": [coordinates] * 2, "loss": plane, "accuracy": None},
        },
        "hessian": {
            "top_eigenvalues": [25.0 * scale, 10.0, 4.2],
            "trace": 120.0,
            "trace_standard_error": 3.0,
        },
    }


def test_the_pictures_fit_their_titles_and_label_log_axes_in_plain_numbers(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figures = []
    save = inspection._save
    monkeypatch.setattr(
        inspection, "_save", lambda fig, path, plt: (figures.append(fig), save(fig, path, plt))[1]
    )
    title = (
        "measured on the run's training set (2,000 examples, seed 0, 40 % labels flipped as "
        "trained), a random subset of 2,000 (seed 0)"
    )
    line = {"coordinates": np.linspace(-0.5, 1.5, 5), "loss": np.array([0.3, 0.05, 0.2, 0.04, 2])}
    reports = {"plain": _fake_report(3.0), "sam": _fake_report(0.5)}
    inspection.plot_reports(reports, tmp_path, title=title, interpolation=(("plain", "sam"), line))
    inspection.plot_reports({"one": _fake_report(1.0)}, tmp_path / "one", title=title)
    assert len(figures) == 6
    log_axes = 0
    for fig in figures:
        canvas = FigureCanvasAgg(fig)  # the saved figure was closed: draw it again
        canvas.draw()
        renderer = canvas.get_renderer()
        # Everything drawn (the wrapped title included) lies inside the picture.
        box = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)
        assert fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1
        assert fig.bbox.y0 - 1 <= box.y0 and box.y1 <= fig.bbox.y1 + 1
        assert fig.get_suptitle().replace("\n", " ") == title
        for ax in fig.axes:
            if ax.get_yscale() not in ("log", "symlog"):
                continue
            log_axes += 1
            labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
            assert len(labels) >= 2, labels
            for text in labels:
                assert "$" not in text and "e" not in text, labels
                float(text)  # a plain number
    assert log_axes >= 5  # 1-D loss (twice), interpolation, spectrum (twice)
