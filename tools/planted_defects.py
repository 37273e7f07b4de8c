"""Planted defects: does the test suite catch known bugs? One defect at a time.

Each defect below is a small edit of the library (an exact `old` string replaced by a
`new` one in one file under `keras_sam/`) that makes a bug a user would suffer: the
perturbation's direction, the m-sharpness average, BatchNorm statistics, a method's
combination, what each backend adapter decides, the commit-or-skip transaction, the norm,
the command line. For each, the script copies the repository into a temporary folder,
plants the defect there (the working tree is never edited), and runs the backend
session(s) that should catch it there, stopping at the first failure:

    KERAS_BACKEND=<backend> PYTHONPATH=<copy> python -m pytest -x -q -n auto -p no:cacheprovider

`PYTHONPATH` makes the suite, and the processes it starts, import the planted copy rather
than the editable install. Exit status 1 (a test failed; or 2 when pytest-xdist stops the
workers after that first failure) is CAUGHT and names the first failing test; 0 is
MISSED; anything else (a collection error, a usage error, the time limit) is reported as
such, never as caught.

It is the record that a change to the suite (tests moved between folders or sessions,
parametrizations trimmed) loses no check: run it after such a change, and with
`--tests-from REF` to run the suite of an earlier commit against the same defects.

    .venv/bin/python tools/planted_defects.py               # every defect, its sessions
    .venv/bin/python tools/planted_defects.py --list        # the defects
    .venv/bin/python tools/planted_defects.py --check       # each `old` found once (fast)
    .venv/bin/python tools/planted_defects.py --only gsam-swapped looksam-orthogonal
    .venv/bin/python tools/planted_defects.py --tests-from af3ada9   # the earlier suite
    .venv/bin/python tools/planted_defects.py --baseline    # first: no defect, must pass
    # A quick look: one test file, in one process.
    .venv/bin/python tools/planted_defects.py --only tf-sparse-duplicates --jobs 0 \\
        --pytest-args "tests/step/test_sparse.py"

How long it takes: 35 runs (a defect in each session named for it). A caught defect
stops at its first failing test, but pytest gets there in collection order (tests/backends,
datasets and diagnostics come before methods and trainers), so a run costs start-up plus
the tests before the first that fails: from under a minute to most of a session. A missed
defect costs a whole session, as long as `make test` takes for that backend. Not timed end
to end on a 2-core machine; expect several hours there, far less on many cores. Each run
against one test file with `--jobs 0` took 10-50 s on 2 busy cores. `--timeout` (minutes,
default 20) bounds each run. `--baseline --only` runs the defect-free sessions alone.

The exit status is 0 only when every run was CAUGHT (and, with `--baseline`, every
defect-free session passed). `--check` is also run by tests/test_planted_defects.py, so
that a refactor that makes an `old` string stale fails the suite itself.
"""

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("tensorflow", "jax", "torch")
ALL = BACKENDS
# What `--tests-from REF` takes from the earlier commit: the suite and its pytest
# configuration (markers, filters, options live in pyproject.toml's [tool.pytest]).
SUITE_PATHS = ("tests", "pyproject.toml")
# Set in the planted copy's sessions: tests/test_planted_defects.py skips itself there
# (the copy's library differs from the defect list on purpose).
ENV_FLAG = "KERAS_SAM_PLANTED_DEFECT"
# What the defects cover; tests/test_planted_defects.py asks for each.
AREAS = ("step", "method", "backend", "transaction", "maths", "cli")


@dataclasses.dataclass(frozen=True)
class Defect:
    id: str
    area: str  # one of AREAS
    path: str  # a file under keras_sam/
    old: str  # occurs exactly once in `path`
    new: str
    description: str  # one line: the bug a user would suffer
    backends: tuple[str, ...]  # the sessions whose tests should catch it


DEFECTS = (
    # ------------------------------------------------------------------ the step
    Defect(
        "step-perturbation-sign",
        "step",
        "keras_sam/step/passes.py",
        "return backend.perturbed(weights, perturbation, gradients)",
        "return backend.perturbed(\n"
        "        weights, [None if e is None else -e for e in perturbation], gradients\n"
        "    )",
        "the perturbed pass is taken at w - e (downhill), not at w + e",
        ALL,
    ),
    Defect(
        "step-m-sharpness-weights",
        "step",
        "keras_sam/step/passes.py",
        "None if gs[0] is None else backend.weighted_sum(gs, part_weights)",
        "None if gs[0] is None else backend.weighted_sum(gs, [1.0 / len(gs)] * len(gs))",
        "m-sharpness parts' gradients averaged with equal weights, not by part size",
        ALL,
    ),
    Defect(
        "step-state-updates-dropped",
        "step",
        "keras_sam/step/passes.py",
        "updates = _kept_updates(clean_updates, pending, real)",
        "updates = _kept_updates([], pending, real)",
        "the clean pass's state updates are dropped: BatchNorm statistics never move",
        ALL,
    ),
    # ----------------------------------------------------------- the transaction
    Defect(
        "transaction-perturbed-unchecked",
        "transaction",
        "keras_sam/step/passes.py",
        "finite = _tame(_concatenated([run.clean.norms, descent_norms]))",
        "finite = _tame(_concatenated([run.clean.norms]))",
        "a NaN/inf perturbed pass is not checked: the step commits anyway",
        ALL,
    ),
    Defect(
        "transaction-copy-after-write",
        "transaction",
        "keras_sam/step/outcomes.py",
        "        self.snapshot = [ops.copy(v.value) for v in self.tracked]\n"
        "        self.apply_or_accumulate(gradients, update_values, state_values)\n",
        "        self.apply_or_accumulate(gradients, update_values, state_values)\n"
        "        self.snapshot = [ops.copy(v.value) for v in self.tracked]\n",
        "verify_optimizer_step copies after the optimizer wrote: a roll-back keeps the NaNs",
        ALL,
    ),
    # ---------------------------------------------------------------- the methods
    Defect(
        "gsam-swapped",
        "method",
        "keras_sam/methods/gsam.py",
        "maths.gsam_gradients(gradients, perturbed_gradients, self.alpha)",
        "maths.gsam_gradients(perturbed_gradients, gradients, self.alpha)",
        "GSAM's clean and perturbed gradients swapped in its combination",
        ALL,
    ),
    Defect(
        "looksam-orthogonal",
        "method",
        "keras_sam/methods/looksam.py",
        "maths.orthogonal_component(perturbed_gradients, gradients)",
        "maths.orthogonal_component(gradients, perturbed_gradients)",
        "LookSAM stores g's component orthogonal to g_s, not g_s's orthogonal to g",
        ALL,
    ),
    Defect(
        "asam-scales-biases",
        "method",
        "keras_sam/methods/hooks.py",
        "return not name.endswith(_NON_ADAPTIVE_NAMES)",
        "return True",
        "ASAM scales biases and offsets by |w| + eta too (they should keep T = 1)",
        ALL,
    ),
    # ------------------------------------------------------- the backend adapters
    Defect(
        "tf-sparse-duplicates",
        "backend",
        "keras_sam/backends/tensorflow.py",
        "gradient = _coalesce(gradient) if sparse_ok else tf.convert_to_tensor(gradient)",
        "gradient = gradient if sparse_ok else tf.convert_to_tensor(gradient)",
        "TF: sparse Embedding gradients not coalesced: repeated ids skew the norm and Adam",
        ("tensorflow",),
    ),
    Defect(
        "jax-loss-scale",
        "backend",
        "keras_sam/backends/jax.py",
        "scaled = scaled * ops.convert_to_tensor(scale)",
        "scaled = scaled",
        "JAX: the pass ignores the loss scale, then unscales: mixed_float16 steps ~0",
        ("jax",),
    ),
    Defect(
        "torch-dropout-replay",
        "backend",
        "keras_sam/backends/torch.py",
        "_set_rng_state(self._before_clean)",
        "_set_rng_state(self._after_clean)",
        "PyTorch: the perturbed pass draws a new unseeded-dropout mask, not the clean one's",
        ("torch",),
    ),
    # ----------------------------------------------------------------- the maths
    Defect(
        "maths-no-epsilon",
        "maths",
        "keras_sam/maths.py",
        'factor = ops.cast(rho, "float32") / (norm + epsilon)',
        'factor = ops.cast(rho, "float32") / norm',
        "the norm's epsilon dropped: a zero gradient gives a NaN perturbation (0/0)",
        ALL,
    ),
    Defect(
        "maths-layerwise-share",
        "maths",
        "keras_sam/maths.py",
        'share = ops.cast(rho, "float32") / ops.sqrt(ops.cast(len(members), "float32"))',
        'share = ops.cast(rho, "float32")',
        "layerwise perturbation: each of the L layers gets rho, not rho / sqrt(L)",
        ALL,
    ),
    # Missed by the suite until tests/test_maths.py checked `tensor_norms` alone (the
    # rescaled fallback of `global_norm` hid it): on JAX it skips every step of a float16
    # model whose gradient norm passes 256.
    Defect(
        "maths-norm-float16",
        "maths",
        "keras_sam/maths.py",
        'tensors = [ops.cast(t, "float32") for t in tensors]',
        "tensors = list(tensors)",
        "the per-tensor norms are taken in the gradient's dtype: float16 squares overflow",
        ("jax",),
    ),
    # -------------------------------------------------------------- the command line
    Defect(
        "cli-asam-rho",
        "cli",
        "keras_sam/cli/recipes.py",
        "adaptive=True), rho=ASAM_RHO_SCALE * DEFAULT_RHO)",
        "adaptive=True), rho=DEFAULT_RHO)",
        "`keras-sam train --method asam` defaults to SAM's rho (0.1), not 10x (1.0)",
        ("tensorflow",),
    ),
    Defect(
        "cli-resume-evaluations",
        "cli",
        "keras_sam/cli/training.py",
        '            self.evaluations = last["evaluations"]\n',
        "",
        "a resumed run restarts its gradient-evaluation count from 0 (history is wrong)",
        ("tensorflow",),
    ),
)


# --------------------------------------------------------------------- checking
def check(root=ROOT, defects=DEFECTS):
    """The problems of the defect list against the library in `root` (empty: none).

    Every `old` must occur exactly once in its file, and the planted file must still
    compile (a defect is a bug, not a syntax error).
    """
    problems = []
    ids = [d.id for d in defects]
    for duplicate in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"{duplicate}: the id is used twice")
    for defect in defects:
        problems += [f"{defect.id}: {p}" for p in _problems(root, defect)]
    return problems


def _problems(root, defect):
    if defect.area not in AREAS:
        return [f"area {defect.area!r} is not one of {AREAS}"]
    if not defect.backends or set(defect.backends) - set(BACKENDS):
        return [f"backends {defect.backends!r} must be some of {BACKENDS}"]
    if not defect.path.startswith("keras_sam/") or defect.old == defect.new:
        return ["the edit must change a file under keras_sam/"]
    path = Path(root) / defect.path
    if not path.is_file():
        return [f"{defect.path} does not exist"]
    source = path.read_text()
    count = source.count(defect.old)
    if count != 1:
        return [f"`old` occurs {count} times in {defect.path}, not once: the defect is stale"]
    try:
        compile(source.replace(defect.old, defect.new), defect.path, "exec")
    except SyntaxError as error:
        return [f"the planted {defect.path} does not compile: {error}"]
    return []


def location(root, defect):
    """`path:line` of the defect's `old` string."""
    source = (Path(root) / defect.path).read_text()
    index = source.find(defect.old)
    line = source.count("\n", 0, index) + 1 if index >= 0 else 0
    return f"{defect.path}:{line}"


# ---------------------------------------------------------------- the planted copy
def copy_repository(root, dest, tests_from=None):
    """Copies the working tree (tracked and untracked files that git does not ignore,
    as they are on disk) into `dest`, with `SUITE_PATHS` from the commit `tests_from`
    if given, and makes `dest` a git repository whose index holds them (a test lists
    the tracked files)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for name in sorted(set(filter(None, listed.split("\0")))):
        source = Path(root) / name
        if name.split("/")[0] in (".venv", ".git") or not source.is_file():
            continue  # the environment, a deleted file, a link to a folder
        target = Path(dest) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    if tests_from:
        for name in SUITE_PATHS:
            path = Path(dest) / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        archive = subprocess.run(
            ["git", "archive", "--format=tar", tests_from, "--", *SUITE_PATHS],
            cwd=root,
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for command in (["git", "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(command, cwd=dest, check=True, capture_output=True)


def plant(dest, defect):
    """Replaces the defect's `old` string by its `new` one in the copy at `dest`."""
    path = Path(dest) / defect.path
    source = path.read_text()
    if source.count(defect.old) != 1:
        raise SystemExit(f"{defect.id}: `old` is not found exactly once in {path}")
    path.write_text(source.replace(defect.old, defect.new))


def _environment(dest, backend, defect_id):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(dest), env.get("PYTHONPATH")]))
    env["KERAS_BACKEND"] = backend
    env[ENV_FLAG] = defect_id
    return env


def _check_imports_the_copy(python, dest, env):
    """The sessions must import the planted copy, not the editable install."""
    origin = subprocess.run(
        [python, "-c", "import importlib.util as u; print(u.find_spec('keras_sam').origin)"],
        cwd=dest,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not Path(origin).resolve().is_relative_to(Path(dest).resolve()):
        raise SystemExit(f"the copy in {dest} is not what Python imports ({origin})")


# -------------------------------------------------------------------------- running
@dataclasses.dataclass
class Run:
    ident: str  # the defect's id, or "baseline"
    defect: Defect | None  # None: the baseline (no defect)
    where: str
    backend: str
    result: str = ""
    first: str = ""
    seconds: float = 0.0


_FIRST = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


def run_session(python, dest, backend, defect_id, jobs, extra, timeout, log):
    """One pytest session in `dest`; returns `(exit code or None on time-out, output)`."""
    command = [python, "-m", "pytest", "-x", "-q", "-rfE", "-n", jobs, "-p", "no:cacheprovider"]
    command += extra
    env = _environment(dest, backend, defect_id)
    _check_imports_the_copy(python, dest, env)
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=dest, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if process.poll() is None:  # timed out, or interrupted (Ctrl-C)
                os.killpg(process.pid, signal.SIGKILL)  # pytest and its workers
                process.wait()
    return code, Path(log).read_text(errors="replace")


def verdict(code, output, expect_pass=False):
    """`(result, first failing test)` for a session's exit code and output."""
    first = _FIRST.search(output)
    name = "" if first is None else first.group(2)
    if first is not None and first.group(1) == "ERROR":
        name += " (error)"
    if code is None:
        return "TIME-OUT", name
    if expect_pass:
        return ("PASSED" if code == 0 else f"FAILED (exit {code})"), name
    # Under pytest-xdist, `-x` ends the session as interrupted (exit 2) after the first
    # failure: that is a catch too, when a failing test is named.
    stopped = code == 2 and "stopping after 1 failures" in output and first is not None
    if code == 1 or stopped:
        return "CAUGHT", name
    if code == 0:
        return "MISSED", ""
    return f"NOT RUN CLEANLY (exit {code})", name


def run_all(args, defects):
    python = args.python
    extra = shlex.split(args.pytest_args)
    jobs = str(args.jobs)
    timeout = args.timeout * 60
    work = Path(tempfile.mkdtemp(prefix="planted-defects-"))
    runs = []
    planned = [None] if args.baseline else []
    planned += list(defects)
    try:
        for defect in planned:
            dest = work / ("baseline" if defect is None else defect.id)
            copy_repository(ROOT, dest, args.tests_from)
            if defect is not None:
                plant(dest, defect)
            ident = "baseline" if defect is None else defect.id
            where = "-" if defect is None else location(ROOT, defect)
            backends = _backends(defect, args.backends)
            for backend in backends:
                run = Run(ident, defect, where, backend)
                started = time.monotonic()
                print(f"== {ident} [{backend}] ...", flush=True)
                code, output = run_session(
                    python,
                    dest,
                    backend,
                    ident,
                    jobs,
                    extra,
                    timeout,
                    work / f"{ident}-{backend}.log",
                )
                run.seconds = time.monotonic() - started
                run.result, run.first = verdict(code, output, expect_pass=defect is None)
                print(f"   {run.result} {run.first} ({run.seconds:.0f} s)", flush=True)
                if run.result not in ("CAUGHT", "PASSED"):
                    tail = "\n".join(output.splitlines()[-30:])
                    print("   " + tail.replace("\n", "\n   "), flush=True)
                runs.append(run)
            if not args.keep:
                shutil.rmtree(dest, ignore_errors=True)
    except KeyboardInterrupt:
        print("interrupted: the table holds the runs that finished", flush=True)
        runs.append(Run("(interrupted)", None, "-", "-", "INTERRUPTED"))
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return runs


def _is_commit(ref):
    command = ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"]
    return subprocess.run(command, cwd=ROOT, capture_output=True).returncode == 0


def _backends(defect, only):
    names = BACKENDS if defect is None else defect.backends
    return [b for b in names if not only or b in only]


def table(runs):
    lines = [
        "| id | where | description | backend | result | first failing test | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        if run.defect is None:
            description = "no defect: the suite must pass"
        else:
            description = run.defect.description
        lines.append(
            f"| {run.ident} | {run.where} | {description} | {run.backend} | {run.result} "
            f"| {run.first or '-'} | {run.seconds:.0f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- the command
def parse(argv):
    parser = argparse.ArgumentParser(
        description="Plants known defects into a copy of keras_sam, one at a time, and "
        "reports whether the test suite catches each.",
    )
    parser.add_argument("--list", action="store_true", help="print the defects and exit")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check that every defect's `old` string occurs once (no pytest)",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        metavar="ID",
        help="run these defects only (none: with --baseline, the baseline alone)",
    )
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, help="run these sessions only")
    parser.add_argument(
        "--tests-from",
        metavar="REF",
        help=f"take {', '.join(SUITE_PATHS)} from this git commit (the library stays "
        "the working tree's)",
    )
    parser.add_argument(
        "--pytest-args",
        default="",
        metavar="ARGS",
        help="extra pytest arguments, one string (e.g. \"-m 'not slow'\" or a test path)",
    )
    parser.add_argument(
        "--jobs", default="auto", help="pytest-xdist workers (-n); 0: one process (default auto)"
    )
    parser.add_argument(
        "--timeout", type=float, default=20.0, help="minutes per session (default 20)"
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="first run each session without a defect: it must pass, or 'caught' means little",
    )
    parser.add_argument("--python", default=sys.executable, help="the Python that runs pytest")
    parser.add_argument("--keep", action="store_true", help="keep the copies and logs")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    problems = check()
    if problems:
        print("The defect list is stale:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    defects = list(DEFECTS)
    if args.only is not None:
        unknown = sorted(set(args.only) - {d.id for d in DEFECTS})
        if unknown:
            print(f"unknown defect(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
        defects = [d for d in DEFECTS if d.id in args.only]
    if args.list:
        for d in defects:
            print(f"{d.id:32} {location(ROOT, d):38} {','.join(d.backends):24} {d.description}")
        return 0
    if args.check:
        print(f"{len(DEFECTS)} defects: every `old` string occurs exactly once.")
        return 0
    if args.tests_from and not _is_commit(args.tests_from):
        print(f"--tests-from {args.tests_from}: not a commit of {ROOT}", file=sys.stderr)
        return 2
    runs = run_all(args, defects)
    print()
    print(table(runs))
    bad = [r for r in runs if r.result not in ("CAUGHT", "PASSED")]
    print(f"\n{len(runs) - len(bad)} of {len(runs)} runs as expected.")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
