"""MetaSchedule tuning of a model's kernels: budgeted, resumable, deduplicated, and never worse than the default.

A task is one fused PrimFunc of the lowered module (the same functions the build schedules), keyed by its
structural hash, i.e. MetaSchedule's workload hash, so the same kernel in two models is one workload.
`tune` splits a trial budget over the model's tasks with MetaSchedule's gradient task scheduler (XGBoost cost
model, evolutionary search), measuring each candidate locally or on a device over RPC. Workloads whose tuning
finished are skipped forever after; an interrupted run continues where it stopped, spending only what is left
of the budget.

A tuned schedule is used only where it beats edgeq's default schedule *side by side*: after tuning, the best
record and the default are built once and timed in alternation (`side_by_side`), and both medians go into the
ledger. The record's own time is no fair comparison: it was taken minutes after the default's, among other
candidates, and on a 2-core machine one timing in five comes out twice as slow (measured: the default times
taken while tuning MobileNetV2 were 2-5x the side-by-side ones, so records that lose by 1.4-1.9x passed as
1.1-1.6x faster and made the built model slower).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from targets.errors import stop_on_ctrl_c

from . import database as dbs
from .apply_tuning import workload_key, workload_module

_FAILED = 1e9  # MetaSchedule records failed candidates with run_secs 1e10
SIDE_BY_SIDE_ROUNDS = 5  # alternating timings of the default and the tuned schedule; medians compared
NEGLIGIBLE = 0.02  # share of the model's default latency below which a kernel is not tuned


@dataclass
class Remote:
    """Where candidates run: a TVM RPC server (host, port) or a tracker (host, port) and key."""

    host: str
    port: int
    key: str | None = None  # set: (host, port) is a tracker
    timeout: float = 60.0
    compiler: str | None = None  # cross compiler that links the candidates for the device
    retries: int = 3  # connection attempts (1, 2, 4, ... s apart) before the device counts as gone

    @property
    def device(self):
        """The same board as the deploy commands name it (connection, messages)."""
        from targets.rpc import Device

        address = f"{self.host}:{self.port}"
        return Device(rpc=None if self.key else address, tracker=address if self.key else None, key=self.key,
                      timeout=self.timeout)

    def check(self) -> None:
        """Return once the device gives a session; EdgeqError (the last reason) after `retries` failed tries."""
        import time

        from targets.errors import EdgeqError

        device = self.device
        for attempt in range(max(1, self.retries)):
            if attempt:
                time.sleep(2 ** (attempt - 1))
            try:
                device.connect()
                return
            except EdgeqError as e:
                reason = str(e)
        raise EdgeqError(f"{reason} (tried {max(1, self.retries)} times)")


@dataclass
class TaskResult:
    name: str
    workload: str
    weight: int
    default_ms: float | None
    best_ms: float | None
    trials: int
    status: str  # "tuned", "default kept" (it won side by side), "not reached" (no budget left), "already tuned", "negligible"


@dataclass
class TuneResult:
    directory: Path
    tasks: list[TaskResult] = field(default_factory=list)
    trials_run: int = 0
    problems: list[str] = field(default_factory=list)


def extract_tasks(mod, target):
    """The tuning tasks of a Relax module: its fused PrimFuncs after edgeq's pre-schedule lowering."""
    from tvm.s_tir import meta_schedule as ms

    from .lowering import pre_schedule

    return ms.relax_integration.extract_tasks(pre_schedule(mod, target), target)


def build_candidate(mod, target, _params):
    """MetaSchedule builder: compile a scheduled PrimFunc, leaving out the one-time weight repacking.

    Unlike MetaSchedule's default_build it does not import tvm.s_tir.tensor_intrin (the candidates arrive
    already tensorized), which costs every builder process many seconds.
    """
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _export_shared(compiler: str, rt_mod) -> str:
    """MetaSchedule export for a device: a shared library linked by the preset's cross compiler."""
    import tempfile

    from tvm.support import cc

    path = str(Path(tempfile.mkdtemp()) / "candidate.so")
    rt_mod.export_library(path, fcompile=cc.cross_compiler(compiler))
    return path


def _connect(host: str, port: int, timeout: float, _config):
    """MetaSchedule session factory for a server without a tracker."""
    from tvm import rpc

    return rpc.connect(host, port, session_timeout=timeout)


def _builder_runner(remote: Remote | None):
    from tvm.s_tir import meta_schedule as ms

    from .tvmscript_import import install

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40)
    if remote is None:
        builder = ms.builder.LocalBuilder(f_build=build_candidate, initializer=install, timeout_sec=300)
        return builder, ms.runner.LocalRunner(timeout_sec=60, evaluator_config=evaluator)
    export = functools.partial(_export_shared, remote.compiler) if remote.compiler else None
    builder = ms.builder.LocalBuilder(f_build=build_candidate, f_export=export, initializer=install, timeout_sec=300)
    if remote.key:
        config = ms.runner.RPCConfig(tracker_host=remote.host, tracker_port=remote.port, tracker_key=remote.key,
                                     session_timeout_sec=int(remote.timeout))
        return builder, ms.runner.RPCRunner(config, evaluator, max_workers=1)
    # RPCConfig insists on tracker fields; with our own session factory they are never used to connect.
    config = ms.runner.RPCConfig(tracker_host=remote.host, tracker_port=remote.port, tracker_key="direct",
                                 session_timeout_sec=int(remote.timeout))
    connect = functools.partial(_connect, remote.host, remote.port, remote.timeout)
    return builder, ms.runner.RPCRunner(config, evaluator, max_workers=1, f_create_session=connect)


def _build(builder, mod, target):
    """A scheduled PrimFunc module compiled like a tuning candidate (None: it failed to build)."""
    from tvm.s_tir import meta_schedule as ms

    (built,) = builder.build([ms.builder.BuilderInput(mod, target)])
    return None if built.error_msg else built.artifact_path


def _run(runner, artifact, mod, target) -> float | None:
    """Seconds per run of a built candidate, measured by the tuning runner (None: it failed)."""
    from tvm.s_tir import meta_schedule as ms

    args = ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True)
    device = "cuda" if target.kind.name == "cuda" else "cpu"
    (future,) = runner.run([ms.runner.RunnerInput(artifact, device, args)])
    result = future.result()
    if result.error_msg or not result.run_secs:
        return None
    return float(sum(float(s) for s in result.run_secs) / len(result.run_secs))


def _measure(builder, runner, mod, target) -> float | None:
    """Seconds per run of a scheduled PrimFunc module, measured like a tuning candidate (None: it failed)."""
    artifact = _build(builder, mod, target)
    return None if artifact is None else _run(runner, artifact, mod, target)


def side_by_side(builder, runner, default_mod, tuned_mod, target, rounds: int = SIDE_BY_SIDE_ROUNDS):
    """Median ms of the default and the tuned schedule of one workload, timed in alternation (inf: failed)."""
    import statistics

    mods = (default_mod, tuned_mod)
    artifacts = [_build(builder, mod, target) for mod in mods]
    times: tuple[list, list] = ([], [])
    for _ in range(rounds):
        for mod, artifact, measured in zip(mods, artifacts, times):
            secs = None if artifact is None else _run(runner, artifact, mod, target)
            measured.append(math.inf if secs is None else secs * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def _compare_best_record(database, builder, runner, func, target, entry: dict) -> None:
    """Time the workload's best record beside the default schedule; the ledger entry gets both medians."""
    from .default_cpu import default_schedule_func

    workload = workload_module(func)
    record = database.query_tuning_record(workload, target, "main")
    if record is None or min(float(s) for s in record.run_secs) >= _FAILED:
        return
    tuned = database.query_schedule(workload, target, "main").mod
    default_ms, tuned_ms = side_by_side(builder, runner, workload_module(default_schedule_func(func, target)),
                                        tuned, target)
    if math.isfinite(default_ms):
        entry["default_ms"] = default_ms
    entry["tuned_ms"] = tuned_ms if math.isfinite(tuned_ms) else None


def _records_by_workload(directory: Path) -> dict[str, list[float]]:
    """Each workload's measured latencies (seconds), in the order they were measured."""
    workloads, _ = dbs.json_lines(directory / dbs.WORKLOADS)
    records, _ = dbs.json_lines(directory / dbs.RECORDS)
    keys = [w[0] for w in workloads]
    out: dict[str, list[float]] = {}
    for index, record in records:
        secs = record[1] or [math.inf]
        out.setdefault(keys[index], []).append(sum(secs) / len(secs))
    return out


@contextlib.contextmanager
def _native_log(path: Path):
    """Send what TVM's C++ writes to stderr while tuning (a warning per failed tensorize attempt, thousands of
    lines) to `path`; yields a stream to the terminal for edgeq's own progress and messages."""
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    terminal = os.fdopen(os.dup(terminal_fd), "w", buffering=1)
    try:
        yield terminal
    finally:
        terminal.flush()
        sys.stderr.flush()
        os.dup2(terminal_fd, 2)
        os.close(terminal_fd)
        terminal.close()


def _progress_callback(bar, names: list[str], stop: threading.Event, remote: Remote | None, lost: list):
    from tvm.s_tir import meta_schedule as ms
    from tvm.ir.utils import derived_object

    best: dict[int, float] = {}

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            for result in runner_results:
                if result.error_msg is None and result.run_secs:
                    secs = sum(float(s) for s in result.run_secs) / len(result.run_secs)
                    best[task_id] = min(best.get(task_id, math.inf), secs)
            done = sum(bool(t.is_terminated) for t in task_scheduler.tasks_)
            latest = f"{names[task_id]} {best[task_id] * 1e3:.3f} ms" if task_id in best else names[task_id]
            bar.set_postfix_str(f"tasks done {done}/{len(names)}, best {latest}", refresh=False)
            bar.update(len(measure_candidates))
            if remote is not None and runner_results and all(r.error_msg for r in runner_results):
                try:  # a round where nothing ran: is the device still there?
                    remote.check()
                except Exception as e:  # noqa: BLE001 - EdgeqError, re-raised by tune() once MetaSchedule stops
                    lost.append(e)
                    stop.set()
            if stop.is_set():  # raised in the scheduler's own thread, after this round's records were added
                raise KeyboardInterrupt

    return Progress()


def tune(mod, preset, work_dir, trials: int, *, per_iteration: int = 16, max_per_task: int | None = None,
         remote: Remote | None = None, seed: int = 0, progress: bool = False) -> TuneResult:
    """Tune a Relax module's kernels for a preset into work_dir/<preset>/ with a budget of `trials` candidates."""
    import targets
    from tqdm import tqdm
    from tvm.s_tir import meta_schedule as ms

    from targets.errors import EdgeqError

    from .default_cpu import default_schedule_func

    if preset.is_gpu:
        raise EdgeqError(f"tuning measures candidates on a CPU; {preset.name} is a {preset.target['kind']} target "
                         "(build it with the default GPU schedules)")
    cross = preset.arch != targets.detect.host_arch()
    if cross and remote is None:
        raise EdgeqError(f"{preset.name} code cannot run on this machine: tune it on the device with --rpc or "
                         "--tracker/--key (e.g. an `edgeq device emulate` board)")
    # MetaSchedule sizes its parallel loops by the target's core count: the board's, or this machine's.
    cores = preset.target.get("num-cores") or (preset.threads if remote is not None else os.cpu_count())
    target = targets.tvm_target(dataclasses.replace(preset, target={**preset.target, "num-cores": cores}))
    if remote is not None and cross:
        remote.compiler = remote.compiler or targets.find_compiler(preset)
        if remote.compiler is None:
            raise EdgeqError(f"no cross compiler for {preset.name}: install {preset.package}")
    if remote is not None:
        remote.check()  # before anything is written
    directory = dbs.target_dir(work_dir, preset)
    database, problems = dbs.open_database(directory)
    result = TuneResult(directory, problems=problems)
    ledger = dbs.load_ledger(directory)
    builder, runner = _builder_runner(remote)

    tasks = extract_tasks(mod, target)
    keys = [workload_key(task.dispatched[0]["main"]) for task in tasks]
    pending = []
    for task, key in zip(tasks, keys):
        func = task.dispatched[0]["main"]
        entry = ledger.setdefault(key, {"task": task.task_name, "complete": False})
        if entry["complete"]:
            result.tasks.append(TaskResult(task.task_name, key, task.weight, entry.get("default_ms"), None, 0,
                                           "already tuned"))
            continue
        if "default_ms" not in entry:
            secs = _measure(builder, runner, workload_module(default_schedule_func(func, target)), target)
            entry["default_ms"] = None if secs is None else secs * 1e3
            dbs.save_ledger(directory, ledger)
        pending.append((task, key))

    # The heaviest kernels first (the scheduler's first round follows this order); kernels taking under
    # NEGLIGIBLE of the model's default time are not worth trials.
    cost = {key: (ledger[key].get("default_ms") or math.inf) * task.weight for task, key in pending}
    total = sum((ledger[key].get("default_ms") or 0.0) * task.weight for task, key in zip(tasks, keys))
    pending.sort(key=lambda item: -cost[item[1]])
    for task, key in [item for item in pending if cost[item[1]] < NEGLIGIBLE * total]:
        ledger[key]["complete"] = True
        result.tasks.append(TaskResult(task.task_name, key, task.weight, ledger[key]["default_ms"], None, 0,
                                       "negligible"))
    pending = [item for item in pending if cost[item[1]] >= NEGLIGIBLE * total]

    measured = _records_by_workload(directory)
    spent = sum(len(measured.get(key, ())) for _, key in pending)
    remaining = trials - spent
    if pending and remaining > 0:
        # Built here rather than by MetaSchedule's helper, which reconfigures Python logging globally
        # (dictConfig); MetaSchedule's per-task tables go to a quiet logger.
        quiet = logging.getLogger("edgeq.tune.metaschedule")
        quiet.setLevel(logging.WARNING)
        contexts = [ms.TuneContext(mod=task.dispatched[0], target=target, space_generator="post-order-apply",
                                   search_strategy="evolutionary", task_name=task.task_name, logger=quiet,
                                   rand_state=seed + i, num_threads="physical").clone()
                    for i, (task, _) in enumerate(pending)]
        weights = [float(task.weight) for task, _ in pending]
        names = [t.task_name for t, _ in pending]
        callbacks = ms.measure_callback.MeasureCallback.create("default")
        log = directory / "metaschedule.log"
        with _native_log(log) as terminal, stop_on_ctrl_c(terminal) as stop, tqdm(
                total=remaining, disable=None if progress else True, unit="trial", desc="tuning", leave=False,
                file=terminal) as bar:
            lost: list = []
            callbacks = list(callbacks) + [_progress_callback(bar, names, stop, remote, lost)]
            try:
                ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(directory),
                                   max_trials_global=remaining, max_trials_per_task=max_per_task or remaining,
                                   num_trials_per_iter=per_iteration, builder=builder, runner=runner,
                                   database=database, cost_model="xgb", measure_callbacks=callbacks,
                                   task_scheduler="gradient")
            except (KeyboardInterrupt, RuntimeError):
                if not stop.is_set():
                    raise
            if lost:
                raise EdgeqError(f"the device {remote.device.name} stopped answering while tuning: {lost[0]}; the database "
                                 f"keeps every measured candidate ({directory}): run the same command again to "
                                 "continue") from None
            if stop.is_set():
                raise KeyboardInterrupt  # the next run resumes from the database
    # A kernel the budget did not reach stays pending for the next run; one that got trials is done for good.
    measured = _records_by_workload(directory)
    for _, key in pending:
        ledger[key]["complete"] = key in measured
    dbs.save_ledger(directory, ledger)

    # Every workload tuned now, or earlier without a side-by-side timing, is compared with its default.
    unjudged = [(task, key) for task, key in zip(tasks, keys)
                if (task, key) in pending or ("tuned_ms" not in ledger[key] and key in measured)]
    for task, key in tqdm(unjudged, desc="tuned vs default", unit="kernel", leave=False,
                          disable=None if progress and unjudged else True):
        _compare_best_record(database, builder, runner, task.dispatched[0]["main"], target, ledger[key])
        dbs.save_ledger(directory, ledger)

    result.trials_run = sum(len(measured.get(key, ())) for _, key in pending) - spent
    for task, key in pending:
        entry = ledger[key]
        status = ("not reached" if not entry["complete"] else "tuned" if dbs.tuned_wins(entry) else "default kept")
        result.tasks.append(TaskResult(task.task_name, key, task.weight, entry.get("default_ms"), entry.get("tuned_ms"),
                                       len(measured.get(key, [])), status))
    return result


def report(directory: str | Path) -> list[dict]:
    """Per workload of a database directory: task name, trials, tuning curve and best record's time, and the
    side-by-side times of the default and the best record (whether builds use it)."""
    directory = Path(directory)
    if not (directory / dbs.RECORDS).exists():
        raise FileNotFoundError(directory)
    ledger = dbs.load_ledger(directory)
    measured = _records_by_workload(directory)
    rows = []
    for key, secs in measured.items():
        curve, best = [], math.inf
        for s in secs:
            best = min(best, s if s < _FAILED else math.inf)
            curve.append(best * 1e3)
        entry = ledger.get(key, {})
        rows.append({"task": entry.get("task", key), "workload": key, "trials": len(secs),
                     "default_ms": entry.get("default_ms"), "best_ms": None if math.isinf(best) else best * 1e3,
                     "tuned_ms": entry.get("tuned_ms"), "used": dbs.tuned_wins(entry),
                     "complete": entry.get("complete", False), "curve_ms": curve})
    # Compared but shipped without a record (`edgeq tune --zoo` keeps the ledger of the losers too).
    rows += [{"task": entry.get("task", key), "workload": key, "trials": 0, "default_ms": entry.get("default_ms"),
              "best_ms": None, "tuned_ms": entry["tuned_ms"], "used": False, "complete": True, "curve_ms": []}
             for key, entry in ledger.items() if key not in measured and "tuned_ms" in entry]
    return rows
