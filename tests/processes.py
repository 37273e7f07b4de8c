"""A fresh Python process for the tests that need one: one way to start it, one time limit,
its output in the failure.

A test starts a process when what it checks lives outside the test's own interpreter: the
backend (Keras picks it at import), a module that must not be imported, a process that is
killed, several processes that talk to each other. Each such process imports Keras and its
backend again (seconds), so a test starts as few as it can.

The child runs `sys.executable` with the repository root first on `PYTHONPATH`, so it
imports the `keras_sam` beside these tests (tools/planted_defects.py relies on that), on the
CPU, with TensorFlow's C++ logging off.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAIL = 4000  # characters of the output shown when a process fails


def environment(backend=None, **variables):
    """`os.environ` for a child: `backend` as `KERAS_BACKEND`, `variables` set (a value of
    None removes the variable)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    if backend is not None:
        env["KERAS_BACKEND"] = backend
    for name, value in variables.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def _describe(command, returncode, output):
    shown = " ".join("<code>" if "\n" in str(a) else str(a) for a in command)
    return f"`{shown}` exited with {returncode}:\n{output[-TAIL:]}"


def execute(command, *, timeout=300, check=True, env=None, cwd=ROOT):
    """Runs `command` (any program) to its end and returns the `CompletedProcess` (text).

    With `check` (the default) the test fails, showing the end of the output, when the
    process exits with an error; past `timeout` seconds it is killed and the test fails
    the same way.
    """
    command = [str(a) for a in command]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env if env is not None else environment(),
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as error:
        output = error.stdout.decode(errors="replace") if error.stdout else ""
        raise AssertionError(_describe(command, f"no exit after {timeout} s", output)) from None
    if check and result.returncode != 0:
        raise AssertionError(_describe(command, result.returncode, result.stdout + result.stderr))
    return result


def run(args, *, backend=None, env=None, **kwargs):
    """Runs `python *args` in a fresh interpreter (`execute`'s arguments); `args` is a
    script and its arguments, `["-m", module, ...]` or `["-c", code]`."""
    env = env if env is not None else environment(backend)
    return execute([sys.executable, *args], env=env, **kwargs)


def run_code(code, **kwargs):
    """`run(["-c", code], ...)`."""
    return run(["-c", code], **kwargs)


def start(args, *, backend=None, env=None, cwd=ROOT, pipe=False):
    """Starts `python *args` and returns the `Popen`; `finish` waits for it.

    Its stdout and stderr go to temporary files, not pipes: a process blocked on a full
    pipe would block its peers (an all-reduce waits for every process). With `pipe=True`
    its stdout is a pipe the test reads as it goes (text; stderr is discarded).
    """
    command = [sys.executable, *[str(a) for a in args]]
    env = env if env is not None else environment(backend)
    if pipe:
        return subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=cwd
        )
    logs = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # closed by `kill`
    process = subprocess.Popen(command, stdout=logs[0], stderr=logs[1], env=env, cwd=cwd)
    process.logs = logs
    return process


def output(process, stream=None):
    """What a process `start`ed without a pipe has written so far: `stream` "stdout" or
    "stderr", or both (stdout first)."""
    texts = []
    for name, log in zip(("stdout", "stderr"), process.logs, strict=True):
        if stream in (None, name):
            log.seek(0)
            texts.append(log.read())
    return "\n".join(texts)


def finish(processes, timeout=300, check=True):
    """Waits for the `start`ed processes, `timeout` seconds for all of them together, and
    returns their standard outputs. If one exits with an error (with `check`) or time runs out, the
    test fails with that process's output, and every process still running is killed."""
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                message = f"no exit after {timeout} s"
                raise AssertionError(_describe(process.args, message, output(process))) from None
        for process in processes:
            if check and process.returncode != 0:
                raise AssertionError(_describe(process.args, process.returncode, output(process)))
        return [output(process, "stdout") for process in processes]
    finally:
        kill(processes)


def kill(processes):
    """Kills and reaps every process still running, and closes their output files."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        for log in getattr(process, "logs", ()):
            log.close()
