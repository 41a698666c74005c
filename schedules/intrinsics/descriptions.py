"""What the intrinsics compute (TensorIntrin descriptions), shared by the VNNI and Arm implementations."""

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


def depthwise_rows_desc(lanes: int, rows: int):
    """``C[c] += int32(int16(A[r, c]) * int16(W[c, r]))`` over ``rows`` rows r of A (a strided window of
    the padded input, channels c innermost): a depthwise conv reducing ``rows`` kernel rows at once, in the
    int16-product form of ``schedules.qkernels.qconv2d``."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        row_stride = T.int64()
        pixel_stride = T.int64()
        A = T.match_buffer(a, (rows, 1, lanes), "uint8", offset_factor=1, strides=[row_stride, pixel_stride, 1])
        B = T.match_buffer(b, (lanes, rows), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:rows, 0:1, 0:lanes], B[0:lanes, 0:rows])
            T.writes(C[0:lanes])
            for i, r in T.grid(lanes, rows):
                with T.sblock("update"):
                    vi, vr = T.axis.remap("SR", [i, r])
                    C[vi] = C[vi] + T.Cast("int32", T.Cast("int16", A[vr, 0, vi]) * T.Cast("int16", B[vi, vr]))

    return desc
