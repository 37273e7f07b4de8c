"""What a test may cost, and the tests of a session that cost more, printed at its end.

`make test` runs each backend's session on two worker processes of a 2-core machine, so
the seconds below are seconds under that load (setup, call and teardown together). A test
over its budget is not a failure: the session's summary names it, so that a test added
later that breaks the budget shows in the output of the run that added it. Make it
smaller (the least model, data and steps that still fail on the defect it guards), or
mark it `slow`, or, past the slow budget, name it in `LONGER` with the reason it cannot be
smaller. docs/development.md gives the figures and the list.
"""

UNIT_SECONDS = 10.0  # a test not marked `slow`
SLOW_SECONDS = 30.0  # an end-to-end test, marked `slow`

# Tests allowed more than `SLOW_SECONDS` (a node id, or the prefix of one), with the reason.
LONGER = {
    "tests/step/test_operations.py::test_a_compiled_jax_sam_step_adds": (
        "compiles three training steps with XLA (plain, bare and SAM) to count their kernels"
    ),
    "tests/backends/test_jax_model_parallel.py": (
        "starts JAX with 2 and 4 host devices in subprocesses and compiles a sharded step"
    ),
    "tests/backends/test_jax_multi_process.py": (
        "three JAX processes (two collectives over gloo, one reference) on localhost"
    ),
    "tests/backends/test_torch_dead_replica.py": (
        "two launches of two torch.distributed processes, one of which kills itself"
    ),
    "tests/backends/test_torch_distribution.py": (
        "two torch.distributed processes against one, for `fit` and the custom loop"
    ),
    "tests/trainers/test_kill_resume.py": (
        "a training process SIGKILLed mid-epoch and started again, per backend"
    ),
    "tests/trainers/test_multi_worker.py": (
        "two TensorFlow worker processes under MultiWorkerMirroredStrategy"
    ),
    "tests/cli/test_training.py::test_an_interrupted_run_resumes_bitwise": (
        "the runner's CNN trained seven times: a run stopped, truncated and resumed three ways"
    ),
    "tests/cli/test_commands.py::test_a_killed_train_resumes_bitwise": (
        "`keras-sam train` SIGKILLed in a fresh interpreter after an epoch, then resumed"
    ),
    "tests/cli/test_inspect.py::test_compare_inspect_draws_both_models_side_by_side": (
        "`compare --inspect`: two CNNs trained, then their landscapes and spectra measured"
    ),
    "tests/trainers/test_contract.py::test_resume_from_a_keras_file_is_bitwise_the_uninterrupted": (
        "on JAX its eager case dispatches every op of 8 epochs of SAM from Python"
    ),
    "tests/test_files.py::test_sigkill_during_save_leaves_a_loadable_file": (
        "kills a process mid-save 4 times, each a fresh interpreter that imports Keras"
    ),
    "tests/backends/test_torch_compile.py::test_compiled_step_is_one_graph": (
        "dynamo traces the whole SAM step (two passes, autograd, the optimizer) once"
    ),
    "tests/backends/test_torch_compile.py::test_each_feature_compiles": (
        "dynamo traces a larger step once per case: four passes (m-sharpness) with"
        " accumulation and Adam under mixed_bfloat16 (39-56 s), GSAM with ASAM under"
        " mixed_float16 (24-37 s); dynamo's `eager` backend instead of `aot_eager`"
        " saves only a fifth"
    ),
    "tests/test_wheel.py": (
        "builds the wheel and installs it with TensorFlow into a fresh virtual environment"
    ),
    "tests/test_finetune_benchmark.py::test_a_quick_study_writes_its_json_and_table": (
        "benchmarks/finetune.py --quick: a pretraining, four fine-tuning runs, then a fresh"
        " process per method for its peak memory (as the study measures it), and a rerun"
    ),
    "tests/test_cross_backend.py": "one process per backend, each importing its framework",
    "tests/test_readme_logs.py": (
        "the README's code in a fresh process per backend, each importing its framework"
    ),
    "tests/test_keras_floor.py": (
        "installs the floor Keras with pip; on TensorFlow a fresh process traces nine steps"
    ),
    "tests/diagnostics/test_cross_backend.py": (
        "one process per backend, each importing its framework"
    ),
}


def allowed_seconds(nodeid, slow):
    for prefix in LONGER:
        if nodeid.startswith(prefix):
            return None
    return SLOW_SECONDS if slow else UNIT_SECONDS


def over_budget(reports):
    """`(seconds, budget, nodeid)` of each test over its budget, slowest first.

    `reports` are pytest's `TestReport`s of the session (setup, call and teardown).
    """
    seconds, slow = {}, set()
    for report in reports:
        seconds[report.nodeid] = seconds.get(report.nodeid, 0.0) + report.duration
        if "slow" in report.keywords:
            slow.add(report.nodeid)
    over = []
    for nodeid, spent in seconds.items():
        allowed = allowed_seconds(nodeid, nodeid in slow)
        if allowed is not None and spent > allowed:
            over.append((spent, allowed, nodeid))
    return sorted(over, reverse=True)


def report(terminalreporter):
    reports = [
        report
        for key in ("passed", "failed", "skipped", "xfailed", "xpassed", "error")
        for report in terminalreporter.stats.get(key, [])
        if hasattr(report, "duration") and getattr(report, "when", None) is not None
    ]
    over = over_budget(reports)
    if not over:
        return
    terminalreporter.section("tests over their budget (tests/budget.py)", sep="-")
    for spent, allowed, nodeid in over:
        terminalreporter.write_line(f"{spent:7.1f} s  (budget {allowed:.0f} s)  {nodeid}")
