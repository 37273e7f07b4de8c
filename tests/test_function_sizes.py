"""No library function longer than 60 lines of code or with more than 8 parameters.

Issue 32's limits, read with `ast` from the source of the whole library (`CHECKED`). A
function's lines of code are the lines from its `def`
to its end that hold code: its docstring, blank lines and comment lines do not count, its
signature and nested functions do. Its parameters are all of them (`*args`, `**kwargs`
and keyword-only ones included), `self` and `cls` left out; a constructor (`__init__`)
may take more, for its hyperparameters.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("keras_sam",)
MAX_LINES = 60
MAX_PARAMETERS = 8


def lines_of_code(source_lines, node):
    """The lines of `node` (a function) that hold code, its docstring left out."""
    docstring = set()
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        if isinstance(first.value.value, str):
            docstring = set(range(first.lineno, first.end_lineno + 1))
    count = 0
    for number in range(node.lineno, node.end_lineno + 1):
        text = source_lines[number - 1].strip()
        if number not in docstring and text and not text.startswith("#"):
            count += 1
    return count


def parameters(node):
    arguments = node.args
    names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
    names += [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
    return [name for name in names if name not in ("self", "cls")]


def oversized(source, where):
    """`where:line name: what is too large` for each function of `source` over a limit."""
    found = []
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        size, count = lines_of_code(lines, node), len(parameters(node))
        if size > MAX_LINES:
            found.append(f"{where}:{node.lineno} {node.name}: {size} lines of code")
        if count > MAX_PARAMETERS and node.name != "__init__":
            found.append(f"{where}:{node.lineno} {node.name}: {count} parameters")
    return found


@pytest.mark.parametrize("package", CHECKED)
def test_no_function_is_too_long_or_takes_too_many_parameters(package):
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        found += oversized(path.read_text(), path.relative_to(ROOT))
    assert found == []


def test_the_check_sees_a_long_function_and_a_long_signature():
    """The check can fail: 61 lines of code (a docstring, blank lines and comments
    aside), and 9 parameters; 60 lines and 8 parameters pass."""
    body = '    """Docstring.\n\n    More.\n    """\n' + "    # a comment\n\n" * 3
    long = "def long(a):\n" + body + "    a += 1\n" * 59 + "    return a\n"
    just = "def just(a):\n" + body + "    a += 1\n" * 58 + "    return a\n"
    wide = "def wide(self, a, b, /, c, *d, e, f, g, i, **h):\n    pass\n"
    narrow = "def narrow(self, a, b, /, c, *d, e, f, g, **h):\n    pass\n"
    hyperparameters = "class C:\n    def __init__(self, a, b, c, d, e, f, g, h, i):\n        pass\n"
    source = "\n".join([long, just, wide, narrow, hyperparameters])
    assert oversized(source, "planted.py") == [
        "planted.py:1 long: 61 lines of code",
        "planted.py:144 wide: 9 parameters",
    ]
