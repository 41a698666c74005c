"""Tensor intrinsics for the integer dot products of int8 kernels; importing registers them.

All of them compute ``C[lanes] (int32) += A[depth] (8-bit, broadcast) . B[lanes, depth] (int8)``; the
default schedule keeps ``C`` in a small ``global`` tile buffer, which TVM puts on the stack (see
``schedules.dot_product.STACK_TILE_BYTES``).
"""

from tvm.script import tirx as T


def dot_product_desc(lanes: int, data_dtype: str, depth: int = 4):
    """The description shared by every intrinsic here."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (depth,), data_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, depth), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[0:lanes, 0:depth])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, depth):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


# the submodules use dot_product_desc, so they are imported after it is defined
from .arm_dot import NEON_4x4, SDOT_4x4  # noqa: E402
from .vnni import MADD, VNNI  # noqa: E402

__all__ = ["MADD", "NEON_4x4", "SDOT_4x4", "VNNI", "dot_product_desc"]
