"""Default schedule of int8 depthwise convolutions with AVX-512 VNNI: one ``vpdpbusd`` per 4 kernel rows.

A depthwise conv reads one input byte per output lane, so the dense dot-product intrinsics (a broadcast input,
``depth`` consecutive input channels) do not apply, and multiplying in int16 then widening costs three
instructions per tap and 16 channels.  Here the 4 bytes of a ``vpdpbusd`` lane are 4 kernel rows of one
channel.  Realize pads the kernel to a multiple of 4 rows with zero weights, and the input with as many more
rows of bottom padding, so the output is unchanged (:func:`depthwise_rows`); the block

    C[b, y, x, c] += int32(int16(P[b, y*s + ry, x*s' + rx, c]) * int16(W[ry, rx, 0, c]))

is then tiled as ``[parallel: rows, pixel tiles, channel tiles] [ry/4, rx] [unrolled: pixels] [c:16 x ry:4]``
with the weight repacked at compile time to ``[C/16, KH/4, KW, 1, 16, 4]``.  The padded input P stays a
buffer of its own: the intrinsic reads 4 of its rows.  Measured on this project's int8 MobileNetV2 layers
(1 thread): a 56x56x144 3x3 conv 205 -> 128 us, 28x28x192 77 -> 43 us, stride 2 112x112x96 161 -> 122 us.
"""

from __future__ import annotations

from tvm import tirx
from tvm.ir.expr import TensorLoad  # a BufferLoad
from tvm.s_tir import Schedule

from targets.features import has_feature

from .dot_product import _MIN_PARALLEL_WORK, STACK_TILE_BYTES, tile_accumulator
from .intrinsics import VNNI, VNNI_DEPTHWISE

ROWS = 4  # kernel rows per vpdpbusd lane
LANES = 16  # channels per vpdpbusd (zmm)
_MAX_PIXELS = 8  # output pixels of one register tile


def depthwise_rows(target, channels: int, dilation: int, data_dtype: str, kernel_rows: int) -> int:
    """How many kernel rows the depthwise intrinsic reduces at once on ``target``: realize pads depthwise
    kernels to a multiple of it.  1 where the intrinsic does not apply (no VNNI, s8 data, channel counts
    that are not a multiple of 16, dilated rows) or does not pay (1 or 2 kernel rows: 4x or 2x the work)."""
    if (target is None or target.kind.name != "llvm" or data_dtype != "uint8" or channels % LANES or dilation != 1
            or kernel_rows < 3):
        return 1
    return ROWS if has_feature(target, "avx512vnni") else 1


def _operands(stmt):
    """(data load, weight load) of a depthwise block in qkernels' int16-product form, else None."""
    store = stmt.body
    if not isinstance(store, tirx.BufferStore) or str(store.buffer.dtype) != "int32" or len(store.indices) != 4:
        return None
    value = store.value
    if not (isinstance(value, tirx.Add) and isinstance(value.b, tirx.Cast) and str(value.b.ty) == "int32"
            and isinstance(value.b.value, tirx.Mul)):
        return None
    loads = []
    for operand, dtype in ((value.b.value.a, "uint8"), (value.b.value.b, "int8")):
        if not (isinstance(operand, tirx.Cast) and str(operand.ty) == "int16" and isinstance(operand.value, TensorLoad)
                and str(operand.value.source.dtype) == dtype and len(operand.value.indices) == 4):
            return None
        loads.append(operand.value)
    data, weight = loads
    channel = store.indices[3]
    if not (data.indices[3].same_as(channel) and weight.indices[3].same_as(channel)):
        return None
    return data, weight


def is_depthwise_dot(sch: Schedule, block) -> bool:
    """Whether ``block`` is a depthwise conv this module can tensorize (u8 data, kernel rows a multiple of 4)."""
    stmt = sch.get(block)
    operands = _operands(stmt)
    if operands is None:
        return False
    kernel_rows = operands[1].source.shape[0]
    reduction = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    return len(reduction) == 2 and isinstance(kernel_rows, tirx.IntImm) and int(kernel_rows) % ROWS == 0


def schedule_depthwise_dot(sch: Schedule, block, intrins) -> None:
    """Tile, repack, cache and tensorize a depthwise block (see the module docstring); ValueError if it does
    not apply (no VNNI among ``intrins``, another form of block), and the caller falls back."""
    if VNNI[LANES] not in {intrin.name for intrin in intrins}:
        raise ValueError("no AVX-512 VNNI")
    if not is_depthwise_dot(sch, block):
        raise ValueError("not a depthwise dot product")
    stmt = sch.get(block)
    weight_index = next(i for i, read in enumerate(stmt.reads) if str(read.source.dtype) == "int8")
    loops = sch.get_loops(block)
    if len(loops) != 6:
        raise ValueError("expected loops b, y, x, c, ry, rx")
    b, y, x, c, ry, rx = loops
    work = 1
    for loop in loops:
        work *= int(sch.get(loop).extent)

    producers = [sch.get(p).name_hint for p in sch.get_producers(block)]  # the padding of the input, if any
    packer = sch.cache_read(block, weight_index, "global")
    sch.transform_layout(block, ("read", weight_index), tirx.IndexMap.from_func(
        lambda r, s, z, o: (o // LANES, r // ROWS, s, z, o % LANES, r % ROWS), ndim=4))
    sch.annotate(packer, "meta_schedule.layout_rewrite_preproc", True)

    width = int(sch.get(x).extent)
    pixels = max(p for p in range(1, _MAX_PIXELS + 1) if width % p == 0 and p * LANES * 4 < STACK_TILE_BYTES)
    c_outer, c_lane = sch.split(c, [None, LANES])
    ry_outer, ry_inner = sch.split(ry, [None, ROWS])
    x_outer, x_inner = sch.split(x, [None, pixels])
    sch.reorder(b, y, x_outer, c_outer, ry_outer, rx, x_inner, c_lane, ry_inner)
    fused = sch.fuse(b, y, x_outer, c_outer)
    cache = tile_accumulator(sch, block, fused, work)
    sch.vectorize(sch.get_loops(cache)[-1])
    init = sch.decompose_reduction(block, ry_outer)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(c_lane, VNNI_DEPTHWISE)
    for loop in (rx, x_inner):
        sch.unroll(loop)
    for name in producers:
        _schedule_padding(sch, sch.get_sblock(name), parallel=work >= _MIN_PARALLEL_WORK)


def _schedule_padding(sch: Schedule, block, parallel: bool) -> None:
    """The padded input, one thread per row and 16 channels per vector (vectorising its fused loops instead
    costs an index division per 16 bytes: 1.3x slower on a 56x56x144 conv)."""
    loops = sch.get_loops(block)
    if len(loops) != 4 or any(sch.get(lp).kind != tirx.ForKind.SERIAL for lp in loops):
        return
    rows = sch.fuse(*loops[:2])
    if parallel:
        sch.parallel(rows)
    channels = int(sch.get(loops[3]).extent)
    if channels % LANES == 0:
        sch.vectorize(sch.split(loops[3], [None, LANES])[1])
