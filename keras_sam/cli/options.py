"""The command line's options, each declared once.

An `Option` is one row: its flag, the config field it sets (`RunConfig`'s for `train` and
`compare`, `InspectSettings`'s for `inspect`; none for an option of the command alone), its
type and rule (a `Number`, `Integer` or `Choice`, which parses the command line's text and
validates a value given in code), its default and its help. From these tables
`add_arguments` makes a command's `argparse` arguments, `declared` makes the config
dataclass (its fields, in the table's order, with the table's defaults), `validate` checks a
config's values, and `config_values` reads a config's fields from parsed arguments.

Keras is not imported here: `--help` and argument errors answer at once.
"""

import argparse
import dataclasses
import math

from keras_sam import _validation
from keras_sam.cli.recipes import (
    ASAM_RHO_SCALE,
    DEFAULT_RHO,
    METHOD_ALIASES,
    METHODS,
    MOMENTUM_SAM_RHO,
)
from keras_sam.models import MODELS

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
# `SAMModel`'s default (keras_sam.trainers.skipped_steps), here without importing Keras.
MAX_CONSECUTIVE_SKIPS = 100


# ------------------------------------------------------------------ types and rules
# Each parse failure says in plain words what was expected and what was given (argparse
# prefixes the option's name: "argument --rho: expected a number >= 0, got 'abc'"); each
# validation failure names the field: "`rho` must be a number >= 0. Received: rho=-1".


@dataclasses.dataclass(frozen=True)
class Number:
    """A finite number >= `minimum`, and <= `maximum` (< with `below`) when given."""

    minimum: float = 0.0
    maximum: float | None = None
    below: bool = False
    annotation = float

    def rule(self):
        return _validation.number_rule(self.minimum, self.maximum, below=self.below)

    def accepts(self, value):
        if not (_validation.is_real(value) and math.isfinite(value)):
            return False
        if self.maximum is not None and (
            value >= self.maximum if self.below else value > self.maximum
        ):
            return False
        return value >= self.minimum

    def parse(self, text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not self.accepts(value):
            raise argparse.ArgumentTypeError(f"expected {self.rule()}, got {text!r}")
        return value

    def validate(self, name, value):
        if not self.accepts(value):
            _validation.refuse(name, self.rule(), value)


@dataclasses.dataclass(frozen=True)
class Integer:
    """An integer in [`minimum`, `maximum`] (either bound optional); `note` says what a
    special value means ("0: all")."""

    minimum: int | None = None
    maximum: int | None = None
    note: str = ""
    annotation = int

    def rule(self, noun="an integer"):
        rule = _validation.integer_rule(self.minimum, self.maximum, noun)
        return f"{rule} ({self.note})" if self.note else rule

    def accepts(self, value):
        return (
            _validation.is_integer(value)
            and (self.minimum is None or value >= self.minimum)
            and (self.maximum is None or value <= self.maximum)
        )

    def parse(self, text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if not self.accepts(value):
            rule = self.rule("a whole number")
            raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}") from None
        return value

    def validate(self, name, value):
        if not self.accepts(value):
            _validation.refuse(name, self.rule(), value)


class SkipLimit(Integer):
    """`--max-consecutive-skips`: a whole number >= 0, where 0 means no limit (None)."""

    def parse(self, text):
        return super().parse(text) or None


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of `values`; `aliases` maps other spellings to them (`sgd` -> `plain`)."""

    values: tuple
    aliases: dict = dataclasses.field(default_factory=dict)
    annotation = str

    def parse(self, text):
        return self.aliases.get(text, text)  # argparse then checks it is one of `values`

    def validate(self, name, value):
        _validation.check_one_of(name, value, self.values)


class SamMethod(Choice):
    """`compare --method`: a SAM method (compare trains the plain runs itself)."""

    def parse(self, text):
        name = super().parse(text)
        if name == "plain":
            raise argparse.ArgumentTypeError(
                f"compare trains the plain runs itself; expected a SAM method ("
                f"{', '.join(self.values)}), got {text!r}"
            )
        return name


# ------------------------------------------------------------------ the tables
RUN = ("train", "compare")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: `flag` (a name without dashes is positional; None: a config field that
    no command sets), the config `field` it
    sets (None: the command's own), its type and rule `check` (None: free text, or a switch
    when `default` is False), `default` (the config's, and the command line's unless
    `command_default` names another for a command), `help`, the `commands` that take it
    (none: a config field alone) and the mutually exclusive `group` it belongs to."""

    flag: str | None
    field: str | None
    check: object
    default: object
    help: str = ""
    commands: tuple = RUN
    command_default: dict = dataclasses.field(default_factory=dict)
    group: str | None = None

    @property
    def dest(self):
        return self.flag.lstrip("-").replace("-", "_")

    def default_for(self, command):
        return self.command_default.get(command, self.default)


# What the command line evaluates by default: every few epochs on a fixed subset of the
# test set, the whole test set after the last epoch, and the top Hessian eigenvalue of the
# final weights on a fixed batch of 256 training examples (seconds a model: the cnn, 2 CPU
# cores); the evaluations would otherwise cost more than the training on the 2,000-image
# runs. A `RunConfig` made in code evaluates every epoch on the whole test set and
# measures no Hessian: the library's runs (tests, benchmark scripts) count on it.
def _command_line(value):
    return dict.fromkeys(RUN, value)


_RHO_HELP = (
    f"SAM radius (default: {DEFAULT_RHO:g}, and {ASAM_RHO_SCALE * DEFAULT_RHO:g} for "
    f"asam: ASAM's scale-invariant radius wants about {ASAM_RHO_SCALE:g} times SAM's. "
    f"keras_sam.SAM defaults to the paper's 0.05 for clean data; {DEFAULT_RHO:g} is the "
    "value of the label-noise runs in docs/RESULTS.md. momentum_sam: the distance of its "
    f"one pass along the momentum, default {MOMENTUM_SAM_RHO:g}: its paper's 3 stalled on "
    "the cnn model. mesa: 0 by default (one pass and a teacher forward pass a step); a "
    "positive rho adds SAM's perturbed pass)"
)
_ALPHA_HELP = (
    "gsam: weight of the orthogonal correction; looksam: weight of the reused "
    "component (default: the method's own, as in the API: the papers' 0.4 for gsam and "
    "0.7 for looksam, which stalled at chance level on the cnn model at 40 %% label "
    "noise with --num-batch-splits 4, where 0.1 for gsam and 0.2 for looksam trained: "
    "docs/methods.md)"
)
_SPLITS_HELP = (
    "m-sharpness: SAM perturbs each of this many parts of a batch separately "
    "(default: %(default)s, parts of 32 examples at batch 128, as in the "
    "label-noise runs of docs/RESULTS.md; keras_sam.SAMModel's own default is none, "
    "one perturbation per batch, which 1 gives here)"
)
_ALIASES = Choice(METHODS, METHOD_ALIASES)
_NON_NEGATIVE, _POSITIVE_INT = Number(0.0), Integer(1)

# `RunConfig`'s fields in order, and the options of `train` and `compare`.
RUN_OPTIONS = (
    Option("--method", "method", _ALIASES, "sam", commands=("train",), help="plain: the inner "
           "optimizer alone; the others wrap it in SAM or a variant (sgd, the old name of "
           "plain, is still accepted)"),
    Option("--method", "method", SamMethod(METHODS[1:], METHOD_ALIASES), "sam",
           commands=("compare",), help="the SAM method of the second run"),
    Option("--rho", "rho", _NON_NEGATIVE, None, _RHO_HELP),
    Option("--alpha", "alpha", _NON_NEGATIVE, None, _ALPHA_HELP),
    Option("--k", "k", _POSITIVE_INT, 5, "looksam, periodic_sam: a two-pass step every k steps"),
    Option("--sam-start", "sam_start", Number(0.0, 1.0, below=True), 0.0, "late-phase SAM: the "
           "fraction of the training steps taken with rho 0, one pass each, before the "
           "method's rho starts (0.9: SAM in the last 10 %% of the steps)"),
    Option("--num-batch-splits", "num_batch_splits", _POSITIVE_INT, 4, _SPLITS_HELP),
    Option("--model", "model", Choice(MODELS), "cnn", "the model"),
    Option("--optimizer", "optimizer", Choice(OPTIMIZERS), "sgd",
           "the inner optimizer, which takes every step (with SAM or without)"),
    Option("--lr", "learning_rate", _NON_NEGATIVE, 0.05,
           "learning rate of the inner optimizer (the start of the cosine schedule)"),
    Option("--momentum", "momentum", _NON_NEGATIVE, 0.9, "momentum (sgd only)"),
    Option("--weight-decay", "weight_decay", _NON_NEGATIVE, 5e-4,
           "weight decay of the inner optimizer, 0 for none"),
    Option("--schedule", "schedule", Choice(SCHEDULES), "cosine", "learning-rate schedule"),
    Option("--epochs", "epochs", _POSITIVE_INT, 40, "epochs of training"),
    Option("--batch-size", "batch_size", _POSITIVE_INT, 128, "batch size"),
    Option("--label-noise", "label_noise", Number(0.0, 1.0), 0.0,
           "fraction of training labels corrupted, in [0, 1]", command_default={"compare": 0.4}),
    Option("--noise-mode", "noise_mode", Choice(("flip", "uniform")), "flip",
           "flip: each corrupted label becomes another class; uniform: any class"),
    Option("--train-size", "train_size", Integer(0, 60000, "0: all"), 2000,
           "training examples, 0 for all 60,000"),
    Option("--seed", "seed", Integer(), 0, "seed"),
    Option(None, "sharpness_examples", _POSITIVE_INT, 1000, commands=(),
           help="training examples the first-order sharpness is measured on"),
    Option(None, "sharpness_rho", _NON_NEGATIVE, 0.05, commands=(),
           help="radius of the measured first-order sharpness"),
    Option("--hessian-examples", "hessian_examples", Integer(0, note="0: not measured"), 0,
           "training examples (labels as trained) on which the top Hessian eigenvalue of "
           "the final weights is measured, by Lanczos; 0: not measured",
           command_default=_command_line(256)),
    Option("--hessian-iterations", "hessian_iterations", _POSITIVE_INT, 20,
           "Lanczos iterations at most (Hessian-vector products) for that eigenvalue"),
    Option("--eval-every", "eval_every", _POSITIVE_INT, 1, "measure clean test accuracy and "
           "sharpness every this many epochs, and after the last",
           command_default=_command_line(5)),
    Option("--eval-examples", "eval_examples", Integer(0, note="0: the whole test set"), 0,
           "test images of the evaluations before the last (a fixed random subset); the "
           "last one takes all 10,000; 0 for all every time",
           command_default=_command_line(2000)),
    # The commands' own options.
    Option("--dataset", None, Choice(("fashion_mnist",)), "fashion_mnist", "the data set"),
    Option("--data-dir", None, None, None, "folder with the four IDX files (default: search "
           "$KERAS_SAM_FASHION_MNIST, /usr/share/datasets/fashion-mnist and the Keras cache, "
           "then download)"),
    Option("--max-consecutive-skips", None, SkipLimit(0), MAX_CONSECUTIVE_SKIPS, "stop with an "
           "error (exit status 1) after this many training steps in a row were skipped for a "
           "NaN or infinite loss or gradient; 0 for no limit"),
    Option("--quiet", None, None, False, "one line per epoch even on a terminal (the default "
           "when the output is not a terminal: a log file or a pipe)"),
    Option("--out", None, None, "runs/train", "output folder", commands=("train",)),
    Option("--out", None, None, "runs/compare", "output folder", commands=("compare",)),
    Option("--overwrite", None, None, False, group="existing",
           help="replace the run already in --out (its files are deleted first)"),
    Option("--resume", None, None, False, group="existing", help="continue the run in --out "
           "from its last epoch checkpoint, bitwise as if uninterrupted (same arguments as "
           "the run; a finished run is not trained again)"),
    Option("--inspect", None, None, False, commands=("compare",), help="also inspect the plain "
           "and the SAM model on their training data (Hessian eigenvalues and trace, "
           "sharpness, landscapes; a few minutes more) and draw them side by side: "
           "inspect.json, inspect_landscape_1d.png, inspect_landscape_2d.png, "
           "inspect_spectrum.png"),
)  # fmt: skip

# `InspectSettings`'s fields in order, and the options of `inspect`.
INSPECT = ("inspect",)
INSPECT_OPTIONS = (
    Option("model", None, None, None, "the .keras model file (a Keras model archive)", INSPECT),
    Option("--dataset", None, Choice(("fashion_mnist",), {"fashion-mnist": "fashion_mnist"}),
           "fashion_mnist", "the data set (fashion_mnist or fashion-mnist)", INSPECT),
    Option("--data-dir", None, None, None, "folder with the four IDX files (default: search)",
           INSPECT),
    Option("--split", None, Choice(("train", "test")), "train", "data to measure on", INSPECT),
    Option("--examples", None, Integer(0, note="0: all"), 2000,
           "examples measured on, a seeded random subset; 0 for all", INSPECT),
    Option("--batch-size", "batch_size", _POSITIVE_INT, 500, "batch size", INSPECT),
    Option("--rho", "rho", _NON_NEGATIVE, 0.05, "sharpness radius", INSPECT),
    Option("--m", "m", _POSITIVE_INT, 32, "m-sharpness sub-batch size", INSPECT),
    Option("--ascent-steps", "ascent_steps", _POSITIVE_INT, 5,
           "steps of the multi-step sharpness", INSPECT),
    Option("--k", "k", _POSITIVE_INT, 5, "top Hessian eigenvalues", INSPECT),
    Option("--max-iterations", "max_iterations", _POSITIVE_INT, 100,
           "Lanczos iterations at most", INSPECT),
    Option(None, "tol", Number(0.0), 1e-3, "Lanczos relative residual", commands=()),
    Option("--probes", "probes", _POSITIVE_INT, 50, "Hutchinson probes for the trace", INSPECT),
    Option("--line-points", "line_points", _POSITIVE_INT, 41, "points of the 1-D landscape",
           INSPECT),
    Option("--grid", "grid", _POSITIVE_INT, 21,
           "points per axis of the 2-D landscape", INSPECT),
    Option("--span", "span", _NON_NEGATIVE, 1.0, "landscape coordinates in [-span, span]",
           INSPECT),
    Option("--seed", "seed", Integer(), 0, "seed of the subset and directions", INSPECT),
    Option("--out", None, None, "runs/inspect", "output folder", INSPECT),
    Option("--quiet", None, None, False, "no progress output", INSPECT),
)  # fmt: skip

PLAYGROUND = ("playground",)
PLAYGROUND_OPTIONS = (
    Option("--rho", None, _NON_NEGATIVE, 0.3, "SAM radius on the 2-D problem", PLAYGROUND),
    Option("--steps", None, _POSITIVE_INT, 600, "steps on the 2-D problem", PLAYGROUND),
    Option("--seed", None, Integer(), 0, "seed of the toy network", PLAYGROUND),
)


# ------------------------------------------------------------------ what the tables make
class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default, unless its help already states it in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text
            or action.nargs == 0
            or action.default in (None, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def add_arguments(parser, options, command):
    """Adds the `options` that `command` takes to its `parser`, in the table's order."""
    groups = {}
    for option in options:
        if command not in option.commands:
            continue
        target = parser
        if option.group is not None:
            if option.group not in groups:
                groups[option.group] = parser.add_mutually_exclusive_group()
            target = groups[option.group]
        if option.check is None and option.default is False:
            target.add_argument(option.flag, action="store_true", help=option.help)
            continue
        kwargs = {"help": option.help}
        if option.flag.startswith("-"):
            kwargs["default"] = option.default_for(command)
        if option.check is not None:
            kwargs["type"] = option.check.parse
            if isinstance(option.check, Choice):
                kwargs["choices"] = option.check.values
        target.add_argument(option.flag, **kwargs)


def _fields(options):
    """The options that set a config field, one per field (the first row names it)."""
    rows = {}
    for option in options:
        if option.field is not None:
            rows.setdefault(option.field, option)
    return tuple(rows.values())


def declared(options):
    """A class decorator: the class as a dataclass whose fields are the `options`' fields,
    in the table's order, with the table's defaults."""

    def decorate(cls):
        rows = _fields(options)
        cls.__annotations__ = {
            o.field: o.check.annotation if o.default is not None else o.check.annotation | None
            for o in rows
        }
        for option in rows:
            setattr(cls, option.field, option.default)
        return dataclasses.dataclass(cls)

    return decorate


def validate(options, config):
    """Checks each field of `config` against its option's rule (None passes where it is
    the default: the field's own meaning, e.g. the method's rho)."""
    for option in _fields(options):
        value = getattr(config, option.field)
        if not (value is None and option.default is None):
            option.check.validate(option.field, value)


def config_values(options, args, command):
    """The config fields that `command`'s parsed `args` set."""
    return {
        option.field: getattr(args, option.dest)
        for option in options
        if option.field is not None and command in option.commands
    }
