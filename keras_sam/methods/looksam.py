"""`LookSAM`: the SAM direction every k steps, reused in between (Liu et al., CVPR 2022)."""

from typing import Any

import keras

from keras_sam import maths
from keras_sam.methods.sam import SAM, check_number
from keras_sam.methods.switching import check_period


@keras.saving.register_keras_serializable(package="keras_sam")
class LookSAM(SAM):
    """LookSAM: two passes every `k` steps, one pass plus a stored direction in between.

    SAM's gradient differs from the clean gradient mostly by a component orthogonal to
    it, which changes slowly. LookSAM computes it on every `k`-th step and reuses it:

    ```
    every k-th step (iterations % k == 0):          # two passes
        g   = grad L(w);  g_s = grad L(w + rho g / ||g||)
        g_v = g_s - (g_s . g / ||g||**2) g          # stored (one slot per weight)
        w   = optimizer.update(w, g_s)
    other steps:                                     # ONE pass
        g   = grad L(w)
        w   = optimizer.update(w, g + alpha * (||g|| / ||g_v||) * g_v)
    ```

    Cost: `1 + 1/k` gradient evaluations per step (1.2 for `k=5`), plus one slot of
    memory per weight. When to use it: when SAM helps but its 2x cost is too much;
    the paper reaches SAM's ImageNet accuracy on ViTs with `k=5`. The defaults are the
    paper's (`k=5`, `alpha=0.7`, with very large batches); `rho` as for SAM. The added
    component always has norm `alpha * ||g||`, however small the stored one was; under
    m-sharpness `g` is a part's gradient, noisier and larger for small parts. On
    keras_sam's Fashion-MNIST CNN with SGD at 40 % label noise and parts of 32
    examples, `alpha=0.7` stalled at chance level while `alpha=0.2` matched SAM's
    accuracy at 1.2 passes per step (docs/RESULTS.md): scale `alpha` down with the
    part size. `SAMModel` logs `second_pass_rate`; `second_passes` counts the
    two-pass steps.

    Args:
        optimizer: the wrapped `keras.optimizers.Optimizer`.
        rho: float >= 0 or a schedule of the step, the radius. Defaults to `0.05`.
        k: int >= 1, the period of the two-pass steps (`k=1` is SAM). Defaults to `5`.
        alpha: float >= 0, the weight of the reused component. Defaults to `0.7`, the
            paper's (large batches); at small batches or parts (m-sharpness) it can stall
            at chance level: use about `0.2` there (it matched SAM on keras_sam's CNN,
            where 0.7 stalled; docs/methods.md).
        **kwargs: the other arguments of `keras_sam.SAM` (`adaptive`, `eta`,
            `epsilon`, `perturb`, `distributed_perturbation`,
            `gradient_accumulation_steps`, `name`).

    Reference:
        Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization,
        CVPR 2022. https://arxiv.org/abs/2203.02714
    """

    skips_second_pass = True

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | str,
        rho: float | keras.optimizers.schedules.LearningRateSchedule = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        **kwargs: Any,
    ) -> None:
        k = check_period("k", k)
        alpha = check_number("alpha", alpha, minimum=0.0)
        super().__init__(optimizer, rho=rho, **kwargs)
        self.k = k
        self.alpha = alpha

    def build(self, var_list):
        super().build(var_list)
        self._orthogonal = self.add_state_slots(var_list, "orthogonal_gradient")

    def needs_second_pass(self, gradients, variables):
        del gradients, variables
        return self.decide_second_pass(self.every_k_steps(self.k))

    def descent_gradients(self, gradients, perturbed_gradients, variables):
        orthogonal = maths.orthogonal_component(perturbed_gradients, gradients)
        for v, g_v in zip(variables, orthogonal):
            if g_v is not None:
                slot = self._orthogonal[v]
                slot.assign(keras.ops.cast(g_v, slot.dtype))
        return perturbed_gradients

    def one_pass_gradients(self, gradients, variables):
        positive = self.rho_is_positive()
        if positive is False:
            return gradients
        stored = [
            None if g is None else self._orthogonal[v].value for g, v in zip(gradients, variables)
        ]
        combined = maths.looksam_gradients(
            gradients, stored, self.alpha, g_norm=self._known_norm(gradients)
        )
        if positive is True:
            return combined
        # A step where the `rho` schedule is 0 is a plain step, and a k-th one stores
        # SAM's orthogonal component at rho = 0, which is zero (what the two passes
        # would compute, up to rounding).
        ops = keras.ops
        clear = ops.logical_and(ops.logical_not(positive), self.every_k_steps(self.k))
        for v, g in zip(variables, gradients):
            if g is not None:
                slot = self._orthogonal[v]
                slot.assign(ops.where(clear, ops.zeros_like(slot.value), slot.value))
        return [
            None if g is None else ops.where(positive, c, g) for g, c in zip(gradients, combined)
        ]

    def get_config(self):
        return super().get_config() | {"k": self.k, "alpha": self.alpha}
