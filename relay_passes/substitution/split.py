"""Cut large graphs at a minimum vertex cut so each part is searched on its own (MetaFlow section 5.3).

An op's capacity is 1 + the number of rule matches that span it (contain it and one of its consumers):
cutting there forbids those rewrites, so the cheapest cut loses the fewest. Max-flow
(scipy.sparse.csgraph.maximum_flow) runs on the op graph with each op split into in/out nodes joined by its
capacity; the first third of the ops (in topological order) hang off the source, the last third feed the
sink. Edges back from consumer to producer have infinite capacity, so the source side is closed under
producers: the upstream part never needs a value of the downstream one, and the parts compose in order.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

from .graph import Graph
from .search import run_together

INF = 1 << 30


def capacities(g: Graph, rules) -> dict[int, int]:
    """1 + the number of rule matches holding an op and one of the ops it feeds.

    Matches one rewrite away count too, on the ops the rewrite replaced: conv -> add -> relu has no match
    across add -> relu until the bias is folded into the conv, and a cut there would forbid that fusion.
    """
    cap = {i: 1 for i in g.op_ids()}
    consumers = {v: _op_consumers(g, v) for v in cap}

    def count(ids):
        for v in ids:
            if consumers[v] & ids:
                cap[v] += 1

    for rule in rules:
        for m in rule.matches(g):
            count({v for v in rule.inside(m) if v in cap})
            after, mapping = rule.rewrite(g, m)
            origin = {new: old for old, new in mapping.items() if old in cap}
            fresh = {i for i in after.nodes if i >= g.next_id}
            for rule2 in rules:
                for m2 in rule2.matches(after, _near(after, fresh)):
                    ids = {origin.get(v, v) for v in rule2.inside(m2)}
                    if ids & set(origin.values()):
                        count({v for v in ids if v in cap})
    return cap


def _near(g: Graph, ids: set[int], hops: int = 3) -> set[int]:
    """Nodes within `hops` edges of `ids`, either direction: where a match touching them can be anchored."""
    users = g.users()
    near, frontier = set(ids), set(ids)
    for _ in range(hops):
        frontier = {j for i in frontier for j in (*g.nodes[i].inputs, *users[i])} - near
        near |= frontier
    return near


def _op_consumers(g: Graph, v: int) -> set[int]:
    """The op nodes reading v, looking through tuples and tuple items."""
    users = g.users()
    out, stack = set(), list(users[v])
    while stack:
        u = stack.pop()
        if g.nodes[u].op in ("tuple", "get_item"):
            stack.extend(users[u])
        else:
            out.add(u)
    return out


def min_cut(g: Graph, order: list[int], cap: dict[int, int]) -> set[int] | None:
    """The upstream part of the ops `order` (topological, producers closed), or None if no finite cut exists."""
    n = len(order)
    if n < 6:
        return None
    index = {v: k for k, v in enumerate(order)}
    src, sink = 2 * n, 2 * n + 1
    rows, cols, caps = [], [], []

    def edge(a, b, c):
        rows.append(a), cols.append(b), caps.append(c)

    for v in order:
        k = index[v]
        # tuple-valued ops (split) stay whole with their item readers: never a cut
        edge(2 * k, 2 * k + 1, cap[v] if not hasattr(g.nodes[v].ty, "fields") else INF)
        for u in _op_producers(g, v):
            if u in index:
                edge(2 * index[u] + 1, 2 * k, INF)
                edge(2 * k, 2 * index[u] + 1, INF)
    for k in range(n // 3):
        edge(src, 2 * k, INF)
        edge(2 * (n - 1 - k) + 1, sink, INF)
    graph = csr_matrix((np.array(caps, np.int64), (rows, cols)), shape=(2 * n + 2,) * 2)
    flow = maximum_flow(graph, src, sink)
    if flow.flow_value >= INF:
        return None
    residual = (graph - flow.flow).tocsr()
    reach, stack = {src}, [src]
    while stack:
        a = stack.pop()
        lo, hi = residual.indptr[a], residual.indptr[a + 1]
        for b, c in zip(residual.indices[lo:hi], residual.data[lo:hi]):
            if c > 0 and b not in reach:
                reach.add(b)
                stack.append(b)
    upstream = {v for v in order if 2 * index[v] in reach}
    return upstream if 0 < len(upstream) < n else None


def _op_producers(g: Graph, v: int) -> set[int]:
    """The op nodes feeding v, looking through tuples and tuple items."""
    out, stack = set(), list(g.nodes[v].inputs)
    while stack:
        i = stack.pop()
        node = g.nodes[i]
        if node.op in ("tuple", "get_item"):
            stack.extend(node.inputs)
        elif node.op not in ("input", "const", "literal"):
            out.add(i)
    return out


def _with_structure(g: Graph, parts: list[set[int]]) -> list[set[int]]:
    """Give each tuple / tuple item to the part all of whose users are in it (else it stays between parts)."""
    users = g.users()
    parts = [set(p) for p in parts]
    for nid in reversed(g.topo()):
        if g.nodes[nid].op in ("tuple", "get_item") and users[nid]:
            for part in parts:
                if all(u in part for u in users[nid]):
                    part.add(nid)
                    break
    return parts


def partition(g: Graph, rules, threshold: int) -> list[set[int]]:
    """Node-id sets, upstream first, each with at most `threshold` ops where a cut could be found."""
    cap = capacities(g, rules)

    def cut(order):
        upstream = min_cut(g, order, cap) if len(order) > threshold else None
        if upstream is None:
            return [set(order)]
        return cut([v for v in order if v in upstream]) + cut([v for v in order if v not in upstream])

    return _with_structure(g, cut(g.op_ids()))


def split_search(g: Graph, rules, run, threshold: int, prefetch=None):
    """Search the parts of `g` with `run(part)`, a generator like search.steps returning (graph, applied),
    all in lockstep (search.run_together: `prefetch` prices what they yield together), then put each result
    back in place of its part (the parts were cut from `g` itself: a part's search only sees shapes from
    outside it, which the other parts' rewrites keep)."""
    parts = partition(g, rules, threshold)
    extracted = [g.subgraph(ids) for ids in parts if ids]
    found = run_together([run(part) for part, _, _ in extracted], prefetch)
    current, moved, applied_all = g.copy(), {}, []
    for (_, outer_in, outs), (new, applied) in zip(extracted, found):
        moved.update(current.inline(new, [moved.get(i, i) for i in outer_in], outs))
        applied_all.extend(applied)
    return current, applied_all, len(parts)
