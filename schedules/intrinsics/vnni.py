"""x86 integer dot products: ``C[lanes] (int32) += A[depth] (8-bit, broadcast) . B[lanes, depth] (s8)``.

* AVX-512 VNNI ``vpdpbusd`` (u8 data, depth 4) on zmm / ymm / xmm: 16, 8 or 4 output lanes, so output
  channel counts that are multiples of 8 or 4 are still tensorized.  TVM's own ``dot_16x4_vnni``
  passes the byte operands as ``<16 x i32>``, which LLVM >= 22 rejects (its ``vpdpbusd`` now takes
  ``<64 x i8>``); these are typed for the LLVM they are built with.
* ``vpdpbusd`` for depthwise convolutions (u8 data): 4 kernel rows of 16 channels per instruction.
* ``vpmaddwd`` (depth 2, both operands widened to int16, exact): s8 data on a VNNI machine, and any
  8-bit data on AVX2 / AVX-512 CPUs without VNNI, where it is still two to three times faster than
  the ``vpmulld`` of an auto-vectorized int32 multiply-add.

Each body is one expression: TVMScript turns a named intermediate into a one-element ``local`` buffer, which
TVM 0.27 allocates with ``TVMBackendAllocWorkspace`` in every register tile.
"""

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target.codegen import llvm_version_major

from .descriptions import depthwise_rows_desc, dot_product_desc

_BYTE_OPERANDS = llvm_version_major() >= 22  # vpdpbusd takes <N x i8> operands, not <N/4 x i32>


def _vnni(lanes: int):
    """vpdpbusd on a ``lanes x 32``-bit register."""
    data = f"uint8x{lanes * 4}" if _BYTE_OPERANDS else f"int32x{lanes}"
    weight = f"int8x{lanes * 4}" if _BYTE_OPERANDS else f"int32x{lanes}"
    intrinsic = f"llvm.x86.avx512.vpdpbusd.{lanes * 32}"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrinsic),
                C.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes), dtype=data),
                T.reinterpret(B.vload([0, 0], dtype=f"int8x{lanes * 4}"), dtype=weight),
                dtype=f"int32x{lanes}",
            )

    return impl


def _madd(lanes: int, data_dtype: str):
    """vpmaddwd: widen both operands to int16, multiply, add adjacent pairs into int32."""
    intrinsic = "llvm.x86.avx512.pmaddw.d.512" if lanes == 16 else "llvm.x86.avx2.pmadd.wd"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), data_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, 2), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=f"int32x{lanes}") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrinsic),
                T.reinterpret(T.broadcast(T.reinterpret(T.Cast("int16x2", A.vload([0], f"{data_dtype}x2")),
                                                        dtype="int32"), lanes), dtype=f"int16x{lanes * 2}"),
                T.Cast(f"int16x{lanes * 2}", B.vload([0, 0], dtype=f"int8x{lanes * 2}")),
                dtype=f"int32x{lanes}",
            )

    return impl


def _vnni_depthwise(lanes: int):
    """vpdpbusd on 4 kernel rows of a depthwise conv: the 4 rows' bytes of each channel are interleaved into
    the 4 bytes of its lane (one byte permute per input pixel; LLVM shares it between the pixels of the register
    tile that read it)."""
    interleave = [lanes * r + c for c in range(lanes) for r in range(4)]
    data = f"uint8x{lanes * 4}" if _BYTE_OPERANDS else f"int32x{lanes}"
    weight = f"int8x{lanes * 4}" if _BYTE_OPERANDS else f"int32x{lanes}"
    intrinsic = f"llvm.x86.avx512.vpdpbusd.{lanes * 32}"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        row_stride = T.int64()
        pixel_stride = T.int64()
        A = T.match_buffer(a, (4, 1, lanes), "uint8", offset_factor=1, strides=[row_stride, pixel_stride, 1])
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4, 0:1, 0:lanes], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrinsic),
                C.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(T.Shuffle([A.vload([0, 0, 0], f"uint8x{lanes}"), A.vload([1, 0, 0], f"uint8x{lanes}"),
                                         A.vload([2, 0, 0], f"uint8x{lanes}"), A.vload([3, 0, 0], f"uint8x{lanes}")],
                                        interleave), dtype=data),
                T.reinterpret(B.vload([0, 0], dtype=f"int8x{lanes * 4}"), dtype=weight),
                dtype=f"int32x{lanes}",
            )

    return impl


VNNI = {lanes: f"edgeq_dot_{lanes}x4_u8i8i32_vnni" for lanes in (16, 8, 4)}
MADD = {(lanes, dtype): f"edgeq_dot_{lanes}x2_{dtype[0]}8i8i32_pmaddwd"
        for lanes in (16, 8) for dtype in ("uint8", "int8")}

VNNI_DEPTHWISE = "edgeq_depthwise_16x4_u8i8i32_vnni"

TensorIntrin.register(VNNI_DEPTHWISE, depthwise_rows_desc(16, 4), _vnni_depthwise(16), override=True)
for _lanes, _name in VNNI.items():
    TensorIntrin.register(_name, dot_product_desc(_lanes, "uint8"), _vnni(_lanes), override=True)
for (_lanes, _dtype), _name in MADD.items():
    TensorIntrin.register(_name, dot_product_desc(_lanes, _dtype, depth=2), _madd(_lanes, _dtype), override=True)
