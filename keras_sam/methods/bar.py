"""`BAR`: balancedness-aware regularization of LoRA adapters (Li, Zhang & He, NeurIPS 2024)."""

from __future__ import annotations

import copy
from typing import Any

import keras

from keras_sam.methods.config import (
    refuse_perturbation_arguments,
    serialize_rate,
    without_perturbation_arguments,
)
from keras_sam.methods.hooks import layer_of
from keras_sam.methods.sam import SAM, check_rate

# The two factors of each Keras LoRA adapter (`layer.enable_lora(rank)`): Dense and
# EinsumDense add `kernel + lora_kernel_a @ lora_kernel_b`, Embedding
# `embeddings + lora_embeddings_a @ lora_embeddings_b`.
LORA_PAIRS = (("lora_kernel_a", "lora_kernel_b"), ("lora_embeddings_a", "lora_embeddings_b"))

# The paper's two variants: which factor grows and which shrinks.
NBAR = "nbar"  # the factor with the larger gradient norm grows (Alg. 2)
OBAR = "obar"  # the factor with the larger weight norm shrinks (Alg. 3)
VARIANTS = (NBAR, OBAR)


@keras.saving.register_keras_serializable(package="keras_sam")
class BAR(SAM):
    """Balancedness-aware regularization: SAM's effect on LoRA, without its second pass.

    For a scale-invariant pair such as a LoRA adapter `W + A B`, SAM's main implicit
    effect is to balance the factors, to drive the balancedness `(||A||**2 - ||B||**2) / 2`
    towards 0 (Li, Zhang & He, 2024, Theorems 2 and 5). BAR makes that effect an explicit
    regularizer, applied to each adapter on its own, at the cost of plain training: one
    forward-backward pass per step. With `g_A`, `g_B` the clean gradients of one adapter:

    ```
    nBAR (Alg. 2):  s = +1 if ||g_A|| >= ||g_B|| else -1   # the larger gradient grows
    oBAR (Alg. 3):  s = +1 if ||A||   <  ||B||   else -1   # the larger factor shrinks
    g_A <- g_A - s * alpha_t * A
    g_B <- g_B + s * alpha_t * B
    w   <- optimizer.update(w, g)       # every other variable: its plain gradient
    ```

    That is the gradient of the paper's regularizer `alpha_t * s * (||B||**2 - ||A||**2) / 2`
    (the sign frozen at this step). With plain SGD at learning rate `eta_t` it is exactly
    the paper's update, `A <- (1 + s alpha_t eta_t) A`, `B <- (1 - s alpha_t eta_t) B`,
    then the SGD step with the clean gradients. The paper applies the scaling to the
    weights, decoupled from the optimizer, as AdamW applies weight decay; here it is a
    gradient term, so with momentum or Adam it passes through the optimizer's moments
    and scaling, as an L2 penalty does with Adam (not AdamW): the same direction, a
    different magnitude (tune `alpha` for the optimizer at hand).

    The adapters are found by name: each layer's `lora_kernel_a` with its
    `lora_kernel_b`, or `lora_embeddings_a` with `lora_embeddings_b` (Keras's
    `enable_lora` on Dense, EinsumDense and Embedding). Every other trainable variable
    (a task head, biases) descends with its plain gradient. A step whose trainable
    variables hold no such pair is refused with an error.

    Cost: one forward-backward pass per step, no persistent memory (no slot, no state
    variable: the squared norms of the adapters and their gradients are taken in the
    step). `SAMModel` logs no `sharpness` (no perturbed pass). The paper reports it
    about as accurate as SAM for LoRA fine-tuning (RoBERTa-large, GPT-2, OPT-1.3B) for
    about 5 % of SAM's extra time.

    Args:
        optimizer: the wrapped `keras.optimizers.Optimizer` (SGD or Adam in the paper).
        alpha: float >= 0, or a schedule of the step (a
            `keras.optimizers.schedules.LearningRateSchedule` evaluated at
            `iterations`), the regularization coefficient `alpha_t`. The paper lets it
            decrease (cosine or linear), as SAM's balancing weakens once the factors
            are balanced. `alpha=0` is the wrapped optimizer. Defaults to `0.1`.
        variant: `"nbar"` (the paper's nBAR, from SAM's dynamics on
            non-overparametrized problems such as LoRA, which it is built for) or
            `"obar"` (oBAR, from the overparametrized case). Defaults to `"nbar"`.
        gradient_accumulation_steps: int >= 1 or `None`, as for `keras_sam.SAM`.
        verify_optimizer_step: bool, as for `keras_sam.SAM`.
        name: string, the optimizer's name. Defaults to `None` (automatic).

    Reference:
        Li, Zhang & He, Implicit Regularization of Sharpness-Aware Minimization for
        Scale-Invariant Problems, NeurIPS 2024 (Section 5.2, Algorithms 2 and 3).
        https://arxiv.org/abs/2410.14802
    """

    one_pass = True
    measures_sharpness = False

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | str,
        alpha: float | keras.optimizers.schedules.LearningRateSchedule = 0.1,
        variant: str = NBAR,
        gradient_accumulation_steps: int | None = None,
        verify_optimizer_step: bool = False,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        refuse_perturbation_arguments(
            kwargs,
            "`BAR` takes no perturbed pass, so it has no `{name}`: its only knobs are "
            "`alpha` (the regularization coefficient) and `variant`. "
            "Received: {name}={value!r}",
        )
        alpha = check_rate("alpha", alpha)
        if variant not in VARIANTS:
            raise ValueError(
                f"`variant` must be one of {', '.join(repr(v) for v in VARIANTS)}. "
                f"Received: variant={variant!r}"
            )
        super().__init__(
            optimizer,
            rho=0.0,
            gradient_accumulation_steps=gradient_accumulation_steps,
            verify_optimizer_step=verify_optimizer_step,
            name=name,
            **kwargs,
        )
        self.alpha = alpha
        self.variant = variant

    def one_pass_gradients(self, gradients, variables):
        pairs = lora_pairs(variables)
        if not pairs:
            raise ValueError(
                "`BAR` regularizes LoRA adapters, and none of the "
                f"{len(variables)} trainable variables is one: it needs pairs "
                f"{' / '.join('(' + a + ', ' + b + ')' for a, b in LORA_PAIRS)} of the same "
                "layer, which `layer.enable_lora(rank)` creates (Dense, EinsumDense, "
                f"Embedding). Variable paths: {', '.join(v.path for v in variables[:8])}"
                + (", ..." if len(variables) > 8 else "")
            )
        alpha = self.at_step(self.alpha)
        result = list(gradients)
        for i, j in pairs:
            if gradients[i] is None or gradients[j] is None:
                continue
            a, b = variables[i].value, variables[j].value
            if self.variant == NBAR:
                grow_a = keras.ops.greater_equal(
                    _squared_norm(gradients[i]), _squared_norm(gradients[j])
                )
            else:
                grow_a = keras.ops.less(_squared_norm(a), _squared_norm(b))
            step = keras.ops.where(grow_a, 1.0, -1.0) * alpha  # s * alpha_t, float32
            result[i] = gradients[i] - keras.ops.cast(step, gradients[i].dtype) * a
            result[j] = gradients[j] + keras.ops.cast(step, gradients[j].dtype) * b
        return result

    def get_config(self):
        config = without_perturbation_arguments(super().get_config())
        return config | {"alpha": serialize_rate(self.alpha), "variant": self.variant}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = copy.deepcopy(config)  # Keras's deserialization edits nested configs
        optimizer = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        if isinstance(config.get("alpha"), dict):
            config["alpha"] = keras.saving.deserialize_keras_object(
                config["alpha"], custom_objects=custom_objects
            )
        return cls(optimizer, **config)


def lora_pairs(variables):
    """`(i, j)` index pairs of each layer's LoRA factors `A` (i) and `B` (j) in `variables`,
    matched by layer (the path up to the last `/`) and name."""
    by_key = {
        (layer_of(v), v.name.split("/")[-1].split(":")[0]): k for k, v in enumerate(variables)
    }
    pairs = []
    for (layer, name), i in by_key.items():
        for a_name, b_name in LORA_PAIRS:
            if name == a_name and (layer, b_name) in by_key:
                pairs.append((i, by_key[(layer, b_name)]))
    return sorted(pairs)


def _squared_norm(tensor):
    tensor = keras.ops.cast(tensor, "float32")
    return keras.ops.sum(tensor * tensor)
