"""Default schedule of integer dot-product reductions (int8 conv / dense) with the CPU's dot-product instructions.

A block ``C[..., o] += int32(A[..., k]) * int32(W[..., k, o])`` (u8/s8 data, constant s8 weight, int32
accumulator; ``k`` the innermost index of A, ``o`` the innermost of C and W) is tiled as

    [parallel: output-channel tiles x pixel tiles] [reduction: ..., k/d] [unrolled: r rows x v vectors] [o:L x k:d]

and the innermost ``L x d`` tile becomes one instruction: AVX-512 VNNI ``vpdpbusd`` (u8 data; L = 16, 8
or 4, d = 4), ``vpmaddwd`` (s8 data on x86, or no VNNI; d = 2), aarch64 ``sdot`` (+dotprod) or NEON
``smull`` + ``saddlp`` (s8 data; L = d = 4).  The weight is repacked at compile time to
``[O/(L*v), ..., K/d, v, L, d]``, so one step of the register tile reads ``v*L*d`` consecutive bytes.
The ``r x v`` accumulator vectors live in a ``local`` cache whose write-back carries the fused
requantize epilogue.  Blocks no intrinsic fits raise ValueError, and the caller falls back.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.ir.expr import TensorLoad  # a BufferLoad
from tvm.s_tir import Schedule
from tvm.sym.pattern import detect_linear_equation
from tvm.tirx.analysis import undefined_vars

from targets.features import has_feature

from .intrinsics import MADD, NEON_4x4, SDOT_4x4, VNNI

_MIN_PARALLEL_WORK = 16384  # as in default_cpu
# TVM places a constant-size "global" buffer of fewer bytes than this on the stack (runtime::kMaxStackAlloca),
# where LLVM keeps it in registers; a larger or a "local" one costs a TVMBackendAllocWorkspace call per
# register tile (measured: a depthwise conv 2.2x slower).  Accumulator tiles are sized to fit.
STACK_TILE_BYTES = 1024


@dataclass(frozen=True)
class DotIntrin:
    """A dot-product tensor intrinsic: ``lanes`` int32 outputs += ``depth`` bytes of A . W[lanes, depth]."""

    name: str
    data_dtype: str  # the intrinsic's A operand; W is always int8
    lanes: int
    depth: int = 4
    max_vectors: int = 2  # accumulator vectors per row of the register tile
    max_accumulators: int = 24  # rows * vectors, leaving registers for weights and the broadcast data


def dot_intrins(target: tvm.target.Target) -> list[DotIntrin]:
    """The dot-product intrinsics of an llvm target, most preferred first (empty if none)."""
    if target.kind.name != "llvm":
        return []

    def has(feature):
        return has_feature(target, feature)

    found = []
    if has("avx512vnni") and has("avx512vl"):
        found += [DotIntrin(VNNI[16], "uint8", 16), DotIntrin(VNNI[8], "uint8", 8, max_vectors=4),
                  DotIntrin(VNNI[4], "uint8", 4, max_vectors=4)]
    if has("avx512bw"):
        found += [DotIntrin(MADD[16, dtype], dtype, 16, depth=2) for dtype in ("uint8", "int8")]
    if has("avx2"):
        found += [DotIntrin(MADD[8, dtype], dtype, 8, depth=2, max_accumulators=10)
                  for dtype in ("uint8", "int8")]
    if "aarch64" in str(target.attrs.get("mtriple", "")):
        if has("dotprod"):
            found.append(DotIntrin(SDOT_4x4, "int8", 4, max_vectors=4))
        elif has("neon"):
            found.append(DotIntrin(NEON_4x4, "int8", 4, max_vectors=4, max_accumulators=16))
    return found


@dataclass
class _Match:
    data: int  # read index of A in the block
    weight: int  # read index of W
    o_var: tirx.Var  # block iterators
    k_var: tirx.Var
    weight_vars: list  # the iterators the weight's indices use (a grouped conv's group among them)


def is_integer_dot(sch: Schedule, block) -> bool:
    """Whether a block accumulates int32(8-bit) * int32(int8) into int32 (tensorizable or not)."""
    return _operands(sch.get(block)) is not None


def _operands(stmt):
    """(data load, weight load) of ``C[...] = C[...] + int32(a) * int32(w)`` with 8-bit a, w; else None."""
    store = stmt.body
    if not isinstance(store, tirx.BufferStore) or str(store.buffer.dtype) != "int32":
        return None
    value = store.value
    if not isinstance(value, tirx.Add) or not isinstance(value.b, tirx.Mul):
        return None
    loads = []
    for operand in (value.b.a, value.b.b):
        if not (isinstance(operand, tirx.Cast) and str(operand.ty) == "int32"
                and isinstance(operand.value, TensorLoad)
                and str(operand.value.source.dtype) in ("uint8", "int8")):
            return None
        loads.append(operand.value)
    return loads


def _match(sch: Schedule, block, intrin: DotIntrin) -> _Match | None:
    """The operands and iterators of a block the intrinsic can compute, or None."""
    stmt = sch.get(block)
    loads = _operands(stmt)
    if loads is None or not stmt.init:
        return None
    free = _layout_free(sch)
    weights = [ld for ld in loads if any(ld.source.same_as(p) for p in free)]
    if len(weights) != 1 or str(weights[0].source.dtype) != "int8":
        return None
    weight = weights[0]
    data = loads[1] if loads[0] is weight else loads[0]
    if str(data.source.dtype) != intrin.data_dtype or len(weight.indices) < 2:
        return None
    o_var, k_var = stmt.body.indices[-1], weight.indices[-2]
    iters = {iv.var: iv for iv in stmt.iter_vars}
    if (not weight.indices[-1].same_as(o_var) or o_var not in iters or k_var not in iters
            or iters[o_var].iter_type != tirx.IterVar.DataPar or iters[k_var].iter_type != tirx.IterVar.CommReduce):
        return None
    # A[..., c0 + k]: k only in A's innermost index, with stride 1; o nowhere in A; k, o only at W's end
    if any(_uses(e, o_var) for e in data.indices) or any(_uses(e, k_var) for e in data.indices[:-1]):
        return None
    if not _is_offset_of(data.indices[-1], k_var):
        return None
    if any(_uses(e, o_var) or _uses(e, k_var) for e in weight.indices[:-2]):
        return None
    if int(iters[o_var].dom.extent) % intrin.lanes or int(iters[k_var].dom.extent) % intrin.depth:
        return None
    reads = [r.source for r in stmt.reads]
    weight_vars = [iv.var for iv in stmt.iter_vars if any(_uses(e, iv.var) for e in weight.indices)]
    return _Match(_read_index(reads, data.source), _read_index(reads, weight.source), o_var, k_var, weight_vars)


def _read_index(reads, buffer) -> int:
    return next(i for i, b in enumerate(reads) if b.same_as(buffer))


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in undefined_vars(expr))


def _is_offset_of(expr, var) -> bool:
    coeff = detect_linear_equation(expr, [var])
    return len(coeff) == 2 and isinstance(coeff[0], tirx.IntImm) and int(coeff[0]) == 1


def _layout_free(sch: Schedule) -> list:
    func = sch.mod["main"]
    return [func.params[int(i)] for i in (func.attrs or {}).get("layout_free_buffers", [])]


def _register_tile(rows: int, vectors: int, intrin: DotIntrin, exact: bool = False) -> tuple[int, int]:
    """(r, v): v divides ``vectors``, r rows per :func:`row_tile` (``exact``: a divisor of ``rows``); the most
    accumulators r * v that fit (in registers, and as a tile buffer on the stack), then the fewest loads per
    step (r broadcasts + v weight vectors).  A 13x13 image gets 13 x 1, a 56x56 one 7 x 2, ViT's 197 tokens
    6 x 2 (the rows padded to 198)."""
    limit = min(intrin.max_accumulators, (STACK_TILE_BYTES - 1) // (intrin.lanes * 4))  # int32 accumulators

    def rows_for(most):
        return max(r for r in range(1, most + 1) if rows % r == 0) if exact else row_tile(rows, most)

    tiles = [(rows_for(min(rows, limit // v)), v)
             for v in range(1, min(vectors, intrin.max_vectors, limit) + 1) if vectors % v == 0]
    return max(tiles, key=lambda rv: (rv[0] * rv[1], -rv[0] - rv[1]))


def row_tile(extent: int, most: int) -> int:
    """Rows of the register tile: the largest divisor of the extent up to ``most``, or, when that leaves the
    tile less than half full (ViT's 197 tokens are prime: 1 row, 2 accumulators, 3.7x slower than 196), the
    width in most/2..most wasting the fewest rows; TVM guards the last, partial tile with a predicate."""
    divisor = max(f for f in range(1, most + 1) if extent % f == 0)
    if 2 * divisor > most or extent <= most:
        return divisor
    return min(range(most, (most + 1) // 2 - 1, -1), key=lambda f: -extent % f)


def schedule_dot_product(sch: Schedule, block, intrins: list[DotIntrin], tile_shape=None) -> None:
    """Tile, repack, cache and tensorize one integer dot-product block with the first intrinsic that fits.

    Raises ValueError if none does (data dtype, or channel counts not multiples of its tile).  ``tile_shape``
    (rows, vectors) overrides the register tile's choice.
    """
    for intrin in intrins:
        match = _match(sch, block, intrin)
        if match is not None:
            break
    else:
        raise ValueError("no dot-product intrinsic computes this block")
    stmt = sch.get(block)
    loops = sch.get_loops(block)
    realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    bound = []  # (loop, iterator) in loop-nest order
    for loop in loops:
        var = sch.get(loop).loop_var
        ivs = [iv for iv, value in zip(stmt.iter_vars, realize.iter_values) if value.same_as(var)]
        if len(ivs) != 1:
            raise ValueError("block iterators are not bound to single loops")
        bound.append((loop, ivs[0]))
    o_loop = next(lp for lp, iv in bound if iv.var.same_as(match.o_var))
    k_loop = next(lp for lp, iv in bound if iv.var.same_as(match.k_var))
    spatial = [lp for lp, iv in bound if iv.iter_type == tirx.IterVar.DataPar and not lp.same_as(o_loop)]
    reduction = [lp for lp, iv in bound if iv.iter_type == tirx.IterVar.CommReduce]
    work = 1
    for lp in loops:
        work *= int(sch.get(lp).extent)

    # The rows of the register tile share its weight vectors, so they run along a loop the weight does not
    # depend on (pixels; not a grouped conv's group).
    shares_weight = {lp for lp, iv in bound if not any(iv.var.same_as(v) for v in match.weight_vars)}
    rows_loop = next((lp for lp in reversed(spatial) if int(sch.get(lp).extent) > 1 and lp in shares_weight), None)
    row_extent = int(sch.get(rows_loop).extent) if rows_loop is not None else 1
    rows, vectors = tile_shape or _register_tile(row_extent, int(sch.get(o_loop).extent) // intrin.lanes, intrin)
    if row_extent % rows:
        # A partial last row tile: the tensorized block cannot carry the predicate, so the rows are padded to
        # whole tiles instead (an einsum such as dense; a conv's windowed read is not one, and keeps a tile
        # that divides its rows).
        row_var = next(iv.var for lp, iv in bound if lp.same_as(rows_loop))
        try:
            sch.pad_einsum(block, [rows if iv.var.same_as(row_var) else 1 for iv in stmt.iter_vars])
        except (RuntimeError, ValueError):
            exact = _register_tile(row_extent, int(sch.get(o_loop).extent) // intrin.lanes, intrin, exact=True)
            return schedule_dot_product(sch, block, intrins, exact)
        return schedule_dot_product(sch, block, intrins, (rows, vectors))
    tile = intrin.lanes * vectors

    _pack_weight(sch, block, match.weight, tile, intrin)
    o_outer, o_vec, o_lane = sch.split(o_loop, [None, vectors, intrin.lanes])
    k_outer, k_inner = sch.split(k_loop, [None, intrin.depth])
    reduction = [k_outer if lp.same_as(k_loop) else lp for lp in reduction]
    outer = [o_outer, *spatial]
    inner = [o_vec]
    if rows_loop is not None:
        r_outer, r_inner = sch.split(rows_loop, [None, rows])
        outer[outer.index(rows_loop)] = r_outer
        inner.insert(0, r_inner)
    sch.reorder(*outer, *reduction, *inner, o_lane, k_inner)
    fused = sch.fuse(*outer)
    cache = tile_accumulator(sch, block, fused, work)
    _vectorize_by(sch, sch.get_loops(cache)[-1], intrin.lanes)

    init = sch.decompose_reduction(block, reduction[0])
    _vectorize_by(sch, sch.get_loops(init)[-1], intrin.lanes)
    sch.tensorize(o_lane, intrin.name)
    for loop in inner:
        sch.unroll(loop)


def tile_accumulator(sch: Schedule, block, fused, work: int):
    """Parallelise the fused outer loop of a register-tiled block (when ``work`` pays for threads) and give the
    block an accumulator tile at that loop whose write-back carries its fused epilogue; returns the write-back."""
    if work >= _MIN_PARALLEL_WORK and int(sch.get(fused).extent) > 1:
        sch.parallel(fused)
    cache = sch.cache_write(block, 0, "global")  # on the stack: see STACK_TILE_BYTES
    inline_epilogues(sch, cache)
    sch.reverse_compute_at(cache, fused, preserve_unit_loops=True)
    return cache


def inline_epilogues(sch: Schedule, block) -> None:
    """Inline the consumers of ``block`` that write as many elements as it does (bias, activation, requantize,
    a reshape) into it.  A consumer writing fewer (a slice of a padded result) stays a block of its own: TVM's
    reverse_compute_inline keeps the producer's loop domain and would write past the end of the smaller buffer."""
    produced = _elements(sch.get(block).writes[0].source)
    for consumer in sch.get_consumers(block):
        if len(sch.get(consumer).writes) != 1 or _elements(sch.get(consumer).writes[0].source) != produced:
            continue
        try:
            sch.reverse_compute_inline(consumer)
        except (RuntimeError, ValueError):
            pass


def _elements(buffer) -> int | None:
    total = 1
    for extent in buffer.shape:
        if not isinstance(extent, tirx.IntImm):
            return None
        total *= int(extent)
    return total


def _vectorize_by(sch: Schedule, loop, lanes: int) -> None:
    """Vectorise ``loop`` one register (``lanes`` int32) at a time, unrolling the registers."""
    extent = int(sch.get(loop).extent)
    if extent > lanes and extent % lanes == 0:
        regs, loop = sch.split(loop, [None, lanes])
        sch.unroll(regs)
    sch.vectorize(loop)


def _pack_weight(sch: Schedule, block, index: int, tile: int, intrin: DotIntrin) -> None:
    """Repack W[..., K, O] as [O/tile, ..., K/depth, tile/lanes, lanes, depth], at compile time.

    The ``lanes x depth`` slice the intrinsic reads is then contiguous, and so is the ``tile x depth``
    slice of one step of the register tile.
    """
    lanes, depth = intrin.lanes, intrin.depth

    def packed(*i):
        *outer, k, o = i
        vector = (o % tile // lanes,) if tile > lanes else ()  # a unit axis would upset the index map inverse
        return (o // tile, *outer, k // depth, *vector, o % lanes, k % depth)

    packer = sch.cache_read(block, index, "global")
    ndim = len(sch.get(block).reads[index].source.shape)
    sch.transform_layout(block, ("read", index), tirx.IndexMap.from_func(packed, ndim=ndim))
    sch.annotate(packer, "meta_schedule.layout_rewrite_preproc", True)
