"""The protocol between the step and a method: named once (`keras_sam.methods.hooks`), each
name a public member of `MethodHooks`, and the step reads nothing private of a method."""

import ast
from pathlib import Path

import pytest

from keras_sam.methods import hooks

STEP = Path(__file__).resolve().parents[2] / "keras_sam" / "step"


def _step_files():
    files = sorted(STEP.glob("*.py"))
    assert files, STEP
    return files


def _private_reads_of_a_method(tree):
    """`x.method._name` and `method._name` in a module: a private member of a method."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        owner = node.value
        name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
        if name == "method":
            found.append(f"{name}.{node.attr}")
    return found


@pytest.mark.parametrize("name", hooks.HOOKS + hooks.FLAGS + hooks.STEP_READS)
def test_every_name_of_the_protocol_is_a_public_member_of_the_hooks(name):
    assert not name.startswith("_")
    assert name in vars(hooks.MethodHooks)


def test_the_step_reads_nothing_private_of_a_method():
    reads = {
        path.name: _private_reads_of_a_method(ast.parse(path.read_text())) for path in _step_files()
    }
    assert {name: found for name, found in reads.items() if found} == {}


def test_the_check_sees_a_private_read():
    tree = ast.parse("def f(roles, method):\n    return roles.method._x, method._y, self._z\n")
    assert _private_reads_of_a_method(tree) == ["method._x", "method._y"]
