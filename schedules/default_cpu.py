"""Default (untuned) CPU schedules for the fused PrimFuncs of a Relax module.

Without a schedule, TVM emits each PrimFunc as a naive single-threaded scalar
loop nest (float reductions are not even auto-vectorized by LLVM because it may
not reassociate them).  This module gives every fused PrimFunc a cheap, generic
schedule in the spirit of the old ``topi.x86`` templates:

* injective producers (broadcasts, elementwise chains, padding of small
  reductions) are inlined into their single consumer;
* a reduction block (conv, matmul, pooling, mean, ...) is register-tiled: the
  loop of the output's innermost dimension is split into one or two SIMD
  vectors, the next spatial loop into a small unrolled tile (up to 8 rows),
  the reduction loops are moved outside these two tiles, the accumulator
  lives in a ``local`` cache and the elementwise epilogue (bias, batch-norm,
  relu, residual add) is fused into the write-back of that cache;
* the outer spatial loops are fused and parallelised over the runtime thread
  pool, the innermost one is vectorised.

Vectorising along the innermost output dimension works best when that
dimension is the channel dimension, so :func:`default_cpu_layout_passes`
converts convolutions to NHWC/HWIO before legalisation.  Constant operands
(weights) of a tiled reduction are repacked at compile time so that the slice
read by one register tile is contiguous.

Integer dot-product reductions (int8 conv / dense) on a CPU with integer
dot-product instructions (VNNI, vpmaddwd, sdot, NEON smull) are tiled and
tensorized by :mod:`schedules.dot_product`, falling back to the generic tiling.

Every primitive is guarded: if the tiled schedule of a block fails, the block
falls back to "parallelise the outer spatial loops", and a PrimFunc whose
schedule fails entirely is left untouched.
"""

import tvm
from tvm import relax, tirx
from tvm.s_tir import Schedule
from tvm.sym.pattern import detect_linear_equation
from tvm.tirx.analysis import undefined_vars

from targets.errors import raise_if_interrupted
from targets.features import vector_bytes

from .fold_constants import fold_constant_tir_calls, fold_constants

from .depthwise_dot import is_depthwise_dot, schedule_depthwise_dot
from .dot_product import (STACK_TILE_BYTES, dot_intrins, inline_epilogues, is_integer_dot, row_tile,
                          schedule_dot_product)

# ScheduleError and the other FFI errors (InternalError, ...) are RuntimeErrors.
# TypeError: int() of a symbolic (dynamic-shape) extent.
_ERRORS = (RuntimeError, ValueError, IndexError, TypeError)
_MAX_UNROLL_TILE = 8  # rows of the register tile (x 1-2 vectors each = accumulators)
_MIN_PARALLEL_WORK = 16384  # below this many loop iterations threads cost more than they give
_MAX_INLINED_PAD_REDUCTION = 32  # see _inline_injective
SCHEDULED = "tirx.is_scheduled"  # TVM's mark of a scheduled PrimFunc (also set by applying a tuning database)


def default_cpu_layout_passes(target: tvm.target.Target) -> list:  # pylint: disable=unused-argument
    """Relax passes to run before legalisation so the default schedule vectorises well.

    Convolutions become NHWC data / HWIO kernels (output channels innermost and
    contiguous in both the kernel and the output), pools follow.  The weight
    transposes are constant-folded in numpy (schedules.fold_constants), not
    by one LLVM build each.  ``CanonicalizeBindings`` first removes the ``(y, mean, var)[0]``
    tuples left by the ONNX BatchNormalization importer, which otherwise stop
    FuseOps from fusing the activation into the convolution.
    """
    return [
        relax.transform.CanonicalizeBindings(),
        relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}),
        fold_constants,
    ]


def default_cpu_schedule(target: tvm.target.Target) -> tvm.transform.Pass:
    """Module pass: schedule every not-yet-scheduled PrimFunc for a multi-core SIMD CPU.

    Expects the weight parameters marked by relax.transform.AttachAttrLayoutFreeBuffers (lowering.pre_schedule),
    so their repacking becomes a separate call evaluated at compile time.
    """
    width = vector_bytes(target)
    intrins = dot_intrins(target)

    @tvm.transform.module_pass(opt_level=0, name="DefaultCPUScheduleFuncs")
    def _schedule(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gvar, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            try:
                sch = _schedule_func(func, width, intrins)
            except _ERRORS:
                raise_if_interrupted()
                continue
            updates[gvar] = sch.mod["main"].with_attr(SCHEDULED, True)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return tvm.transform.Sequential(
        [
            _schedule,
            relax.transform.SplitLayoutRewritePreproc(),  # repacking -> separate call_tir
            fold_constant_tir_calls,  # ... evaluated at compile time, all in one LLVM build
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination(),
        ],
        name="DefaultCPUSchedule",
    )


def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and bool(func.attrs.get(SCHEDULED, False))


def default_schedule_func(func: tirx.PrimFunc, target: tvm.target.Target) -> tirx.PrimFunc:
    """One PrimFunc with the default schedule (what tuning must beat)."""
    return _schedule_func(func, vector_bytes(target), dot_intrins(target)).mod["main"]


def _schedule_func(func: tirx.PrimFunc, vector_bytes: int, intrins=()) -> Schedule:
    sch = Schedule(tvm.IRModule({"main": func}))
    _inline_injective(sch)
    # Reductions first: tiling one may absorb its epilogue block.
    for reduction, schedule_block in ((True, _tile_reduction), (False, _vectorize_spatial)):
        for name in _root_block_names(sch):
            if name not in _root_block_names(sch):
                continue  # absorbed while scheduling an earlier block
            block = sch.get_sblock(name)
            if _is_reduction(sch, block) == reduction and all(
                sch.get(lp).kind == tirx.ForKind.SERIAL for lp in sch.get_loops(block)
            ):
                attempts = [lambda s, b, f=schedule_block: f(s, b, vector_bytes)]
                if reduction and intrins and is_integer_dot(sch, block):
                    attempts.insert(0, lambda s, b: schedule_dot_product(s, b, intrins))
                if reduction and intrins and is_depthwise_dot(sch, block):
                    attempts.insert(0, lambda s, b: schedule_depthwise_dot(s, b, intrins))
                sch = _guarded(sch, name, *attempts)
    return sch


def _guarded(sch: Schedule, name: str, *schedule_blocks) -> Schedule:
    """Apply the first of ``schedule_blocks`` that succeeds on a copy; if none does, only parallelise."""
    for attempt in (*schedule_blocks, _parallel_outer):
        trial = sch.copy()
        try:
            attempt(trial, trial.get_sblock(name))
            return Schedule(trial.mod)  # fresh state: Schedule.copy() fails after a tensorize
        except _ERRORS:
            raise_if_interrupted()  # Ctrl-C inside a schedule primitive arrives as a RuntimeError
    return sch


def _root_block_names(sch: Schedule) -> list:
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    return [sch.get(b).name_hint for b in blocks]


def _has_root(sch: Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except _ERRORS:
        return False


def _is_reduction(sch: Schedule, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _inline_injective(sch: Schedule) -> None:
    """Inline every spatial block with one consumer into it (padding, BN, bias, relu).

    Kept separate: blocks with several consumers (e.g. softmax's ``exp``), so
    expensive producers are not recomputed, and padding feeding a large
    reduction (dense conv): inlined, its bounds check runs once per FMA in the
    innermost loop (and scalarises it when it varies along the vector lanes),
    while a separate, vectorised padding pass is amortised over the reduction
    (measured -20% on ResNet-18).  Padding of depthwise convs/pools (small
    reductions) is still inlined.  No producer (padding, transpose, quantize) of
    an integer dot product (dense, or depthwise in VNNI form) is inlined: the
    dot-product instructions read their 8-bit operand from a buffer.
    """
    for name in _root_block_names(sch):
        block = sch.get_sblock(name)
        consumers = sch.get_consumers(block)
        if _is_reduction(sch, block) or len(consumers) != 1:
            continue
        if is_integer_dot(sch, consumers[0]) or is_depthwise_dot(sch, consumers[0]):
            continue
        if _is_padding(sch, block) and _reduction_size(sch, consumers[0]) > _MAX_INLINED_PAD_REDUCTION:
            continue
        try:
            sch.compute_inline(block)
        except _ERRORS:
            pass


def _is_padding(sch: Schedule, block) -> bool:
    body = sch.get(block).body
    op = getattr(getattr(body, "value", None), "op", None)
    return str(getattr(op, "name", "")).endswith("if_then_else")  # "prim.if_then_else"


def _reduction_size(sch: Schedule, block) -> int:
    size = 1
    for iv in sch.get(block).iter_vars:
        if iv.iter_type == tirx.IterVar.CommReduce:
            extent = iv.dom.extent
            size *= int(extent) if isinstance(extent, tirx.IntImm) else _MAX_INLINED_PAD_REDUCTION
    return size


def _loop_kinds(sch: Schedule, block, loops) -> list:
    """'S' / 'R' per loop from the block iterators it binds; 'X' if mixed or opaque."""
    stmt = sch.get(block)
    realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    kinds = []
    for loop in loops:
        var = sch.get(loop).loop_var
        used = {
            iv.iter_type
            for iv, value in zip(stmt.iter_vars, realize.iter_values)
            if any(v.same_as(var) for v in undefined_vars(value))
        }
        if used == {tirx.IterVar.CommReduce}:
            kinds.append("R")
        elif used <= {tirx.IterVar.DataPar}:
            kinds.append("S")
        else:
            kinds.append("X")
    return kinds


def _vector_loop(sch: Schedule, block, loops, vector_bytes: int, along_reads: bool = False):
    """(loop, lanes) for the loop of the written buffer's innermost dimension.

    It is vectorisable when every read of the block is contiguous or invariant
    along it; lanes is the largest power-of-two divisor of its extent up to the
    SIMD width, else its largest divisor up to 128 bytes (LLVM splits a 29-lane vector into registers; a
    scalar loop is 2.4x slower), None when fewer than 4 lanes fit.  With ``along_reads`` the
    loop is instead the one the reads' innermost dimension follows (a transpose
    such as the model input's NCHW -> NHWC: vector loads, scattered stores).
    """
    stmt = sch.get(block)
    realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    if len(stmt.writes) != 1:
        return None, None
    write = stmt.writes[0]
    candidates = [read.region[-1].min for read in stmt.reads] if along_reads else [write.region[-1].min]
    ivar = next((iv.var for iv in stmt.iter_vars for e in candidates if _stride(e, iv.var) == 1), None)
    if ivar is None:
        return None, None
    value = realize.iter_values[[iv.var.same_as(ivar) for iv in stmt.iter_vars].index(True)]
    loop = next((lp for lp in loops if sch.get(lp).loop_var.same_as(value)), None)
    if loop is None:
        return None, None
    for read in stmt.reads:
        *outer, inner = [rng.min for rng in read.region] or [tirx.IntImm("int64", 0)]
        if any(any(v.same_as(ivar) for v in undefined_vars(e)) for e in outer) or _stride(inner, ivar) not in (0, 1):
            return None, None
    lanes = vector_bytes * 8 // write.source.dtype.bits
    extent = int(sch.get(loop).extent)
    while lanes >= 4 and extent % lanes:
        lanes //= 2
    if lanes < 4:  # no power-of-two factor (ShuffleNetV2's 58 channels): a divisor up to 128 bytes wide (two
        widest = max(2 * vector_bytes, 128) * 8 // write.source.dtype.bits  # AVX-512 registers, four AVX2 ones)
        lanes = max((d for d in range(4, widest + 1) if extent % d == 0), default=0)
    return (loop, lanes) if lanes >= 4 else (None, None)


def _stride(index, var):
    """Constant coefficient of ``var`` in a linear index expression, or None."""
    coeff = detect_linear_equation(index, [var])
    return int(coeff[0]) if len(coeff) == 2 and isinstance(coeff[0], tirx.IntImm) else None


def _tile_reduction(sch: Schedule, block, vector_bytes: int) -> None:
    """Register-tile a reduction block and fuse its elementwise epilogue.

    Loop order: [parallel fused outer spatial] [reduction] [unrolled row tile] [vector].
    """
    loops = sch.get_loops(block)
    work = _extent_product(sch, loops)
    kinds = _loop_kinds(sch, block, loops)
    if "X" in kinds:
        raise ValueError("loop binds both spatial and reduction iterators")
    spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
    reduction = [lp for lp, k in zip(loops, kinds) if k == "R"]
    vloop, lanes = _vector_loop(sch, block, loops, vector_bytes)
    outer, inner = list(spatial), []
    if vloop is not None:
        dtype_bytes = sch.get(block).writes[0].source.dtype.bits // 8
        if int(sch.get(vloop).extent) % (2 * lanes) == 0:
            lanes *= 2  # two vectors per row: fewer loads per FMA
        _pack_constant_operands(sch, block, vloop, lanes)
        vo, vi = sch.split(vloop, [None, lanes])
        outer.remove(vloop)
        if _reduction_size(sch, block) > _MAX_INLINED_PAD_REDUCTION:
            outer.insert(0, vo)  # one weight slice stays in cache for all output rows
        else:
            outer.append(vo)  # depthwise conv / pool: tiny weights; all channels of a pixel while its lines are hot
        inner.append(vi)
        rows = [lp for lp in spatial if not lp.same_as(vloop) and int(sch.get(lp).extent) > 1]
        if rows:
            row = rows[-1]
            extent = int(sch.get(row).extent)
            most = min(_MAX_UNROLL_TILE, (STACK_TILE_BYTES - 1) // (lanes * dtype_bytes))
            factor = row_tile(extent, max(most, 1))
            ro, ri = sch.split(row, [None, factor])
            outer[outer.index(row)] = ro
            inner.insert(0, ri)
    sch.reorder(*outer, *reduction, *inner)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if work >= _MIN_PARALLEL_WORK and int(sch.get(fused).extent) > 1:
        sch.parallel(fused)
    if inner:
        cache = sch.cache_write(block, 0, "global")  # on the stack: see STACK_TILE_BYTES
        inline_epilogues(sch, cache)
        sch.reverse_compute_at(cache, fused, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(cache)[-1])
        # vectorize (and parallelise, above) before decompose_reduction: the
        # update block of a decomposed reduction is no longer a reduction block.
        sch.vectorize(inner[-1])
        if len(inner) == 2:
            sch.unroll(inner[0])
        if reduction:
            init_inner = sch.get_loops(sch.decompose_reduction(block, reduction[0]))[-1]
            if sch.get(init_inner).kind != tirx.ForKind.VECTORIZED:
                sch.vectorize(init_inner)


def _pack_constant_operands(sch: Schedule, block, vloop, tile: int) -> None:
    """Repack constant operands (weights) read along the vector loop as [d_last // tile, ..., tile].

    E.g. an HWIO kernel read by a 16-wide output-channel tile becomes
    [O/16, H, W, I, 16]: the slice used by one register tile is contiguous
    instead of one 64-byte line every ``I*O*4`` bytes, which thrashes the
    cache sets for wide layers.  The repacking block is annotated as a layout
    rewrite so ``SplitLayoutRewritePreproc`` + ``FoldConstant`` run it at
    compile time.
    """
    func = sch.mod["main"]
    free = [func.params[int(i)] for i in (func.attrs or {}).get("layout_free_buffers", [])]
    loop_var = sch.get(vloop).loop_var
    realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    stmt = sch.get(block)
    ivar = next(iv.var for iv, val in zip(stmt.iter_vars, realize.iter_values) if val.same_as(loop_var))
    for index, read in enumerate(stmt.reads):
        buf = read.source
        if (
            not any(buf.same_as(p) for p in free)
            or len(buf.shape) < 2
            or int(buf.shape[-1]) % tile
            or not any(v.same_as(ivar) for v in undefined_vars(read.region[-1].min))
        ):
            continue
        index_map = tirx.IndexMap.from_func(lambda *i: (i[-1] // tile, *i[:-1], i[-1] % tile), ndim=len(buf.shape))
        try:  # on a copy first: TVM cannot invert some maps (a depthwise weight read at a constant index)
            _repack(sch.copy(), block, index, index_map)
        except _ERRORS:
            continue  # read as it is: still contiguous along the vector loop
        _repack(sch, block, index, index_map)


def _repack(sch: Schedule, block, index: int, index_map) -> None:
    packer = sch.cache_read(block, index, "global")
    sch.transform_layout(block, ("read", index), index_map)
    sch.annotate(packer, "meta_schedule.layout_rewrite_preproc", True)


def _vectorize_spatial(sch: Schedule, block, vector_bytes: int) -> None:
    """Injective block: vectorise the innermost output dimension (else the reads'), parallelise the rest."""
    loops = sch.get_loops(block)
    vloop, lanes = _vector_loop(sch, block, loops, vector_bytes)
    if vloop is None:
        vloop, lanes = _vector_loop(sch, block, loops, vector_bytes, along_reads=True)
    work = _extent_product(sch, loops)
    outer = list(loops)
    if vloop is not None:
        position = [lp.same_as(vloop) for lp in loops].index(True)
        vo, vi = sch.split(vloop, [None, lanes])
        outer[position] = vo
        inner = outer[position + 1:]  # a transpose: the loops of later output dimensions (usually short)
        del outer[position + 1:]
        sch.reorder(*outer, *inner, vi)
        sch.vectorize(vi)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if work >= _MIN_PARALLEL_WORK and int(sch.get(fused).extent) > 1:
        sch.parallel(fused)


def _parallel_outer(sch: Schedule, block) -> None:
    """Fallback: fuse and parallelise the leading spatial loops of a block."""
    loops = sch.get_loops(block)
    kinds = _loop_kinds(sch, block, loops)
    lead = []
    for loop, kind in zip(loops, kinds):
        if kind != "S":
            break
        lead.append(loop)
    if not lead or _extent_product(sch, loops) < _MIN_PARALLEL_WORK:
        return
    fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    sch.parallel(fused)


def _extent_product(sch: Schedule, loops) -> int:
    total = 1
    for loop in loops:
        extent = sch.get(loop).extent
        total *= int(extent) if isinstance(extent, tirx.IntImm) else _MIN_PARALLEL_WORK
    return total
