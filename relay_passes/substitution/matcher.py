"""Find every occurrence of a rule's source pattern in a graph.

A pattern is a list of `P` rows: a name, the op(s) the node may have (None: any value, an external input of
the match), and for a prefix of its inputs the names of the pattern nodes feeding them. Rows are matched in
order; a row is reached either as an input of an already-matched row or as a user of one, so listing the
anchor first keeps matching local. Matched op nodes are distinct; attribute constraints are the rule's
`check`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .graph import Graph


@dataclass(frozen=True)
class P:
    name: str
    op: str | tuple[str, ...] | None = None
    inputs: tuple[str | None, ...] = ()


def _op_ok(p: P, op: str) -> bool:
    return p.op is None or op == p.op or (isinstance(p.op, tuple) and op in p.op)


def match(g: Graph, pattern: tuple[P, ...], anchors=None):
    """Yield {pattern name: node id} for each occurrence (whose first row is in `anchors`, if given)."""
    users = g.users()

    def candidates(k, m):
        p = pattern[k]
        for q in pattern[:k]:
            for pos, name in enumerate(q.inputs):
                if name == p.name and q.name in m:
                    ins = g.nodes[m[q.name]].inputs
                    return [ins[pos]] if pos < len(ins) else []
        for pos, name in enumerate(p.inputs):
            if name in m:
                return [u for u in users[m[name]]
                        if len(g.nodes[u].inputs) > pos and g.nodes[u].inputs[pos] == m[name]]
        return list(g.nodes if anchors is None else anchors)

    def consistent(p, nid, m):
        node = g.nodes[nid]
        if not _op_ok(p, node.op) or len(node.inputs) < len(p.inputs):
            return False
        if p.op is not None and nid in {v for k, v in m.items() if _is_op_row(k)}:
            return False
        return all(name is None or name not in m or m[name] == node.inputs[pos] for pos, name in enumerate(p.inputs))

    op_rows = {p.name for p in pattern if p.op is not None}

    def _is_op_row(name):
        return name in op_rows

    def rec(k, m):
        if k == len(pattern):
            # input links to rows matched later are checked here
            if all(name is None or g.nodes[m[p.name]].inputs[pos] == m[name]
                   for p in pattern for pos, name in enumerate(p.inputs)):
                yield dict(m)
            return
        p = pattern[k]
        for nid in candidates(k, m):
            if consistent(p, nid, m):
                m[p.name] = nid
                yield from rec(k + 1, m)
                del m[p.name]

    yield from rec(0, {})
