"""Tensor intrinsics for the integer dot products of int8 kernels; importing registers them.

The dense ones compute ``C[lanes] (int32) += A[depth] (8-bit, broadcast) . B[lanes, depth] (int8)``, the
depthwise one ``C[lanes] += sum_r A[r, lanes] * B[lanes, r]`` (one input byte per output lane); the
default schedule keeps ``C`` in a small ``global`` tile buffer, which TVM puts on the stack (see
``schedules.dot_product.STACK_TILE_BYTES``).
"""

from .arm_dot import NEON_4x4, SDOT_4x4
from .descriptions import depthwise_rows_desc, dot_product_desc
from .vnni import MADD, VNNI, VNNI_DEPTHWISE

__all__ = ["MADD", "NEON_4x4", "SDOT_4x4", "VNNI", "VNNI_DEPTHWISE", "dot_product_desc", "depthwise_rows_desc"]
