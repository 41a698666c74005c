"""ONNX -> Relax: read, check, fix dynamic dims, infer shapes, refuse unsupported ops (all at once), import."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import EdgeqError, one_line
from .recurrent import has_recurrent, unroll_recurrent
from .rewrites import rewrite
from .simplify import simplify
from .support import refusals, signature_refusals
from .tensors import TensorSpec


@dataclass
class ImportedModel:
    """A Relax module plus what the artifact needs to describe it."""

    mod: "object"  # tvm.IRModule; main takes the inputs in order and returns the outputs
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    onnx_model: onnx.ModelProto
    name: str
    sha256: str
    opset: int
    source: bytes  # the ONNX file as given: shipped in the artifact to build host references from


def read_onnx(model) -> tuple[onnx.ModelProto, str]:
    """A checked ModelProto and a name for it, from a path or a ModelProto."""
    proto, name = _read(model)
    _check(proto)
    return proto, name


def _read(model) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "model"
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise EdgeqError(f"cannot read {path}: no such file")
    try:
        proto = onnx.load(path)
    except Exception as e:  # protobuf DecodeError, missing external data, permissions
        raise EdgeqError(f"cannot read {path} as ONNX: {one_line(e)}") from None
    if not proto.graph.output:
        raise EdgeqError(f"{path} is not an ONNX model (no graph outputs)")
    return proto, os.path.splitext(os.path.basename(path))[0]


def _check(proto: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise EdgeqError(f"invalid ONNX model: {one_line(e)}") from None


def dtype_name(elem_type: int) -> str:
    """numpy dtype name of an ONNX tensor element type."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


def _fix_inputs(graph: onnx.GraphProto, shapes: dict[str, tuple[int, ...]]) -> list[TensorSpec]:
    """Resolve every input's shape (user overrides first) and write it back into the graph."""
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    names = [i.name for i in inputs]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise EdgeqError(f"--input-shape names unknown input(s) {', '.join(unknown)}; inputs are {', '.join(names)}")
    specs, unresolved = [], []
    for value in inputs:
        tensor = value.type.tensor_type
        dims = tensor.shape.dim
        if any(d.HasField("dim_value") and d.dim_value == 0 for d in dims):
            raise EdgeqError(f"input {value.name!r} has a dimension of size 0: edgeq compiles non-empty tensors")
        if value.name in shapes:
            shape = shapes[value.name]
            fixed = [d.dim_value for d in dims]
            if len(shape) != len(dims):
                raise EdgeqError(f"--input-shape {value.name}: rank {len(shape)} given, the model's input has rank {len(dims)}")
            clash = [(i, f, s) for i, (f, s) in enumerate(zip(fixed, shape)) if f > 0 and f != s]
            if clash:
                i, f, s = clash[0]
                raise EdgeqError(f"--input-shape {value.name}: dim {i} is fixed to {f} in the model, {s} given")
        else:
            shape = tuple(d.dim_value for d in dims)
            if any(s <= 0 for s in shape):
                shown = [str(d.dim_value) if d.dim_value > 0 else d.dim_param or "?" for d in dims]
                guess = "x".join(str(max(s, 1)) for s in shape)
                unresolved.append((f"{value.name}[{', '.join(shown)}]", f"--input-shape {value.name}={guess}"))
                continue
        for d, s in zip(dims, shape):
            d.Clear()
            d.dim_value = s
        specs.append(TensorSpec(value.name, tuple(shape), dtype_name(tensor.elem_type)))
    if unresolved:
        raise EdgeqError(f"dynamic input dims are not resolved: {'; '.join(u for u, _ in unresolved)}; "
                         f"fix them, e.g. {' '.join(fix for _, fix in unresolved)}")
    return specs


def _nodes(graph: onnx.GraphProto):
    """Every node, including those in If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _nodes(sub)


def unsupported_ops(proto: onnx.ModelProto) -> dict[str, list[str]]:
    """{op type: [node names]} for every node the Relax ONNX frontend cannot convert."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    from relay_passes.quantize.qlinear import REWRITES

    known = set(_get_convert_map()) | {"If", "Constant"}
    missing: dict[str, list[str]] = defaultdict(list)
    for i, node in enumerate(_nodes(proto.graph)):
        if node.op_type not in known and (node.domain if node.domain != "ai.onnx" else "", node.op_type) not in REWRITES:
            domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
            missing[domain + node.op_type].append(node.name or f"#{i}")
    return dict(missing)


def _qoperators_to_qdq(proto: onnx.ModelProto) -> onnx.ModelProto:
    """QLinearConv / QLinearMatMul / com.microsoft QLinear* (which TVM cannot import) as QDQ chains it can."""
    from relay_passes.quantize.qlinear import REWRITES, to_qdq

    if not any((n.domain if n.domain != "ai.onnx" else "", n.op_type) in REWRITES for n in proto.graph.node):
        return proto
    try:
        return to_qdq(proto)
    except ValueError as e:
        raise EdgeqError(f"cannot import the quantized operators: {one_line(e)}") from None


def _output_specs(mod, graph: onnx.GraphProto) -> list[TensorSpec]:
    from tvm import relax

    ret = mod["main"].ret_ty
    fields = ret.fields if isinstance(ret, relax.TupleType) else [ret]
    names = [o.name for o in graph.output]
    specs = []
    for name, ty in zip(names, fields):
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            raise EdgeqError(f"output {name!r} has no static tensor shape after import")
        try:
            shape = tuple(int(d) for d in ty.shape.values)
        except TypeError:
            raise EdgeqError(f"output {name!r} has a data-dependent shape {ty.shape}; edgeq needs static shapes") from None
        specs.append(TensorSpec(name, shape, str(ty.dtype)))
    return specs


class _NodeError(Exception):
    """A converter failed: which node, of which op, and why."""

    def __init__(self, op: str, node: str, cause: BaseException):
        super().__init__(f"cannot import {op} node {node or '(unnamed)'!r}: {one_line(cause)}")


def _import(proto: onnx.ModelProto, inputs: list[TensorSpec], opset: int):
    """TVM's Relax ONNX importer, with a converter's failure reported with its op and node.

    The importer's own message has neither (it prints the op to stdout, then raises the converter's
    ValueError / TVMError / OpNotImplemented): its GraphProto's per-node conversion is wrapped instead.
    """
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    class NamingImporter(ONNXGraphImporter):
        def _convert_operator(self, op_name, inputs, attr, opset):
            try:
                return super()._convert_operator(op_name, inputs, attr, opset)
            except Exception as e:  # noqa: BLE001 - any converter failure is a property of this node
                raise _NodeError(op_name, attr.get("tvm_custom", {}).get("name", ""), e) from None

    importer = NamingImporter({s.name: list(s.shape) for s in inputs}, {s.name: s.dtype for s in inputs},
                              keep_params_in_input=False, sanitize=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return importer.from_onnx(proto.graph, opset)
    except _NodeError as e:
        raise EdgeqError(str(e)) from None
    except Exception as e:  # the importer itself (outside a converter)
        raise EdgeqError(f"TVM could not import the model: {one_line(e)}") from None


def _infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as e:  # InferenceError, or a checker error raised during inference
        raise EdgeqError(f"ONNX shape inference failed: {one_line(e)}") from None


def load_onnx(model, input_shapes: dict[str, tuple[int, ...]] | None = None, fold: bool = True) -> ImportedModel:
    """Load an ONNX file or ModelProto and import it into Relax with every dim static.

    input_shapes fixes dynamic dims, e.g. {"image": (1, 3, 224, 224)}. fold=False skips folding the shape
    arithmetic (edgeq.simplify), for models edgeq derived from one already folded (calibration taps).
    """
    proto, name = read_onnx(model)
    serialized = proto.SerializeToString()
    proto = onnx.ModelProto.FromString(serialized)  # never modify the caller's proto
    problems = signature_refusals(proto)
    if problems:
        raise EdgeqError("; ".join(problems))
    inputs = _fix_inputs(proto.graph, dict(input_shapes or {}))
    proto = _qoperators_to_qdq(proto)
    proto = rewrite(proto)
    if fold:
        proto = simplify(proto)
    proto = _infer_shapes(proto)
    if has_recurrent(proto):
        proto = _infer_shapes(unroll_recurrent(proto))  # needs the sequence length: after folding and inference
    missing = unsupported_ops(proto)
    if missing:
        listing = "; ".join(f"{op} (nodes: {', '.join(nodes)})" for op, nodes in sorted(missing.items()))
        raise EdgeqError(f"unsupported ONNX operators: {listing}")
    problems = refusals(proto)
    if problems:
        raise EdgeqError("; ".join(problems))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    mod = _import(proto, inputs, opset)
    digest = hashlib.sha256(serialized).hexdigest()
    return ImportedModel(mod, inputs, _output_specs(mod, proto.graph), proto, name, digest, opset, serialized)
