"""Sparse gradients (Embedding): the true norm with duplicate indices, the dense result,
and no dense gradient when the method does not need one."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam

VOCABULARY, WIDTH = 50, 4
IDS = np.array([[1, 1, 2, 7], [1, 5, 5, 5], [9, 1, 2, 2], [3, 3, 3, 3]])  # many duplicates


class _OneHotEmbedding(keras.layers.Layer):
    """An Embedding computed as one-hot times the table: its gradient is dense."""

    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self.table = table

    def build(self, input_shape):
        self.embeddings = self.add_weight(shape=self.table.shape, initializer="zeros")
        self.embeddings.assign(self.table)

    def call(self, ids):
        one_hot = keras.ops.one_hot(ids, VOCABULARY, dtype=self.compute_dtype)
        return keras.ops.matmul(one_hot, self.embeddings)


class _GradientTypes(keras.optimizers.SGD):
    """SGD that records the gradient types it is handed (when its step is traced)."""

    def apply(self, grads, trainable_variables=None):
        self.seen = [type(g).__name__ for g in grads]
        return super().apply(grads, trainable_variables)


class _AdamTypes(keras.optimizers.Adam):
    """Adam that records the gradient types it is handed."""

    def apply(self, grads, trainable_variables=None):
        self.seen = [type(g).__name__ for g in grads]
        return super().apply(grads, trainable_variables)


def _model(table, dense, rng):
    lookup = _OneHotEmbedding(table) if dense else keras.layers.Embedding(VOCABULARY, WIDTH)
    model = keras.Sequential(
        [
            keras.Input((IDS.shape[1],), dtype="int32"),
            lookup,
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ]
    )
    model.set_weights([table, rng.normal(size=(WIDTH, 2)), rng.normal(size=2)])
    return model


def _train(method, dense, inner="sgd", splits=None, steps=5, **compile_kwargs):
    rng = np.random.default_rng(1)
    table = rng.normal(size=(VOCABULARY, WIDTH)).astype("float32")
    targets = rng.normal(size=(len(IDS), 2)).astype("float32")
    model = _model(table, dense, rng)
    optimizer = _GradientTypes(0.1, momentum=0.9) if inner == "sgd" else _AdamTypes(0.05)
    sam_model = keras_sam.SAMModel(model, num_batch_splits=splits)
    sam_model.compile(optimizer=method(optimizer), loss="mse", **compile_kwargs)
    sam_model.fit(IDS, targets, batch_size=len(IDS), epochs=steps, shuffle=False, verbose=0)
    return model, optimizer


def _sam(inner):
    return keras_sam.SAM(inner, rho=0.5)


@pytest.mark.parametrize(
    "inner, splits, compile_kwargs",
    [
        ("sgd", None, {}),
        ("adam", None, {}),
        ("adam", 2, {}),  # m-sharpness: the parts' sparse gradients are concatenated
        ("sgd", None, {"jit_compile": True}),
    ],
)
def test_sparse_sam_matches_the_dense_computation(inner, splits, compile_kwargs):
    sparse_model, sparse_optimizer = _train(_sam, False, inner, splits, **compile_kwargs)
    dense_model, dense_optimizer = _train(_sam, True, inner, splits, **compile_kwargs)
    for a, b in zip(sparse_model.get_weights(), dense_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # The wrapped optimizer got the Embedding's gradient sparse, the one-hot's dense.
    assert sparse_optimizer.seen[0] == "IndexedSlices"
    assert dense_optimizer.seen[0] != "IndexedSlices"


def test_the_norm_counts_duplicate_indices_once_summed():
    # With the gradient rows taken as they come (duplicates not summed), the norm and so
    # the perturbation would be wrong (4.24 against 6.48 in the research notes); the
    # result would then differ from the dense one by far more than the tolerance.
    ids = tf.constant([1, 1, 2, 1, 5, 5])
    table = keras.Variable(np.ones((6, 2), "float32"))
    optimizer = keras_sam.SAM(keras.optimizers.SGD(0.0), rho=1.0)
    seen = {}

    def grad_func():
        with tf.GradientTape() as tape:
            vectors = tf.gather(table.value, ids)
            loss = tf.reduce_sum(vectors * tf.constant([[1.0, 2.0]]))
            # The perturbed pass reads w + e: record the perturbation it sees.
            seen.setdefault("values", []).append(table.value - 1.0)
        return vectors, loss, tape

    optimizer.optimize(grad_func, [table])
    e = seen["values"][1].numpy()
    dense_gradient = np.zeros((6, 2))
    for i in ids.numpy():
        dense_gradient[i] += [1.0, 2.0]
    np.testing.assert_allclose(np.sqrt(np.sum(e**2)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(e, dense_gradient / np.linalg.norm(dense_gradient), rtol=1e-6)


@pytest.mark.parametrize(
    "method",
    [
        lambda inner: keras_sam.SAM(inner, rho=0.5, adaptive=True),
        lambda inner: keras_sam.LookSAM(inner, rho=0.5, k=2),
        lambda inner: keras_sam.GSAM(inner, rho=0.5, alpha=0.3),
    ],
    ids=["ASAM", "LookSAM", "GSAM"],
)
def test_methods_that_combine_gradients_get_them_dense_and_match(method):
    sparse_model, sparse_optimizer = _train(method, False, steps=3)
    dense_model, _ = _train(method, True, steps=3)
    for a, b in zip(sparse_model.get_weights(), dense_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert sparse_optimizer.seen[0] != "IndexedSlices"


def test_sparse_gradients_under_mixed_float16():
    keras.config.set_dtype_policy("mixed_float16")
    sparse_model, sparse_optimizer = _train(_sam, False, steps=2)
    dense_model, _ = _train(_sam, True, steps=2)
    for a, b in zip(sparse_model.get_weights(), dense_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)
    assert sparse_optimizer.seen[0] == "IndexedSlices"


def test_a_method_that_skips_the_second_pass_keeps_sparse_gradients():
    # PeriodicSAM takes one pass on every other step: both branches stay sparse.
    def method(inner):
        return keras_sam.PeriodicSAM(inner, rho=0.5, k=2)

    sparse_model, sparse_optimizer = _train(method, False, steps=4)
    dense_model, _ = _train(method, True, steps=4)
    for a, b in zip(sparse_model.get_weights(), dense_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert sparse_optimizer.seen[0] == "IndexedSlices"
