"""tools/planted_defects.py's defect list is current: every defect's `old` string occurs
exactly once in the library, and the defects cover the step, a method, each backend
adapter, the transaction, the maths and the command line. (Running the defects is the
tool's job, not the suite's.)"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "planted_defects.py"


def _tool():
    spec = importlib.util.spec_from_file_location("planted_defects", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for its dataclasses
    spec.loader.exec_module(module)
    return module


tool = _tool()

pytestmark = pytest.mark.skipif(
    bool(os.environ.get(tool.ENV_FLAG)),
    reason="in a planted copy, whose library differs from the defect list on purpose",
)


def test_every_defect_is_found_exactly_once_in_the_library():
    assert tool.check() == []


def test_the_defects_cover_the_step_methods_backends_transaction_maths_and_cli():
    defects = tool.DEFECTS
    assert len(defects) >= 10
    assert {d.area for d in defects} >= {"step", "method", "transaction", "maths", "cli"}
    paths = {d.path for d in defects}
    assert any(p.startswith("keras_sam/step/") for p in paths)
    assert any(p.startswith("keras_sam/methods/") for p in paths)
    assert any(p.startswith("keras_sam/cli/") for p in paths)
    for backend in tool.BACKENDS:
        assert f"keras_sam/backends/{backend}.py" in paths, backend
        assert any(backend in d.backends for d in defects), backend


def test_a_failure_is_a_catch_and_anything_else_is_not():
    failed = "FAILED tests/step/test_x.py::test_y - AssertionError\n1 failed, 3 passed"
    assert tool.verdict(1, failed) == ("CAUGHT", "tests/step/test_x.py::test_y")
    # pytest-xdist's `-x` stops the workers after the first failure: exit 2, a failure named.
    stopped = failed + "\n!! xdist.dsession.Interrupted: stopping after 1 failures !!"
    assert tool.verdict(2, stopped) == ("CAUGHT", "tests/step/test_x.py::test_y")
    assert tool.verdict(0, "5 passed")[0] == "MISSED"
    assert tool.verdict(2, "ERROR tests/a.py - ImportError")[0].startswith("NOT RUN CLEANLY")
    assert tool.verdict(None, "")[0] == "TIME-OUT"
