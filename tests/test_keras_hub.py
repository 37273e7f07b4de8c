"""Fine-tuning KerasHub models with SAM: a causal LM and a text classifier, built from
small configs (no download), with and without LoRA adapters, on every backend."""

import warnings

import keras
import numpy as np
import pytest

import keras_sam

keras_hub = pytest.importorskip("keras_hub")

VOCABULARY, SEQUENCE, BATCH = 32, 8, 8


def _causal_lm():
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=SEQUENCE,
        dropout=0.0,
    )
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCABULARY, (2 * BATCH, SEQUENCE + 1))
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((2 * BATCH, SEQUENCE), bool)}
    return model, x, tokens[:, 1:]


def _classifier():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=SEQUENCE,
        dropout=0.0,
    )
    model = keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=3, preprocessor=None, dropout=0.0
    )
    rng = np.random.default_rng(1)
    x = {
        "token_ids": rng.integers(1, VOCABULARY, (2 * BATCH, SEQUENCE)),
        "segment_ids": np.zeros((2 * BATCH, SEQUENCE), "int32"),
        "padding_mask": np.ones((2 * BATCH, SEQUENCE), bool),
    }
    return model, x, rng.integers(0, 3, 2 * BATCH)


TASKS = {"causal_lm": _causal_lm, "classifier": _classifier}


def _values(variables):
    return [keras.ops.convert_to_numpy(v).copy() for v in variables]


def _fine_tune(task, lora):
    keras.utils.set_random_seed(0)
    model, x, y = TASKS[task]()
    if lora:
        model.backbone.enable_lora(2)
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(
        optimizer=keras_sam.SAM(keras.optimizers.Adam(1e-2), rho=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return sam_model, x, y


def _fit_and_check(task, lora):
    """One SAM epoch; checks what moved and what did not; returns the model and data."""
    sam_model, x, y = _fine_tune(task, lora)
    model = sam_model.model
    trainable, frozen = model.trainable_weights, model.non_trainable_weights
    before_trainable, before_frozen = _values(trainable), _values(frozen)
    history = sam_model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)

    sharpness = history.history["sharpness"]
    assert len(sharpness) == 1 and np.isfinite(sharpness[0]) and sharpness[0] != 0.0
    assert history.history["skipped_steps"] == [0.0]
    # SAM perturbs and updates exactly what the optimizer was built on: the trainable weights.
    paths = [v.path for v in trainable]
    built_on = sam_model.optimizer.inner_optimizer._trainable_variables
    assert sorted(v.path for v in built_on) == sorted(paths)
    if lora:
        # In the backbone, only the adapters train, and the biases of the adapted layers
        # (Keras's `enable_lora` freezes a layer's kernel only); outside it, the task's head.
        in_backbone = [v.path for v in model.backbone.trainable_weights]
        adapted = {p.rsplit("/", 1)[0] for p in in_backbone if "lora_kernel" in p}
        assert adapted, in_backbone
        assert all(
            "lora_kernel" in p
            or p == f"{p.rsplit('/', 1)[0]}/bias"
            and p.rsplit("/", 1)[0] in adapted
            for p in in_backbone
        ), in_backbone
        assert len(frozen) > len(trainable)
    else:
        assert not frozen
    for path, old, new in zip(paths, before_trainable, _values(trainable), strict=True):
        assert not np.array_equal(old, new), f"{path} did not move"
    for old, new in zip(before_frozen, _values(frozen), strict=True):
        np.testing.assert_array_equal(old, new)  # bitwise: never perturbed and left so
    return sam_model, x, y


def _outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def _load(path):
    with warnings.catch_warnings():
        # KerasHub tasks override compile() without compile_from_config; the SAMModel
        # around them is compiled from its own config.
        warnings.filterwarnings("ignore", message=r"`compile\(\)` was not called")
        return keras.saving.load_model(path)


def _assert_saves_and_loads(sam_model, x, tmp_path):
    sam_model.save(tmp_path / "fine-tuned.keras")
    loaded = _load(tmp_path / "fine-tuned.keras")
    assert isinstance(loaded, keras_sam.SAMModel)
    assert type(loaded.model) is type(sam_model.model)
    np.testing.assert_array_equal(_outputs(loaded.model, x), _outputs(sam_model.model, x))
    assert len(loaded.optimizer.variables) == len(sam_model.optimizer.variables)
    for a, b in zip(
        _values(loaded.optimizer.variables), _values(sam_model.optimizer.variables), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_causal_lm_lora_moves_only_the_adapters_and_they_reload(tmp_path):
    sam_model, x, _ = _fit_and_check("causal_lm", lora=True)
    tuned = sam_model.model
    assert len(tuned.trainable_weights) == len(tuned.backbone.trainable_weights)  # no head
    # A whole-model save merges the adapters into the kernels (Keras's EinsumDense saves
    # kernel + a @ b): the loaded model computes the same, but has no adapters, every weight
    # trainable, so the optimizer's saved slots (built on the adapters) do not fit it.
    sam_model.save(tmp_path / "merged.keras")
    with pytest.warns(UserWarning, match="Skipping variable loading for optimizer"):
        merged = _load(tmp_path / "merged.keras")
    assert not any("lora_kernel" in v.path for v in merged.model.weights)
    np.testing.assert_allclose(_outputs(merged.model, x), _outputs(tuned, x), rtol=1e-5, atol=1e-6)

    # The adapters alone: `save_lora_weights` writes lora_kernel_a and lora_kernel_b only
    # (not the biases of the adapted layers, which trained too and are copied below).
    tuned.backbone.save_lora_weights(str(tmp_path / "adapters.lora.h5"))

    fresh, _, _ = _causal_lm()  # the base model, with the tuned biases copied below
    base = [v for v in tuned.weights if "lora_kernel" not in v.path]
    assert len(base) == len(fresh.weights)
    for target, source in zip(fresh.weights, base, strict=True):
        target.assign(source)
    before = _outputs(fresh, x)
    fresh.backbone.load_lora_weights(str(tmp_path / "adapters.lora.h5"))
    after = _outputs(fresh, x)
    np.testing.assert_allclose(after, _outputs(tuned, x), rtol=1e-6, atol=1e-6)
    assert np.abs(after - before).max() > 1e-4  # the adapters carry the fine-tuning


@pytest.mark.slow
def test_classifier_lora_trains_the_adapters_and_the_head():
    sam_model, _, _ = _fit_and_check("classifier", lora=True)
    model = sam_model.model
    head = {id(v) for v in model.trainable_weights} - {id(v) for v in model.backbone.weights}
    assert len(head) == 2  # the logits layer's kernel and bias, which moved (checked above)


@pytest.mark.slow
def test_classifier_fine_tunes_saves_and_loads(tmp_path):
    # Full fine-tuning (every weight trains) and an exact `.keras` round trip; the causal
    # LM's round trip is the LoRA test's merged save above.
    sam_model, x, _ = _fit_and_check("classifier", lora=False)
    _assert_saves_and_loads(sam_model, x, tmp_path)
