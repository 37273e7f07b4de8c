import dataclasses
import json
import time

import keras
import numpy as np
import pytest

from keras_sam.cli import report
from keras_sam.cli.training import RunConfig, build_optimizer, prepare_data, train


def _arrays(rng, n_train=300, n_test=100):
    # Class k images are bright in row band k: learnable in a couple of epochs.
    def make(n):
        y = rng.integers(0, 10, n).astype("uint8")
        x = rng.integers(0, 40, (n, 28, 28)).astype("uint8")
        for i, label in enumerate(y):
            x[i, 2 * label : 2 * label + 3] = 250
        return x, y

    return make(n_train), make(n_test)


def test_prepare_data_subsets_corrupts_and_keeps_clean_labels(rng):
    arrays = _arrays(rng)
    config = RunConfig(train_size=200, label_noise=0.4, seed=3)
    data = prepare_data(config, arrays=arrays)
    assert data.x_train.shape == (200, 28, 28, 1) and data.x_train.dtype == np.float32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert data.noise_fraction == pytest.approx(0.4)
    assert np.mean(data.y_train != data.y_train_clean) == pytest.approx(0.4)
    assert len(data.x_test) == 100 and np.array_equal(data.y_test, arrays[1][1])
    again = prepare_data(config, arrays=arrays)
    np.testing.assert_array_equal(again.y_train, data.y_train)
    other = prepare_data(RunConfig(train_size=200, label_noise=0.4, seed=4), arrays=arrays)
    assert np.any(other.y_train_clean != data.y_train_clean)


@pytest.mark.parametrize("method", ["plain", "sam", "asam"])
def test_train_records_history_and_writes_files(rng, tmp_path, method):
    config = RunConfig(
        method=method,
        rho=0.5 if method == "asam" else 0.05,
        epochs=2,
        batch_size=50,
        train_size=200,
        sharpness_examples=100,
        seed=0,
    )
    data = prepare_data(config, arrays=_arrays(rng))
    model, history = train(config, data, out_dir=tmp_path, verbose=0)
    passes = 1 if method == "plain" else 2
    assert history["epoch"] == [1, 2]
    assert history["gradient_evaluations"] == [4 * passes, 8 * passes]
    assert (history["sharpness"][0] is None) == (method == "plain")
    assert all(0 <= a <= 1 for a in history["test_accuracy"])
    # the recorded test accuracy is the model's on the clean test labels
    final = np.mean(model.predict(data.x_test, verbose=0).argmax(-1) == data.y_test)
    assert history["test_accuracy"][-1] == pytest.approx(final)
    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved == json.loads(json.dumps(history))
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["method"], written["backend"]) == (method, keras.backend.backend())
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(
        loaded.predict(data.x_test, verbose=0),
        model.predict(data.x_test, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "method, cls, evaluations",
    [
        ("gsam", "GSAM", [8, 16]),
        ("friendly_sam", "FriendlySAM", [8, 16]),
        # 4 steps per epoch, a two-pass step at steps 0 and 3 (k=3), then 6: 4 + 2, 8 + 3.
        ("looksam", "LookSAM", [6, 11]),
        ("periodic_sam", "PeriodicSAM", [6, 11]),
        ("aesam", "AESAM", None),
        ("momentum_sam", "MomentumSAM", [4, 8]),  # one pass a step
        ("mesa", "MESA", [4, 8]),  # one forward-backward pass a step (and the teacher's forward)
    ],
)
def test_variants_train_and_count_the_passes_they_take(rng, method, cls, evaluations):
    import keras_sam

    config = RunConfig(
        method=method, k=3, epochs=2, batch_size=50, train_size=200, sharpness_examples=50
    )
    assert type(build_optimizer(config, steps=8)) is getattr(keras_sam, cls)
    _, history = train(config, prepare_data(config, arrays=_arrays(rng)), verbose=0)
    skips = getattr(keras_sam, cls).skips_second_pass
    assert (history["second_pass_rate"][0] is None) == (not skips)
    if evaluations is not None:
        assert history["gradient_evaluations"] == evaluations
    else:  # AESAM: whatever it chose, between one and two passes a step
        assert 8 < history["gradient_evaluations"][-1] < 16


def test_eval_every_evaluates_every_k_epochs_and_the_last(rng):
    config = RunConfig(
        method="plain", epochs=5, eval_every=2, batch_size=100, train_size=200,
        sharpness_examples=50,
    )  # fmt: skip
    _, history = train(config, prepare_data(config, arrays=_arrays(rng)), verbose=0)
    assert history["epoch"] == [2, 4, 5]
    assert history["gradient_evaluations"] == [4, 8, 10]
    assert len(history["test_accuracy"]) == len(history["measured_sharpness"]) == 3


def test_the_top_hessian_eigenvalue_is_of_the_final_weights_on_the_probe_examples(rng):
    from keras_sam.diagnostics import Objective, hessian_eigenvalues

    config = RunConfig(
        method="plain", epochs=2, batch_size=100, train_size=200, label_noise=0.4,
        sharpness_examples=20, hessian_examples=40, hessian_iterations=30,
    )  # fmt: skip
    data = prepare_data(config, arrays=_arrays(rng))
    model, history = train(config, data, verbose=0)
    assert history["hessian_top_eigenvalue"][0] is None  # measured at the end only
    # The probe: the first 40 of the seeded permutation, with the labels trained on.
    probe = np.random.default_rng(config.seed + 1).permutation(200)[:40]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trained = Objective(model, data.x_train[probe], data.y_train[probe], loss=loss)
    wanted = hessian_eigenvalues(
        trained, k=1, max_iterations=30, tol=1e-2, seed=config.seed, verbose=0
    )[0]
    true_labels = Objective(model, data.x_train[probe], data.y_train_clean[probe], loss=loss)
    clean = hessian_eigenvalues(
        true_labels, k=1, max_iterations=30, tol=1e-2, seed=config.seed, verbose=0
    )[0]
    assert wanted > 0 and abs(wanted - clean) > 1e-3 * wanted  # the labels matter
    assert history["hessian_top_eigenvalue"][-1] == pytest.approx(wanted, rel=1e-4)


def test_report_table_and_plots(rng, tmp_path):
    history = {
        "epoch": [1, 2],
        "accuracy": [0.5, 0.6],
        "test_accuracy": [0.7, 0.65],
        "measured_sharpness": [0.01, 0.02],
        "gradient_evaluations": [10, 20],
        "train_seconds": [1.0, 2.3],
        "train_cpu_seconds": [1.5, 3.0],
        "eval_seconds": [0.5, 1.0],
        "seconds": [1.5, 3.3],
    }
    runs = {"plain": (RunConfig(epochs=2), history), "sam": (RunConfig(epochs=2), history)}
    table = report.comparison_table(runs)
    header = [cell.strip() for cell in table.splitlines()[0].split("|")[1:-1]]
    assert header[:3] == ["run", "epochs", "gradient evaluations"]
    assert header[3:6] == ["train s", "train CPU s", "eval s"]
    row = "| sam | 2 | 20 | 2.3 | 3.0 | 1.0 | 65.00 % | 70.00 % | 60.00 % | 0.0200 | n/a |"
    assert table.count("\n") == 4 and row in table
    # A history recorded before the times were kept apart still makes a table.
    old = {k: v for k, v in history.items() if not k.endswith("_seconds")}
    assert "| n/a | n/a | n/a |" in report.comparison_table({"plain": (RunConfig(), old)})
    for path in report.comparison_plots(runs, tmp_path, title="t"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    # With a top Hessian eigenvalue measured at the end, the table shows it and the
    # sharpness picture gains a panel (a wider image).
    narrow = (tmp_path / "sharpness.png").read_bytes()
    measured = dict(history, hessian_top_eigenvalue=[None, 12.345])
    runs["sam"] = (RunConfig(epochs=2), measured)
    assert row.replace("| n/a |", "| 12.35 |") in report.comparison_table(runs)
    report.comparison_plots(runs, tmp_path, title="t")
    assert _png_width(tmp_path / "sharpness.png") > _png_width_of(narrow)


def _png_width(path):
    return _png_width_of(path.read_bytes())


def _png_width_of(data):
    return int.from_bytes(data[16:20], "big")  # the IHDR chunk's width


def test_evaluation_time_is_kept_apart_from_training_time(rng, monkeypatch):
    """Every evaluation is made to take 0.4 s longer: all of it lands in `eval_seconds`,
    none in `train_seconds`."""
    import keras_sam.diagnostics

    measure = keras_sam.diagnostics.sharpness

    def slow_sharpness(*args, **kwargs):
        time.sleep(0.4)
        return measure(*args, **kwargs)

    monkeypatch.setattr(keras_sam.diagnostics, "sharpness", slow_sharpness)
    config = RunConfig(
        method="sam", epochs=3, batch_size=100, train_size=200, sharpness_examples=50
    )
    _, history = train(config, prepare_data(config, arrays=_arrays(rng)), verbose=0)
    evals, trains, totals = (history[k] for k in ("eval_seconds", "train_seconds", "seconds"))
    assert evals[0] >= 0.4 and evals[-1] >= 3 * 0.4
    assert all(b >= a for a, b in zip(evals, evals[1:]))
    assert all(b >= a for a, b in zip(trains, trains[1:]))
    for train_s, eval_s, total in zip(trains, evals, totals):
        assert train_s + eval_s == pytest.approx(total, abs=1e-3)
    # The training time of the last two epochs holds none of the 0.8 s of sleeping
    # that fell between them (the epochs themselves take well under that here).
    assert trains[-1] - trains[0] < (totals[-1] - totals[0]) - 0.8 + 1e-3
    assert all(c > 0 for c in history["train_cpu_seconds"])


def test_eval_examples_takes_a_subset_before_the_last_evaluation(rng):
    config = RunConfig(
        method="plain", epochs=3, batch_size=100, train_size=200, sharpness_examples=50,
        eval_examples=40,
    )  # fmt: skip
    data = prepare_data(config, arrays=_arrays(rng))
    model, history = train(config, data, verbose=0)
    assert history["test_examples"] == [40, 40, 100]
    final = np.mean(model.predict(data.x_test, verbose=0).argmax(-1) == data.y_test)
    assert history["test_accuracy"][-1] == pytest.approx(final)
    # Subset accuracies are multiples of 1/40, the last one of 1/100.
    assert all(round(40 * a, 6) == round(40 * a) for a in history["test_accuracy"][:2])


def test_plain_is_the_method_name_and_sgd_its_old_spelling():
    assert RunConfig(method="sgd").method == "plain"
    assert not RunConfig(method="sgd").is_sam
    assert build_optimizer(RunConfig(method="sgd"), steps=10).__class__.__name__ == "SGD"


def test_rho_defaults_to_the_methods_own_and_asams_is_ten_times_sams():
    assert RunConfig(method="sam").rho == pytest.approx(0.1)
    assert RunConfig(method="gsam").rho == pytest.approx(0.1)
    assert RunConfig(method="asam").rho == pytest.approx(1.0)
    assert RunConfig(method="asam", rho=0.3).rho == 0.3  # a given rho is kept
    optimizer = build_optimizer(RunConfig(method="asam"), steps=10)
    assert optimizer.adaptive and optimizer.get_config()["rho"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "adam"},
        {"eval_examples": -1},
        {"rho": -1.0},
        {"epochs": 0},
        {"train_size": 70000},
        {"label_noise": 1.5},
        {"schedule": "step"},
        {"optimizer": "lbfgs"},
        {"alpha": -0.5},
        {"k": 0},
        {"sam_start": 1.0},
    ],
)
def test_run_config_validation_names_the_argument(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"`{name}`.*Received: {name}="):
        RunConfig(**kwargs)


# ------------------------------------------------------------------ resuming a run
def _small(method="looksam", **changes):
    fields = dict(k=2, epochs=3, eval_every=2, batch_size=50, train_size=200)
    return RunConfig(method=method, sharpness_examples=50, **(fields | changes))


class _Interrupt(Exception):
    pass


def _stop_at(epoch):
    class Stop(keras.callbacks.Callback):
        def on_epoch_begin(self, e, logs=None):
            if e == epoch:
                raise _Interrupt

    return Stop()


def _same(run_a, run_b):
    (model_a, history_a), (model_b, history_b) = run_a, run_b
    history_a, history_b = dict(history_a), dict(history_b)
    for key in ("seconds", "train_seconds", "train_cpu_seconds", "eval_seconds"):
        history_a.pop(key), history_b.pop(key)
    assert history_a == history_b
    for a, b in zip(model_a.get_weights(), model_b.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_an_interrupted_run_resumes_bitwise(rng, tmp_path, monkeypatch):
    from keras_sam import files
    from keras_sam.cli import training

    config = _small()
    data = prepare_data(config, arrays=_arrays(rng))
    whole = train(config, data, out_dir=tmp_path / "whole", verbose=0)
    assert whole[1]["epoch"] == [2, 3] and training.run_state(tmp_path / "whole") == "complete"

    # Stopped after epoch 2, and killed while writing epoch 2's checkpoint (truncated):
    # the run restarts from epoch 1's (an epoch with no history entry, eval_every=2).
    out = tmp_path / "stopped"
    with pytest.raises(_Interrupt):
        train(config, data, out_dir=out, verbose=0, callbacks=[_stop_at(2)])
    assert training.run_state(out) == "partial" and not (out / "model.keras").exists()
    latest = out / "checkpoint" / "keras" / "latest.weights.h5"
    assert latest.with_suffix(".h5.bkp").exists()
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    _same(whole, train(config, data, out_dir=out, verbose=0, resume=True))
    assert training.run_state(out) == "complete" and not (out / "checkpoint").exists()
    # Resuming a complete run loads it.
    _same(whole, train(config, data, out_dir=out, verbose=0, resume=True))

    # Killed while writing the first checkpoint (truncated; no previous one): starts over.
    out = tmp_path / "first"
    with pytest.raises(_Interrupt):
        train(config, data, out_dir=out, verbose=0, callbacks=[_stop_at(1)])
    latest = out / "checkpoint" / "keras" / "latest.weights.h5"
    assert not latest.with_suffix(".h5.bkp").exists()
    latest.write_bytes(latest.read_bytes()[:96])
    _same(whole, train(config, data, out_dir=out, verbose=0, resume=True))

    # Stopped after the last epoch, while writing model.keras: nothing left to train.
    out = tmp_path / "saving"
    with monkeypatch.context() as patch:
        patch.setattr(files, "save_model", lambda *a: (_ for _ in ()).throw(OSError("full")))
        with pytest.raises(OSError, match="full"):
            train(config, data, out_dir=out, verbose=0)
    assert training.run_state(out) == "partial"
    _same(whole, train(config, data, out_dir=out, verbose=0, resume=True))


def test_resume_refuses_another_configuration(rng, tmp_path):
    from keras_sam import files

    config = _small()
    data = prepare_data(config, arrays=_arrays(rng))
    files.write_json(tmp_path / "config.json", dataclasses.asdict(config))
    other = dataclasses.replace(config, learning_rate=0.1, epochs=4)
    message = r"learning_rate=0.05 there, 0.1 here; epochs=3 there, 4 here"
    with pytest.raises(ValueError, match=message):
        train(other, data, out_dir=tmp_path, verbose=0, resume=True)


def test_a_fresh_run_deletes_a_previous_runs_checkpoint(rng, tmp_path):
    # A stale (here: unreadable) checkpoint must not be restored into a new run.
    from keras_sam.cli import training

    (tmp_path / "checkpoint" / "keras").mkdir(parents=True)
    (tmp_path / "checkpoint" / "keras" / "latest.weights.h5").write_bytes(b"not hdf5")
    (tmp_path / "history.json").write_text("{}")
    config = _small(method="sgd", epochs=1)
    _, history = train(config, prepare_data(config, arrays=_arrays(rng)), out_dir=tmp_path)
    assert history["epoch"] == [1] and training.run_state(tmp_path) == "complete"
    assert json.loads((tmp_path / "history.json").read_text())["epoch"] == [1]


def test_run_state_tells_empty_partial_and_complete(tmp_path):
    from keras_sam.cli.training import delete_run, run_state

    assert run_state(tmp_path / "absent") == "empty"
    (tmp_path / "notes.txt").write_text("mine")
    assert run_state(tmp_path) == "empty"
    (tmp_path / "config.json").write_text("{}")
    assert run_state(tmp_path) == "partial"
    (tmp_path / "history.json").write_text("{}")
    (tmp_path / "model.keras").write_text("")
    assert run_state(tmp_path) == "complete"
    (tmp_path / "checkpoint").mkdir()
    assert run_state(tmp_path) == "partial"
    delete_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
