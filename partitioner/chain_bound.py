"""Branch and bound over a chain's cut points, the fluid LP as the bound: every valid plan's step from below.

The fluid relaxation (partitioner/path_rows.py FluidLp) lets a stage end inside a block. On large
blocks that is most of what it misses: on llama-70b with 8 ranks x 2 chunks an MLP block is a seventh
of a stage, and the best split of whole blocks is a few tenths of a percent slower than the fluid
answer, the CP-SAT relaxation (partitioner/critical_path.py) never proving it. Here the cut points
are branched on instead: cut j (the end of stage j - 1) lies among the chain's prefixes lo_j..hi_j,
and the LP asks for the least T over points of the hull of those prefixes' (forward, backward) work,
every path's row at most T (paths violated at its answer are added, as in fluid_bound). A node
whose LP reaches the threshold is closed; else the cut whose LP point spans the most work splits in
two. A leaf, every cut at one prefix, is a split of whole blocks whose LP value is its step.

A block graph that is not a path is relaxed to one: the blocks of its longest greedy path in block
order are kept, the others cost nothing. Every valid plan is ordered along that path, so it splits
the kept blocks contiguously (stages may be empty in the relaxation), each stage's kept work at most
its own; the step grows with every stage's time and with communication, left out here, so the least
step over the chain's splits bounds every plan's. Leaves below the threshold are handed back as plans
(a dropped block goes with the next kept one), so the search finds plans too.

Under a memory cap the bound is over the plans within it: every rank's parameter state and saved
activations of the kept blocks, linear in the cut points like their work, stay within the cap in
each node's LP (a plan's rank holds at least them), so splits that break it are cut off. A node
whose every split breaks it is infeasible: where none is left, the bound is the threshold (every
split outside the ranges reaches it), the best plan then within the gap.

Every LP solve ends by the deadline (partitioner/glop.py). A node GLOP gives up on (out of time,
or cycling on a degenerate LP) proves nothing more: it keeps its parent's bound, and the search
reports itself incomplete.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import networkx as nx
from ortools.linear_solver import pywraplp

from partitioner.glop import solve_within
from partitioner.path_rows import ActionDag, PathRow, StageUnits, prefix_caps
from partitioner.work_hull import ideal_halfplanes

MAX_ROUNDS = 200  # separation rounds of one node's LP


def chain_blocks(bg) -> list[int]:
    """Blocks of a path through bg in block order: each kept block feeds the next kept one."""
    if not bg.blocks:
        return []
    keep = [0]
    for b in range(1, len(bg.blocks)):
        if bg.graph.has_edge(keep[-1], b):
            keep.append(b)
    return keep


@dataclass(frozen=True)
class ChainBound:
    """Outcome of chain_bound.

    lower_bound_s: no valid plan simulates faster (complete or not);
    complete: every node was closed by its LP, so lower_bound_s is at least the threshold or the best
    leaf (not past the deadline, nor where GLOP gave up on a node: that node keeps its parent's bound);
    nodes: LPs solved in the search.
    """

    lower_bound_s: float
    complete: bool
    nodes: int


@dataclass(frozen=True)
class ChainMemory:
    """The memory cap on the chain's splits: cap_bytes per rank; inflight[r] microbatch-chunks alive on
    rank r at the peak (PlanProblem.inflight), stage k on rank k % len(inflight); static[i], saved[i]:
    the parameter state and saved bytes of the chain's first i blocks."""

    cap_bytes: int
    inflight: list[int]
    static: list[int]
    saved: list[int]


class _CutLp:
    """min T over cut points P_j = sum_i mu[j][i] (F_i, B_i), mu a distribution over prefixes i in
    lo_j..hi_j (the hull of their work), stage sums P_{j+1} - P_j >= 0, every row at most T, and with
    a cap every rank's memory of the chain's blocks within it (cap_rows).
    Counted in whole microbatches of work (units / unit): GLOP's numbers stay near 1."""

    def __init__(self, fq: list[int], bq: list[int], lo: list[int], hi: list[int], rows: dict, units: StageUnits,
                 memory: ChainMemory | None = None):
        K = len(lo) - 1
        self.units = units  # its stage passes (StageUnits.passes)
        self.K, self.unit = K, float(fq[-1] + bq[-1] or 1)
        self.lp = lp = pywraplp.Solver.CreateSolver("GLOP")
        self.mu: list[dict] = []
        self.F, self.B = [0.0], [0.0]
        for j in range(1, K):
            mu = {i: lp.NumVar(0, 1, "") for i in range(lo[j], hi[j] + 1)}
            lp.Add(sum(mu.values()) == 1)
            for out, q in ((self.F, fq), (self.B, bq)):
                out.append(lp.NumVar(0, lp.infinity(), ""))
                lp.Add(out[-1] == sum(q[i] / self.unit * x for i, x in mu.items()))
            self.mu.append(mu)
        self.F.append(fq[-1] / self.unit)
        self.B.append(bq[-1] / self.unit)
        self.f = [self.F[k + 1] - self.F[k] for k in range(K)]
        self.b = [self.B[k + 1] - self.B[k] for k in range(K)]
        for k in range(K):
            lp.Add(self.f[k] >= 0)
            lp.Add(self.b[k] >= 0)
        if memory is not None and K > 1:
            self.cap_rows(memory)
        self.T = lp.NumVar(0, lp.infinity(), "T")
        lp.Minimize(self.T)
        self.keys: set = set()
        for r in rows.values():
            self.add(r)

    def cap_rows(self, memory: ChainMemory) -> None:
        """Rank r's memory (stage_costs.closed_form_rank_mem_bytes) of the chain's blocks at most the cap:
        their parameter state, plus inflight[r] x each of its stages' saved bytes (their max is at least
        each), in caps. A plan's rank holds at least that: the values it keeps across stages, its
        backward transient, tied weights and the blocks off the chain only add to it."""
        K, p, cap = self.K, len(memory.inflight), float(memory.cap_bytes)

        def at(q: list[int]) -> list:
            return [0.0] + [sum(q[i] / cap * x for i, x in mu.items()) for mu in self.mu] + [q[-1] / cap]

        static, saved = at(memory.static), at(memory.saved)
        for r in range(p):
            held = sum(static[k + 1] - static[k] for k in range(r, K, p))
            for k in range(r, K, p):
                self.lp.Add(held + memory.inflight[r] * (saved[k + 1] - saved[k]) <= 1 + 1e-9)  # + rounding

    def add(self, r: PathRow) -> None:
        if r.key[:2] not in self.keys:
            self.keys.add(r.key[:2])
            self.lp.Add(sum(c * x for c, x in zip(r.fwd_count, self.f) if c)
                        + sum(c * x for c, x in zip(r.bwd_count, self.b) if c)
                        + self.units.passes(r) / self.unit - self.T <= 0)

    def restrict(self, lo: list[int], hi: list[int]) -> None:
        for j, mu in enumerate(self.mu, start=1):
            for i, x in mu.items():
                x.SetUb(1.0 if lo[j] <= i <= hi[j] else 0.0)

    def solve(self, dag: ActionDag, rows: dict, key, deadline: float) -> tuple[int, float]:
        """(status, the node's least T in units), adding violated paths (to `rows` too). Status
        OPTIMAL; INFEASIBLE: no point in the ranges; else GLOP gave up (partitioner/glop.py: out of
        time past `deadline`, or cycling), T then the last answer's (0 if none): the LP only grew,
        so it still bounds the node, no more."""
        top = 0.0
        for i in range(MAX_ROUNDS + 1):
            status = solve_within(self.lp, deadline)
            if status != pywraplp.Solver.OPTIMAL:
                return status, top
            top = self.T.solution_value() * self.unit
            if i == MAX_ROUNDS:
                break
            length, r = dag.longest(*self.units.with_passes(*self.stage_units()))
            if length <= top * (1 + 1e-7) or r.key[:2] in self.keys:
                break
            rows.setdefault(key(r), r)
            self.add(r)
        return pywraplp.Solver.OPTIMAL, top

    def stage_units(self) -> tuple[list[float], list[float]]:
        F, B = ([x if isinstance(x, float) else x.solution_value() for x in xs] for xs in (self.F, self.B))
        K, u = self.K, self.unit
        return [(F[k + 1] - F[k]) * u for k in range(K)], [(B[k + 1] - B[k]) * u for k in range(K)]

    def fix(self, lo: list[int], hi: list[int], value: float, threshold: float) -> tuple[list[int], list[int]]:
        """Reduced-cost fixing after solve() answered `value` (units): cut j at prefix i costs at least
        value + the reduced cost of mu[j][i], so the ends of every range that cost the threshold go."""
        lo, hi = list(lo), list(hi)

        def costly(j: int, i: int) -> bool:
            return value + self.mu[j - 1][i].reduced_cost() * self.unit >= threshold

        for j in range(1, self.K):
            while lo[j] <= hi[j] and costly(j, lo[j]):
                lo[j] += 1
            while hi[j] >= lo[j] and costly(j, hi[j]):
                hi[j] -= 1
        return lo, hi

    def support(self, j: int) -> list[tuple[int, float]]:
        """(prefix, weight) of cut j's answer."""
        return [(i, w) for i, x in self.mu[j - 1].items() if (w := x.solution_value()) > 1e-9]


def chain_bound(bg, units: StageUnits, dag: ActionDag, rows: dict, upper_s: float, gap: float, deadline: float,
                key=lambda r: r.key, score: Callable[[list[int]], float] | None = None,
                cap_bytes: int | None = None, inflight: list[int] | None = None) -> ChainBound:
    """A lower bound on every valid plan's simulated step (module docstring): proves the best plan,
    upper_s, within `gap` when it completes at or above upper_s / (1 + gap).

    rows: paths (PathRow by key(row)), the new ones the LPs need added to them. score(assignment):
    the simulated step of a valid plan of bg (inf when it breaks the memory cap); the leaves below
    the threshold are scored and the threshold drops to the best score / (1 + gap); so is every node's
    answer with its cuts at the nearest prefixes. cap_bytes, inflight (PlanProblem's): the bound is
    over the plans within the cap (ChainMemory; without them, over all). Past `deadline` (every LP
    solve ends by it) the bound is the least over the open nodes and the closed ones.
    """
    K, n = dag.num_stages, len(bg.blocks)
    chain = chain_blocks(bg)
    fq, bq = [0], [0]
    for b in chain:
        fq.append(fq[-1] + units.fdev[b])
        bq.append(bq[-1] + units.bdev[b])
    wq = [f + b for f, b in zip(fq, bq)]
    margin = 1 + 2e-6  # the bound is reported 1e-6 low (the LP's tolerance): prove a little more
    threshold = upper_s * units.scale / (1 + gap) * margin
    lo, hi = cut_ranges(units, chain, fq, bq, dag, rows, key, threshold / units.scale, deadline)
    outside = threshold  # the step of every chain split outside the ranges reaches it
    if any(lo[j] > hi[j] for j in range(K + 1)):  # no chain split meets the threshold (fluid relaxation)
        return ChainBound(outside * (1 - 1e-6) / units.scale, True, 0)
    memory = None
    if cap_bytes is not None and cap_bytes > 0 and inflight:
        static, saved = [0], [0]
        for b in chain:
            static.append(static[-1] + bg.blocks[b].param_state_bytes)
            saved.append(saved[-1] + bg.blocks[b].saved_bytes)
        memory = ChainMemory(cap_bytes, list(inflight), static, saved)
    lp = _CutLp(fq, bq, lo, hi, rows, units, memory)
    stack = [(lo, hi, 0.0)]
    closed, nodes, scored, complete = [], 0, set(), True
    while stack:
        if time.perf_counter() > deadline:
            least = min([t for _, _, t in stack] + closed)
            return ChainBound(least * (1 - 1e-6) / units.scale, False, nodes)
        lo, hi, parent = stack.pop()
        lp.restrict(lo, hi)
        status, got = lp.solve(dag, rows, key, deadline)
        nodes += 1
        if status == pywraplp.Solver.INFEASIBLE:
            continue  # no split in these ranges
        top = max(got, parent)
        if status != pywraplp.Solver.OPTIMAL:  # GLOP gave up: the node keeps the bound it has
            closed.append(top)
            complete = False
            continue
        if top >= threshold:
            closed.append(top)
            continue
        lo, hi = lp.fix(lo, hi, got, threshold)
        if any(lo[j] > hi[j] for j in range(1, K)):  # every split here reaches the threshold
            closed.append(threshold)
            continue
        cut = _branch_cut(lp, wq, K)
        if score is not None:  # the answer's cuts at the nearest prefixes: often a good plan
            assign = chain_split_assignment(chain, _rounded_cuts(lp, wq, K), n, K)
            if len(set(assign)) == K and tuple(assign) not in scored:  # no stage empty: a valid plan
                scored.add(tuple(assign))
                threshold = min(threshold, score(assign) * units.scale / (1 + gap) * margin)
        if cut is None:  # a split of whole blocks: its step (no communication) is `top`
            closed.append(top)
            continue
        j, split, left_first = cut
        kids = []
        for side in (0, 1):
            l, h = list(lo), list(hi)
            if side == 0:
                h[j] = split
            else:
                l[j] = split + 1
            for i in range(j + 1, K):  # cuts stay ordered
                l[i] = max(l[i], l[i - 1])
            for i in range(j - 1, 0, -1):
                h[i] = min(h[i], h[i + 1])
            if all(l[i] <= h[i] for i in range(1, K)):
                kids.append((l, h, top))
        stack += kids if not left_first else kids[::-1]  # the side holding more of the answer first
    least = min(closed, default=outside)  # none closed: every split in the ranges breaks the cap
    return ChainBound(least * (1 - 1e-6) / units.scale, complete, nodes)


def cut_ranges(units: StageUnits, chain: list[int], fq: list[int], bq: list[int], dag: ActionDag, rows: dict,
                key, threshold_s: float, deadline: float) -> tuple[list[int], list[int]]:
    """(lo, hi): the prefixes cut j can take in a chain split whose step (no communication) is below
    threshold_s: prefix_caps of the kept blocks (every prefix where they give none: prefix_caps also
    answers None when GLOP fails, no proof that nothing meets the threshold)."""
    N, K = len(chain), dag.num_stages
    lo, hi = [0] * (K + 1), [N] * (K + 1)
    hi[0], lo[K] = 0, N
    fdev = [fq[i + 1] - fq[i] for i in range(N)]
    bdev = [bq[i + 1] - bq[i] for i in range(N)]
    path = nx.DiGraph([(i, i + 1) for i in range(N - 1)])
    path.add_nodes_from(range(N))
    kept = dataclasses.replace(units, fdev=fdev, bdev=bdev, fhost=[0] * N, bhost=[0] * N,
                               cut_halfplanes=tuple(ideal_halfplanes(path, fdev, bdev)))
    caps = prefix_caps(rows, kept, dag, threshold_s, key=key, deadline=deadline)
    if caps is None:
        return lo, hi
    most, after = caps
    wq = [f + b for f, b in zip(fq, bq)]
    for j in range(1, K):  # cut j: stages 0..j-1 hold at most most[j-1], stages j.. at most after[j]
        inside = [i for i in range(N + 1) if wq[i] <= most[j - 1] and wq[N] - wq[i] <= after[j]]
        lo[j], hi[j] = (inside[0], inside[-1]) if inside else (N + 1, -1)  # none: the search ends at once
    for j in range(1, K + 1):
        lo[j] = max(lo[j], lo[j - 1])
    for j in range(K - 1, -1, -1):
        hi[j] = min(hi[j], hi[j + 1])
    return lo, hi


def _branch_cut(lp: _CutLp, wq: list[int], K: int) -> tuple[int, int, bool] | None:
    """(cut, last prefix of the left side, left side first) for the cut whose answer spans the most
    work; None when every cut sits at one prefix."""
    best, widest = None, 0
    for j in range(1, K):
        sup = lp.support(j)
        first, last = sup[0][0], sup[-1][0]
        if first == last or wq[last] - wq[first] <= widest:
            continue
        mass = sum(w for _, w in sup)
        mean = sum(i * w for i, w in sup) / mass
        split = min(max(math.floor(mean), first), last - 1)
        widest = wq[last] - wq[first]
        best = (j, split, sum(w for i, w in sup if i <= split) >= mass / 2)
    return best


def _rounded_cuts(lp: _CutLp, wq: list[int], K: int) -> list[int]:
    """Every cut of the answer at the prefix of its support nearest its work, kept in order."""
    cuts, last = [], 0
    for j in range(1, K):
        sup = lp.support(j)
        work = sum(wq[i] * w for i, w in sup) / sum(w for _, w in sup)
        last = max(last, min((i for i, _ in sup), key=lambda i: abs(wq[i] - work)))
        cuts.append(last)
    return cuts


def chain_split_assignment(chain: list[int], cuts: list[int], n: int, K: int) -> list[int]:
    """Stage of every block of bg when the kept blocks split at `cuts` (prefix counts of stages
    1..K-1); a dropped block goes with the next kept block (the last stage after the last)."""
    stage_of_kept, k = [], 0
    for i in range(len(chain)):
        while k < K - 1 and cuts[k] <= i:
            k += 1
        stage_of_kept.append(k)
    out, nxt = [K - 1] * n, 0
    for b in range(n):
        while nxt < len(chain) and chain[nxt] < b:
            nxt += 1
        out[b] = stage_of_kept[nxt] if nxt < len(chain) else K - 1
    return out
