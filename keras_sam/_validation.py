"""Argument checks shared by the methods, the diagnostics and the command line.

Each check returns the value it accepts (converted where it says so) and refuses any other
with a `ValueError` that names the argument and the rule:
"`name` must be <rule>. Received: name=<value>". A caller that words a rule its own way
(the diagnostics' "a positive integer") passes `rule`; the command line states the same
rules to argparse through `number_rule` and `integer_rule`.

Keras is imported only by `check_rate`, so that the command line can check its options
without it.
"""

import math
import numbers

import numpy as np

# The largest finite float32, and the smallest normal one (below it, float32 loses
# precision, and below about 1.4e-45 rounds to 0).
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)


def refuse(name, rule, value):
    raise ValueError(f"`{name}` must be {rule}. Received: {name}={value!r}")


def is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer_rule(minimum=None, maximum=None, noun="an integer"):
    """ "an integer >= 1", "an integer in [0, 60000]", ... (`noun` "a whole number" for
    the command line)."""
    if minimum is not None and maximum is not None:
        return f"{noun} in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"{noun} >= {minimum}"
    return noun


def number_rule(minimum=0.0, maximum=None, strict=False, below=False, noun="a number"):
    """ "a number >= 0", "a number > 0", "a fraction in [0, 1)", ..."""
    if maximum is not None:
        return f"a fraction in [{minimum:g}, {maximum:g}{')' if below else ']'}"
    return f"{noun} {'>' if strict else '>='} {minimum:g}"


def check_integer(name, value, minimum=None, maximum=None, optional=False, rule=None):
    """An integer (not a bool) in [`minimum`, `maximum`], returned as `int`; `None` too
    when `optional`."""
    if value is None and optional:
        return None
    if (
        not is_integer(value)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        rule = rule or integer_rule(minimum, maximum)
        refuse(name, f"None or {rule}" if optional else rule, value)
    return int(value)


def check_positive_int(name, value):
    """The diagnostics' wording of an integer >= 1."""
    return check_integer(name, value, minimum=1, rule="a positive integer")


def check_number(name, value, minimum, strict=False, float32=False, rule=None, maximum=None):
    """A finite real number >= `minimum` (> with `strict`), and <= `maximum` when given,
    returned as a float.

    With `float32`, also finite in float32 (the value is used in float32 in the step).
    Without `rule`, the methods' wording: "a number" for what is not one, "a finite number
    >= 0" for one out of range; with it, `rule` for both.
    """
    if not is_real(value):
        refuse(name, rule or "a number", value)
    number = float(value)
    if (
        not math.isfinite(number)
        or number < minimum
        or (strict and number == minimum)
        or (maximum is not None and number > maximum)
    ):
        refuse(name, rule or f"a finite number {'>' if strict else '>='} {minimum:g}", value)
    if float32 and abs(number) > FLOAT32_MAX:
        refuse(
            name,
            f"finite in float32, in which the step uses it: at most {FLOAT32_MAX:.8g}",
            value,
        )
    return number


def check_non_negative(name, value):
    """The diagnostics' wording of a number >= 0."""
    return check_number(name, value, minimum=0.0, rule="a number >= 0")


def check_positive(name, value):
    """The diagnostics' wording of a number > 0."""
    return check_number(name, value, minimum=0.0, strict=True, rule="a number > 0")


def check_verbose(value):
    if value not in (0, 1, 2) or isinstance(value, bool):
        refuse("verbose", "0, 1 or 2", value)
    return value


def check_one_of(name, value, allowed):
    if value not in allowed:
        refuse(name, f"one of {tuple(allowed)}", value)
    return value


def check_bool(name, value):
    if not isinstance(value, bool):
        refuse(name, "True or False", value)
    return value


def check_rate(name, value):
    """A number >= 0 (returned as float) or a `LearningRateSchedule` (returned as is)."""
    import keras

    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return value
    if not is_real(value):
        refuse(
            name,
            "a number or a `keras.optimizers.schedules.LearningRateSchedule` of the step",
            value,
        )
    return check_number(name, value, minimum=0.0, float32=True)


def check_epsilon(epsilon):
    """`epsilon` > 0 that float32 keeps: 1e-45 would round to 0 and make 0/0 of a zero
    gradient, where `e = 0` is promised."""
    epsilon = check_number("epsilon", epsilon, minimum=0.0, strict=True, float32=True)
    if epsilon < FLOAT32_SMALLEST_NORMAL:
        raise ValueError(
            "`epsilon` must be at least the smallest normal float32, "
            f"{FLOAT32_SMALLEST_NORMAL:.8g}: the norm is taken in float32, where a smaller "
            f"value loses precision or rounds to 0. Received: epsilon={epsilon!r}"
        )
    return epsilon


def check_accumulation_steps(value):
    return check_integer("gradient_accumulation_steps", value, minimum=1, optional=True)
