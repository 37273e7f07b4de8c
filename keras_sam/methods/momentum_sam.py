"""`MomentumSAM`: SAM at the cost of one pass, perturbing along the momentum (Becker et al.,
2024)."""

from typing import Any

import keras

from keras_sam import maths
from keras_sam.methods.sam import SAM, check_number


@keras.saving.register_keras_serializable(package="keras_sam")
class MomentumSAM(SAM):
    """Momentum-SAM (MSAM): one forward-backward pass per step, at a point chosen before it.

    SAM spends a pass to find its ascent direction. MSAM takes the direction it already
    has: the momentum `v` of the gradients it has descended with. Each step takes ONE
    pass, at `w - rho * v / ||v||`, and the wrapped optimizer descends from `w` with the
    gradient found there:

    ```
    e = -rho * v / (||v|| + epsilon)     # v = 0 at the first step: e = 0, the pass is at w
    g = grad L(w + e)                    # the step's only pass
    v = momentum * v + g                 # the method's state (one slot per weight)
    w = optimizer.update(w, g)           # the weights never hold w + e
    ```

    The paper's implementation keeps the weights at the perturbed point between steps
    and must move them back at the end of training; here the weights are `w` after
    every step, so evaluation, `predict` and checkpoints see `w`, and nothing needs
    moving back. `v` is state of this optimizer (in checkpoints), written only when a
    step succeeds, averaged over the parts under m-sharpness and over the replicas
    under a distribution. It is this method's own momentum, whatever the wrapped
    optimizer does (with `SGD(momentum=0.9)` and `momentum=0.9` it points where SGD's
    velocity points, as in the paper). With `adaptive=True` the neighbourhood is
    ASAM's: `e = -rho * T**2 v / ||T v||` (keras_sam's extension, not in the paper);
    `perturb=` limits `e`, and the norm, to the selected variables.

    What the logs mean: there is no pass at `w`, so `loss` (and the metrics, and the
    BatchNorm statistics the step commits) are those of the pass at `w + e`, MSAM's
    estimate of the perturbed loss; `sharpness` is not measured and not logged. The
    custom loops return `(predictions, loss, loss_sam)` with `loss_sam` equal to
    `loss`, both at `w + e`.

    Cost: one pass per step, as the wrapped optimizer alone, plus one slot of memory per
    weight and a few element-wise operations.

    `rho` is much larger than SAM's: the momentum direction is far from the steepest
    ascent, so the loss changes less along it. The paper uses `rho = 3` in every run
    (CIFAR-100 with SGD, where SAM got 0.2; ImageNet with SGD and with AdamW); that is
    the default here. Small models, whose weight vectors are short, want less: on
    keras_sam's Fashion-MNIST CNN with SGD at 40 % label noise (one seed, 40 epochs),
    `rho=3` and `rho=2` never left chance level, while `rho=1` trained, between plain
    SGD and SAM at one pass a step (docs/RESULTS.md has the figures); sweep `rho`, e.g.
    `keras-sam train --method momentum_sam --rho X`.

    Args:
        optimizer: the wrapped `keras.optimizers.Optimizer`.
        rho: float >= 0 or a schedule of the step, the distance of the pass from `w`.
            Defaults to `3.0`, the paper's (CIFAR-100 and ImageNet networks); a small model,
            whose weight vectors are short, wants less: on keras_sam's CNN 3 and 2 never
            left chance level and `1.0` trained (docs/methods.md; `keras-sam train`
            defaults to 1).
        momentum: float in [0, 1), the decay of `v`. Defaults to `0.9` (the paper's SGD
            momentum).
        **kwargs: the other arguments of `keras_sam.SAM` (`adaptive`, `eta`,
            `epsilon`, `perturb`, `distributed_perturbation`,
            `gradient_accumulation_steps`, `name`).

    Example:

    ```python
    opt = keras_sam.MomentumSAM(keras.optimizers.SGD(0.1, momentum=0.9), rho=3.0)
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    sam_model.fit(x, y, epochs=10)   # one forward-backward pass per step
    ```

    Reference:
        Becker et al., Momentum-SAM: Sharpness Aware Minimization without
        Computational Overhead, 2024. https://arxiv.org/abs/2401.12033
    """

    one_pass = True
    measures_sharpness = False

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | str,
        rho: float | keras.optimizers.schedules.LearningRateSchedule = 3.0,
        momentum: float = 0.9,
        **kwargs: Any,
    ) -> None:
        momentum = check_number("momentum", momentum, minimum=0.0)
        if momentum >= 1:
            raise ValueError(f"`momentum` must be in [0, 1). Received: momentum={momentum!r}")
        super().__init__(optimizer, rho=rho, **kwargs)
        self.momentum = momentum

    def build(self, var_list):
        super().build(var_list)
        self._momenta = self.add_state_slots(var_list, "momentum")

    def initial_perturbation(self, variables):
        if self.rho_is_positive() is False:
            return None  # rho=0: the pass at `w`, bitwise the wrapped optimizer
        momenta = [self._momenta[v].value for v in variables]
        return self.perturbation_along(momenta, variables, sign=-1.0)

    def one_pass_gradients(self, gradients, variables):
        present = [v for g, v in zip(gradients, variables) if g is not None]
        slots = [self._momenta[v] for v in present]
        # `v <- momentum v + g`, over all the slots at once.
        updated = maths.list_ops.add_scaled(
            [keras.ops.cast(g, s.dtype) for g, s in zip(filter(_present, gradients), slots)],
            self.momentum,
            [s.value for s in slots],
        )
        for slot, value in zip(slots, updated):
            slot.assign(value)
        return gradients

    def get_config(self):
        return super().get_config() | {"momentum": self.momentum}


def _present(gradient):
    return gradient is not None
