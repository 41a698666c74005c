"""aarch64 int8 dot products: 4 int32 lanes += 4 s8 (broadcast) . 4x4 s8.

``sdot`` needs +dotprod (Cortex-A76, Raspberry Pi 5).  Without it (Cortex-A72, Raspberry Pi 4) the
same tile is two widening ``smull`` (8x8->16 bit) folded by ``saddlp`` / ``addp`` into int32, exact
for all int8 inputs.  Both compute what TVM's ``dot_4x4_i8i8s32_sdot`` / ``_neon`` do, registered here so
that edgeq does not import all of ``tvm.s_tir.tensor_intrin``, and written as single expressions: TVMScript
turns a named intermediate into a one-element ``local`` buffer, which TVM 0.27 allocates with
``TVMBackendAllocWorkspace`` at every use of the intrinsic (see ``schedules.dot_product.STACK_TILE_BYTES``).
"""

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .descriptions import dot_product_desc

SDOT_4x4 = "edgeq_dot_4x4_i8i8s32_sdot"
NEON_4x4 = "edgeq_dot_4x4_i8i8s32_neon"


@T.prim_func(s_tir=True)
def _sdot_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
            C.vload([0], dtype="int32x4"),
            T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4), dtype="int8x16"),
            B.vload([0, 0], dtype="int8x16"),
            dtype="int32x4",
        )


def _pair_sums(a_row, b_half):
    """saddlp(smull(a0..a3 a0..a3, two rows of B)): the 4 dot-product halves of those two output lanes."""
    return T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
        T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"),
            T.reinterpret(T.broadcast(T.reinterpret(a_row, dtype="int32"), 2), dtype="int8x8"), b_half,
            dtype="int16x8"),
        dtype="int32x4")


@T.prim_func(s_tir=True)
def _neon_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1)
    B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
    C = T.match_buffer(c, (4,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:4], A[0:4], B[0:4, 0:4])
        T.writes(C[0:4])
        # addp of the pair sums with rows o0, o1 (low half of B) and o2, o3 (high half); one expression built
        # by a Python helper: a named intermediate in the script would become a local buffer
        C[T.ramp(T.int32(0), 1, 4)] = C.vload([0], dtype="int32x4") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v4i32"),
            _pair_sums(A.vload([0], "int8x4"), T.vectorlow(B.vload([0, 0], dtype="int8x16"), dtype="int8x8")),
            _pair_sums(A.vload([0], "int8x4"), T.vectorhigh(B.vload([0, 0], dtype="int8x16"), dtype="int8x8")),
            dtype="int32x4",
        )


TensorIntrin.register(SDOT_4x4, dot_product_desc(4, "int8"), _sdot_impl, override=True)
TensorIntrin.register(NEON_4x4, dot_product_desc(4, "int8"), _neon_impl, override=True)
