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
from conftest import ort_outputs
from schedules import database as dbs
from schedules import tune

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


@pytest.mark.slow
def test_a_tuned_workload_is_not_tuned_again(tuned, tmp_path, cli):
    model, work_dir, _, _ = tuned
    code, out, err = cli(*_tune_args(model, work_dir))
    assert code == 0 and "already tuned" in out and "0 trials this run" in out, err
    assert len(_records(work_dir)) == TRIALS
    other = tmp_path / "conv_pool.onnx"  # a different model with the same conv kernel (and a max pool)
    onnx.save(conv_model(with_pool=True), other)
    code, out, err = cli(*_tune_args(other, work_dir))
    assert code == 0, err
    (conv_row,) = [line for line in out.splitlines() if line.startswith("fused_conv2d")]
    assert "already tuned" in conv_row
    assert sum(r[0] == 0 for r in _records(work_dir)) == TRIALS  # none added to the conv's workload


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

    # The records are used only where they beat the default schedule: make the default look slow, then fast.
    for entry in ledger.values():
        entry["default_ms"] = 1e6
    dbs.save_ledger(directory, ledger)
    default, tuned_kernel = conv_kernel([]), conv_kernel([directory])
    assert tuned_kernel != default
    for entry in ledger.values():
        entry["default_ms"] = 1e-9
    dbs.save_ledger(directory, ledger)
    assert conv_kernel([directory]) == default
    for entry in ledger.values():
        entry["default_ms"] = 1e6
    dbs.save_ledger(directory, ledger)

    x = np.random.default_rng(1).standard_normal((1, 8, 16, 16)).astype(np.float32)
    (expected,) = ort_outputs(onnx.load(model), {"x": x})
    code, _, err = cli("compile", model, "--tuning-db", work_dir, "-o", tmp_path / "art")
    assert code == 0, err
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["tuning"]["databases"] == [str(directory)]
    ex = tvm.compile(mod, target, relax_pipeline=lowering_pipeline(target, [directory]))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_damaged_database_lines_are_reported_and_skipped(tmp_path):
    from tvm.s_tir import meta_schedule as ms

    # A real database with two workloads and a record each, then a torn workload line in the middle and a
    # half-written record at the end (what a kill during an append leaves).
    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    funcs = []
    for n in (8, 16):
        from tvm import te

        a = te.placeholder((n,), name="a")
        funcs.append(te.create_prim_func([a, te.compute((n,), lambda i: a[i] * 2, name="b")]))
    for func in funcs:
        workload = database.commit_workload(tune.workload_module(func))
        sch = tvm_schedule(tune.workload_module(func))
        database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [1e-6],
                                                               targets.tvm_target(targets.resolve("host")),
                                                               ms.arg_info.ArgInfo.from_prim_func(func)))
    workloads = (tmp_path / dbs.WORKLOADS).read_text().splitlines()
    (tmp_path / dbs.WORKLOADS).write_text(workloads[0][:40] + "\n" + workloads[1] + "\n")  # first one torn
    records = (tmp_path / dbs.RECORDS).read_text()
    (tmp_path / dbs.RECORDS).write_text(records + records.splitlines()[0][:30])

    reopened, problems = dbs.open_database(tmp_path)
    assert problems == [f"{tmp_path / dbs.WORKLOADS}: skipped unreadable line 1",
                        f"{tmp_path / dbs.RECORDS}: skipped unreadable line 3",
                        f"{tmp_path / dbs.RECORDS}: skipped 1 records of unreadable workloads"]
    assert len(reopened) == 1  # the second workload's record survives, renumbered to the first line
    assert reopened.query_tuning_record(tune.workload_module(funcs[1]), targets.tvm_target(targets.resolve("host")), "main") is not None
    assert dbs.open_database(tmp_path)[1] == []  # repaired for good


def tvm_schedule(mod):
    from tvm.s_tir import Schedule

    sch = Schedule(mod)
    sch.parallel(sch.get_loops(sch.get_sblock("b"))[0])
    return sch


def test_tuning_a_cross_target_needs_a_device(tmp_path, cli):
    onnx.save(conv_model(), tmp_path / "conv.onnx")
    code, _, err = cli("tune", tmp_path / "conv.onnx", "--target", "rpi4", "--work-dir", tmp_path / "w")
    assert code == 2 and "tune it on the device with --rpc" in err
    code, _, err = cli("compile", tmp_path / "conv.onnx", "--tuning-db", tmp_path / "nothing", "-o", tmp_path / "o")
    assert code == 2 and "no tuning database for host-" in err and not (tmp_path / "o").exists()
