"""Tuning: databases survive kills and damage, runs resume within their budget, tuned workloads are not retuned,
and applying records changes the schedule but not the outputs (checked against onnxruntime)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import targets
from conftest import free_port, kill, ort_outputs, start
from schedules import database as dbs
from schedules import apply_tuning, tune

TRIALS, PER_ITERATION = 8, 4


def conv_model(with_pool: bool = False) -> onnx.ModelProto:
    """One 3x3 conv + relu: a single kernel worth tuning (with_pool: the same kernel in another model)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2, "w")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    out = "y"
    if with_pool:
        nodes.append(helper.make_node("MaxPool", ["y"], ["z"], kernel_shape=[2, 2], strides=[2, 2]))
        out = "z"
    shape = [1, 16, 8, 8] if with_pool else [1, 16, 16, 16]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # onnxruntime reads it


def _edgeq(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgeq.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _tune_args(model, work_dir):
    return ["tune", model, "--trials", TRIALS, "--per-iteration", PER_ITERATION, "--work-dir", work_dir]


def _records(work_dir: Path) -> list:
    (directory,) = [d for d in work_dir.iterdir() if d.is_dir()]
    return [json.loads(line) for line in (directory / dbs.RECORDS).read_text().splitlines()]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tuning run killed with Ctrl-C after its first committed round, then resumed to the end."""
    root = tmp_path_factory.mktemp("tune")
    model, work_dir = root / "conv.onnx", root / "work"
    onnx.save(conv_model(), model)
    proc = _edgeq(*_tune_args(model, work_dir))
    deadline = time.time() + 900  # the first round: default-schedule measurement, then one search + build + run
    while time.time() < deadline and proc.poll() is None:
        records = list(work_dir.glob(f"*/{dbs.RECORDS}"))
        if records and records[0].read_text().count("\n") >= PER_ITERATION:
            break
        time.sleep(0.5)
    assert proc.poll() is None, "tuning finished (or failed) before it could be interrupted"
    assert time.time() < deadline, "no round of measurements was committed in time"
    interrupted_at = len(_records(work_dir))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().endswith("edgeq: interrupted"), err
    proc = _edgeq(*_tune_args(model, work_dir))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return model, work_dir, interrupted_at, out


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_budget(tuned):
    _, work_dir, interrupted_at, out = tuned
    records = _records(work_dir)
    assert PER_ITERATION <= interrupted_at < TRIALS
    # An uninterrupted run measures exactly TRIALS candidates of the one kernel; so did the two halves together.
    assert len(records) == TRIALS and {r[0] for r in records} == {0}
    assert "fused_conv2d" in out and "tuned" in out
    rows = tune.report(records and next(d for d in work_dir.iterdir() if d.is_dir()))
    (conv,) = [r for r in rows if r["task"].startswith("fused_conv2d")]
    assert conv["complete"] and conv["trials"] == TRIALS and conv["best_ms"] > 0 and conv["default_ms"] > 0
    assert conv["tuned_ms"] > 0  # the best record, timed beside the default


@pytest.mark.slow
def test_a_tuned_workload_is_not_tuned_again(tuned, tmp_path, cli):
    model, work_dir, _, _ = tuned
    code, out, err = cli(*_tune_args(model, work_dir))  # tunes only what the first budget did not reach
    assert code == 0, err
    (conv_row,) = [line for line in out.splitlines() if line.startswith("fused_conv2d")]
    assert "already tuned" in conv_row and sum(r[0] == 0 for r in _records(work_dir)) == TRIALS
    code, out, err = cli(*_tune_args(model, work_dir))
    assert code == 0 and "0 trials this run" in out and "not reached" not in out, err
    other = tmp_path / "conv_pool.onnx"  # a different model with the same conv kernel (and a max pool)
    onnx.save(conv_model(with_pool=True), other)
    code, out, err = cli(*_tune_args(other, work_dir))
    assert code == 0, err
    (conv_row,) = [line for line in out.splitlines() if line.startswith("fused_conv2d")]
    assert "already tuned" in conv_row
    assert sum(r[0] == 0 for r in _records(work_dir)) == TRIALS  # none added to the conv's workload


@pytest.mark.slow
def test_a_default_timed_slow_while_tuning_is_timed_again_beside_the_record(tuned, tmp_path, cli):
    # What made shipped records slow down whole models: the default's time, taken once before tuning, came
    # out 2-5x too slow, so records that lose side by side looked faster. A ledger without side-by-side times
    # (an older database) gets them on the next run, without new trials.
    import shutil

    model, work_dir, _, _ = tuned
    copy = tmp_path / "work"
    shutil.copytree(work_dir, copy)
    (directory,) = [d for d in copy.iterdir() if d.is_dir()]
    ledger = dbs.load_ledger(directory)
    for entry in ledger.values():
        entry["default_ms"] = 1e6
        entry.pop("tuned_ms", None)
    dbs.save_ledger(directory, ledger)
    code, _, err = cli("compile", model, "--tuning-db", copy, "--no-shipped-tuning", "-o", tmp_path / "art")
    assert code == 0 and "tuned kernels of the tuning database were not used: never timed beside" in err, err
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["tuning"]["tuned_kernels"] == [] and manifest["tuning"]["untimed_kernels"]
    conv_records = sum(r[0] == 0 for r in _records(copy))
    code, out, err = cli(*_tune_args(model, copy))
    assert code == 0, err
    (conv,) = [r for r in tune.report(directory) if r["task"].startswith("fused_conv2d")]
    assert conv["default_ms"] < 1e3 and conv["tuned_ms"] > 0 and conv["used"] == dbs.tuned_wins(conv)
    assert sum(r[0] == 0 for r in _records(copy)) == conv_records  # the conv was timed again, not re-tuned


def test_side_by_side_alternates_the_two_schedules_and_takes_medians(monkeypatch):
    calls, secs = [], {"default": [4e-3, 2e-3, 2e-3, 2.1e-3, 2e-3], "tuned": [1.9e-3, 1.8e-3, None, 1.9e-3, 1.9e-3]}
    monkeypatch.setattr(tune, "_build", lambda builder, mod, target: mod)

    def run(runner, artifact, mod, target):
        calls.append(mod)
        return secs[mod][sum(c == mod for c in calls) - 1]

    monkeypatch.setattr(tune, "_run", run)
    assert tune.side_by_side(None, None, "default", "tuned", None) == (2.0, 1.9)  # one slow run, one failure
    assert calls == ["default", "tuned"] * tune.SIDE_BY_SIDE_ROUNDS


@pytest.mark.slow
def test_kernels_the_budget_did_not_reach_are_tuned_by_the_next_run(tmp_path, cli):
    model, work_dir = tmp_path / "conv.onnx", tmp_path / "work"
    onnx.save(conv_model(), model)  # the conv and two layout transposes are worth tuning; a budget of one round
    args = ["tune", model, "--trials", PER_ITERATION, "--per-iteration", PER_ITERATION, "--work-dir", work_dir]

    def statuses(out):
        rows = out.split("-------\n", 1)[1].split("\n(")[0].splitlines()
        return {row.split()[0]: row for row in rows}

    code, out, err = cli(*args)
    assert code == 0, err
    waiting = [name for name, row in statuses(out).items() if "not reached" in row]
    conv = next(n for n in statuses(out) if n.startswith("fused_conv2d"))  # the heaviest kernel goes first
    assert waiting and conv not in waiting, out
    code, out, err = cli(*args)
    assert code == 0 and f"{PER_ITERATION} trials this run" in out, err
    rows = statuses(out)
    assert "already tuned" in rows[conv]
    assert "not reached" not in rows[waiting[0]] and "already tuned" not in rows[waiting[0]], out


@pytest.mark.slow
def test_applying_records_changes_the_schedule_not_the_outputs(tuned, tmp_path, cli):
    import tvm
    from tvm import relax

    from edgeq.frontend import load_onnx
    from relay_passes import pipeline
    from schedules.lowering import lowering_pipeline

    model, work_dir, _, _ = tuned
    (directory,) = [d for d in work_dir.iterdir() if d.is_dir()]
    ledger = dbs.load_ledger(directory)
    target = targets.tvm_target(targets.resolve("host"))
    mod = pipeline.optimize(load_onnx(model).mod)

    def conv_kernel(databases):
        lowered = lowering_pipeline(target, databases)(mod)
        return next(str(f) for g, f in lowered.functions.items() if "conv2d" in g.name_hint)

    # The records are used only where they beat the default schedule side by side: make the default lose, then win.
    def judged(default_ms, tuned_ms):
        for entry in ledger.values():
            entry.update(default_ms=default_ms, tuned_ms=tuned_ms)
        dbs.save_ledger(directory, ledger)

    judged(1.0, 0.5)
    default, tuned_kernel = conv_kernel([]), conv_kernel([directory])
    assert tuned_kernel != default
    judged(1.0, 0.99)  # within the timing margin: not worth it
    assert conv_kernel([directory]) == default
    judged(1.0, None)  # the best record failed when timed again
    assert conv_kernel([directory]) == default
    judged(1.0, 0.5)

    x = np.random.default_rng(1).standard_normal((1, 8, 16, 16)).astype(np.float32)
    (expected,) = ort_outputs(onnx.load(model), {"x": x})
    code, _, err = cli("compile", model, "--tuning-db", work_dir, "--no-shipped-tuning", "-o", tmp_path / "art")
    assert code == 0, err
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["tuning"]["databases"] == [str(directory)]
    assert [k for k in manifest["tuning"]["tuned_kernels"] if "conv2d" in k], manifest["tuning"]
    ex = tvm.compile(mod, target, relax_pipeline=lowering_pipeline(target, [directory]))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_damaged_database_lines_are_reported_and_skipped(tmp_path):
    # A real database with two workloads and a record each, then a torn workload line in the middle and a
    # half-written record at the end (what a kill during an append leaves).
    funcs = _database(tmp_path, {8: 1e-6, 16: 1e-6})
    workloads = (tmp_path / dbs.WORKLOADS).read_text().splitlines()
    (tmp_path / dbs.WORKLOADS).write_text(workloads[0][:40] + "\n" + workloads[1] + "\n")  # first one torn
    records = (tmp_path / dbs.RECORDS).read_text()
    (tmp_path / dbs.RECORDS).write_text(records + records.splitlines()[0][:30])

    reopened, problems = dbs.open_database(tmp_path)
    assert problems == [f"{tmp_path / dbs.WORKLOADS}: skipped unreadable line 1",
                        f"{tmp_path / dbs.RECORDS}: skipped unreadable line 3",
                        f"{tmp_path / dbs.RECORDS}: skipped 1 records of unreadable workloads"]
    assert len(reopened) == 1  # the second workload's record survives, renumbered to the first line
    assert reopened.query_tuning_record(apply_tuning.workload_module(funcs[16]), targets.tvm_target(targets.resolve("host")), "main") is not None
    assert dbs.open_database(tmp_path)[1] == []  # repaired for good


def _database(directory: Path, sizes_and_secs: dict[int, float]) -> dict:
    """A real MetaSchedule database with one workload (y = 2x of length n) and one record (secs) per entry;
    returns the PrimFunc of each n."""
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    directory.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(directory))
    host = targets.tvm_target(targets.resolve("host"))
    funcs = {}
    for n, secs in sizes_and_secs.items():
        a = te.placeholder((n,), name="a")
        func = te.create_prim_func([a, te.compute((n,), lambda i: a[i] * 2, name="b")])
        workload = database.commit_workload(apply_tuning.workload_module(func))
        database.commit_tuning_record(ms.database.TuningRecord(tvm_schedule(apply_tuning.workload_module(func)).trace,
                                                               workload, [secs], host,
                                                               ms.arg_info.ArgInfo.from_prim_func(func)))
        funcs[n] = func
    return funcs


def test_export_ships_only_records_that_beat_the_default(tmp_path, monkeypatch):
    source, shipped = tmp_path / "work", tmp_path / "shipped" / "host-x"
    keys = {n: apply_tuning.workload_key(f) for n, f in _database(source, {8: 1e-6, 16: 1e-3, 24: 2e-6}).items()}
    # The records' own times (1e-6 s) beat every default; only the side-by-side times (ms) decide.
    dbs.save_ledger(source, {keys[8]: {"task": "eight", "default_ms": 0.01, "tuned_ms": 0.005},  # tuned wins
                             keys[16]: {"task": "sixteen", "default_ms": 0.01, "tuned_ms": 0.02},  # default wins
                             keys[24]: {"task": "twenty-four", "default_ms": 0.01, "tuned_ms": 0.008}})
    keys.update({n: apply_tuning.workload_key(f) for n, f in _database(shipped, {24: 1e-6, 32: 1e-6}).items()})  # already shipped: a faster 24, and 32
    dbs.save_ledger(shipped, {keys[24]: {"task": "twenty-four", "default_ms": 0.01, "tuned_ms": 0.004},
                              keys[32]: {"task": "thirty-two", "default_ms": 0.01, "tuned_ms": 0.005}})

    assert dbs.export_winners(source, shipped) == 3
    database, problems = dbs.open_database(shipped, create=False)
    assert problems == [] and len(database) == 3  # one record per workload
    ledger = dbs.load_ledger(shipped)
    assert set(ledger) == {keys[8], keys[16], keys[24], keys[32]}  # the loser stays documented, without a record
    assert ledger[keys[24]]["tuned_ms"] == 0.004 and not dbs.tuned_wins(ledger[keys[16]])
    best = {k: min(v) for k, v in tune._records_by_workload(shipped).items()}
    assert best == {keys[8]: 1e-6, keys[24]: 1e-6, keys[32]: 1e-6}
    rows = {r["workload"]: r for r in tune.report(shipped)}  # `edgeq tune --report` lists the loser too
    assert set(rows) == set(ledger) and rows[keys[16]]["trials"] == 0 and not rows[keys[16]]["used"]
    assert rows[keys[8]]["used"] and rows[keys[8]]["tuned_ms"] == 0.005
    # a build for the preset reads the shipped database unless told not to
    monkeypatch.setattr(dbs, "SHIPPED", tmp_path / "shipped")
    monkeypatch.setattr(dbs, "database_name", lambda preset: "host-x")
    assert dbs.databases_for(targets.resolve("host")) == [shipped]
    assert dbs.databases_for(targets.resolve("host"), shipped=False) == []


def test_the_shipped_databases_hold_only_winning_records():
    """What `edgeq tune --zoo` shipped: readable, one record per workload, each faster than edgeq's default
    side by side, and a ledger of every workload it compared."""
    directories = [d for d in dbs.SHIPPED.iterdir() if d.is_dir()]
    assert directories, "edgeq ships at least the database of the machine it is developed on"
    for directory in directories:
        assert dbs.repair(directory) == [], directory
        ledger = dbs.load_ledger(directory)
        assert ledger and all("tuned_ms" in entry for entry in ledger.values()), directory
        for key, secs in tune._records_by_workload(directory).items():
            assert len(secs) == 1 and dbs.tuned_wins(ledger[key]), (directory, ledger.get(key))


def tvm_schedule(mod):
    from tvm.s_tir import Schedule

    sch = Schedule(mod)
    sch.parallel(sch.get_loops(sch.get_sblock("b"))[0])
    return sch


def test_tuning_on_a_device_that_does_not_answer_says_so(tmp_path, cli):
    onnx.save(conv_model(), tmp_path / "conv.onnx")
    port = free_port()
    code, _, err = cli("tune", tmp_path / "conv.onnx", "--rpc", f"127.0.0.1:{port}", "--retries", 2,
                       "--work-dir", tmp_path / "work")
    assert code == 2 and f"cannot connect to 127.0.0.1:{port}: connection refused" in err, err
    assert "tried 2 times" in err and not (tmp_path / "work").exists()


@pytest.mark.slow
def test_a_device_lost_while_tuning_stops_the_run_with_the_database_whole(tmp_path):
    """Candidates measured over RPC on a server on this machine; the server is killed after the first round."""
    onnx.save(conv_model(), tmp_path / "conv.onnx")
    port = free_port()
    server = start("tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1),
                   port=port)
    try:
        work_dir = tmp_path / "work"
        proc = _edgeq("tune", tmp_path / "conv.onnx", "--rpc", f"127.0.0.1:{port}", "--retries", 2, "--trials", 12,
                      "--per-iteration", PER_ITERATION, "--work-dir", work_dir)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            records = list(work_dir.glob(f"*/{dbs.RECORDS}"))
            if records and records[0].read_text().count("\n") >= PER_ITERATION:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        kill(server)  # the server and the session processes it forked: the whole device is gone
        out, err = proc.communicate(timeout=300)
    finally:
        kill(server)
    assert proc.returncode == 2, out + err
    assert err.strip().splitlines()[-1].startswith(f"edgeq: error: the device 127.0.0.1:{port} stopped answering"), err
    assert "run the same command again to continue" in err
    (directory,) = [d for d in work_dir.iterdir() if d.is_dir()]
    assert dbs.repair(directory) == [] and len(_records(work_dir)) >= PER_ITERATION


def test_tuning_a_cross_target_needs_a_device(tmp_path, cli):
    onnx.save(conv_model(), tmp_path / "conv.onnx")
    code, _, err = cli("tune", tmp_path / "conv.onnx", "--target", "rpi4", "--work-dir", tmp_path / "w")
    assert code == 2 and "tune it on the device with --rpc" in err
    code, _, err = cli("compile", tmp_path / "conv.onnx", "--tuning-db", tmp_path / "nothing", "-o", tmp_path / "o")
    assert code == 2 and "no tuning database for host-" in err and not (tmp_path / "o").exists()


def test_tune_quantizes_the_model_as_compile_does(tmp_path, cli):
    """`edgeq tune --quantize` takes compile's quantization flags, so it tunes the kernels the build will compile:
    with --keep-8bit first the last conv of a w2a2 model is bit-serial, and that is the kernel tuned."""
    import zoo

    from edgeq.cli import _parser

    commands = {name: set(p._option_string_actions) for name, p in
                _parser()._subparsers._group_actions[0].choices.items() if name in ("compile", "tune")}
    quantization = {"--quantize", "--keep-8bit", "--fpsc", "--calib", "--calib-method", "--percentile", "--exclude",
                    "--per-tensor"}
    assert quantization <= commands["compile"] and quantization <= commands["tune"]
    g = zoo._Graph(0)
    out = g.op("Relu", g.conv(g.op("Relu", g.conv("x", 4, 16)), 16, 16))
    onnx.save(zoo._model(g.nodes, {"x": [1, 4, 8, 8]}, {out: None}, g.inits), tmp_path / "two.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((4, 4, 8, 8)).astype(np.float32))
    args = ["tune", tmp_path / "two.onnx", "--trials", "0", "--work-dir", tmp_path / "w", "--calib",
            tmp_path / "calib.npz", "--quantize", "w2a2"]
    code, out_text, _ = cli(*args, "--keep-8bit", "first")
    assert code == 0 and "bitserial_qconv2d" in out_text
    code, out_text, _ = cli(*args)  # first and last 8-bit (the default): both convs int8
    assert code == 0 and "bitserial" not in out_text and "qconv2d" in out_text
    code, _, err = cli(*args[:-1], "int8", "--fpsc")
    assert code == 2 and "--fpsc applies to the low-bit modes" in err
