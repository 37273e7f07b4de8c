"""`GSAM`: Surrogate Gap Guided SAM (Zhuang et al., ICLR 2022)."""

from typing import Any

import keras

from keras_sam import maths
from keras_sam.methods.sam import SAM, check_number


@keras.saving.register_keras_serializable(package="keras_sam")
class GSAM(SAM):
    """Surrogate Gap Guided Sharpness-Aware Minimization.

    SAM's perturbed gradient minimizes the perturbed loss `L(w + e)`; GSAM also shrinks
    the surrogate gap `h(w) = L(w + e) - L(w)`, without undoing the first aim, by
    adding an ascent on the clean loss orthogonal to the perturbed gradient:

    ```
    g      = grad L(w)                          # clean pass
    e      = rho_t * g / (||g|| + epsilon)      # as SAM (ASAM with adaptive=True)
    g_adv  = grad L(w + e)                      # perturbed pass
    g_perp = g - (g . g_adv / ||g_adv||**2) g_adv
    w      = optimizer.update(w, g_adv - alpha * g_perp)
    ```

    When to use it: where SAM helps and you can afford its 2x cost; the paper reports
    gains over SAM mostly on Vision Transformers. The paper lets `rho` follow the
    learning rate, `rho_t` between `rho_min` and `rho_max` in proportion to `lr_t`:
    pass `rho=keras_sam.ProportionalRho(lr_schedule, rho_max=..., rho_min=...)`.
    Cost: as SAM (two passes), plus a few global dot products. `alpha=0` (and a
    constant `rho`) is SAM. `alpha` is GSAM's own knob: the paper's ViT runs use values
    around 0.4 (the default here); tune it in [0, 0.5], starting small with SGD. On
    keras_sam's Fashion-MNIST CNN with SGD at 40 % label noise, `alpha=0.4` never left
    chance level while `alpha=0.1` trained (docs/RESULTS.md).

    Args:
        optimizer: the wrapped `keras.optimizers.Optimizer`.
        rho: float >= 0 or a schedule of the step, the radius. Defaults to `0.05`.
        alpha: float >= 0, the weight of the orthogonal correction. Defaults to `0.4`, the
            paper's (ViTs); with SGD at small batches it can stall at chance level: start
            at about `0.1` there (it trained on keras_sam's CNN, where 0.4 stalled;
            docs/methods.md).
        **kwargs: the other arguments of `keras_sam.SAM` (`adaptive`, `eta`,
            `epsilon`, `perturb`, `distributed_perturbation`,
            `gradient_accumulation_steps`, `name`).

    Reference:
        Zhuang et al., Surrogate Gap Minimization Improves Sharpness-Aware Training,
        ICLR 2022. https://arxiv.org/abs/2203.08065
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | str,
        rho: float | keras.optimizers.schedules.LearningRateSchedule = 0.05,
        alpha: float = 0.4,
        **kwargs: Any,
    ) -> None:
        alpha = check_number("alpha", alpha, minimum=0.0)
        super().__init__(optimizer, rho=rho, **kwargs)
        self.alpha = alpha

    def descent_gradients(self, gradients, perturbed_gradients, variables):
        del variables
        return maths.gsam_gradients(gradients, perturbed_gradients, self.alpha)

    def get_config(self):
        return super().get_config() | {"alpha": self.alpha}
