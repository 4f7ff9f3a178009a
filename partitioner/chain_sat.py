"""CP-SAT over a chain's cut points: proves every valid plan's step at least a threshold, or finds a faster plan.

The relaxation is chain_bound's (partitioner/chain_bound.py): the blocks of a path through the graph
(chain_blocks) split contiguously into the stages, the other blocks free, communication left out, and
every path's row (partitioner/path_rows.py) at most the step. Here the cuts stay whole blocks: cut j is
an integer prefix count c_j in the range prefix_caps leaves it (cut_ranges), its forward and backward
work the prefix sums at c_j (a one-hot choice of prefix), so a row is linear in them. "Can every row
stay at most the threshold?" is then a small integer program; CP-SAT refutes it where the fluid LP's
branch and bound opens thousands of nodes (identical layers give many splits of equal work, which the
LP cannot tell apart).

The rows come lazily: an answer whose longest path (ActionDag.longest) exceeds the threshold adds that
path and is asked again. An answer within it is a split of whole blocks: as a plan (a dropped block
goes with the next kept one) it is scored, and a faster plan lowers the threshold to its step / (1 +
gap); on a path, where the split is the plan, one no faster (communication the rows leave out) is
forbidden and the question asked again (its step is above the threshold). INFEASIBLE proves the
threshold: no valid plan simulates faster (the integer units are rounded down, so every row stays a
lower bound). Under a memory cap each rank's parameter state and saved activations of the kept blocks
stay within it (as chain_bound's ChainMemory), so the bound is over the plans within the cap.
"""
from __future__ import annotations

import math
import time
from typing import Callable

from ortools.sat.python import cp_model

from partitioner.chain_bound import ChainBound, chain_blocks, chain_split_assignment, cut_ranges
from partitioner.path_rows import ActionDag, PathRow, StageUnits


class _CutModel:
    """c_1 <= ... <= c_{K-1} in their ranges (strict: 0 < c_1 < ... < c_{K-1} < N, no stage empty); F_j, B_j
    their prefix work; every row at most `top`; with `memory` (cap, inflight, static and saved prefix
    bytes) every rank within the cap."""

    def __init__(self, fq: list[int], bq: list[int], lo: list[int], hi: list[int], K: int,
                 memory: tuple[int, list[int], list[int], list[int]] | None, strict: bool, units: StageUnits):
        md = self.model = cp_model.CpModel()
        self.K, self.units = K, units  # units: its stage passes (StageUnits.passes)
        self.cut = [md.NewIntVar(lo[j], hi[j], f"c{j}") for j in range(1, K)]
        self.F, self.B = [0], [0]
        for j, c in enumerate(self.cut, start=1):
            at = {i: md.NewBoolVar("") for i in range(lo[j], hi[j] + 1)}  # one-hot: its LP is the hull
            md.AddExactlyOne(at.values())
            md.Add(c == sum(i * x for i, x in at.items()))
            for out, q in ((self.F, fq), (self.B, bq)):
                out.append(md.NewIntVar(min(q[lo[j]:hi[j] + 1]), max(q[lo[j]:hi[j] + 1]), ""))
                md.Add(out[-1] == sum(q[i] * x for i, x in at.items()))
            md.Add(c >= (self.cut[j - 2] if j > 1 else 0) + (1 if strict else 0))
        if strict and self.cut:
            md.Add(self.cut[-1] <= len(fq) - 2)
        self.F.append(fq[-1])
        self.B.append(bq[-1])
        self.top = md.NewIntVar(0, 16 * (fq[-1] + bq[-1] + K * sum(units.pass_dev)) * (K + 1), "top")
        if memory is not None:
            self._cap(memory)

    def _cap(self, memory: tuple[int, list[int], list[int], list[int]]) -> None:
        """Rank r's parameter state plus inflight[r] x each of its stages' saved bytes at most the cap."""
        cap, inflight, static, saved = memory
        md, K, p = self.model, self.K, len(inflight)

        def at(q: list[int]) -> list:
            out = [0]
            for c in self.cut:
                v = md.NewIntVar(0, q[-1], "")
                md.AddElement(c, q, v)
                out.append(v)
            return out + [q[-1]]

        st, sv = at(static), at(saved)
        for r in range(p):
            held = sum(st[k + 1] - st[k] for k in range(r, K, p))
            for k in range(r, K, p):
                md.Add(held + inflight[r] * (sv[k + 1] - sv[k]) <= cap)

    def add(self, r: PathRow) -> None:
        F, B = self.F, self.B
        self.model.Add(sum(a * (F[k + 1] - F[k]) for k, a in enumerate(r.fwd_count) if a)
                       + sum(a * (B[k + 1] - B[k]) for k, a in enumerate(r.bwd_count) if a)
                       + self.units.passes(r) <= self.top)


def chain_sat_bound(bg, units: StageUnits, dag: ActionDag, rows: dict, upper_s: float, gap: float, deadline: float,
                    key=lambda r: r.key, score: Callable[[list[int]], float] | None = None,
                    cap_bytes: int | None = None, inflight: list[int] | None = None) -> ChainBound:
    """A lower bound on every valid plan's simulated step (module docstring), complete when it proves the
    best plan (upper_s, or a faster one score() found) within `gap`.

    rows: paths (PathRow by key(row)), the new ones added to them. score(assignment): the simulated step
    of a valid plan of bg (inf beyond the memory cap). cap_bytes, inflight (PlanProblem's): the bound is
    over the plans within the cap. Past `deadline`, without score(), or (off a path) at an answer that
    scores no faster than the best plan, it stops incomplete and proves nothing (bound 0).
    """
    K = dag.num_stages
    chain = chain_blocks(bg)
    fq, bq = [0], [0]
    for b in chain:
        fq.append(fq[-1] + units.fdev[b])
        bq.append(bq[-1] + units.bdev[b])

    def threshold(best_s: float) -> int:  # proving this proves best_s within the gap
        return math.ceil(best_s * units.scale / (1 + gap) * (1 + 1e-9))

    top = threshold(upper_s)
    lo, hi = cut_ranges(units, chain, fq, bq, dag, rows, key, top / units.scale, deadline)
    if any(lo[j] > hi[j] for j in range(K + 1)):  # no chain split meets the threshold (fluid relaxation)
        return ChainBound(top / units.scale, True, 0)
    memory = None
    if cap_bytes is not None and cap_bytes > 0 and inflight and K > 1:
        static, saved = [0], [0]
        for b in chain:
            static.append(static[-1] + bg.blocks[b].param_state_bytes)
            saved.append(saved[-1] + bg.blocks[b].saved_bytes)
        if static[-1] + max(inflight) * saved[-1] > cap_bytes:  # else no split of the chain reaches the cap
            memory = (cap_bytes, list(inflight), static, saved)
    path = len(chain) == len(bg.blocks)  # every block on the chain: a split is a plan, no stage empty
    cm = _CutModel(fq, bq, lo, hi, K, memory, strict=path, units=units)
    added: set = set()
    for r in rows.values():
        if r.key[:2] not in added:
            added.add(r.key[:2])
            cm.add(r)
    best_s, solves = upper_s, 0
    while True:
        left_s = deadline - time.perf_counter()
        if left_s <= 0:
            return ChainBound(0.0, False, solves)
        cm.model.Add(cm.top <= top)  # the thresholds only fall: the newest is the one that binds
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = left_s
        solver.parameters.num_workers = 1  # one worker refutes fastest here, and deterministically
        solver.parameters.linearization_level = 2  # the rows' LP over the one-hot prefixes: the fluid's hull
        status = solver.Solve(cm.model)
        solves += 1
        if status == cp_model.INFEASIBLE:
            return ChainBound(top / units.scale, True, solves)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return ChainBound(0.0, False, solves)
        cuts = [solver.Value(c) for c in cm.cut]
        F = [solver.Value(x) if not isinstance(x, int) else x for x in cm.F]
        B = [solver.Value(x) if not isinstance(x, int) else x for x in cm.B]
        length, r = dag.longest(*units.with_passes([F[k + 1] - F[k] for k in range(K)],
                                                   [B[k + 1] - B[k] for k in range(K)]))
        if length > top and r.key[:2] not in added:  # a path the model misses: add it, ask again
            added.add(r.key[:2])
            rows.setdefault(key(r), r)
            cm.add(r)
            continue
        assign = chain_split_assignment(chain, cuts, len(bg.blocks), K)
        if score is None or len(set(assign)) < K:  # its step is not known
            return ChainBound(0.0, False, solves)
        step = score(assign)
        if step < best_s:
            best_s, top = step, min(top, threshold(step))
        elif path:  # the plan is no faster than the best (communication): leave it out, ask again
            cm.model.AddForbiddenAssignments(cm.cut, [tuple(cuts)])
        else:  # other plans share its chain split: nothing more to learn here
            return ChainBound(0.0, False, solves)
