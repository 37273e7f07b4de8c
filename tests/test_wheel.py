"""The built distributions: the wheel installs into a fresh environment and trains.

Slow (a minute or two: a build, a fresh virtual environment and a TensorFlow install from
pip's cache). The sdist must carry the whole test tree, so that its tests can run.
"""

import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests import processes

ROOT = Path(__file__).resolve().parent.parent

# One worker runs the whole module: its processes start once, in a module fixture.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_wheel")]

# A short SAM fit on a task it can learn (the label is the sign of the first feature),
# run in the fresh environment from a folder outside the source tree.
FIT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import keras_sam

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(2)])
    sam_model = keras_sam.SAMModel(model)
    sam_model.compile(optimizer=keras_sam.SAM(keras.optimizers.SGD(0.1), rho=0.05),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    history = sam_model.fit(x, y, batch_size=32, epochs=8, verbose=0).history
    print(json.dumps({
        "file": keras_sam.__file__,
        "version": keras_sam.__version__,
        "loss": history["loss"],
        "accuracy": history["accuracy"][-1],
        "sharpness": history["sharpness"][-1],
        "modules": sorted(m for m in ("pytest", "ruff", "mkdocs", "matplotlib")
                          if m in sys.modules or __import__("importlib").util.find_spec(m)),
    }))
    """
)


def _run(*command, env=None, **kwargs):
    # Without the source tree on PYTHONPATH: pip would take it for the installed package.
    env = env if env is not None else processes.environment(PYTHONPATH=None)
    return processes.execute(command, timeout=900, env=env, **kwargs).stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--outdir", str(out), str(ROOT))
    return out


def test_distributions_pass_twine_check(dist):
    files = sorted(str(p) for p in dist.iterdir())
    assert len(files) == 2
    assert "PASSED" in _run(sys.executable, "-m", "twine", "check", "--strict", *files)


def test_wheel_carries_license_typing_marker_and_loose_requirements(dist):
    (wheel,) = dist.glob("keras_sam-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    assert "keras_sam/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    metadata = metadata.decode()
    assert "License-Expression: Apache-2.0" in metadata
    unconditional = [
        line.split(":", 1)[1].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert sorted(r.split(">")[0] for r in unconditional) == ["keras", "numpy"]


def test_sdist_carries_the_whole_test_tree_and_the_docs(dist):
    (sdist,) = dist.glob("keras_sam-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    tracked = _run("git", "ls-files", "tests", "docs", cwd=ROOT).split()
    if not tracked:  # not a git checkout (e.g. an unpacked sdist): the files on disk
        tracked = [
            str(p.relative_to(ROOT))
            for folder in ("tests", "docs")
            for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
    missing = sorted(set(tracked) - names)
    assert missing == []
    for name in (
        "tests/conftest.py",
        "tests/reference.py",
        "LICENSE",
        "CHANGELOG.md",
        "constraints.txt",
        "mkdocs.yml",
        "Makefile",
    ):
        assert name in names
    assert not any("__pycache__" in name for name in names)


def test_wheel_trains_in_a_fresh_environment(dist, tmp_path):
    (wheel,) = dist.glob("keras_sam-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv))
    python = venv / "bin" / "python"
    _run(
        str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "-c", str(ROOT / "constraints.txt"), f"{wheel}[tensorflow-cpu]",
    )  # fmt: skip
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "KERAS_BACKEND": "tensorflow",
           "TF_CPP_MIN_LOG_LEVEL": "3", "HOME": str(tmp_path)}  # fmt: skip
    import json

    report = json.loads(_run(str(python), "-c", FIT, cwd=work, env=env).strip().splitlines()[-1])
    assert Path(report["file"]).is_relative_to(venv)  # the installed copy, not the source tree
    import keras_sam

    assert report["version"] == keras_sam.__version__
    assert report["loss"][-1] < 0.7 * report["loss"][0]
    assert report["accuracy"] > 0.85
    assert report["sharpness"] > 0
    assert report["modules"] == []  # no dev tools, docs tools or matplotlib were needed
    # The command line is installed too and answers without a backend import.
    assert "playground" in _run(str(venv / "bin" / "keras-sam"), "--help", cwd=work, env=env)
