"""Where a plan's cut points can lie: the convex hull of the (forward, backward) work of prefix-closed block sets.

In every valid plan the blocks on stages 0..j-1 form an ideal of the block graph (a set that holds
every predecessor of its blocks: stages are ordered along edges), so the plan's cumulative forward and
backward work (F_j, B_j) up to stage j is the sum over an ideal. On a chain the ideals are the
prefixes, and (F_j, B_j) lies on the curve of prefix sums; the curve bends where blocks differ in their
backward/forward ratio (an embedding's backward is 25 times its forward, a norm's 2.2, a matmul's 1.9).
The fluid relaxation (partitioner/path_rows.py FluidLp) lets stages take any forward/backward mix
within the blocks' range of ratios, much looser than the curve; confining every cut point to the hull
of the ideals' sums keeps every stage's mix near what contiguous runs of blocks have.

The half-planes hold for every DAG: each comes from a support query, the largest weighted sum over
all ideals, a maximum-weight closure (a min cut) over the block graph (on a chain, the best prefix),
so no ideal is missed where the graph branches. The stage passes' fixed cost (BlockGraph.stage_pass)
is no block's work and has no part here: the rows add it (path_rows.StageUnits.passes).
"""
from __future__ import annotations

from ortools.graph.python import max_flow


def _best_ideal(graph, weights: list[int]) -> set[int]:
    """An ideal of `graph` (blocks 0..n-1, edges u -> v meaning v needs u) of largest total weight.

    The maximum-weight closure as a min cut: source -> b (weight) for b > 0, b -> sink (-weight) for
    b < 0, and v -> u unbounded for every edge u -> v; the source side of a min cut is the ideal.
    """
    n = len(weights)
    flow = max_flow.SimpleMaxFlow()
    source, sink = n, n + 1
    unbounded = sum(abs(w) for w in weights) + 1
    flow.add_arc_with_capacity(source, sink, 0)  # both ends exist: without an arc to the sink, ortools
    # answers OPTIMAL with an empty source side
    for b, w in enumerate(weights):
        if w > 0:
            flow.add_arc_with_capacity(source, b, w)
        elif w < 0:
            flow.add_arc_with_capacity(b, sink, -w)
    for u, v in graph.edges():
        flow.add_arc_with_capacity(v, u, unbounded)
    if flow.solve(source, sink) != flow.OPTIMAL:
        raise RuntimeError("max flow failed on the block graph")  # int64 capacities: not expected
    return {b for b in flow.get_source_side_min_cut() if b < n}


def ideal_halfplanes(graph, fwd: list[int], bwd: list[int], max_queries: int = 64) -> list[tuple[int, int, int]]:
    """(a, c, h): a F + c B <= h for the (F, B) = (sum fwd, sum bwd) of every ideal of `graph`.

    fwd, bwd: integer work of every block (exact in integers). Starting from the segment between the
    empty ideal and the whole graph, each edge A -> C of the polygon found so far is pushed out as far
    as the ideals reach to its right (a support query: the ideal farthest from it); its half-plane
    holds every ideal, and the farthest point, if beyond A -> C, splits the edge in two. Within
    max_queries it ends at the exact hull (a few vertices on transformers); past them the half-planes
    found still hold, only less tightly.
    """
    order = list(range(len(fwd)))
    chain = all(graph.has_edge(b, b + 1) for b in order[:-1])  # every ideal is a prefix

    def farthest(a: int, c: int) -> tuple[int, int]:
        weights = [a * f + c * b for f, b in zip(fwd, bwd)]
        if chain:
            best, run, end = 0, 0, 0
            for i, w in enumerate(weights):
                run += w
                if run > best:
                    best, end = run, i + 1
            ideal = range(end)
        else:
            ideal = _best_ideal(graph, weights)
        return sum(fwd[b] for b in ideal), sum(bwd[b] for b in ideal)

    origin, whole = (0, 0), (sum(fwd), sum(bwd))
    if origin == whole:
        return []
    out, edges, queries = [], [(origin, whole), (whole, origin)], 0
    while edges:
        (ax, ay), (cx, cy) = edges.pop()
        dx, dy = cx - ax, cy - ay
        px, py = farthest(dy, -dx)
        queries += 1
        out.append((dy, -dx, dy * px - dx * py))
        if dy * px - dx * py > dy * ax - dx * ay and queries + len(edges) + 2 <= max_queries:
            edges += [((ax, ay), (px, py)), ((px, py), (cx, cy))]
    return out
