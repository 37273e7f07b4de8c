"""The package as a user meets it: metadata, README, the docs' API pages, type hints."""

import ast
import importlib.metadata
import inspect
import re
import sys
from pathlib import Path

import pytest

import keras_sam

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
README = (ROOT / "README.md").read_text()
DOCS_URL = PROJECT["urls"]["Documentation"].rstrip("/") + "/"
REPO_URL = PROJECT["urls"]["Source"].rstrip("/") + "/"

_LINK = re.compile(r"\]\(([^)\s]+)\)|<(https?://[^>\s]+)>")


def _requirement_name(requirement):
    return re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower().replace("_", "-")


# ----------------------------------------------------------------------------- README
def test_readme_is_a_front_page_of_at_most_12000_characters():
    assert len(README) <= 12_000, len(README)
    assert README.startswith("# keras-sam\n")


def test_readme_starts_with_the_two_set_up_commands():
    first_block = re.search(r"```(\w*)\n(.*?)```", README, re.S)
    assert first_block.group(1) == "bash"
    commands = [line.split("#")[0].strip() for line in first_block.group(2).splitlines()]
    assert commands == ["make demo", "make test"]


def test_readme_links_are_relative_to_the_repository_so_that_they_work_from_a_clone():
    """The pages a reader of the repository (or a clone) can open: docs/*.md, LICENSE, the
    pictures. No link into the documentation site, which nothing publishes yet (tests/
    test_docs.py checks that each file and heading exists). On PyPI, once published,
    relative links will not resolve: docs/development.md's release steps say so."""
    links = [a or b for a, b in _LINK.findall(README)]
    relative = [link for link in links if not link.startswith("https://")]
    assert len(relative) >= 10
    assert not [link for link in links if link.startswith(DOCS_URL)]
    assert all((ROOT / link.split("#")[0]).is_file() for link in relative), relative


def test_mkdocs_site_url_is_the_documentation_url():
    text = (ROOT / "mkdocs.yml").read_text()
    assert f"site_url: {DOCS_URL}" in text
    assert f"repo_url: {REPO_URL.rstrip('/')}" in text


# ------------------------------------------------------------------------------- docs
def _api_pages():
    return "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))


def test_every_public_name_has_an_api_reference():
    pages = _api_pages()
    names = [name for name in keras_sam.__all__ if name != "__version__"]
    assert len(names) == 16
    for name in names:
        assert f"::: {keras_sam._PUBLIC[name]}.{name}\n" in pages, name

    diagnostics = (ROOT / "docs" / "api" / "diagnostics.md").read_text()
    assert "::: keras_sam.diagnostics\n" in diagnostics
    from keras_sam import diagnostics as module

    for name in module.__all__:
        assert f"        - {name}\n" in diagnostics, name
    for module_name in (
        "keras_sam.datasets.fashion_mnist",
        "keras_sam.datasets.label_noise",
        "keras_sam.models",
    ):
        assert f"::: {module_name}\n" in pages, module_name


def test_every_docs_page_is_in_the_navigation_and_every_entry_exists():
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    nav = re.findall(r"^\s*- (?:[^:\n]+: )?([\w/.-]+\.md)\s*$", mkdocs, re.M)
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav) == pages


# --------------------------------------------------------------------------- metadata
def test_license_is_spdx_with_the_license_file():
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert "Version 2.0" in (ROOT / "LICENSE").read_text()[:200]


def test_the_library_requires_keras_and_numpy_only():
    assert sorted(_requirement_name(r) for r in PROJECT["dependencies"]) == ["keras", "numpy"]


def test_extras_per_backend_and_per_tool():
    extras = PROJECT["optional-dependencies"]
    assert set(extras) == {
        "tensorflow",
        "tensorflow-cpu",
        "jax",
        "torch",
        "plots",
        "docs",
        "dev",
        "hub",
        "tuner",
    }
    assert [_requirement_name(r) for r in extras["tensorflow"]] == ["tensorflow"]
    assert {_requirement_name(r) for r in extras["tensorflow-cpu"]} == {
        "tensorflow-cpu",
        "tensorflow",
    }
    assert [_requirement_name(r) for r in extras["plots"]] == ["matplotlib"]
    assert "matplotlib" not in {_requirement_name(r) for r in PROJECT["dependencies"]}
    # keras-hub is installed with --no-deps (its tensorflow-text needs the full tensorflow):
    # the extra lists what it needs instead, and never a TensorFlow.
    hub = {_requirement_name(r) for r in extras["hub"]}
    assert "keras-hub" not in hub and not any(name.startswith("tensorflow") for name in hub)
    assert [_requirement_name(r) for r in extras["tuner"]] == ["keras-tuner", "tensorboard"]


def test_the_makefile_installs_keras_hub_without_its_dependencies():
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps -c $(CONSTRAINTS) $(KERAS_HUB)" in makefile
    assert "KERAS_HUB := keras-hub" in makefile
    assert "keras-hub" in _pins()


def test_classifiers_keywords_and_urls():
    assert "Typing :: Typed" in PROJECT["classifiers"]
    python = [c for c in PROJECT["classifiers"] if c.startswith("Programming Language :: Python")]
    assert "Programming Language :: Python :: 3.10" in python
    assert "sharpness-aware minimization" in PROJECT["keywords"]
    assert set(PROJECT["urls"]) >= {"Homepage", "Documentation", "Source", "Issues", "Changelog"}


def test_one_version_source():
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "keras_sam.__version__"
    }
    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    assert re.fullmatch(r"\d+\.\d+\.\d+", keras_sam.__version__)
    # The installed metadata (an editable install here) reads the same value.
    assert importlib.metadata.version("keras-sam") == keras_sam.__version__


def test_py_typed_ships_with_the_package():
    assert (ROOT / "keras_sam" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["keras_sam"]


def _pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line!r}"
            pins[_requirement_name(name)] = version.strip()
    return pins


def test_constraints_pin_every_declared_requirement():
    pins = _pins()
    assert pins["torch"] == "2.13.0"
    declared = list(PROJECT["dependencies"])
    for extra in ("dev", "docs", "plots", "tensorflow-cpu", "jax", "torch", "hub", "tuner"):
        declared += PROJECT["optional-dependencies"][extra]
    x86 = [r for r in declared if "platform_machine !=" not in r]  # this machine's markers
    missing = {_requirement_name(r) for r in x86} - set(pins)
    assert missing == set()
    assert "keras-sam" not in pins


def test_constraints_are_what_this_environment_runs():
    """`make test` installs through the constraints: the versions tested are the pinned ones."""
    pins = _pins()
    for name in ("keras", "numpy", "tensorflow-cpu", "jax", "torch", "mkdocs"):
        installed = importlib.metadata.version(name)
        assert installed.split("+")[0] == pins[name], (name, installed, pins[name])


# ------------------------------------------------------------------------- type hints
def _public_callables():
    from keras_sam import diagnostics, models
    from keras_sam.datasets import fashion_mnist, label_noise

    for name in keras_sam.__all__:
        value = getattr(keras_sam, name)
        if inspect.isclass(value):
            yield f"keras_sam.{name}", value.__init__
    if hasattr(keras_sam.SAM, "optimize"):
        yield "keras_sam.SAM.optimize", keras_sam.SAM.optimize
    yield "keras_sam.SAM.bind", keras_sam.SAM.bind
    for name in diagnostics.__all__:
        yield f"keras_sam.diagnostics.{name}", getattr(diagnostics, name)
    for module, names in (
        (models, ("build_model", "cnn", "resnet")),
        (fashion_mnist, ("load_data", "find_data_dir")),
        (label_noise, ("corrupt_labels",)),
    ):
        for name in names:
            yield f"{module.__name__}.{name}", getattr(module, name)


def test_public_signatures_have_type_hints():
    unannotated = []
    for qualname, function in _public_callables():
        signature = inspect.signature(function)
        for parameter in signature.parameters.values():
            if parameter.name == "self":
                continue
            if parameter.annotation is inspect.Parameter.empty:
                unannotated.append(f"{qualname}({parameter.name})")
        returns = signature.return_annotation
        if function.__name__ != "__init__" and returns is inspect.Signature.empty:
            unannotated.append(f"{qualname} -> ?")
    assert unannotated == []


# ------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("command", [["compare", "--epochs", "1"], ["inspect", "model.keras"]])
def test_cli_names_the_plots_extra_when_matplotlib_is_missing(
    command, monkeypatch, tmp_path, capsys
):
    from keras_sam import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    assert cli.main([*command, "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "need matplotlib, which is not installed" in error
    assert "pip install matplotlib" in error
    assert not (tmp_path / "out").exists()  # said before anything ran


def test_no_module_imports_matplotlib_at_import_time():
    """matplotlib is the `plots` extra: only the functions that draw import it.

    (Keras itself imports matplotlib when it is installed, so this reads the source; the
    wheel test trains in an environment without it.)
    """
    top_level = []
    for path in sorted((ROOT / "keras_sam").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(name.split(".")[0] == "matplotlib" for name in names):
                    top_level.append(str(path.relative_to(ROOT)))
    assert top_level == []
    drawing = (ROOT / "keras_sam" / "cli" / "report.py").read_text()
    assert "    import matplotlib\n" in drawing  # inside the drawing function


def test_changelog_has_the_current_version_or_unreleased():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog or f"## [{keras_sam.__version__}]" in changelog
    assert f"## [{keras_sam.__version__}]" in changelog
