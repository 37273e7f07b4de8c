"""The library's imports run one way: no circle, and no arrow from a lower layer to a higher.

Every `import` and `from ... import` of `keras_sam/` is read with `ast`, those at module
level and those inside functions alike (a late import is still an arrow). The layers are
declared once, below; an arrow up is allowed only where `KNOWN_UPWARD` names it, with its
reason, so a new one fails.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "keras_sam"

# The layers, from the ground up: a module may import its own layer and those below it.
# A module belongs to the longest prefix listed (`keras_sam.backends.base` is not
# `keras_sam.backends`).
LAYERS = (
    # pure functions and tools that know nothing of SAM
    (
        "keras_sam.maths",
        "keras_sam._validation",
        "keras_sam.files",
        "keras_sam.datasets",
        "keras_sam.models",
    ),
    # SAM and its variants (their hooks and the helpers they call)
    ("keras_sam.methods",),
    # the interface the step is written against: `Backend`'s defaults in `keras.ops`
    ("keras_sam.backends.base",),
    # the step, written once for every backend: one package, whose files import each
    # other one way (entry -> passes, outcomes, records; passes -> records)
    ("keras_sam.step",),
    # one adapter per backend (the only importers of TensorFlow, JAX, PyTorch)
    ("keras_sam.backends",),
    # SAMModel and the skipped-steps guard
    ("keras_sam.trainers",),
    # the tools around the library
    ("keras_sam.diagnostics",),
    # the public names (`keras_sam/__init__.py`)
    ("keras_sam",),
    # the application
    ("keras_sam.cli",),
)

# Arrows up that stay, (importer, imported) -> why. A new one fails `test_no_arrow_runs_up`.
KNOWN_UPWARD = {
    ("keras_sam.methods.sam", "keras_sam.backends"): (
        "`SAM.optimize` / `SAM.stateless_optimize`, the custom loops' entry points, live on "
        "the optimizer (the seed's API) and reach the backend's adapter with a late "
        "`backends.current()`; moving the entry points above both is a redesign left for "
        "later (issue 32)"
    ),
}


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported(node, importer, path, modules):
    """The `keras_sam` modules one import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # a relative import: resolved against the importer's package
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module
    # `from package import module` names the module; `from module import name`, the module.
    return [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
        for alias in node.names
    ]


def import_graph(modules=None):
    """importer -> the set of `keras_sam` modules it imports (itself left out)."""
    modules = modules if modules is not None else _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets.update(_imported(node, name, path, modules))
        graph[name] = {t for t in targets if t.split(".")[0] == "keras_sam" and t != name}
    return graph


def layer_of(module):
    best, rank = "", None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            fits = module == prefix or module.startswith(prefix + ".")
            if fits and len(prefix) > len(best):
                best, rank = prefix, index
    return rank


def upward_arrows(graph):
    return {
        (importer, imported)
        for importer, targets in graph.items()
        for imported in targets
        if layer_of(imported) > layer_of(importer)
    }


def circles(graph):
    """The import circles: each strongly connected set of two modules or more (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_every_module_has_a_layer():
    assert [m for m in _modules() if layer_of(m) is None] == []


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_no_arrow_runs_up():
    arrows = upward_arrows(import_graph())
    assert sorted(arrows - set(KNOWN_UPWARD)) == []
    # An exception that no longer exists is struck from the list.
    assert sorted(set(KNOWN_UPWARD) - arrows) == []


def test_the_checks_see_a_planted_circle_and_arrow_up(tmp_path):
    """The checks can fail: a late import of the step from a method is both an arrow up
    and (the step importing the methods) a circle."""
    planted = dict(_modules())
    method = tmp_path / "planted.py"
    method.write_text("def f():\n    from keras_sam import step\n")
    planted["keras_sam.methods.planted"] = method
    step = tmp_path / "step.py"
    step.write_text(planted["keras_sam.step"].read_text() + "\nfrom .methods import planted\n")
    planted["keras_sam.step"] = step
    graph = import_graph(planted)
    assert ("keras_sam.methods.planted", "keras_sam.step") in upward_arrows(graph)
    assert any({"keras_sam.methods.planted", "keras_sam.step"} <= set(c) for c in circles(graph))


@pytest.mark.parametrize(
    "module, layer",
    [
        ("keras_sam.maths", 0),
        ("keras_sam.methods.sam", 1),
        ("keras_sam.backends.base", 2),
        ("keras_sam.step", 3),
        ("keras_sam.step.passes", 3),
        ("keras_sam.backends.jax", 4),
        ("keras_sam", 7),
    ],
)
def test_a_module_takes_the_layer_of_its_longest_prefix(module, layer):
    assert layer_of(module) == layer
