"""The substitution rules, as a table of data (MetaFlow's hand-written rules plus TASO's concat ones).

A rule is a source pattern (matcher.P rows: op types and how they connect), a `check` (attribute
constraints), and a `build` that adds the target subgraph to a copy of the graph, transforming weights
with numpy, and returns {old value: equivalent new value} for the external edges it preserves. Whatever
the old values no longer feed is removed as dead code, so a rewrite is correct as soon as every returned
pair is equal; whether it is worth it is the cost model's business.

`LIFTS` are not searched: they run once first and turn conv2d / matmul with constant weights into the
fused ops of ops.py (same Relax when lowered), which the rules then grow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from tvm import relax

from . import ops
from .graph import Graph, Node
from .matcher import P, match

CONV, MATMUL = "edgeq.conv2d", "edgeq.matmul"
ACTS = tuple(ops.ACTIVATIONS)


@dataclass(frozen=True)
class Rule:
    name: str
    doc: str
    pattern: tuple[P, ...]
    preserves: tuple[str, ...]  # the pattern values the target subgraph provides again
    build: Callable[[Graph, dict], dict]
    check: Callable[[Graph, dict], bool] = lambda g, m: True

    def matches(self, g: Graph, anchors=None):
        for m in match(g, self.pattern, anchors):
            if self.check(g, m):
                yield m

    def inside(self, m: dict) -> set[int]:
        """The matched nodes proper (not the external inputs that wildcard rows stand for)."""
        return {m[p.name] for p in self.pattern if p.op is not None}

    def rewrite(self, g: Graph, m: dict) -> tuple[Graph, dict]:
        """The rewritten graph and {old value: new value} of the edges it preserved."""
        new = g.copy()
        mapping = self.build(new, m)
        new.replace(mapping)
        return new, mapping

    def apply(self, g: Graph, m: dict) -> Graph:
        return self.rewrite(g, m)[0]


# helpers ----------------------------------------------------------------------------------------------------
def _n(g, m, name):
    return g.nodes[m[name]]


def _w(g, nid):
    return g.array(g.nodes[nid].inputs[1])


def _bias(g, nid) -> np.ndarray:
    """The fused op's bias as a vector (zeros when it has none)."""
    node = g.nodes[nid]
    n = node.shape[1] if node.op == CONV else node.shape[-1]
    return g.array(node.inputs[2]).reshape(-1) if len(node.inputs) > 2 else np.zeros(n, np.float32)


def _has_bias(g, *nids):
    return any(len(g.nodes[i].inputs) > 2 for i in nids)


def _kernel(g, nid):
    return _w(g, nid).shape[2:]


def per_channel(g, const_id, out_shape, axis) -> np.ndarray | None:
    """A constant operand as one value per channel `axis` of out_shape, if that is all it broadcasts to."""
    k = g.array(const_id)
    rank = len(out_shape)
    if k is None or k.ndim > rank or k.dtype != np.float32:
        return None
    full = (1,) * (rank - k.ndim) + k.shape
    if any(d != 1 and (i != axis or d != out_shape[i]) for i, d in enumerate(full)):
        return None
    target = tuple(out_shape[i] if i == axis else 1 for i in range(rank))
    return np.broadcast_to(k.reshape(full), target).reshape(-1)


def _conv(g, x, w, b, attrs):
    inputs = [x, g.const(w.astype(np.float32))] + ([g.const(b.reshape(1, -1, 1, 1).astype(np.float32))]
                                                   if b is not None else [])
    return g.op(CONV, inputs, **attrs)


def _matmul(g, x, w, b, attrs):
    return g.op(MATMUL, [x, g.const(w)] + ([g.const(b.astype(np.float32))] if b is not None else []), **attrs)


def _act_none(g, m, *names):
    return all(_n(g, m, n).attrs.get("act") is None for n in names)


def _axis(g, nid):
    node = g.nodes[nid]
    shaped = g.nodes[node.inputs[0]] if node.op == "relax.split" else node
    return node.attrs["axis"] % len(shaped.shape)


def _parts(g, m, tup="t"):
    return list(_n(g, m, tup).inputs)


# lifts: relax ops with constant weights -> the fused ops -------------------------------------------------
def _lift_conv_check(g, m):
    c = _n(g, m, "c")
    return (all(c.attrs.get(k) == v for k, v in ops.CONV_LAYOUT.items()) and c.dtype == "float32"
            and c.attrs.get("out_dtype") in (None, "", "float32"))


def _lift_conv(g, m):
    c = _n(g, m, "c")
    attrs = {k: c.attrs[k] for k in ("strides", "padding", "dilation", "groups")}
    return {m["c"]: g.op(CONV, [m["x"], m["w"]], **attrs, act=None)}


def _lift_matmul_check(g, m):
    mm = _n(g, m, "mm")
    return (g.array(m["w"]).ndim == 2 and mm.dtype == "float32" and mm.attrs.get("out_dtype") in (None, "", "float32"))


def _lift_matmul(g, m):
    return {m["mm"]: g.op(MATMUL, [m["x"], m["w"]], act=None)}


LIFTS = (
    Rule("lift_conv", "conv2d with constant NCHW/OIHW weights as the fused conv op",
         (P("c", "relax.nn.conv2d", ("x", "w")), P("x"), P("w", "const")), ("c",), _lift_conv, _lift_conv_check),
    Rule("lift_matmul", "matmul with a constant 2-D weight as the fused matmul op",
         (P("mm", "relax.matmul", ("x", "w")), P("x"), P("w", "const")), ("mm",), _lift_matmul, _lift_matmul_check),
)


# conv epilogues ---------------------------------------------------------------------------------------------
def _conv_attrs(node):
    return {k: node.attrs[k] for k in ("strides", "padding", "dilation", "groups", "act")}


def _bn_check(g, m):
    bn = _n(g, m, "bn")
    return (_act_none(g, m, "c") and bn.attrs.get("axis") in (1, -3) and _n(g, m, "out").attrs["index"] == 0
            and all(g.array(m[k]) is not None for k in ("gamma", "beta", "mean", "var")))


def _bn_build(g, m):
    c, bn = _n(g, m, "c"), _n(g, m, "bn")
    gamma, beta, mean, var = (g.array(m[k]).astype(np.float64) for k in ("gamma", "beta", "mean", "var"))
    scale = (gamma if bn.attrs.get("scale", True) else 1.0) / np.sqrt(var + bn.attrs["epsilon"])
    shift = beta if bn.attrs.get("center", True) else 0.0
    w = _w(g, m["c"]) * scale.reshape(-1, 1, 1, 1)
    b = (_bias(g, m["c"]) - mean) * scale + shift
    return {m["out"]: _conv(g, m["x"], w, b, _conv_attrs(c))}


def _affine_check(g, m):
    c = _n(g, m, "c")
    k = per_channel(g, m["k"], c.shape, 1)
    return (_act_none(g, m, "c") and k is not None and _n(g, m, "e").shape == c.shape
            and (_n(g, m, "e").op != "relax.divide" or np.all(k != 0)))


def _affine_build(g, m):
    """y = conv(x) op k with k per output channel: folded into the conv's weights and bias."""
    c, e = _n(g, m, "c"), _n(g, m, "e")
    k = per_channel(g, m["k"], c.shape, 1).astype(np.float64)
    w, b = _w(g, m["c"]).astype(np.float64), _bias(g, m["c"]).astype(np.float64)
    scale, shift = {"relax.multiply": (k, 0), "relax.divide": (None, 0),
                    "relax.add": (1, k), "relax.subtract": (1, -k)}[e.op]
    if scale is None:
        scale = 1 / k  # the check made sure k has no zero
    scale = np.broadcast_to(scale, k.shape)
    return {m["e"]: _conv(g, m["x"], w * scale.reshape(-1, 1, 1, 1), b * scale + shift, _conv_attrs(c))}


def _fuse_act(g, m):
    node, act = _n(g, m, "c"), _n(g, m, "r")
    return {m["r"]: g.add(Node(node.op, node.inputs, {**node.attrs, "act": act.op}, node.ty))}


def _mm_bias_check(g, m):
    mm, k = _n(g, m, "c"), g.array(m["k"])
    n = mm.shape[-1]
    return (_act_none(g, m, "c") and k is not None and k.size == n and k.shape[-1] == n and k.ndim <= len(mm.shape)
            and len(mm.inputs) == 2 and k.dtype == np.float32)


def _mm_bias(g, m):
    mm = _n(g, m, "c")
    return {m["e"]: _matmul(g, mm.inputs[0], _w(g, m["c"]), g.array(m["k"]).reshape(-1), {"act": None})}


# merging siblings -------------------------------------------------------------------------------------------
def _same(g, m, keys, *names):
    return all(_n(g, m, names[0]).attrs.get(k) == _n(g, m, n).attrs.get(k) for k in keys for n in names[1:])


def _split_back(g, merged, sizes, axis, olds):
    split = g.op("relax.split", [merged], indices_or_sections=tuple(np.cumsum(sizes)[:-1].tolist()), axis=axis)
    return {old: g.op("get_item", [split], index=i) for i, old in enumerate(olds)}


def _merge_mm_check(g, m):
    return m["a"] < m["b"] and _same(g, m, ("act",), "a", "b") and _w(g, m["a"]).shape[0] == _w(g, m["b"]).shape[0]


def _merge_mm(g, m):
    a = _n(g, m, "a")
    wa, wb = _w(g, m["a"]), _w(g, m["b"])
    bias = np.concatenate([_bias(g, m["a"]), _bias(g, m["b"])]) if _has_bias(g, m["a"], m["b"]) else None
    merged = _matmul(g, m["x"], np.concatenate([wa, wb], axis=1), bias, {"act": a.attrs["act"]})
    return _split_back(g, merged, [wa.shape[1], wb.shape[1]], len(a.shape) - 1, [m["a"], m["b"]])


def _enlargement(g, small, big):
    """Per spatial axis (pad_lo, pad_hi) of zeros that make `small`'s kernel `big`'s, or None."""
    ks, kb = _kernel(g, small), _kernel(g, big)
    ps, pb = g.nodes[small].attrs["padding"], g.nodes[big].attrs["padding"]
    plan = []
    for ax in range(2):
        lo, hi = pb[ax] - ps[ax], pb[ax + 2] - ps[ax + 2]
        if lo < 0 or hi < 0 or lo + hi != kb[ax] - ks[ax]:
            return None
        plan.append((lo, hi))
    return plan


def _target_kernel(g, m):
    """The merged conv's geometry: per axis the larger kernel (with its padding)."""
    ka, kb = _kernel(g, m["a"]), _kernel(g, m["b"])
    big = m["a"] if ka[0] * ka[1] >= kb[0] * kb[1] else m["b"]
    return big, (m["b"] if big == m["a"] else m["a"])


def _merge_conv_check(g, m):
    a, b = _n(g, m, "a"), _n(g, m, "b")
    if not (m["a"] < m["b"] and a.attrs["groups"] == b.attrs["groups"] == 1
            and _same(g, m, ("strides", "dilation", "act"), "a", "b")
            and a.attrs["dilation"] == (1, 1) and a.shape[2:] == b.shape[2:]):
        return False
    big, small = _target_kernel(g, m)
    return _enlargement(g, small, big) is not None


def _merge_conv(g, m):
    big, small = _target_kernel(g, m)
    plan = _enlargement(g, small, big)
    ws = np.pad(_w(g, small), ((0, 0), (0, 0), *plan))
    weights = {big: _w(g, big), small: ws}
    a, b = _n(g, m, "a"), _n(g, m, "b")
    bias = np.concatenate([_bias(g, m["a"]), _bias(g, m["b"])]) if _has_bias(g, m["a"], m["b"]) else None
    attrs = {**_conv_attrs(g.nodes[big])}
    merged = _conv(g, m["x"], np.concatenate([weights[m["a"]], weights[m["b"]]]), bias, attrs)
    return _split_back(g, merged, [a.shape[1], b.shape[1]], 1, [m["a"], m["b"]])


def _enlarge_check(g, m):
    a, b = _n(g, m, "a"), _n(g, m, "b")
    return (_kernel(g, m["a"]) == (1, 1) and _kernel(g, m["b"]) == (3, 3) and a.attrs["strides"] == b.attrs["strides"]
            and a.attrs["dilation"] == (1, 1) and a.attrs["groups"] == 1)


def _enlarge(g, m):
    """A 1x1 conv as a 3x3 one (zero ring, padding +1): same output, and now mergeable with its 3x3 sibling."""
    a = _n(g, m, "a")
    w = np.pad(_w(g, m["a"]), ((0, 0), (0, 0), (1, 1), (1, 1)))
    attrs = {**_conv_attrs(a), "padding": tuple(p + 1 for p in a.attrs["padding"])}
    b = _bias(g, m["a"]) if _has_bias(g, m["a"]) else None
    return {m["a"]: _conv(g, m["x"], w, b, attrs)}


def _conv_sum_check(g, m):
    ca, cb, s = _n(g, m, "ca"), _n(g, m, "cb"), _n(g, m, "s")
    xa, xb = _n(g, m, "a"), _n(g, m, "b")
    return (m["a"] != m["b"] and _act_none(g, m, "ca", "cb") and ca.attrs["groups"] == cb.attrs["groups"] == 1
            and _same(g, m, ("strides", "padding", "dilation"), "ca", "cb")
            and _kernel(g, m["ca"]) == _kernel(g, m["cb"])
            and ca.shape == cb.shape == s.shape and xa.dtype == xb.dtype
            and xa.shape[:1] + xa.shape[2:] == xb.shape[:1] + xb.shape[2:])


def _conv_sum(g, m):
    """conv(a, Wa) + conv(b, Wb) = conv(concat(a, b), [Wa | Wb]) (weights joined on input channels)."""
    ca = _n(g, m, "ca")
    cat = g.op("relax.concat", [g.op("tuple", [m["a"], m["b"]])], axis=1)
    w = np.concatenate([_w(g, m["ca"]), _w(g, m["cb"])], axis=1)
    b = _bias(g, m["ca"]) + _bias(g, m["cb"]) if _has_bias(g, m["ca"], m["cb"]) else None
    return {m["s"]: _conv(g, cat, w, b, _conv_attrs(ca))}


def _residual_check(g, m):
    c, s, x = _n(g, m, "c"), _n(g, m, "s"), _n(g, m, "x")
    if not (_act_none(g, m, "c") and c.attrs["groups"] == 1 and c.attrs["strides"] == (1, 1)
            and c.attrs["dilation"] == (1, 1) and c.shape == x.shape == s.shape):
        return False
    kh, kw = _kernel(g, m["c"])
    return c.attrs["padding"][0] < kh and c.attrs["padding"][1] < kw


def _residual(g, m):
    """conv(x) + x: the identity is a 1 at the kernel tap that reads x[c] at the output position."""
    c = _n(g, m, "c")
    w = _w(g, m["c"]).copy()
    top, left = c.attrs["padding"][:2]
    for ch in range(w.shape[0]):
        w[ch, ch, top, left] += 1
    b = _bias(g, m["c"]) if _has_bias(g, m["c"]) else None
    return {m["s"]: _conv(g, m["x"], w, b, _conv_attrs(c))}


# concat algebra ---------------------------------------------------------------------------------------------
def _unary_in(g, m):
    r = _n(g, m, "r")
    parts = [g.op(r.op, [p]) for p in _parts(g, m)]
    return {m["r"]: g.op("relax.concat", [g.op("tuple", parts)], axis=_axis(g, m["c"]))}


def _unary_out_check(g, m):
    fields = [g.nodes[i] for i in _parts(g, m)]
    return len(fields) > 1 and fields[0].op in ACTS and all(f.op == fields[0].op for f in fields)


def _unary_out(g, m):
    fields = [g.nodes[i] for i in _parts(g, m)]
    cat = g.op("relax.concat", [g.op("tuple", [f.inputs[0] for f in fields])], axis=_axis(g, m["c"]))
    return {m["c"]: g.op(fields[0].op, [cat])}


def _add_in_check(g, m):
    ta, tb = _parts(g, m, "t1"), _parts(g, m, "t2")
    return (_axis(g, m["c1"]) == _axis(g, m["c2"]) and len(ta) == len(tb)
            and _n(g, m, "s").shape == _n(g, m, "c1").shape
            and all(g.nodes[a].shape == g.nodes[b].shape for a, b in zip(ta, tb)))


def _add_in(g, m):
    parts = [g.op("relax.add", [a, b]) for a, b in zip(_parts(g, m, "t1"), _parts(g, m, "t2"))]
    return {m["s"]: g.op("relax.concat", [g.op("tuple", parts)], axis=_axis(g, m["c1"]))}


def _add_out_check(g, m):
    fields = [g.nodes[i] for i in _parts(g, m)]
    return len(fields) > 1 and all(
        f.op == "relax.add" and all(g.nodes[i].shape == f.shape for i in f.inputs) for f in fields)


def _add_out(g, m):
    fields = [g.nodes[i] for i in _parts(g, m)]
    axis = _axis(g, m["c"])
    sides = [g.op("relax.concat", [g.op("tuple", [f.inputs[k] for f in fields])], axis=axis) for k in (0, 1)]
    return {m["c"]: g.op("relax.add", sides)}


def _split_bounds(g, nid):
    node = g.nodes[nid]
    n = g.nodes[node.inputs[0]].shape[_axis(g, nid)]
    sec = node.attrs["indices_or_sections"]
    return list(range(n // sec, n, n // sec)) if isinstance(sec, int) else list(sec)


def _whole_split_runs(g, m) -> list[tuple[int, int, int]]:
    """(start, stop, split input) for each run of concat parts that is a whole split, in order, on its axis."""
    fields = [g.nodes[i] for i in _parts(g, m)]
    runs, k = [], 0
    while k < len(fields):
        f = fields[k]
        src = f.inputs[0] if f.op == "get_item" and f.attrs["index"] == 0 else None
        s = g.nodes[src] if src is not None else None
        n = len(s.ty.fields) if s is not None and s.op == "relax.split" else 0
        if n and _axis(g, src) == _axis(g, m["c"]) and all(
                k + i < len(fields) and fields[k + i].op == "get_item" and fields[k + i].inputs[0] == src
                and fields[k + i].attrs["index"] == i for i in range(n)):
            runs.append((k, k + n, s.inputs[0]))
            k += n
        else:
            k += 1
    return runs


def _split_concat(g, m):
    parts, runs = _parts(g, m), _whole_split_runs(g, m)
    for start, stop, src in reversed(runs):
        parts[start:stop] = [src]
    if len(parts) == 1:
        return {m["c"]: parts[0]}
    return {m["c"]: g.op("relax.concat", [g.op("tuple", parts)], axis=_axis(g, m["c"]))}


def _concat_split_check(g, m):
    axis = _axis(g, m["c"])
    sizes = [g.nodes[i].shape[axis] for i in _parts(g, m)]
    return (_axis(g, m["s"]) == axis and _split_bounds(g, m["s"]) == np.cumsum(sizes)[:-1].tolist()
            and all(g.nodes[u].op == "get_item" for u in g.users()[m["s"]]))


def _concat_split(g, m):
    parts = _parts(g, m)
    return {u: parts[g.nodes[u].attrs["index"]] for u in g.users()[m["s"]]}


def _transpose_pair(g, m):
    rank = len(_n(g, m, "x").shape)
    p1 = _n(g, m, "i").attrs.get("axes") or tuple(reversed(range(rank)))
    p2 = _n(g, m, "o").attrs.get("axes") or tuple(reversed(range(rank)))
    axes = tuple(p1[j] for j in p2)
    if axes == tuple(range(rank)):
        return {m["o"]: m["x"]}
    return {m["o"]: g.op("relax.permute_dims", [m["x"]], axes=axes)}


def _reshape_pair(g, m):
    o, x = _n(g, m, "o"), _n(g, m, "x")
    if o.shape == x.shape:
        return {m["o"]: m["x"]}
    return {m["o"]: g.op("relax.reshape", [m["x"], g.literal(relax.ShapeExpr(list(o.shape)))])}


def _tensor_x(g, m):
    return isinstance(_n(g, m, "x").ty, relax.TensorType)


_CONV_X = (P("c", CONV, ("x",)), P("x"))
_SIBLINGS = (P("a", CONV, ("x",)), P("x"), P("b", CONV, ("x",)))
_CAT = (P("c", "relax.concat", ("t",)), P("t", "tuple"))

RULES: tuple[Rule, ...] = (
    Rule("conv_bn", "fold an inference batch_norm after a conv into its weights and bias",
         (*_CONV_X, P("bn", "relax.nn.batch_norm", ("c", "gamma", "beta", "mean", "var")),
          *(P(k, "const") for k in ("gamma", "beta", "mean", "var")), P("out", "get_item", ("bn",))),
         ("out",), _bn_build, _bn_check),
    Rule("conv_scale", "fold a per-channel multiply/divide by a constant after a conv into its weights",
         (*_CONV_X, P("e", ("relax.multiply", "relax.divide"), ("c", "k")), P("k", "const")),
         ("e",), _affine_build, _affine_check),
    Rule("conv_bias", "fold a per-channel add/subtract of a constant after a conv into its bias",
         (*_CONV_X, P("e", ("relax.add", "relax.subtract"), ("c", "k")), P("k", "const")),
         ("e",), _affine_build, _affine_check),
    Rule("conv_act", "fuse relu/sigmoid/tanh into the conv before it",
         (*_CONV_X, P("r", ACTS, ("c",))), ("r",), _fuse_act, lambda g, m: _act_none(g, m, "c")),
    Rule("matmul_bias", "fuse a constant bias add (Gemm's) into the matmul before it",
         (P("c", MATMUL), P("e", "relax.add", ("c", "k")), P("k", "const")), ("e",), _mm_bias, _mm_bias_check),
    Rule("matmul_act", "fuse relu/sigmoid/tanh into the matmul before it",
         (P("c", MATMUL), P("r", ACTS, ("c",))), ("r",), _fuse_act, lambda g, m: _act_none(g, m, "c")),
    Rule("merge_matmuls", "two matmuls of one input -> one matmul on concatenated weights + split",
         (P("a", MATMUL, ("x",)), P("x"), P("b", MATMUL, ("x",))), ("a", "b"), _merge_mm, _merge_mm_check),
    Rule("merge_convs", "two convs of one input, same stride -> one conv (smaller kernel zero-padded) + split",
         _SIBLINGS, ("a", "b"), _merge_conv, _merge_conv_check),
    Rule("enlarge_conv", "a 1x1 conv as 3x3 (zero ring, pad+1) when a 3x3 sibling shares its input",
         _SIBLINGS, ("a",), _enlarge, _enlarge_check),
    Rule("conv_sum", "conv(a) + conv(b) -> conv(concat(a, b)) with weights joined on input channels",
         (P("s", "relax.add", ("ca", "cb")), P("ca", CONV, ("a",)), P("cb", CONV, ("b",)), P("a"), P("b")),
         ("s",), _conv_sum, _conv_sum_check),
    Rule("residual_left", "conv(x) + x -> conv with the identity added to its weights",
         (P("s", "relax.add", ("c", "x")), *_CONV_X), ("s",), _residual, _residual_check),
    Rule("residual_right", "x + conv(x) -> conv with the identity added to its weights",
         (P("s", "relax.add", ("x", "c")), *_CONV_X), ("s",), _residual, _residual_check),
    Rule("act_into_concat", "act(concat(a, b)) -> concat(act(a), act(b))",
         (P("r", ACTS, ("c",)), *_CAT), ("r",), _unary_in),
    Rule("act_out_of_concat", "concat(act(a), act(b)) -> act(concat(a, b))",
         _CAT, ("c",), _unary_out, _unary_out_check),
    Rule("add_into_concat", "concat(a1, a2) + concat(b1, b2) -> concat(a1 + b1, a2 + b2)",
         (P("s", "relax.add", ("c1", "c2")), P("c1", "relax.concat", ("t1",)), P("t1", "tuple"),
          P("c2", "relax.concat", ("t2",)), P("t2", "tuple")), ("s",), _add_in, _add_in_check),
    Rule("add_out_of_concat", "concat(a1 + b1, a2 + b2) -> concat(a1, a2) + concat(b1, b2)",
         _CAT, ("c",), _add_out, _add_out_check),
    Rule("split_concat", "the parts of a split, concatenated in order on its axis -> the split's input",
         _CAT, ("c",), _split_concat, lambda g, m: bool(_whole_split_runs(g, m))),
    Rule("concat_split", "split of a concat at the concat's boundaries -> the concat's parts",
         (P("s", "relax.split", ("c",)), *_CAT), ("s[i]",), _concat_split, _concat_split_check),
    Rule("transpose_pair", "permute_dims(permute_dims(x)) -> one permute_dims, or x",
         (P("o", "relax.permute_dims", ("i",)), P("i", "relax.permute_dims", ("x",)), P("x")), ("o",),
         _transpose_pair, _tensor_x),
    Rule("reshape_pair", "reshape(reshape(x)) -> one reshape, or x",
         (P("o", "relax.reshape", ("i",)), P("i", "relax.reshape", ("x",)), P("x")), ("o",), _reshape_pair, _tensor_x),
)

BY_NAME = {r.name: r for r in RULES}

# folds into a conv / matmul's weights, bias or epilogue: each removes an op from a kernel TVM fuses anyway, so
# none can make the compiled model slower. They are applied exhaustively before the search (`simplify`), which
# then spends its budget (and its measurements) on the rewrites that can go either way, instead of on every
# order of folding 30 epilogues and every half-folded kernel.
SIMPLIFY = ("conv_bn", "conv_scale", "conv_bias", "conv_act", "matmul_bias", "matmul_act")


def simplify(g: Graph, rules=RULES) -> tuple[Graph, list[str]]:
    """Apply the SIMPLIFY rules among `rules` until none matches (each removes an op, so this terminates)."""
    chosen = [r for r in rules if r.name in SIMPLIFY]
    applied: list[str] = []
    changed = True
    while changed:
        changed = False
        for rule in chosen:
            m = next(rule.matches(g), None)
            if m is not None:
                g = rule.apply(g, m)
                applied.append(rule.name)
                changed = True
    return g, applied


def lift(g: Graph) -> Graph:
    """Apply the lifts until none matches (each removes its match, so this terminates)."""
    for rule in LIFTS:
        while True:
            m = next(rule.matches(g), None)
            if m is None:
                break
            g = rule.apply(g, m)
    return g
