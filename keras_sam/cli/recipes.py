"""The methods the command line trains, by name: each one's builder and default rho.

`RECIPES` is the one mapping that `train`, `compare`, `RunConfig` and the benchmark scripts
read the method names, their default radius and their construction from. Keras and the
methods are imported by the builders only, so that the command line parses its arguments
without them.
"""

import dataclasses
from collections.abc import Callable

# rho when none is given: 0.1, the label-noise runs' value (docs/RESULTS.md; the library's
# SAM defaults to the paper's 0.05 for clean data); ASAM's scale-invariant radius wants
# about ten times SAM's (Kwon et al., 2021).
DEFAULT_RHO = 0.1
ASAM_RHO_SCALE = 10.0
# Momentum-SAM's distance along the momentum. keras_sam.MomentumSAM defaults to the paper's
# 3 (large ResNets and ViTs); on the Fashion-MNIST CNN at 40 % label noise (seed 0, 40
# epochs) 3 and 2 stalled at chance level and 1 did best of 0.1, 0.3 and 1
# (docs/methods.md).
MOMENTUM_SAM_RHO = 1.0
# MESA (one pass a step, rho 0): the authors' ImageNet recipe scaled to the run. Their
# weight average's decay, 0.9998, remembers about one epoch of ImageNet at batch 256 (5005
# steps), so a run's is 1 - 1 / (steps per epoch); their trajectory term starts after 5
# of 90 epochs, so a run's after the same share of its steps; lambda 0.8, temperature 5.
MESA_START_SHARE = 5 / 90
MESA_LMBDA, MESA_TEMPERATURE = 0.8, 5.0
# Old spellings still accepted: "sgd" meant "the inner optimizer alone", whatever it is.
METHOD_ALIASES = {"sgd": "plain"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a run builds a method: `build(inner, rho, config, steps)` (None: the inner
    optimizer alone), and the rho it gets when none is given."""

    build: Callable | None
    rho: float = DEFAULT_RHO


def _methods():
    from keras_sam import methods

    return methods


def _build(module, cls_name, alpha=False, k=False, **fixed):
    """A builder of `keras_sam.methods.<module>.<cls_name>(inner, rho=rho, **fixed)`, with
    the run's `alpha` when the method takes one and it is given (else the method's own), and
    the run's `k` when the method takes one."""

    def build(inner, rho, config, steps):
        kwargs = {"rho": rho, **fixed}
        if alpha and config.alpha is not None:
            kwargs["alpha"] = config.alpha
        if k:
            kwargs["k"] = config.k
        return getattr(getattr(_methods(), module), cls_name)(inner, **kwargs)

    return build


def _mesa(inner, rho, config, steps):
    """MESA with the authors' recipe scaled to the run (`MESA_START_SHARE`)."""
    steps_per_epoch = max(1.0, steps / config.epochs)
    return _methods().mesa.MESA(
        inner,
        lmbda=MESA_LMBDA,
        temperature=MESA_TEMPERATURE,
        decay=min(0.9998, 1.0 - 1.0 / steps_per_epoch),
        start_step=int(round(MESA_START_SHARE * steps)),
        rho=rho,
    )


RECIPES = {
    "plain": Recipe(None, rho=DEFAULT_RHO),
    "sam": Recipe(_build("sam", "SAM", adaptive=False)),
    "asam": Recipe(_build("sam", "SAM", adaptive=True), rho=ASAM_RHO_SCALE * DEFAULT_RHO),
    "gsam": Recipe(_build("gsam", "GSAM", alpha=True)),
    "friendly_sam": Recipe(_build("friendly_sam", "FriendlySAM")),
    "looksam": Recipe(_build("looksam", "LookSAM", alpha=True, k=True)),
    "periodic_sam": Recipe(_build("switching", "PeriodicSAM", k=True)),
    "aesam": Recipe(_build("switching", "AESAM")),
    "momentum_sam": Recipe(_build("momentum_sam", "MomentumSAM"), rho=MOMENTUM_SAM_RHO),
    "mesa": Recipe(_mesa, rho=0.0),  # MESA alone; a positive rho adds SAM's perturbed pass
}
METHODS = tuple(RECIPES)


def default_rho(method):
    """The radius a run of `method` gets when none is given (ASAM's is ten times SAM's;
    Momentum-SAM's is its own, `MOMENTUM_SAM_RHO`; MESA's 0)."""
    return RECIPES[METHOD_ALIASES.get(method, method)].rho


def build_method(config, inner, steps):
    """`config.method` wrapping the optimizer `inner`, for a run of `steps` steps (late-phase
    SAM: rho 0 for the first `config.sam_start` of them)."""
    recipe = RECIPES[config.method]
    if recipe.build is None:
        return inner
    rho = config.rho
    if config.sam_start:
        start = int(round(config.sam_start * steps))
        rho = _methods().schedules.LatePhaseRho(rho, start_step=start)
    return recipe.build(inner, rho, config, steps)
