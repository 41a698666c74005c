"""MetaFlow's cost-based backtracking search (Algorithm 1).

A priority queue of graphs ordered by cost; pop the cheapest; apply every rule at every match; a new graph
(by canonical hash) whose cost is below alpha x the best cost so far is queued. alpha = 1 is greedy;
alpha > 1 lets the search walk through slightly worse graphs (an enlarged kernel) to reach better ones
(the merge it enables). Stops after `budget` expansions or when the queue is empty.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from targets.errors import raise_if_interrupted

from .graph import Graph


@dataclass
class SearchResult:
    graph: Graph
    cost: float
    applied: list[str] = field(default_factory=list)  # rule names, in the order they built the best graph
    expansions: int = 0
    seen: int = 0


def steps(graph: Graph, rules, cost, alpha: float = 1.05, budget: int = 300):
    """The search as a generator: it yields each list of graphs it is about to price and returns the
    SearchResult, so a driver (`run_together`) can measure the new kernels of several searches in one compile."""
    yield [graph]
    start = cost(graph)
    best = SearchResult(graph, start)
    tie = itertools.count()
    queue = [(start, next(tie), graph, [])]
    seen = {graph.hash()}
    expansions = 0
    while queue and expansions < budget:
        _, _, g, log = heapq.heappop(queue)
        expansions += 1
        raise_if_interrupted()  # a Ctrl-C inside TVM's type inference comes back as an error
        candidates = []
        for rule in rules:
            for m in list(rule.matches(g)):
                new = rule.apply(g, m)
                h = new.hash()
                if h not in seen:
                    seen.add(h)
                    candidates.append((new, rule.name))
        yield [new for new, _ in candidates]
        for new, name in candidates:
            c = cost(new)
            if c < alpha * best.cost:
                heapq.heappush(queue, (c, next(tie), new, log + [name]))
            if c < best.cost:
                best = SearchResult(new, c, log + [name])
    best.expansions, best.seen = expansions, len(seen)
    return best


def run_together(searches, prefetch=None) -> list:
    """Advance generators like `steps` in lockstep, pricing what all of them yield with one `prefetch` call
    (CostModel.prefetch: one compile for the new kernels of every part of a split graph, not one per part);
    their results."""
    results: list = [None] * len(searches)
    active = dict(enumerate(searches))
    while active:
        wanted = []
        for k, gen in list(active.items()):
            try:
                wanted += next(gen)
            except StopIteration as done:
                results[k] = done.value
                del active[k]
        if wanted and prefetch is not None:
            prefetch(wanted)
    return results


def search(graph: Graph, rules, cost, alpha: float = 1.05, budget: int = 300) -> SearchResult:
    return run_together([steps(graph, rules, cost, alpha, budget)], getattr(cost, "prefetch", None))[0]
