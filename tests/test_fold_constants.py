"""schedules.fold_constants: numpy folding gives exactly what TVM's FoldConstant gives, without LLVM builds."""

import tvm_ffi
import zoo
from tvm import relax

import edgeq
from schedules.fold_constants import fold_constants


def _prepared(name):
    mod = edgeq.load_onnx(zoo.ZOO[name]()).mod
    for p in (relax.transform.CanonicalizeBindings(), relax.transform.FoldBatchnormToConv2D(),
              relax.transform.DecomposeOpsForInference()):
        mod = p(mod)
    return mod


def test_numpy_folding_equals_tvm_folding_bit_for_bit():
    dce = relax.transform.DeadCodeElimination()
    for name in ("mixed", "batchnorm", "clip", "reshape"):  # BN chains, Clip's isnan/where on 0-d bounds, shapes
        mod = _prepared(name)
        ours = dce(relax.transform.FoldConstant()(fold_constants(mod)))["main"]
        theirs = dce(relax.transform.FoldConstant()(mod))["main"]
        assert tvm_ffi.structural_equal(ours, theirs, map_free_vars=True), name  # constants compared by value


def test_folds_everything_it_knows_and_leaves_the_input_module_alone():
    mod = _prepared("batchnorm")
    before = mod["main"].script()
    folded = fold_constants(mod)
    assert mod["main"].script() == before
    script = folded["main"].script()
    for op in ("R.sqrt", "R.divide", "R.reshape", "R.multiply"):
        assert op not in script, op


def test_weight_repacks_are_evaluated_in_one_build_like_fold_constant():
    """The default schedule's compile-time weight repacks (call_tir on constants), all in one LLVM build."""
    import targets
    from relay_passes import pipeline
    from schedules.fold_constants import _constant_tir_calls, fold_constant_tir_calls
    from schedules.default_cpu import default_cpu_schedule
    from schedules.lowering import pre_schedule

    target = targets.tvm_target(targets.resolve("host"))
    mod = pre_schedule(pipeline.optimize(edgeq.load_onnx(zoo._conv(32, 64, shape=[1, 32, 14, 14])()).mod), target)
    passes = default_cpu_schedule(target).passes
    schedule_only, split, dce = passes[0], passes[1], passes[-1]  # schedule, split out the repacks, ..., DCE
    with target:
        split_mod = split(schedule_only(mod))
    assert len(_constant_tir_calls(split_mod["main"])) >= 1  # the conv weight's repack
    ours = dce(relax.transform.FoldConstant()(fold_constant_tir_calls(split_mod)))["main"]
    theirs = dce(relax.transform.FoldConstant()(split_mod))["main"]
    assert tvm_ffi.structural_equal(ours, theirs, map_free_vars=True)
