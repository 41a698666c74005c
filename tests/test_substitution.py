"""Relaxed graph substitution: each rule keeps the numbers, the search finds cheaper graphs, nothing is lost."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import tvm
from conftest import ort_outputs
from onnx import helper
from tvm import relax

import zoo
from edgeq import EdgeqError
from edgeq.frontend import load_onnx
from relay_passes.substitution import random_inputs, run_functions, substitute, verify_same
from relay_passes.substitution import rules as R
from relay_passes.substitution import split as S
from relay_passes.substitution.cost import CostModel
from relay_passes.substitution.graph import Graph
from relay_passes.substitution.search import search

X = [1, 4, 6, 6]


def _onnx(build, inputs: dict, seed: int = 0) -> onnx.ModelProto:
    """A model from build(g) -> output name(s), with ``inputs`` as name -> shape."""
    g = zoo._Graph(seed)
    outs = build(g)
    outs = [outs] if isinstance(outs, str) else outs
    return zoo._model(g.nodes, inputs, {o: None for o in outs}, g.inits)


def _graph(mod) -> Graph:
    return R.lift(Graph.from_relax(relax.transform.FoldConstant()(mod)["main"]))


def _apply(mod, rule_name: str):
    """The module after one application of the named rule (the first match)."""
    g = _graph(mod)
    rule = R.BY_NAME[rule_name]
    match = next(rule.matches(g), None)
    assert match is not None, f"{rule_name} does not match"
    new = rule.apply(g, match)
    assert new.hash() != g.hash()
    out = mod.clone()
    out["main"] = new.to_relax()
    return out, new


# --- one model per rule, each checked against TVM's run of the original and against onnxruntime -------------
def _conv_bn(g):
    return g.bn(g.conv("x", 4, 6, bias=False), 6)


def _conv_affine(op, shape, bias=False):
    return lambda g: g.op(op, g.conv("x", 4, 6, bias=bias), g.rand(*shape))


def _conv_act(op):
    return lambda g: g.op(op, g.conv("x", 4, 6, bias=False))


def _gemm(g):
    return g.op("Gemm", "v", g.rand(10, 5), g.rand(5))


def _matmul_act(g):
    return g.op("Relu", g.op("MatMul", "v", g.rand(10, 5)))


def _two_matmuls(g):
    return [g.op("Gemm", "v", g.rand(10, 5), g.rand(5)), g.op("MatMul", "v", g.rand(10, 3))]


def _conv_siblings(k1, p1, k2, p2):
    return lambda g: [g.conv("x", 4, 3, k=k1, pad=p1), g.conv("x", 4, 5, k=k2, pad=p2)]


def _conv_sum(g):
    return g.op("Add", g.conv("x", 4, 6, bias=False), g.conv("y", 3, 6, bias=False))


def _residual(left):
    def build(g):
        c = g.conv("x", 4, 4, bias=False)
        return g.op("Add", *((c, "x") if left else ("x", c)))
    return build


def _concat(g, *parts):
    return g.op("Concat", *parts, axis=1)


RULE_CASES = [
    ("conv_bn", _conv_bn, {"x": X}),
    ("conv_scale", _conv_affine("Mul", (1, 6, 1, 1)), {"x": X}),
    ("conv_scale", _conv_affine("Div", (6, 1, 1)), {"x": X}),
    ("conv_bias", _conv_affine("Add", (6, 1, 1), bias=True), {"x": X}),
    ("conv_bias", _conv_affine("Sub", (1, 6, 1, 1)), {"x": X}),
    ("conv_act", _conv_act("Relu"), {"x": X}),
    ("conv_act", _conv_act("Sigmoid"), {"x": X}),
    ("matmul_bias", _gemm, {"v": [2, 10]}),
    ("matmul_act", _matmul_act, {"v": [2, 10]}),
    ("merge_matmuls", _two_matmuls, {"v": [2, 10]}),
    ("merge_convs", _conv_siblings(1, 0, 3, 1), {"x": X}),
    ("merge_convs", _conv_siblings(3, 1, 3, 1), {"x": X}),
    ("enlarge_conv", _conv_siblings(1, 0, 3, 1), {"x": X}),
    ("conv_sum", _conv_sum, {"x": X, "y": [1, 3, 6, 6]}),
    ("residual_left", _residual(True), {"x": X}),
    ("residual_right", _residual(False), {"x": X}),
    ("act_into_concat", lambda g: g.op("Relu", _concat(g, "x", "y")), {"x": X, "y": [1, 2, 6, 6]}),
    ("act_out_of_concat", lambda g: _concat(g, g.op("Relu", "x"), g.op("Relu", "y")), {"x": X, "y": [1, 2, 6, 6]}),
    ("add_into_concat", lambda g: g.op("Add", _concat(g, "x", "y"), _concat(g, "y", "x")), {"x": X, "y": X}),
    ("add_out_of_concat", lambda g: _concat(g, g.op("Add", "x", "y"), g.op("Add", "y", "y")), {"x": X, "y": X}),
    ("split_concat", lambda g: g.op("Relu", _concat(g, *_split(g, "x", [1, 3]))), {"x": X}),
    ("concat_split", lambda g: [g.op("Relu", o) for o in _split(g, _concat(g, "x", "y"), [4, 2])],
     {"x": X, "y": [1, 2, 6, 6]}),
    ("transpose_pair", lambda g: g.op("Transpose", g.op("Transpose", "x", perm=[0, 2, 3, 1]), perm=[0, 3, 1, 2]),
     {"x": X}),
    ("transpose_pair", lambda g: g.op("Transpose", g.op("Transpose", "x", perm=[0, 2, 3, 1]), perm=[0, 2, 1, 3]),
     {"x": X}),
    ("reshape_pair", lambda g: g.op("Reshape", g.op("Reshape", "x", g.const(np.array([1, -1]))),
                                    g.const(np.array([4, 36]))), {"x": X}),
]


def _split(g, x, sizes):
    outs = [f"{x}_s{i}" for i in range(len(sizes))]
    g.nodes.append(helper.make_node("Split", [x, g.const(np.array(sizes, np.int64))], outs, axis=1))
    return outs


@pytest.mark.parametrize("rule, build, inputs", RULE_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(RULE_CASES)])
def test_rule_is_equivalent(rule, build, inputs):
    model = _onnx(build, inputs)
    imported = load_onnx(model)
    new, _ = _apply(imported.mod, rule)
    verify_same(imported.mod, new, [rule])  # TVM: rewritten vs original
    feeds = zoo.random_inputs(model, seed=1)
    (got,) = run_functions(new, ["main"], [feeds[s.name] for s in imported.inputs])
    for a, b in zip(got, ort_outputs(model, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_every_rule_has_a_case():
    assert {r.name for r in R.RULES} == {c[0] for c in RULE_CASES}


def test_merge_convs_enlarges_the_smaller_kernel():
    model = _onnx(_conv_siblings(1, 0, 3, 1), {"x": X})
    _, g = _apply(load_onnx(model).mod, "merge_convs")
    (conv,) = [g.nodes[i] for i in g.op_ids() if g.nodes[i].op == R.CONV]
    assert g.nodes[conv.inputs[1]].shape == (8, 4, 3, 3) and conv.attrs["padding"] == (1, 1, 1, 1)


# --- search -----------------------------------------------------------------------------------------------------
def _inception(g):
    """Parallel 1x1 / 3x3 conv-relu branches of one input, concatenated."""
    a = g.op("Relu", g.conv("x", 8, 4, k=1, pad=0))
    b = g.op("Relu", g.conv("x", 8, 4, k=3, pad=1))
    return _concat(g, a, b)


INCEPTION = {"x": [1, 8, 6, 6]}


def test_search_merges_inception_branches():
    model = _onnx(_inception, INCEPTION)
    imported = load_onnx(model)
    new, report = substitute(imported.mod, "cuda-sm80", cost="analytic", budget=60)
    assert report.verified and report.cost_after < report.cost_before
    assert "merge_convs" in report.applied and report.ops_after == 1
    calls = [b.value.op.name for b in new["main"].body.blocks[0].bindings if isinstance(b.value, relax.Call)]
    assert calls.count("relax.nn.conv2d") == 1
    feeds = zoo.random_inputs(model, seed=2)
    (got,) = run_functions(new, ["main"], [feeds["x"]])
    np.testing.assert_allclose(got[0], ort_outputs(model, feeds)[0], rtol=1e-4, atol=1e-4)
    assert "analytic" in report.cost_model and "merge_convs" in report.format()
    assert "smaller kernel zero-padded" in report.format(verbose=True)


def test_alpha_above_one_explores_at_least_as_well():
    import targets

    g = _graph(load_onnx(_onnx(_inception, INCEPTION)).mod)
    found = {}
    for target in ("cuda-sm80", "host"):
        model = CostModel(targets.tvm_target(targets.resolve(target)), measured=False)
        greedy = search(g, R.RULES, model, alpha=1.0, budget=60)
        relaxed = search(g, R.RULES, model, alpha=1.05, budget=60)
        assert relaxed.cost <= greedy.cost < model(g)
        found[target] = greedy, relaxed
    # on the GPU figures only alpha > 1 walks through the costlier merged-conv + split graph to the single conv
    greedy, relaxed = found["cuda-sm80"]
    assert relaxed.cost < greedy.cost and "merge_convs" in relaxed.applied and "merge_convs" not in greedy.applied
    assert len(relaxed.graph.op_ids()) == 1


def test_unknown_ops_survive():
    """A call_tir kernel and ops no rule knows pass through; the rules still fire around them."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "float32"))
    w = relax.const(np.random.default_rng(0).standard_normal((4, 4, 3, 3)).astype("float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, w, padding=[1, 1, 1, 1]))
            r = bb.emit(relax.op.nn.relu(c))
            e = bb.emit_te(tvm.topi.exp, r)
            s = bb.emit(relax.op.nn.softmax(e, axis=1))
            out = bb.emit_output(relax.op.add(s, r))
        bb.emit_func_output(out)
    mod = bb.get()
    new, report = substitute(mod, cost="analytic", budget=20)
    assert "conv_act" in report.applied and report.verified
    text = new.script()
    assert "call_tir" in text and "R.nn.softmax" in text
    assert any(isinstance(f, tvm.tirx.PrimFunc) for f in new.functions.values())


def _chain(blocks):
    def build(g):
        h = "x"
        for _ in range(blocks):
            h = g.op("Relu", g.conv(h, 4, 4))
        return h
    return build


def test_split_parts_recombine_to_the_original():
    mod = load_onnx(_onnx(_chain(6), {"x": X})).mod
    g = _graph(mod)
    assert len(g.op_ids()) == 18
    parts = S.partition(g, R.RULES, threshold=6)
    assert len(parts) >= 3
    ops = [set(p) & set(g.op_ids()) for p in parts]
    assert set().union(*ops) == set(g.op_ids()) and sum(map(len, ops)) == len(g.op_ids())
    assert all(len(p) <= 6 for p in ops)
    # a cut never separates conv -> bias add -> relu, which rules fuse (the add -> relu one only after a rewrite)
    for p in ops[:-1]:
        last = max(p, key=g.op_ids().index)
        assert g.nodes[last].op == "relax.nn.relu"
    def unchanged(part):
        yield [part]
        return part, []

    same, applied, n = S.split_search(g, R.RULES, unchanged, threshold=6)
    assert n == len(parts) and not applied and same.hash() == g.hash()
    new_mod, report = substitute(mod, cost="analytic", budget=20, split_threshold=6)
    assert report.parts == len(parts) and report.verified and report.ops_after == 6


def _two_blocks(g):
    """Two inception blocks in a row: a graph that splits into parts with merges to find in each."""
    return _inception_on(g, g.op("Relu", g.conv(_inception_on(g, "x"), 8, 8, k=1, pad=0)))


def _inception_on(g, x):
    a = g.op("Relu", g.conv(x, 8, 4, k=1, pad=0))
    b = g.op("Relu", g.conv(x, 8, 4, k=3, pad=1))
    return _concat(g, a, b)


def test_parts_are_searched_in_lockstep_with_one_pricing_call_per_round():
    """The parts' searches advance together: what they all need priced goes to one prefetch (one compile),
    and each part's result is what searching it alone gives."""
    import targets

    from relay_passes.substitution.search import steps

    g = _graph(load_onnx(_onnx(_two_blocks, INCEPTION)).mod)
    model = CostModel(targets.tvm_target(targets.resolve("cuda-sm80")), measured=False)
    parts = S.partition(g, R.RULES, threshold=8)
    assert len(parts) >= 2
    alone = [search(g.subgraph(ids)[0], R.RULES, model, alpha=1.05, budget=30) for ids in parts]
    rounds = []

    def run(part):
        found = yield from steps(part, R.RULES, model, 1.05, 30)
        return found.graph, found.applied

    together, applied, n = S.split_search(g, R.RULES, run, 8, prefetch=lambda graphs: rounds.append(len(graphs)))
    assert n == len(parts) and len(rounds) <= 1 + max(r.expansions for r in alone)  # (rounds with nothing new: no call)
    assert rounds[0] == len(parts)  # the first round prices every part's starting graph
    assert applied == [name for r in alone for name in r.applied] and "merge_convs" in applied
    mod = load_onnx(_onnx(_two_blocks, INCEPTION)).mod
    rewritten = mod.clone()
    rewritten["main"] = together.to_relax()
    verify_same(mod, rewritten)
    assert len(together.op_ids()) < len(g.op_ids())


def test_retime_runs_the_compiled_kernels_again_without_compiling(tmp_path, monkeypatch):
    """Side-by-side re-timing reuses the code the search compiled: only the kernels that differ run again."""
    import targets

    mod = load_onnx(_onnx(_inception, INCEPTION)).mod
    a = _graph(mod)
    b = R.BY_NAME["merge_convs"].apply(a, next(R.BY_NAME["merge_convs"].matches(a)))
    model = CostModel(targets.tvm_target(targets.resolve("host")), measured=True, cache=tmp_path / "c.json")
    model.prefetch([a, b])
    timed = []
    for key, timer in list(model._timers.items()):
        model._timers[key] = lambda key=key, timer=timer: timed.append(key) or timer()
    compiles = []
    real_compile = tvm.compile
    monkeypatch.setattr(tvm, "compile", lambda *args, **kw: compiles.append(1) or real_compile(*args, **kw))
    cost_a, cost_b = model.retime(a, b)
    keys = {g: {model._measured_key(g, group) for group in model.groups(g)} for g in (a, b)}
    assert not compiles and set(timed) == keys[a] ^ keys[b] and len(timed) >= 3  # 2 branch convs vs merged + split
    assert cost_a == pytest.approx(model(a)) and cost_b == pytest.approx(model(b))


def _pool_block(g):
    """Concat, split, max-pool, add and a global mean between convs: ops that follow the convs' layout."""
    a = g.op("Relu", g.conv("x", 4, 6, bias=True))
    b = g.op("MaxPool", g.conv("x", 4, 6, k=1, pad=0), kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    g.nodes.append(helper.make_node("Split", [_concat(g, a, b), g.const(np.array([6, 6], np.int64))],
                                    ["s0", "s1"], axis=1))
    return g.op("ReduceMean", g.op("Add", "s0", "s1"), axes=[2, 3], keepdims=1)


def test_kernels_are_timed_channels_last_as_the_cpu_build_runs_them():
    """A kernel measured alone must be the kernel the model runs: NHWC data, HWIO weights, and no transposes at
    its boundary (which timed a 1x1 conv at twice its in-model time and made merged convs look cheaper)."""
    from relay_passes.substitution import cost as C
    from relay_passes.substitution.channels_last import channels_last

    g = _graph(load_onnx(_onnx(_pool_block, {"x": X})).mod)
    g, _ = R.simplify(g)
    for group in C.fusion_groups(g):
        function, types = C._kernel_function(g, group)
        text = function.script()
        assert "permute_dims" not in text and 'data_layout="NCHW"' not in text and 'layout="NCHW"' not in text
        for shape, _ in types:  # 4-D inputs come channels last (X is 1x4x6x6, the convs give 1x6x6x6)
            assert len(shape) != 4 or shape[1] == shape[2] == 6
        ex = tvm.compile(tvm.IRModule({"main": function}), tvm.target.Target("llvm"))
        vm = relax.VirtualMachine(ex, tvm.cpu())
        out = vm["main"](*[tvm.runtime.tensor(np.ones(s, d)) for s, d in types])
        nchw = g.nodes[group[-1]]
        if hasattr(nchw.ty, "shape") and len(nchw.shape) == 4:
            assert tuple(out.numpy().shape) == tuple(nchw.shape[a] for a in (0, 2, 3, 1))
    ops = {g.nodes[n].op for group in C.fusion_groups(g) for n in group}
    assert {"edgeq.conv2d", "relax.nn.max_pool2d", "relax.concat", "relax.split", "relax.mean"} <= ops
    # an op with no channels-last form (a 4-D reshape) leaves its kernel as it is
    kernel = _graph(load_onnx(_onnx(lambda g: g.op("Reshape", "x", g.const(np.array([1, 4, 36, 1], np.int64))),
                                    {"x": X})).mod)
    assert channels_last(kernel) is kernel
    # nor does an operand of another rank: [6] added to NCHW data broadcasts along W, not along the channels
    kernel = _graph(load_onnx(_onnx(lambda g: g.op("Add", g.conv("x", 4, 6), g.rand(6)), {"x": X})).mod)
    assert channels_last(kernel) is kernel


def test_verify_catches_a_wrong_rule():
    wrong = R.Rule("drop_relu", "relu(x) -> x (wrong)", (R.P("r", "relax.nn.relu", ("x",)), R.P("x")), ("r",),
                   lambda g, m: {m["r"]: m["x"]})
    mod = load_onnx(_onnx(_conv_act("Relu"), {"x": X})).mod
    with pytest.raises(EdgeqError, match="changed output 0.*drop_relu"):
        substitute(mod, cost="analytic", rules=[wrong], budget=5)
    new, report = substitute(mod, cost="analytic", rules=[wrong], budget=5, verify=False)
    assert report.applied == ["drop_relu"] and not report.verified


def test_measured_cost_cache_is_written_once_and_reused(tmp_path):
    cache = tmp_path / "costs.json"
    mod = load_onnx(_onnx(_conv_act("Relu"), {"x": [1, 4, 4, 4]})).mod
    first_mod, first = substitute(mod, cost="measured", cache=cache, budget=5)
    # conv -> relu priced as the one kernel TVM fuses it into; the fused conv op lowers to that same kernel, so it
    # is not measured again
    assert "measured" in first.cost_model and first.measurements == 1 and first.applied == ["conv_act"]
    table = json.loads(cache.read_text())
    assert len(table) == first.measurements
    stamp = cache.stat().st_mtime_ns
    _, second = substitute(mod, cost="measured", cache=cache, budget=5)
    assert second.measurements == 0 and cache.stat().st_mtime_ns == stamp
    assert second.cost_before == pytest.approx(first.cost_before) and second.applied == first.applied


def test_a_graphs_new_kernels_are_measured_in_one_compile(tmp_path, monkeypatch):
    """prefetch measures every kernel a graph's cost needs in one compile; pricing it then measures nothing."""
    import tvm

    g = _graph(load_onnx(_onnx(lambda g: [g.op("Relu", g.conv("x", 4, 6, bias=False)),
                                          g.op("Sigmoid", g.conv("x", 4, 8, k=1, pad=0, bias=False))], {"x": X})).mod)
    import targets

    model = CostModel(targets.tvm_target(targets.resolve("host")), measured=True, cache=tmp_path / "c.json")
    compiles = []
    real_compile = tvm.compile
    monkeypatch.setattr(tvm, "compile", lambda *a, **k: compiles.append(1) or real_compile(*a, **k))
    model.prefetch([g])
    assert len(compiles) == 1 and model.measurements == len(model.groups(g)) == 2
    assert all(ms > 0 for ms in model.table.values())
    model(g)
    assert len(compiles) == 1 and model.measurements == 2


def test_a_search_result_is_judged_on_kernels_timed_side_by_side(tmp_path, monkeypatch):
    """The machine slowed down (or sped up) between the search's batches: the merged kernel was timed fast, and
    timed again next to the branch kernels it replaces it is slow.  The input graph must be kept."""
    from relay_passes.substitution import cost as cost_module

    retiming = []
    original_retime = CostModel.retime
    monkeypatch.setattr(CostModel, "retime", lambda self, a, b: retiming.append(1) or original_retime(self, a, b))

    def fake_compile_kernels(kernels, target):
        def timer(g, group):
            merged = any(g.nodes[n].op == R.CONV and g.nodes[n].shape[1] == 8 for n in group)  # 4 + 4 channels
            return lambda: (10.0 if retiming else 0.1) if merged else 1.0
        return [timer(g, group) for g, group in kernels]

    monkeypatch.setattr(cost_module, "compile_kernels", fake_compile_kernels)
    mod = load_onnx(_onnx(_inception, INCEPTION)).mod
    new, report = substitute(mod, cost="measured", cache=tmp_path / "costs.json", budget=60)
    assert retiming  # only a search rule's result is re-timed: the search did merge the branches
    assert "merge_convs" not in report.applied and report.cost_after <= report.cost_before
    calls = [b.value.op.name for b in new["main"].body.blocks[0].bindings if isinstance(b.value, relax.Call)]
    assert calls.count("relax.nn.conv2d") == 2


def test_parts_that_recombine_worse_than_the_folds_give_the_folds(monkeypatch):
    """Parts searched alone can recombine into a graph the whole-graph cost prices above the folds alone."""
    import relay_passes.substitution as pkg

    mod = load_onnx(_onnx(_conv_act("Relu"), {"x": X})).mod
    monkeypatch.setattr(pkg, "split_search", lambda graph, *_: (graph, ["merge_convs"], 2))
    new, report = substitute(mod, cost="analytic", budget=5)
    assert report.applied == ["conv_act"] and report.cost_after < report.cost_before and report.verified


def test_cross_target_falls_back_to_analytic():
    mod = load_onnx(_onnx(_conv_act("Relu"), {"x": X})).mod
    _, report = substitute(mod, "rpi4", cost="measured", budget=5)
    assert "analytic" in report.cost_model and "cannot run" in report.note


def test_nothing_to_gain_returns_the_module_itself():
    mod = load_onnx(_onnx(lambda g: g.op("Relu", "x"), {"x": X})).mod
    new, report = substitute(mod, cost="analytic")
    assert new is mod and report.applied == [] and "nothing" in report.format()


def test_random_inputs_follow_the_signature():
    mod = load_onnx(_onnx(_conv_sum, {"x": X, "y": [1, 3, 6, 6]})).mod
    assert [a.shape for a in random_inputs(mod["main"])] == [(1, 4, 6, 6), (1, 3, 6, 6)]


def test_dynamic_shapes_are_left_alone():
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.relu(relax.op.nn.relu(x)))
        bb.emit_func_output(out)
    mod = bb.get()
    new, report = substitute(mod, cost="analytic")
    assert new is mod and "static shape" in report.note


def test_mixed_model_builds_with_the_edgeq_lowering():
    """BN folds, epilogue fusion and the residual fold on zoo's mixed model; compiled as `edgeq build` does."""
    import targets
    from relay_passes import pipeline
    from schedules.lowering import lowering_pipeline

    model = zoo.ZOO["mixed"]()
    imported = load_onnx(model)
    new, report = substitute(pipeline.optimize(imported.mod), cost="analytic", budget=50)
    assert {"conv_act", "residual_left", "matmul_bias"} <= set(report.applied) and report.verified
    target = targets.tvm_target(targets.resolve("host"))
    with target:
        ex = tvm.compile(pipeline.optimize(new), target, relax_pipeline=lowering_pipeline(target))
    feeds = zoo.random_inputs(model, seed=3)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(feeds["x"])).numpy()
    np.testing.assert_allclose(got, ort_outputs(model, feeds)[0], rtol=1e-4, atol=1e-5)


def test_bindings_outside_dataflow_are_left_alone():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4), "float32"))
    with bb.function("main", [x]):
        y = bb.emit(relax.op.nn.relu(relax.op.nn.relu(x)))
        bb.emit_func_output(y)
    mod = bb.get()
    new, report = substitute(mod, cost="analytic")
    assert new is mod and "outside dataflow" in report.note


def test_measured_cost_prices_the_kernels_tvm_fuses():
    """conv -> relu is one kernel (one group); a value read twice ends its group; folds run before the search."""
    from relay_passes.substitution.cost import fusion_groups

    g = _graph(load_onnx(_onnx(_conv_act("Relu"), {"x": X})).mod)
    assert [[g.nodes[i].op for i in grp] for grp in fusion_groups(g)] == [[R.CONV, "relax.nn.relu"]]
    g = _graph(load_onnx(_onnx(lambda g: [g.op("Relu", g.conv("x", 4, 6, bias=False)),
                                          g.op("Sigmoid", g.conv("x", 4, 6, bias=False))], {"x": X})).mod)
    assert sorted(len(grp) for grp in fusion_groups(g)) == [2, 2]
    c = g.op_ids()[0]
    shared = g.copy()
    shared.output = shared.op("tuple", [shared.op("relax.nn.relu", [c]), shared.op("relax.sigmoid", [c])])
    shared.prune()
    assert sorted(len(grp) for grp in fusion_groups(shared)) == [1, 1, 1]
    folded, applied = R.simplify(_graph(load_onnx(_onnx(_conv_bn, {"x": X})).mod))
    assert applied and set(applied) <= set(R.SIMPLIFY) and [folded.nodes[i].op for i in folded.op_ids()] == [R.CONV]
