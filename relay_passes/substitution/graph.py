"""A small dataflow-graph view of a Relax `main`: what rules match on, rewrite, price and hash.

Every value is a node: function inputs, constants (numpy), literals (shape expressions, global vars and
other non-tensor arguments, kept as Relax expressions), tuples, tuple items and op calls. A call imported
from Relax keeps its original `relax.Call` as a template and is re-emitted with new arguments, so ops no
rule knows (call_tir, packed functions, anything) pass through untouched, never dropped. Graphs are treated
as immutable: a rewrite copies the node table, adds nodes, redirects uses and removes what became dead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.ir import expr as ir_expr

from . import ops

LEAVES = ("input", "const", "literal")
STRUCTURAL = LEAVES + ("tuple", "get_item")  # cost nothing: no kernel behind them


class Unsupported(Exception):
    """The function uses Relax structure the graph view does not model (control flow, nested functions)."""


@dataclass(eq=False)
class Node:
    op: str
    inputs: tuple[int, ...] = ()
    attrs: dict = field(default_factory=dict)
    ty: object = None  # the Relax type of the value
    value: object = None  # input: relax.Var; const: np.ndarray; literal: relax expr; imported call: relax.Call
    _digest: str | None = None
    _tkey: tuple | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.ty.shape.values)

    @property
    def dtype(self) -> str:
        return str(self.ty.dtype)

    @property
    def tkey(self) -> tuple:
        """The value's type as plain data: (shape, dtype), a tuple of those, or its printed form."""
        if self._tkey is None:
            self._tkey = type_key(self.ty)
        return self._tkey

    def with_inputs(self, inputs) -> "Node":
        return Node(self.op, tuple(inputs), self.attrs, self.ty, self.value, _tkey=self._tkey)

    def digest(self) -> str:
        """Hash of what the node is, apart from its inputs (constants by content)."""
        if self._digest is None:
            if self.op == "const":
                content = hashlib.blake2b(self.value.tobytes(), digest_size=16).hexdigest()
                key = (self.value.dtype.str, self.value.shape, content)
            elif self.op == "literal":
                key = tvm_ffi.structural_hash(self.value)
            elif self.op == "input":  # the Var object itself: names may repeat, copies share the Var
                key = (self.value.name, id(self.value))
            else:
                key = (sorted(self.attrs.items(), key=lambda kv: kv[0]),
                       self.value.op.name if isinstance(self.value, relax.Call) and hasattr(self.value.op, "name")
                       else None)
            self._digest = hashlib.blake2b(repr((self.op, key)).encode(), digest_size=16).hexdigest()
        return self._digest


def type_key(ty) -> tuple:
    if hasattr(ty, "fields"):
        return ("tuple",) + tuple(type_key(f) for f in ty.fields)
    try:
        return (tuple(int(d) for d in ty.shape.values), str(ty.dtype))
    except (AttributeError, TypeError):
        return ("other", str(ty))


_TYPES: dict = {}  # (op, attrs, input type keys) -> inferred type: Relax inference costs ~1 ms a call


def python_value(v):
    """Relax attribute values as plain, hashable Python (arrays to tuples, IntImm to int)."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if hasattr(v, "__len__") and not isinstance(v, (str, bytes)):
        return tuple(python_value(x) for x in v)
    if hasattr(v, "value"):
        return v.value
    return str(v)


def attrs_dict(attrs) -> dict:
    if attrs is None or not hasattr(attrs, "__tvm_ffi_type_info__"):
        return {}
    return {f.name: python_value(getattr(attrs, f.name)) for f in attrs.__tvm_ffi_type_info__.fields}


class Graph:
    """Nodes by id, the function's inputs (ids, in order) and the id of its return value."""

    def __init__(self, nodes=None, params=(), output=None, func_attrs=None, next_id=0):
        self.nodes: dict[int, Node] = dict(nodes or {})
        self.params = list(params)
        self.output = output
        self.func_attrs = func_attrs
        self.next_id = next_id
        self._users = None
        self._hash = None
        self._topo = None

    # construction ---------------------------------------------------------------------------------------
    def add(self, node: Node) -> int:
        nid = self.next_id
        self.next_id += 1
        self.nodes[nid] = node
        self._users = self._hash = self._topo = None
        return nid

    def const(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        return self.add(Node("const", ty=relax.TensorType(array.shape, array.dtype.name), value=array))

    def literal(self, expr) -> int:
        return self.add(Node("literal", ty=expr.ty, value=expr))

    def op(self, op: str, inputs, **attrs) -> int:
        """A rule-created op node; its type comes from Relax's own type inference."""
        if op == "tuple":
            ty = relax.TupleType([self.nodes[i].ty for i in inputs])
        elif op == "get_item":
            ty = self.nodes[inputs[0]].ty.fields[attrs["index"]]
        else:
            key = (op, repr(sorted(attrs.items())), tuple(self._arg_key(i) for i in inputs))
            if key not in _TYPES:
                args = [self._typed_arg(i) for i in inputs]
                _TYPES[key] = relax.BlockBuilder().normalize(ops.core_call(op, args, attrs)).ty
            ty = _TYPES[key]
        return self.add(Node(op, tuple(inputs), attrs, ty))

    def _arg_key(self, nid):
        node = self.nodes[nid]
        return node.digest() if node.op == "literal" else node.tkey

    def _typed_arg(self, nid):
        node = self.nodes[nid]
        if node.op == "literal":
            return node.value
        if node.op == "tuple":
            return relax.Tuple([self._typed_arg(i) for i in node.inputs])
        return relax.Var(f"v{nid}", node.ty)

    def copy(self) -> "Graph":
        new = Graph(self.nodes, self.params, self.output, self.func_attrs, self.next_id)
        new._topo, new._users, new._hash = self._topo, self._users, self._hash
        return new

    # queries ----------------------------------------------------------------------------------------------
    def users(self) -> dict[int, list[int]]:
        if self._users is None:
            users: dict[int, list[int]] = {i: [] for i in self.nodes}
            for nid, node in self.nodes.items():
                for i in node.inputs:
                    if nid not in users[i]:
                        users[i].append(nid)
            self._users = users
        return self._users

    def array(self, nid) -> np.ndarray | None:
        node = self.nodes[nid]
        return node.value if node.op == "const" else None

    def topo(self) -> list[int]:
        """Live nodes (reachable from the inputs' and the output's side), producers first."""
        if self._topo is None:
            self._topo = self._walk()
        return self._topo

    def _walk(self) -> list[int]:
        order, state = [], {}
        for root in [*self.params, self.output]:
            stack = [(root, False)]
            while stack:
                nid, done = stack.pop()
                if done:
                    state[nid] = 2
                    order.append(nid)
                    continue
                if state.get(nid):
                    continue
                state[nid] = 1
                stack.append((nid, True))
                stack.extend((i, False) for i in reversed(self.nodes[nid].inputs) if not state.get(i))
        return order

    def op_ids(self) -> list[int]:
        """Nodes that run a kernel, in topological order."""
        return [i for i in self.topo() if self.nodes[i].op not in STRUCTURAL]

    def hash(self) -> str:
        """Canonical hash: equal for graphs computing the same expression DAG, whatever the node ids."""
        if self._hash is None:
            memo = {}
            for nid in self.topo():
                node = self.nodes[nid]
                memo[nid] = hashlib.blake2b(repr((node.digest(), [memo[i] for i in node.inputs])).encode(),
                                            digest_size=16).hexdigest()
            self._hash = memo[self.output]
        return self._hash

    # rewriting --------------------------------------------------------------------------------------------
    def replace(self, mapping: dict[int, int]) -> None:
        """Redirect every use of each key to its value, then drop nodes nothing needs any more."""
        def final(i):
            while i in mapping and mapping[i] != i:
                i = mapping[i]
            return i

        for nid, node in list(self.nodes.items()):
            if any(i in mapping for i in node.inputs):
                self.nodes[nid] = node.with_inputs(final(i) for i in node.inputs)
        self.output = final(self.output)
        self._topo = None
        self.prune()

    def prune(self) -> None:
        live = set(self.topo())
        self.nodes = {i: n for i, n in self.nodes.items() if i in live}
        self._users = self._hash = None  # topo stays valid: it is exactly the live nodes

    # Relax conversion -------------------------------------------------------------------------------------
    @classmethod
    def from_relax(cls, func: relax.Function) -> "Graph":
        g = cls(func_attrs=func.attrs)
        env: dict = {}
        for p in func.params:
            env[p] = g.add(Node("input", ty=p.ty, value=p))
            g.params.append(env[p])
        body = func.body
        if not isinstance(body, relax.SeqExpr):
            raise Unsupported("the function body is not a sequence of bindings")
        for block in body.blocks:
            if not isinstance(block, relax.DataflowBlock) and len(block.bindings):
                raise Unsupported("bindings outside dataflow blocks (possibly impure) are not modelled")
            for binding in block.bindings:
                if not isinstance(binding, relax.VarBinding):
                    raise Unsupported(f"{type(binding).__name__} bindings are not modelled")
                env[binding.var] = g._import(binding.value, env)
        g.output = g._import(body.body, env)
        g.prune()
        return g

    def _import(self, expr, env) -> int:
        if isinstance(expr, relax.Var):
            if expr not in env:
                raise Unsupported(f"free variable {expr.name}")
            return env[expr]
        if isinstance(expr, ir_expr.Constant) and hasattr(expr.value, "numpy"):  # a tensor; scalar immediates
            return self.add(Node("const", ty=expr.ty, value=expr.value.numpy()))  # (slice bounds) are literals
        if isinstance(expr, relax.Tuple):
            fields = [self._import(f, env) for f in expr.fields]
            return self.add(Node("tuple", tuple(fields), ty=expr.ty))
        if isinstance(expr, relax.TupleGetItem):
            src = self._import(expr.tuple_value, env)
            if self.nodes[src].op == "tuple":  # (a, b)[0] is a: BN's (y, mean, var)[0] after decomposition
                return self.nodes[src].inputs[int(expr.index)]
            return self.add(Node("get_item", (src,), {"index": int(expr.index)}, ty=expr.ty))
        if isinstance(expr, relax.Call):
            if isinstance(expr.op, (relax.Function, relax.Var)):
                raise Unsupported("calls of local functions are not modelled")
            args = [self._import(a, env) for a in expr.args]
            name = expr.op.name if isinstance(expr.op, tvm.ir.Op) else f"call:{expr.op}"
            return self.add(Node(name, tuple(args), attrs_dict(expr.attrs), ty=expr.ty, value=expr))
        if isinstance(expr, (relax.Function, relax.If, relax.SeqExpr)):
            raise Unsupported(f"{type(expr).__name__} inside main is not modelled")
        return self.add(Node("literal", ty=getattr(expr, "ty", None), value=expr))

    def to_relax(self) -> relax.Function:
        """Emit the graph as a Relax function with one dataflow block, via BlockBuilder."""
        bb = relax.BlockBuilder()
        params = [self.nodes[i].value for i in self.params]
        attrs = dict(self.func_attrs.items()) if self.func_attrs is not None else None
        with bb.function("main", params, attrs=attrs):
            with bb.dataflow():
                env: dict[int, object] = {}
                for nid in self.topo():
                    env[nid] = self._emit(bb, nid, env)
                out = bb.emit_output(env[self.output])
            bb.emit_func_output(out)
        return bb.get()["main"]

    def _emit(self, bb, nid, env):
        node = self.nodes[nid]
        if node.op in ("input", "literal"):
            return node.value
        if node.op == "const":
            return relax.const(node.value, node.value.dtype.name)
        if node.op == "tuple":
            return relax.Tuple([env[i] for i in node.inputs])
        if node.op == "get_item":
            src = env[node.inputs[0]]
            if isinstance(src, relax.Tuple):
                return src.fields[node.attrs["index"]]
            return bb.emit(relax.TupleGetItem(src, node.attrs["index"]))
        args = [env[i] for i in node.inputs]
        if isinstance(node.value, relax.Call):
            call = node.value
            return bb.emit(relax.Call(call.op, args, call.attrs, call.ty_args))
        return bb.emit(ops.emitter(node.op)(bb, args, node.attrs))

    # parts ------------------------------------------------------------------------------------------------
    def subgraph(self, ids: set[int]) -> tuple["Graph", list[int], list[int]]:
        """The part made of `ids` as a graph of its own: (part, ids its inputs stand for, ids its outputs are).

        Values flowing in become inputs (constants and literals are copied in); values used outside the part
        or returned by the function become the part's outputs, as one tuple.
        """
        users = self.users()
        part = Graph(func_attrs=None)
        local: dict[int, int] = {}
        outer_inputs: list[int] = []
        for nid in self.topo():
            if nid not in ids:
                continue
            node = self.nodes[nid]
            for i in node.inputs:
                if i in local:
                    continue
                src = self.nodes[i]
                if src.op in ("const", "literal"):
                    local[i] = part.add(src)
                else:
                    local[i] = part.add(Node("input", ty=src.ty, value=relax.Var(f"p{i}", src.ty)))
                    part.params.append(local[i])
                    outer_inputs.append(i)
            local[nid] = part.add(node.with_inputs(local[i] for i in node.inputs))
        outputs = [i for i in ids if i == self.output or any(u not in ids for u in users[i])]
        outputs.sort()
        part.output = part.op("tuple", [local[i] for i in outputs])
        part.prune()
        return part, outer_inputs, outputs

    def inline(self, part: "Graph", outer_inputs: list[int], outputs: list[int]) -> dict[int, int]:
        """Put a (rewritten) part back: its inputs bound to `outer_inputs`, its outputs replacing `outputs`;
        {old output id: the id now standing for it}."""
        local = dict(zip(part.params, outer_inputs))
        for nid in part.topo():
            if nid not in local:
                node = part.nodes[nid]
                local[nid] = self.add(node.with_inputs(local[i] for i in node.inputs))
        results = part.nodes[part.output].inputs
        mapping = {old: local[new] for old, new in zip(outputs, results)}
        self.replace(mapping)
        return mapping
