"""`FlatLoRA`: LoRA fine-tuning over a flat loss landscape of the merged weights (Li et al.,
ICML 2025), at the cost of one pass a step."""

from __future__ import annotations

import math
import random
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_sam._validation import check_integer
from keras_sam.methods.config import (
    refuse_perturbation_arguments,
    serialize_rate,
    without_perturbation_arguments,
)
from keras_sam.methods.sam import SAM, check_rate

# SAM's arguments that mean nothing for a random perturbation, with their defaults: a
# config carrying the default is accepted (`SAM.from_config` passes `perturb=None`).

# The frozen weight and the two adapters of each kind of LoRA layer Keras has (Dense,
# EinsumDense and the convolutions share the first; Embedding has the second). The merged
# weight is `frozen + (lora_alpha / lora_rank) * matmul(a, b)` in every one.
_LORA_ATTRIBUTES = (
    ("_kernel", "lora_kernel_a", "lora_kernel_b"),
    ("_embeddings", "lora_embeddings_a", "lora_embeddings_b"),
)


@keras.saving.register_keras_serializable(package="keras_sam")
class FlatLoRA(SAM):
    """Flat-LoRA: LoRA adapters trained for a flat loss landscape of the merged weights.

    LoRA trains `W' = W + s B A` through the adapters `A`, `B` (`s = lora_alpha /
    lora_rank`; `W` frozen); a minimum flat in the adapters' space may still be sharp in
    the full weight space, where the merged model lives. Flat-LoRA minimizes the expected
    loss under a random perturbation of the merged weight instead, with ONE pass a step:

    ```
    W'      = W + s B A                                  # merged, per LoRA layer
    sigma_t = sigma * (1 - cos(pi t / T)) / 2            # with total_steps=T; else sigma
    eps_ij  ~ N(0, sigma_t**2 / n * ||W'_i||**2)         # row i = output unit i, n inputs
    g       = grad_{A, B, ...} L(W + s B A + eps)        # the step's only pass
    A, B    = optimizer.update(A, B, g)                  # W never changes
    ```

    Each output unit's row of the merged weight gets noise of standard deviation
    `sigma_t ||W'_i|| / sqrt(n)`, so a unit's relative perturbation is about `sigma_t`
    whatever its scale (the paper's filter-wise perturbation; `n` the input dimension).
    In Keras's kernel layout the output axis is the last one: for Dense, the
    convolutions and Embedding (a Dense on one-hot tokens: rows are embedding
    dimensions, `n` the vocabulary) the norm is over all the other axes; for
    EinsumDense over the kernel's contracted axes (those not in the output).

    The pass reads `W + eps` in place of the frozen weight through the step's stateless
    scope (`SAM.pass_values`): nothing is written, so the frozen weights are bitwise
    unchanged, also when a step fails. The noise is a function of `(seed, iterations,
    layer)` (a counter-based generator written in `keras.ops`: the same numbers on
    every backend, under `tf.function`/XLA, `jax.jit` and PyTorch eager), so it is
    never stored: regenerated for each part of the batch, identical for every
    micro-batch of one optimizer step and every replica, and a resumed run draws what
    the uninterrupted one would. The merged weight's norm is taken without gradient
    (a constant of the step, as in the paper's code).

    Choices where the official code (github.com/nblt/Flat-LoRA, `logTrainer.py`) and the
    paper differ or are silent, and what is followed here:

    - schedule: both increase the strength as `(1 - cos(pi t / T)) / 2` from 0 at the
      first step to `sigma` at the last; followed with `total_steps=T` (no default: Keras
      does not know a run's length; `None` keeps `sigma` constant, and `sigma` may be a
      schedule of the step of its own);
    - norm: both take the row norm of the merged weight over the input dimension, times
      `sigma / sqrt(n)`: followed;
    - where the noise lives: the code adds it into the weights before the pass and
      subtracts a regenerated copy after (which rounds: `(W + e) - e` is not `W` in
      floating point), with a seed from the clock; here it is never written, and the
      seed is an argument saved in the config, so runs reproduce;
    - which layers: the code perturbs LoRA Linear layers; here every Keras LoRA layer
      among the trained variables (Dense, EinsumDense, the convolutions, Embedding).

    Trained variables that are not LoRA adapters (a classifier head, biases) train as
    usual and are not perturbed. Quantized LoRA layers are refused (their frozen weight
    is not a float kernel).

    It needs the model's layers to find each adapter's frozen weight: `SAMModel` binds
    them by itself; in a custom loop call `optimizer.bind(model)` before the first step.

    Cost: one forward-backward pass a step, as LoRA alone, and no persistent memory
    beyond LoRA's (no state, no slot). During the pass the noisy copy `W + eps` of each
    adapted frozen weight exists beside `W` (the official code writes the noise into the
    weights instead), and drawing the noise is element-wise work over the adapted
    weights (about 35 operations per weight, with a log, a root, a sine and a cosine):
    small beside the passes when many tokens go through each weight, not on a CPU at
    small batches (docs/methods.md has figures). `SAMModel` logs no `sharpness` (there
    is no pass at `W'` alone: `loss` is the loss at the perturbed weights).

    Args:
        optimizer: the wrapped `keras.optimizers.Optimizer`.
        sigma: float >= 0 or a schedule of the step, the relative strength of the noise.
            Defaults to `0.05` (the official code's setting).
        total_steps: int >= 1 or None, the number of optimizer steps of the run: the
            strength then rises as `sigma (1 - cos(pi t / T)) / 2` (the paper's schedule;
            `sigma` after `T` steps). `None`: `sigma` at every step. Defaults to `None`.
        seed: int in [0, 2**32) or None, the noise's seed (None draws one, kept in the
            config). Defaults to `None`.
        **kwargs: `gradient_accumulation_steps`, `verify_optimizer_step` and `name`, as
            for `keras_sam.SAM`.

    Example:

    ```python
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            layer.enable_lora(8)
    opt = keras_sam.FlatLoRA(keras.optimizers.AdamW(1e-3), sigma=0.05, total_steps=1000)
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    sam_model.fit(x, y, epochs=...)   # one forward-backward pass per step
    ```

    Reference:
        Li et al., Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape, ICML 2025.
        https://arxiv.org/abs/2409.14396
    """

    one_pass = True
    measures_sharpness = False

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | str,
        sigma: float | keras.optimizers.schedules.LearningRateSchedule = 0.05,
        total_steps: int | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        refuse_perturbation_arguments(
            kwargs,
            "`FlatLoRA` does not take `{name}`: its perturbation is random noise on the "
            "merged LoRA weights, of relative strength `sigma`.",
        )
        sigma = check_rate("sigma", sigma)
        total_steps = check_integer("total_steps", total_steps, minimum=1, optional=True)
        if seed is None:
            seed = random.SystemRandom().randrange(2**32)
        else:
            seed = check_integer(
                "seed", seed, 0, 2**32 - 1, optional=True, rule="an integer in [0, 2**32)"
            )
        super().__init__(optimizer, rho=0.0, **kwargs)
        self.sigma = sigma
        self.total_steps = None if total_steps is None else int(total_steps)
        self.seed = int(seed)
        self._lora_layers = None  # id(adapter A) -> layer, from `bind`
        self._bound_key = None

    # ----------------------------------------------------------------- the method
    @property
    def binds_model(self):
        return True

    def bind(self, model: keras.Model) -> FlatLoRA:
        """Finds `model`'s LoRA layers (each adapter's frozen weight); `SAMModel` calls it."""
        layers = model._flatten_layers(include_self=True, recursive=True)
        found = {}
        for layer in layers:
            if not getattr(layer, "lora_enabled", False):
                continue
            for frozen, a, b in _LORA_ATTRIBUTES:
                if hasattr(layer, a) and hasattr(layer, frozen):
                    found[id(getattr(layer, a))] = (layer, frozen, a, b)
        self._lora_layers = _Layers(found)
        return self

    def pass_values(self, variables):
        """The noisy frozen weight `W + eps` of each LoRA layer whose adapters train."""
        layers = self._lora_layers
        if layers is None:
            raise ValueError(
                "`FlatLoRA` needs the model to find the frozen weights of its LoRA layers: "
                "call `optimizer.bind(model)` before the first step of a custom loop "
                "(`SAMModel` does it for you)."
            )
        trained = {id(v) for v in variables}
        targets = []
        for v in variables:
            entry = layers.get(id(v))
            if entry is not None and id(getattr(entry[0], entry[3])) in trained:
                targets.append(entry)
        if not targets:
            raise ValueError(
                "`FlatLoRA` found no LoRA layer among the trained variables: it perturbs "
                "the merged weights of layers with LoRA enabled (`layer.enable_lora(rank)` "
                "on Dense, EinsumDense, Embedding or a convolution), whose adapters train. "
                f"Trained variable paths: {', '.join(v.path for v in variables[:8])}"
                + (", ..." if len(variables) > 8 else "")
            )
        strength = self.strength()
        step = self.iterations.value
        pairs = []
        for index, (layer, frozen_name, a_name, b_name) in enumerate(targets):
            if getattr(layer, "quantization_mode", None):
                raise ValueError(
                    f"`FlatLoRA` cannot perturb the quantized layer `{layer.name}` "
                    f"(quantization_mode={layer.quantization_mode!r}): its frozen weight is "
                    "not a float kernel."
                )
            frozen = getattr(layer, frozen_name)
            noise = self.noise(
                frozen.value,
                getattr(layer, a_name).value,
                getattr(layer, b_name).value,
                layer.lora_alpha / layer.lora_rank,
                reduction_axes(layer, len(frozen.shape)),
                strength,
                step,
                index,
            )
            pairs.append((frozen, frozen.value + ops.cast(noise, frozen.dtype)))
        return pairs

    # ------------------------------------------------------------------- helpers
    def strength(self):
        """`sigma_t` at this step: `sigma` (or its schedule) times the cosine ramp."""
        sigma = self.at_step(self.sigma)
        if self.total_steps is None:
            return sigma
        t = ops.minimum(ops.cast(self.iterations.value, "float32"), float(self.total_steps))
        return sigma * 0.5 * (1.0 - ops.cos(math.pi * t / self.total_steps))

    def noise(self, frozen, a, b, scale, axes, strength, step, index):
        """`eps` for one layer: `strength ||W'_i|| / sqrt(n)` times standard normal noise,
        `W' = frozen + scale * a @ b`, the norm over `axes` (n their sizes' product)."""
        a, b = (ops.stop_gradient(ops.cast(t, "float32")) for t in (a, b))
        merged = ops.cast(frozen, "float32") + scale * ops.matmul(a, b)
        n = int(np.prod([frozen.shape[i] for i in axes])) if axes else 1
        row_norms = ops.sqrt(ops.sum(ops.square(merged), axis=axes, keepdims=True))
        deviation = ops.cast(strength, "float32") * row_norms / math.sqrt(n)
        return deviation * standard_normal(tuple(frozen.shape), self.seed, step, index)

    def get_config(self):
        config = without_perturbation_arguments(super().get_config())
        return config | {
            "sigma": serialize_rate(self.sigma),
            "total_steps": self.total_steps,
            "seed": self.seed,
        }


class _Layers:
    """id(adapter A) -> (layer, frozen, a, b), kept out of TensorFlow's tracking."""

    def __init__(self, by_id):
        self._by_id = by_id

    def get(self, key):
        return self._by_id.get(key)


def reduction_axes(layer, rank):
    """The kernel axes a row norm runs over: the inputs of each output unit.

    The kernel's last axis is the output for Dense, the convolutions and Embedding; for
    EinsumDense the axes contracted with the input (the kernel's letters absent from the
    output)."""
    equation = getattr(layer, "equation", None)
    if isinstance(equation, str) and "..." not in equation.split("->")[0].split(",")[-1]:
        inputs, output = equation.replace(" ", "").split("->")
        kernel = inputs.split(",")[1]
        return tuple(i for i, letter in enumerate(kernel) if letter not in output)
    return tuple(range(rank - 1))


# ------------------------------------------------------------------ the noise
# A counter-based generator: element `c` of a layer's noise is a hash of `c` and of a key
# made from (seed, step, layer), so nothing is stored and every backend draws the same
# numbers. The hash is Wellons's "lowbias32" integer mixer, on int32 bit patterns
# (wrap-around multiplication; logical shifts by masking the arithmetic ones), which
# `keras.ops` has on every backend and compiler; the uniforms become normals by Box-Muller.
_MIX_1 = 0x7FEB352D
_MIX_2 = 0x846CA68B
_GOLDEN = 0x9E3779B9
_SALT = 0x632BE5AB


def _int32(value):
    """A uint32 constant as the int32 of the same bits."""
    return int(np.array(value & 0xFFFFFFFF, dtype=np.uint32).view(np.int32))


def _shift_right(x, bits):
    return ops.bitwise_and(ops.right_shift(x, bits), (1 << (32 - bits)) - 1)


def _mix(x):
    x = ops.bitwise_xor(x, _shift_right(x, 16))
    x = ops.multiply(x, ops.convert_to_tensor(_int32(_MIX_1), "int32"))
    x = ops.bitwise_xor(x, _shift_right(x, 15))
    x = ops.multiply(x, ops.convert_to_tensor(_int32(_MIX_2), "int32"))
    return ops.bitwise_xor(x, _shift_right(x, 16))


def _key(seed, step, index):
    key = _mix(ops.convert_to_tensor(_int32(seed ^ _GOLDEN), "int32"))
    key = _mix(ops.bitwise_xor(key, ops.cast(step, "int32")))
    return _mix(ops.bitwise_xor(key, ops.convert_to_tensor(_int32(index + _SALT), "int32")))


def standard_normal(shape, seed, step, index):
    """Standard normal float32 noise of `shape`, a pure function of `seed` (an int),
    `step` (an integer tensor or int) and `index` (an int, the layer).

    Pairs of 24-bit uniforms in (0, 1) from the hash of each counter give two normals
    each (Box-Muller)."""
    size = int(np.prod(shape)) if shape else 1
    pairs = (size + 1) // 2
    key = _key(seed, step, index)
    salted = _mix(ops.bitwise_xor(key, ops.convert_to_tensor(_int32(_SALT), "int32")))
    counters = ops.arange(2 * pairs, dtype="int32")
    bits = _mix(ops.add(_mix(ops.bitwise_xor(counters, key)), salted))
    uniform = (ops.cast(_shift_right(bits, 8), "float32") + 0.5) * (1.0 / 2**24)
    uniform = ops.reshape(uniform, (pairs, 2))
    radius = ops.sqrt(-2.0 * ops.log(uniform[:, 0]))
    angle = (2.0 * math.pi) * uniform[:, 1]
    normal = ops.concatenate([radius * ops.cos(angle), radius * ops.sin(angle)])
    return ops.reshape(normal[:size], shape)
