"""The README's code runs without a warning on every backend.

tests/test_docs.py runs the README's blocks with Python warnings as errors, but a warning
that a framework logs (TensorFlow's AutoGraph, through `logging`) or prints from C++, or a
Python warning shown once per process, escapes a test that shares its interpreter. Here each
backend runs the README's blocks for it in a fresh interpreter, with the environment a user
has (TensorFlow's C++ logging at its default level), after a plain Keras `fit` that takes
the frameworks' own start-up messages (and a plain `save`: on JAX and PyTorch, Keras's
saving imports TensorFlow when it is installed, whose C++ logging announces itself);
whatever the README's code writes to stderr after
that must be empty, C++ informational lines (`I0000 ...`) aside. On TensorFlow the custom
loop runs twice: as written (`@tf.function`) and with `jit_compile=True`, which the README
says works too.
"""

import re
import textwrap

import pytest

from tests import processes, test_docs

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_readme_logs")]

MARKER = "== the README's code starts here =="

WARM_UP = textwrap.dedent(
    f"""
    import sys
    import numpy as np
    import keras

    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    plain.compile(optimizer="sgd", loss="mse")
    plain.fit(np.zeros((8, 4), "float32"), np.zeros((8, 2), "float32"), verbose=0)
    plain.save("plain.keras")  # on JAX and PyTorch Keras's saving imports TensorFlow
    keras.backend.clear_session()
    print({MARKER!r}, file=sys.stderr, flush=True)
    """
)


def readme_program(backend):
    """The README's blocks for `backend`, in order, as one program."""
    blocks = [
        block
        for block in test_docs.parse(test_docs.ROOT / "README.md")
        if backend in block.backends and not block.skip
    ]
    code = [block.code for block in blocks]
    loops = [block.code for block in blocks if "@tf.function" in block.code]
    code += [c.replace("@tf.function", "@tf.function(jit_compile=True)", 1) for c in loops]
    return WARM_UP + "\n\n".join(code) + "\nprint('README OK')\n", len(blocks)


def after_marker(stderr):
    _, found, tail = stderr.partition(MARKER)
    assert found, stderr[-2000:]
    return [
        line
        for line in tail.splitlines()
        if line.strip() and not re.match(r"I\d{4} ", line)  # C++ INFO lines
    ]


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_the_readme_runs_without_a_warning(backend, tmp_path):
    program, blocks = readme_program(backend)
    assert blocks >= (3 if backend == "tensorflow" else 2)  # set-up and fit (and the loop)
    env = processes.environment(backend, TF_CPP_MIN_LOG_LEVEL=None)
    # A file, as a user's script: AutoGraph converts only functions whose source it finds.
    script = tmp_path / "readme.py"
    script.write_text(program)
    result = processes.run([script], env=env, cwd=tmp_path, timeout=300)
    assert "README OK" in result.stdout
    assert after_marker(result.stderr) == []


def test_after_marker_keeps_what_the_readme_writes_and_drops_info_lines():
    stderr = f"start-up noise\n{MARKER}\nI0000 00:00:17 1 port.cc:153] info\nWARNING:tf: x\n"
    assert after_marker(stderr) == ["WARNING:tf: x"]
