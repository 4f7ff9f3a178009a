"""The partition ILP, solved with OR-Tools CP-SAT.

Blocks b, virtual stages k = 0..K-1 (K = p * v), stage k on rank k % p.
- Order encoding: y[b,k] boolean = (stage(b) >= k), y[b,k+1] <= y[b,k];
  x[b,k] = y[b,k] - y[b,k+1] is a linear expression, not a variable. Along
  every edge u -> v (transitive reduction only) y[u,k] <= y[v,k]; every stage
  holds a block. y is fixed outside each block's stage domain (_domains).
- Paths (block b feeds b + 1 for all b, the usual case) have contiguous stages,
  s(b+1) - s(b) is 0 or 1 (clauses y[b+1,k+1] -> y[b,k] keep stages
  non-empty), and a value b -> b+1 crosses into k iff y[b+1,k] - y[b,k] = 1:
  a linear term, no extra variable.
- Stage time t_k = c_k + l_k: compute c_k = sum_b (fwd+bwd)_b x[b,k], and the
  latency l_k of receiving every value that crosses into k from another rank,
  paid once per value and destination stage: z[c,k] >= x[consumer,k] -
  sum_{j = k mod p, j <= k} x[producer,j]. Values the graph outputs must reach the last
  stage. Sends overlap compute (as in the simulator), so with one stage per
  rank communication delays the pipeline's fill and drain but not the steady
  state, unless a link is busier than its rank: M >= l_k.
- Rank time T_r = sum_{k on r} c_k <= M (v = 1), or sum_{k on r} t_k <= M
  (v > 1: Megatron's fixed interleaved order waits on every hop in the steady
  state too, which the simulator confirms).
- Objective (per step, + all-reduce of replicated tied parameters):
  v = 1: (m - 1) M + sum_k t_k, the 1F1B/GPipe critical path (first microbatch
  through every stage, then m - 1 times the bottleneck); equals (m + p - 1) t
  for p equal stages of time t.
  v > 1: m M + (p - 1) S with S >= t_k the largest stage; equals Megatron's
  m t + (p - 1) t / v for equal chunks (t = v S per rank). The (p - 1) S term
  matters: the schedule's fixed order stalls on an uneven chunk, and the
  looser m M + (sum_k t_k - M) / v let the solver pile a rank's work into one
  chunk, which the simulator scored well below even splits (benchmarks/RESULTS.md).
- Memory of rank r: its blocks' param+grad+optimizer bytes, one copy of every
  shared parameter a block on r reads, and saved activations x the microbatch-
  chunks in flight (warm-up + 1 of the schedule): exactly the stage's for v = 1,
  conservatively W_r x the rank's largest stage for v > 1. <= cap. A stage's
  activations include the values it sends or receives that none of its own
  blocks saves (the executor holds them until the backward; partitioner/stage_scorer.py
  says when), one boolean per value and stage where they can occur.
- Shared parameters: rep_s boolean; without it all users sit on one rank
  (sum_r h[s,r] <= 1), with it every holder pays the memory and the step pays
  an all-reduce of 2 * bytes / link bandwidth. The solver picks.
Incumbent and pruning: the chain DP splits (partitioner/chain_dp.py, by time
with receives and by compute) and the baselines' splits are scored by the
model's objective (_model_objective); the best one within the memory cap is a
complete hint and its objective U an upper bound. Any better solution has
every stage's compute <= C (v = 1: (U - total) / (m - 1); v > 1: (U - m *
M_lb) / (p - 1)), so block b, whose ancestors fill stages 0..s(b), needs
s(b) >= ceil(work(b and ancestors) / C) - 1, and likewise towards the end.
On large graphs this leaves each block two or three stages (benchmarks/
RESULTS.md has the figures). The result is exact: the pruned model still holds the incumbent, and what it cuts
off is worse than it. Lower bounds on M and S come from the average and, for
paths, the chain DP's bottleneck.

The objective is a closed form; the event simulator is the judge. So the
solver's solution and every seed are polished by a local search on the
simulated step time (partitioner/refine.py): move a block, or shift a range of
stage boundaries together, while the move keeps stages ordered, non-empty and
within the memory cap and the simulator says the step gets faster; a third of
the time goes to the seeds alike, the rest to the best (with random kicks once
it stops). The polish gets 70% of time_limit_s where no exact search follows
(interleaving, branchy graphs): there the closed form misjudges most
(benchmarks/RESULTS.md). For one stage per rank
(1f1b) on a path-shaped graph every valid plan is a contiguous split, and a
branch and bound over them (partitioner/exact.py) then starts from the polished
plan and replaces it only by a faster split within the cap; solver_status gains
"+exact(optimal)" (or "+exact(incomplete)": out of time) when it did, "+optimal"
when it proved the polished plan the best split. Where that proof is missing
(interleaving, branchy graphs, gpipe) critical-path row generation
(partitioner/critical_path.py) follows: a lower bound on the simulated step of
every valid plan within the cap, and a faster plan where it finds one
(solver_status gains "+paths"). Plan.step_lower_bound_s reports the bound (the
exact search's where it finished). time_limit_s bounds the whole of solve():
building, solving, the polish, the exact search (at most EXACT_TIME_CAP_S of it)
and the row generation (the rest, at most PATHS_TIME_CAP_S).

gap (default 1%) ends the search early once the plan is proven within it: it is
CP-SAT's relative gap limit; for 1f1b on paths the polish stops at a plan within
it of pipeline_bound_s (known before the polish) and the exact search is skipped
then, else it drops partial splits whose bound is within it of the best; the row
generation stops within it. Where no bound comes that close, time_limit_s ends it.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
from ortools.sat.python import cp_model

from partitioner.chain_dp import split_chain
from partitioner.critical_path import DEFAULT_TOL as PATHS_TOL
from partitioner.critical_path import path_bound_solve
from partitioner.errors import PlanError
from partitioner.exact import best_split_s, pipeline_bound_s, split_assignment, split_cuts
from partitioner.plan import (DEFAULT_LINK_BW_BYTES_PER_S, Plan, check_config, check_gap, evaluate_assignment,
                              inflight_microbatches)
from partitioner.refine import refine

_TIME_UNITS = 1_000_000  # total work is scaled to about this many integer units
_MEM_LIMIT = 1 << 52  # bytes are exact below this total, scaled above
EXACT_TIME_CAP_S = 10.0  # most time the exact split search after refine takes
PATHS_TIME_CAP_S = 30.0  # most time the critical-path row generation after them takes
PATHS_MIN_TIME_S = 0.5  # less time left than this: no row generation
DEFAULT_GAP = 0.01  # stop once the plan is proven within this fraction of a lower bound


@dataclass
class _Ilp:
    """The CP-SAT model and how to read and seed it.

    y[b][k] = stage(b) >= k, for k = 0..K: the int 1 or 0 where fixed, else a BoolVar.
    rules: (var, expr, div) for every variable other than y: the smallest value the
    constraints allow is max(its lower bound, ceil(expr / div)) over its rules, so a
    full hint follows from y alone (see _hint).
    """

    model: cp_model.CpModel
    y: list[list]
    rank_mem: list  # linear expressions in memory units
    objective: object
    time_scale: float
    mem_scale: float
    rules: list[tuple[cp_model.IntVar, object, int]]
    stage_sum: object = None  # stage_sum(k, weights): sum_b weights[b] x[b,k] as a linear expression
    allreduce: list = field(default_factory=list)  # (seconds, rep): a replicated tied weight's all-reduce

    def assignment(self, value) -> list[int]:
        """Stage of every block, with value(var) reading a solution."""
        return [sum(e if isinstance(e, int) else value(e) for e in row[1:-1]) for row in self.y]


def on_stage(y: list[list], b: int, k: int):
    """x[b,k] = y[b][k] - y[b][k + 1]: 1 iff block b sits on stage k (an int where fixed)."""
    return y[b][k] - y[b][k + 1]


def _is_var(e) -> bool:
    return not isinstance(e, int)


def _imply(md: cp_model.CpModel, a, b) -> None:
    """a <= b for literals or the constants 0/1."""
    if _is_var(a) and _is_var(b):
        md.AddImplication(a, b)
    elif _is_var(a) or _is_var(b):
        md.Add(a <= b)
    elif a > b:
        md.AddBoolOr([])  # infeasible; the caller reports it


def _closure(bg) -> tuple[list[int], list[int]]:
    """Bitsets of the ancestors and of the descendants of every block (ids are topological)."""
    n = len(bg.blocks)
    anc, desc = [0] * n, [0] * n
    for b in range(n):
        for u in bg.graph.predecessors(b):
            anc[b] |= anc[u] | (1 << u)
    for b in reversed(range(n)):
        for s in bg.graph.successors(b):
            desc[b] |= desc[s] | (1 << s)
    return anc, desc


def _bit_sums(bits: list[int], wv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per bitset: how many bits it has and the sum of wv over them (one row at a time: O(n) memory)."""
    n, nbytes = len(wv), max(1, (len(wv) + 7) // 8)
    counts, sums = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for i, x in enumerate(bits):
        row = np.unpackbits(np.frombuffer(x.to_bytes(nbytes, "little"), dtype=np.uint8), bitorder="little")[:n]
        counts[i], sums[i] = row.sum(), row @ wv
    return counts, sums


def _domains(bg, K: int, w: list[int], stage_cap: int | None, anc: list[int], desc: list[int],
             path: bool, prefix: tuple[list[int], list[int]] | None = None) -> list[range]:
    """Stages block b can take.

    Every stage before b's holds a block that is not b's descendant, every stage
    after it one that is not b's ancestor. With stage_cap (the most compute a
    stage holds in any solution better than the incumbent) b and its ancestors
    also fill stages 0..s(b): s(b) >= ceil(work / cap) - 1, and b and its
    descendants stages s(b)..K-1. prefix (most[j], most_after[j]) generalises it:
    the most work stages 0..j, and stages j..K-1, hold.
    """
    n, wv = len(bg.blocks), np.asarray(w, dtype=np.int64)
    if path:  # ancestors are exactly the lower ids, descendants the higher ones
        n_anc, n_desc = np.arange(n), n - 1 - np.arange(n)
        w_anc = np.concatenate([[0], np.cumsum(wv)])[:n]
        w_desc = wv.sum() - w_anc - wv
    else:
        (n_anc, w_anc), (n_desc, w_desc) = _bit_sums(anc, wv), _bit_sums(desc, wv)
    out = []
    for b in range(n):
        lo, hi = max(0, K - n + int(n_anc[b])), min(K - 1, n - 1 - int(n_desc[b]))
        if stage_cap is not None and stage_cap > 0:
            lo = max(lo, -(-(int(w_anc[b]) + w[b]) // stage_cap) - 1)
            hi = min(hi, K - -(-(int(w_desc[b]) + w[b]) // stage_cap))
        if prefix is not None:
            before, after = int(w_anc[b]) + w[b], int(w_desc[b]) + w[b]
            lo = max(lo, next((j for j in range(K) if prefix[0][j] >= before), K))
            hi = min(hi, next((j for j in reversed(range(K)) if prefix[1][j] >= after), -1))
        out.append(range(lo, hi + 1))
    return out


def _time_units(bg) -> tuple[list[int], float]:
    """Integer fwd+bwd time of every block (total about _TIME_UNITS) and the scale (units per second)."""
    ts = _TIME_UNITS / (sum(b.time_s for b in bg.blocks) or 1.0)
    return [round(b.time_s * ts) for b in bg.blocks], ts


def _time_lower_bounds(w: list[int], p: int, v: int, path: bool) -> tuple[int, int]:
    """Lower bounds on the busiest rank's and the largest stage's time (units).

    Average work; for paths also the best contiguous split's bottleneck, which is
    exact for the largest stage and, for v = 1, for the busiest rank.
    """
    K, total = p * v, sum(w)
    lb_rank, lb_stage = -(-total // p), -(-total // K)
    if path:
        lb_stage = max(lb_stage, int(split_chain(w, K).bottleneck))
        if v == 1:
            lb_rank = max(lb_rank, lb_stage)
    return lb_rank, lb_stage


def _stage_cap(upper: int | None, w: list[int], p: int, v: int, m: int, path: bool) -> tuple[int | None, int | None]:
    """(most compute of one stage, largest M) in any solution with objective <= upper."""
    if upper is None:
        return None, None
    lb_rank, lb_stage = _time_lower_bounds(w, p, v, path)
    if v == 1:  # objective >= (m - 1) M + total, and every stage's compute <= M
        if m == 1:
            return None, None
        top = (upper - sum(w)) // (m - 1)
        return top, top
    if p == 1:
        return None, None
    # objective >= m M + (p - 1) S, and every stage's compute <= S
    return (upper - m * lb_rank) // (p - 1), (upper - (p - 1) * lb_stage) // m


def _model_objective(bg, assign: list[int], p: int, v: int, m: int, bw: float, w: list[int], ts: float) -> int:
    """The ILP's objective (integer units) of a valid assignment, computed directly."""
    K = p * v
    c, lat = [0] * K, [0] * K
    for b, k in enumerate(assign):
        c[k] += w[b]
    if p > 1:
        for val in bg.values:
            cost = round(val.bytes / bw * ts)
            if cost <= 0:
                continue
            j = assign[val.producer]
            for k in {assign[x] for x in val.consumers} | ({K - 1} if val.to_output else set()):
                if k % p != j % p:
                    lat[k] += cost
    t = [a + b for a, b in zip(c, lat)]
    busy = t if v > 1 else c
    top = max([sum(busy[r::p]) for r in range(p)] + lat)
    allreduce = sum(round(2 * sp.bytes / bw * ts) for sp in bg.shared_params
                    if sp.trainable and len({assign[b] % p for b in sp.blocks}) > 1)
    if v == 1:
        return (m - 1) * top + sum(t) + allreduce
    return m * top + (p - 1) * max(t) + allreduce


def _build(bg, p: int, v: int, m: int, schedule: str, bw: float, cap: int | None,
           with_time: bool = True, upper: int | None = None,
           domain_cap: tuple[list[int], list[int], list[int]] | None = None,
           need_memory: bool | None = None) -> _Ilp:
    """The model; with `upper` (an incumbent's objective) only solutions at least as good remain.

    need_memory (default: a cap is given): model the values stages hold at their boundaries
    (extra booleans); without it rank_mem leaves them out.

    domain_cap (weights, most, most_after): prune the stage domains as if stages 0..j held at most
    most[j] of the weights and stages j..K-1 at most most_after[j] (_domains), in place of the
    pruning `upper` gives; the caller vouches for it.
    """
    K, n = p * v, len(bg.blocks)
    if need_memory is None:
        need_memory = cap is not None
    w, ts = _time_units(bg)
    total_w = sum(w)
    total_mem = sum(b.param_state_bytes + b.saved_bytes * m * v + b.bwd_working_bytes for b in bg.blocks) + \
        sum(s.state_bytes * p for s in bg.shared_params) + 2 * m * v * sum(val.bytes for val in bg.values)
    mem_scale = min(1.0, _MEM_LIMIT / max(total_mem, 1))
    md = cp_model.CpModel()
    rules: list = []
    path = bg.is_path()
    anc, desc = _closure(bg)
    stage_cap, top_cap = _stage_cap(upper if with_time else None, w, p, v, m, path)
    if domain_cap is not None:
        dom = _domains(bg, K, domain_cap[0], None, anc, desc, path, domain_cap[1:])
    else:
        dom = _domains(bg, K, w, stage_cap, anc, desc, path)
    if upper is not None and any(len(d) == 0 for d in dom):
        raise _NoSplit()
    if any(len(d) == 0 for d in dom):
        md.AddBoolOr([])  # the graph's order leaves a stage empty: infeasible
    y = [[1 if k <= dom[b].start else 0 if k >= dom[b].stop else md.NewBoolVar(f"y{b}_{k}")
          for k in range(K + 1)] for b in range(n)]
    for b in range(n):
        for k in range(dom[b].start + 1, dom[b].stop - 1):
            md.AddImplication(y[b][k + 1], y[b][k])
    # precedence on the transitive reduction (an edge implied by a longer path adds nothing)
    for u, wb in bg.graph.edges:
        if any(anc[o] >> u & 1 for o in bg.graph.predecessors(wb) if o != u):
            continue
        for k in range(1, K):
            _imply(md, y[u][k], y[wb][k])

    def x(b: int, k: int):
        return on_stage(y, b, k)

    def stage_sum(k: int, weights: list[int]):
        """sum_b weights[b] * x[b,k] as one weighted sum."""
        vs, cs, const = [], [], 0
        for j, sign in ((k, 1), (k + 1, -1)):
            for b in range(n):
                e = y[b][j]
                if weights[b] == 0:
                    continue
                if _is_var(e):
                    vs.append(e)
                    cs.append(sign * weights[b])
                else:
                    const += sign * weights[b] * e
        return cp_model.LinearExpr.WeightedSum(vs, cs) + const

    if path:  # consecutive blocks differ by at most one stage, so none is left empty
        for b in range(n - 1):
            for k in range(1, K - 1):
                _imply(md, y[b + 1][k + 1], y[b][k])
    else:
        for k in range(K):
            md.Add(stage_sum(k, [1] * n) >= 1)

    c = [stage_sum(k, w) for k in range(K)]
    lat: list = [0] * K
    if p > 1 and with_time:
        for ci, val in enumerate(bg.values):
            cost = round(val.bytes / bw * ts)
            if cost <= 0:
                continue
            u = val.producer
            if path and tuple(val.consumers) == (u + 1,) and not val.to_output:
                # s(u+1) - s(u) is 0 or 1: the value crosses into k iff s(u) < k <= s(u+1)
                for k in range(1, K):
                    if _is_var(y[u + 1][k]) or _is_var(y[u][k]) or y[u + 1][k] != y[u][k]:
                        lat[k] += cost * (y[u + 1][k] - y[u][k])
                continue
            for k, need in _readers(val, dom, x, K).items():
                # the producer on k's rank at a stage <= k (for v = 1: at k, i.e. s(u) >= k)
                same = y[u][k] if v == 1 else sum(x(u, j) for j in range(k % p, k + 1, p) if j in dom[u])
                if not _is_var(same) and all(not _is_var(e) for e in need):
                    lat[k] += cost * max(0, max(need) - same)
                    continue
                z = md.NewBoolVar(f"z{ci}_{k}")
                for e in need:
                    md.Add(z >= e - same)
                    rules.append((z, e - same, 1))
                lat[k] += cost * z
    t = [c[k] + lat[k] for k in range(K)]

    # shared parameters: holders per rank, replicate or co-locate
    allreduce, reps = [], []
    holds: list[list[tuple]] = [[] for _ in range(p)]
    for si, sp in enumerate(bg.shared_params):
        h = [md.NewBoolVar(f"h{si}_{r}") for r in range(p)]
        for b in sp.blocks:
            for k in dom[b]:
                md.Add(h[k % p] >= x(b, k))
                rules.append((h[k % p], x(b, k), 1))
        rep = md.NewBoolVar(f"rep{si}")
        md.Add(sum(h) <= 1 + (p - 1) * rep)
        rules.append((rep, sum(h) - 1, max(1, p - 1)))
        if sp.trainable:
            allreduce.append(round(2 * sp.bytes / bw * ts) * rep)
            reps.append((2 * sp.bytes / bw, rep))
        for r in range(p):
            holds[r].append((sp.state_bytes, h[r]))

    # memory per rank
    inflight = inflight_microbatches(schedule, p, m, v)
    static_w = [int(b.param_state_bytes * mem_scale + 0.999) for b in bg.blocks]
    saved_w = [int(b.saved_bytes * mem_scale + 0.999) for b in bg.blocks]
    held = _held_bytes(md, bg, K, p, dom, x, mem_scale, rules) if need_memory else [0] * K
    held_max = 2 * sum(int(val.bytes * mem_scale + 0.999) for val in bg.values) if need_memory else 0
    work_w = [int(b.bwd_working_bytes * mem_scale + 0.999) for b in bg.blocks]
    on_rank: list[list[tuple[int, int]]] = [[] for _ in range(p)]  # (block, stage) pairs that can land on a rank
    for b, wb in enumerate(work_w):
        for k in dom[b] if wb > 0 else ():
            on_rank[k % p].append((b, k))
    rank_mem = []
    for r in range(p):
        static = sum(stage_sum(k, static_w) for k in range(r, K, p))
        static += sum(int(sb * mem_scale + 0.999) * h for sb, h in holds[r])
        saved = [stage_sum(k, saved_w) + held[k] for k in range(r, K, p)]
        if len(saved) == 1:
            act = inflight[r] * saved[0]
        else:
            z = md.NewIntVar(0, sum(saved_w) + held_max, f"act{r}")
            for s in saved:
                md.Add(z >= s)
                rules.append((z, s, 1))
            act = inflight[r] * z
        work = 0  # the largest backward transient among the rank's blocks
        if on_rank[r]:
            work = md.NewIntVar(0, max(work_w), f"work{r}")
            for b, k in on_rank[r]:
                md.Add(work >= work_w[b] * x(b, k))
                rules.append((work, work_w[b] * x(b, k), 1))
        rank_mem.append(static + act + work)
        if cap is not None:
            md.Add(static + act + work <= int(cap * mem_scale))

    objective = 0
    if with_time:
        hi = total_w + 10 * _TIME_UNITS * K
        busy = t if v > 1 else c  # see the module docstring
        # lower bounds: average work; for paths the best contiguous split's bottleneck
        # (v = 1: the busiest rank holds one stage; v > 1: the largest chunk)
        lb_rank, lb_stage = _time_lower_bounds(w, p, v, path)
        top = md.NewIntVar(lb_rank, max(lb_rank, min(hi, top_cap if top_cap is not None else hi)), "M")
        for r in range(p):
            rank_busy = sum(busy[k] for k in range(r, K, p))
            md.Add(top >= rank_busy)
            rules.append((top, rank_busy, 1))
        for k in range(K):
            if not isinstance(lat[k], int) or lat[k] > 0:
                md.Add(top >= lat[k])
                rules.append((top, lat[k], 1))
        if v == 1:
            objective = (m - 1) * top + sum(t) + sum(allreduce)
        else:
            biggest = md.NewIntVar(lb_stage, max(lb_stage, min(hi, stage_cap if stage_cap is not None else hi)), "S")
            for k in range(K):
                md.Add(biggest >= t[k])
                rules.append((biggest, t[k], 1))
            objective = m * top + (p - 1) * biggest + sum(allreduce)
    return _Ilp(md, y, rank_mem, objective, ts, mem_scale, rules, stage_sum, reps)


def _readers(val, dom: list[range], x, K: int) -> dict[int, list]:
    """Stage -> the 0/1 expressions "this reader of `val` sits on it" (the graph output on the last)."""
    needs: dict[int, list] = {}
    for c in val.consumers:
        for k in dom[c]:
            needs.setdefault(k, []).append(x(c, k))
    if val.to_output:
        needs.setdefault(K - 1, []).append(1)
    return needs


def _held_bytes(md: cp_model.CpModel, bg, K: int, p: int, dom: list[range], x, mem_scale: float,
                rules: list) -> list:
    """Per stage: bytes of the values it holds past its saved activations (the rules of
    partitioner/stage_scorer.py), as lower-bounded booleans (memory only ever wants them 0)."""
    held: list = [0] * K
    for ci, val in enumerate(bg.values):
        size = int(val.bytes * mem_scale + 0.999)
        if size == 0:
            continue
        u, s = val.producer, val.saver

        def at(b: int, k: int):
            return x(b, k) if b >= 0 and k in dom[b] else 0

        def lower(terms: list, name: str, k: int) -> None:
            """held[k] += size * h, h >= each term (0/1 expressions)."""
            terms = [t for t in terms if _is_var(t) or t > 0]
            if not terms:
                return
            if all(not _is_var(t) for t in terms):
                held[k] += size
                return
            h = md.NewBoolVar(f"{name}{ci}_{k}")
            for t in terms:
                md.Add(h >= t)
                rules.append((h, t, 1))
            held[k] += size * h

        if s != u:  # sent: the producer holds it unless one of its blocks saves it
            for k in dom[u]:
                terms = [at(u, k) - at(c, k) - at(s, k) for c in val.consumers]
                if val.to_output and k != K - 1:
                    terms.append(at(u, k) - at(s, k))
                lower(terms, "out", k)
        if val.requires_grad:  # received: kept for the backward unless one of k's blocks saves it
            for k, need in _readers(val, dom, x, K).items():
                same = sum(at(u, j) for j in range(k % p, k + 1, p))  # the producer on k's rank
                lower([e - same - at(s, k) for e in need], "in", k)
    return held


class _NoSplit(Exception):
    """No assignment satisfies the domains (the caller drops `upper`, or reports the graph)."""


def chain_dp_split(bg, p: int, v: int, m: int, schedule: str, bw: float, cap: int | None) -> list[int]:
    """Block -> stage from the chain DP over blocks in topological order (time incl. receives),
    within the memory cap when one is given and some contiguous split fits it; else without."""
    n, K = len(bg.blocks), p * v
    cut = [0.0] * n
    for val in bg.values:
        last = max(val.consumers, default=val.producer)
        if val.to_output:
            last = n
        for a in range(val.producer + 1, min(last, n - 1) + 1):
            cut[a] += val.bytes / bw
    if p == 1:
        cut = [0.0] * n
    times = [b.time_s for b in bg.blocks]
    if cap is not None:
        infl = inflight_microbatches(schedule, p, m, v)
        try:
            return split_chain(times, K, cut, [b.param_state_bytes for b in bg.blocks],
                               [b.saved_bytes for b in bg.blocks], [infl[k % p] for k in range(K)],
                               cap / v, [b.bwd_working_bytes for b in bg.blocks]).block_stage()
        except PlanError:
            pass
    return split_chain(times, K, cut).block_stage()


def _hint(ilp: _Ilp, assign: list[int], cap: int | None) -> tuple[int, bool] | None:
    """Hint every variable from `assign`; (model objective, within the memory cap), None if out of domain.

    y follows from the split, every other variable from its rules, so CP-SAT starts
    from a complete solution (with x alone it often found none within the time
    limit on 1,000 blocks x 16 stages).
    """
    md = ilp.model
    proto = md.Proto()
    val = [var.domain[0] for var in proto.variables]
    for b, row in enumerate(ilp.y):
        for k, e in enumerate(row):
            want = int(assign[b] >= k)
            if _is_var(e):
                val[e.Index()] = want
            elif e != want:
                return None  # outside the block's stage domain
    for var, expr, div in ilp.rules:
        offset, terms = _flat(expr)
        i = var.Index()
        dom = proto.variables[i].domain  # (its [-1] reads 0 in this ortools: index from the front)
        val[i] = min(dom[len(dom) - 1], max(val[i], -(-(offset + sum(c * val[j] for j, c in terms)) // div)))

    def value(expr) -> int:
        offset, terms = _flat(expr)
        return offset + sum(c * val[j] for j, c in terms)

    md.ClearHints()
    for i, x in enumerate(val):
        md.AddHint(md.GetIntVarFromProtoIndex(i), x)
    fits = cap is None or all(value(e) <= int(cap * ilp.mem_scale) for e in ilp.rank_mem)
    return value(ilp.objective), fits


def _flat(expr) -> tuple[int, list[tuple[int, int]]]:
    """(offset, [(var index, coefficient)]) of a linear expression or an int."""
    if isinstance(expr, int):
        return expr, []
    f = cp_model.FlatIntExpr(expr)
    return f.offset, [(v.index, c) for v, c in zip(f.vars, f.coeffs)]


def _solver(time_limit_s: float, workers: int | None, gap: float = 0.0) -> cp_model.CpSolver:
    """CP-SAT with a time limit, `gap` as its relative gap limit, and workers (default: at least 8,
    CP-SAT's portfolio wants that many subsolvers even on fewer cores)."""
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = workers or max(8, os.cpu_count() or 1)
    if gap > 0:
        solver.parameters.relative_gap_limit = float(gap)
    return solver


def min_memory_bytes(bg, num_ranks: int, chunks: int = 1, microbatches: int | None = None,
                     schedule: str | None = None, time_limit_s: float = 10.0,
                     workers: int | None = None) -> tuple[int, bool]:
    """Smallest per-device memory any valid split needs: (bytes, proven optimal)."""
    schedule, m = check_config(len(bg.blocks), num_ranks, chunks, microbatches, schedule)
    ilp = _build(bg, num_ranks, chunks, m, schedule, DEFAULT_LINK_BW_BYTES_PER_S, None, with_time=False,
                 need_memory=True)
    peak = ilp.model.NewIntVar(0, 1 << 60, "peak")
    for e in ilp.rank_mem:
        ilp.model.Add(peak >= e)
    ilp.model.Minimize(peak)
    solver = _solver(time_limit_s, workers)
    status = solver.Solve(ilp.model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise PlanError(f"could not compute the smallest memory for {num_ranks * chunks} stages within "
                        f"{time_limit_s:g} s: raise --time-limit")
    assign = ilp.assignment(solver.Value)
    plan = evaluate_assignment(bg, assign, num_ranks, chunks, m, schedule, simulate=False)
    return max(plan.rank_mem_bytes), status == cp_model.OPTIMAL


def solve(bg, num_ranks: int, chunks: int = 1, microbatches: int | None = None, schedule: str | None = None,
          memory_cap_bytes: int | None = None, link_bw_bytes_per_s: float = DEFAULT_LINK_BW_BYTES_PER_S,
          time_limit_s: float = 10.0, workers: int | None = None, hint: bool = True,
          simulate: bool = True, refine_time_s: float | None = None, gap: float = DEFAULT_GAP) -> Plan:
    """Best assignment of bg's blocks to num_ranks * chunks virtual stages (see module docstring).

    gap: stop searching once the plan is proven within this fraction of a lower bound on the
    simulated step of every valid plan (0: search until optimal or time_limit_s).

    Raises PlanError for a bad pipeline shape, more stages than blocks, or a
    memory cap nothing fits (the message states the smallest memory that fits).
    """
    schedule, m = check_config(len(bg.blocks), num_ranks, chunks, microbatches, schedule)
    check_gap(gap)
    p, v = num_ranks, chunks
    K, n = p * v, len(bg.blocks)
    exact_follows = v == 1 and schedule == "1f1b" and m >= p and p > 1 and bg.is_path()
    if refine_time_s is None:  # the simulator's polish pays most where no exact search follows it
        # (with a gap the exact search needs only a good incumbent: 0.5 s of polish found the same
        # gpt2-xl plan at p = 8 as 2 s)
        refine_time_s = min(2.0 if gap == 0 else 0.5, time_limit_s / 4) if exact_follows else 0.7 * time_limit_s
    t0 = time.perf_counter()
    _check_parameter_share(bg, p, v, m, schedule, memory_cap_bytes, time_limit_s, workers)
    from partitioner.baselines import BASELINES, baseline_assignment
    bw, cap = link_bw_bytes_per_s, memory_cap_bytes
    dp_split = chain_dp_split(bg, p, v, m, schedule, bw, cap)
    compute_split = split_chain([b.time_s for b in bg.blocks], K).block_stage()
    baseline_splits = [baseline_assignment(bg, name, K) for name in BASELINES]
    start, upper = None, None
    if hint:  # the best seed by the model's objective is the incumbent; it prunes the model (_domains)
        w, ts = _time_units(bg)
        seeds = [dp_split, compute_split] + baseline_splits
        fitting = [a for a in seeds if cap is None or _fits(bg, a, p, v, m, schedule, cap)]
        start = min(fitting or seeds, key=lambda a: _model_objective(bg, a, p, v, m, bw, w, ts))
        upper = _model_objective(bg, start, p, v, m, bw, w, ts) if fitting else None
    ilp = None
    if upper is not None:
        try:
            ilp = _build(bg, p, v, m, schedule, bw, cap, upper=upper)
            got = _hint(ilp, start, cap)
            if got is None or got[0] > upper or not got[1]:  # the pruning would cut off the incumbent
                ilp = None
        except _NoSplit:
            ilp = None
    if ilp is None:
        ilp = _build(bg, p, v, m, schedule, bw, cap)
        if start is not None:
            _hint(ilp, start, cap)
    ilp.model.Minimize(ilp.objective)
    # time_limit_s bounds the whole call: model building, the solver and the refinement after it
    reserve = refine_time_s + 0.05 * time_limit_s if simulate else 0.02 * time_limit_s
    solver = _solver(max(0.1, time_limit_s - reserve - (time.perf_counter() - t0)), workers, gap)
    status = solver.Solve(ilp.model)
    if status == cp_model.INFEASIBLE or (status == cp_model.UNKNOWN and memory_cap_bytes is not None
                                         and not _fits(bg, start, p, v, m, schedule, memory_cap_bytes)):
        if memory_cap_bytes is None:
            raise PlanError(f"no valid split of {n} blocks into {K} stages: the block graph forces an order "
                            "that leaves a stage empty; use fewer devices or chunks, or a deeper module depth (--depth)")
        need, exact = min_memory_bytes(bg, p, v, m, schedule, time_limit_s, workers)
        raise PlanError(f"memory cap {_gib(memory_cap_bytes)} per device is too small: no split into {K} stages "
                        f"fits; the smallest per-device memory that fits is {'' if exact else 'at most '}"
                        f"{_gib(need)} ({schedule}, {m} microbatches). Raise the cap (--memory / memory=), add "
                        "devices, or use fewer microbatches in flight (1f1b instead of gpipe)")
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        assign = ilp.assignment(solver.Value)
        status_name = solver.StatusName(status)
        obj, bound = solver.ObjectiveValue(), solver.BestObjectiveBound()
    else:  # time limit without a solution: the warm start is still a valid plan
        assign = start or dp_split
        status_name = "DP_FALLBACK"
        obj, bound = float("nan"), solver.BestObjectiveBound()
    refined = False
    # a bound on every plan's simulated step, known before the polish: it may stop early
    early_bound = pipeline_bound_s(bg, p, v, m) if simulate and exact_follows and gap > 0 else None
    target_s = early_bound * (1 + gap) if early_bound else 0.0
    if simulate and refine_time_s > 0:
        # the ILP's answer, its warm start and the compute-only chain DP: the closed form
        # misjudges interleaved schedules on slow links, where balance beats fewer cuts.
        # The baselines' splits are seeds too, so the result is never worse than any of them.
        # A third of the time goes to the seeds alike, the rest to the best of them, with kicks.
        seeds = [assign, start, dp_split, compute_split] + baseline_splits
        seeds = [a for i, a in enumerate(seeds) if a is not None and a not in seeds[:i]]
        polish_end = time.perf_counter() + refine_time_s

        def polish(a: list[int], budget_s: float, kicks: bool = False) -> tuple[list[int], float]:
            return refine(bg, a, p, v, m, schedule, bw, cap, budget_s, kicks, target_s=target_s)
        best = _first_within(target_s, (polish(a, refine_time_s / (3 * len(seeds))) for a in seeds))
        if best[1] > target_s:
            best = polish(best[0], max(0.0, polish_end - time.perf_counter()), kicks=True)
        refined = best[0] != assign
        assign = best[0]
    plan = evaluate_assignment(bg, assign, p, v, m, schedule, link_bw_bytes_per_s, memory_cap_bytes,
                               method="ilp", simulate=simulate)
    exact, lower = "", 0.0  # lower: no valid plan within the cap simulates faster (0: not known)
    if early_bound is not None and plan.step_time_s <= target_s:
        lower = early_bound  # proven within the gap: no exact search
    elif simulate and refine_time_s > 0 and exact_follows:
        # every valid plan is a contiguous split: search them all, the refined plan as incumbent
        budget_s = min(EXACT_TIME_CAP_S, max(0.0, time_limit_s - (time.perf_counter() - t0)))
        found = best_split_s(bg, p, m, link_bw_bytes_per_s, plan.step_time_s, budget_s,
                             split_cuts(plan.block_stage), memory_cap_bytes, gap=gap)
        if found.cuts is not None and found.step_time_s < plan.step_time_s:
            plan = evaluate_assignment(bg, split_assignment(found.cuts, n), p, v, m, schedule, link_bw_bytes_per_s,
                                       memory_cap_bytes, method="ilp", simulate=simulate)
            exact = ("+exact(incomplete)" if not found.complete else "+exact(optimal)" if gap == 0
                     else "+exact(within gap)")
        elif found.complete:
            exact = "+optimal" if gap == 0 else "+exact(within gap)"  # no split beats the refined plan by more
        lower = min(plan.step_time_s, max(found.lower_bound_s, early_bound or pipeline_bound_s(bg, p, v, m)))
    paths_tol = gap if gap > 0 else PATHS_TOL
    if simulate and refine_time_s > 0 and plan.step_time_s > lower * (1 + paths_tol):
        # critical-path row generation: a lower bound for interleaving and branchy graphs, and
        # sometimes a faster plan than the closed form's (partitioner/critical_path.py)
        budget_s = min(PATHS_TIME_CAP_S, time_limit_s - (time.perf_counter() - t0))
        if budget_s >= PATHS_MIN_TIME_S:
            seeds = [start, dp_split] if start is not None else [dp_split]
            found = path_bound_solve(bg, p, v, m, schedule, memory_cap_bytes, link_bw_bytes_per_s, budget_s,
                                     plan.block_stage, tuple(seeds), paths_tol, workers)
            if found.assignment is not None and found.step_time_s < plan.step_time_s * (1 - 1e-12):
                plan = evaluate_assignment(bg, found.assignment, p, v, m, schedule, link_bw_bytes_per_s,
                                           memory_cap_bytes, method="ilp", simulate=simulate)
                exact += "+paths"
            lower = max(lower, min(found.lower_bound_s, plan.step_time_s))
    scale = ilp.time_scale
    plan.solver_status = status_name + ("+refined" if refined else "") + exact
    plan.objective = plan.model_step_time_s if math.isnan(obj) else obj / scale
    plan.bound = bound / scale
    plan.gap = max(0.0, (plan.objective - plan.bound) / plan.objective) if plan.objective > 0 else 0.0
    plan.step_lower_bound_s = lower
    plan.gap_limit, plan.time_limit_s = gap, time_limit_s
    plan.solve_time_s = time.perf_counter() - t0
    return plan


def _check_parameter_share(bg, p: int, v: int, m: int, schedule: str, cap: int | None, time_limit_s: float,
                           workers: int | None) -> None:
    """PlanError at once when the parameters' training state alone, spread evenly, exceeds the cap:
    no split fits, and on a large model the ILP would spend the whole time limit finding that out.
    The message gives the smallest memory that fits where the memory ILP finds it within a fifth of
    the time limit, else the even share as a lower bound."""
    if cap is None:
        return
    share = (sum(b.param_state_bytes for b in bg.blocks) + sum(s.state_bytes for s in bg.shared_params)) / p
    if share <= cap:
        return
    try:
        need, exact = min_memory_bytes(bg, p, v, m, schedule, time_limit_s / 5, workers)
        least = f"{'' if exact else 'at most '}{_gib(need)}"
    except PlanError:
        least = f"at least {_gib(share)} (parameters, gradients and optimizer states alone, over {p} devices)"
    raise PlanError(f"memory cap {_gib(cap)} per device is too small: no split into {p * v} stages fits; the "
                    f"smallest per-device memory that fits is {least} ({schedule}, {m} microbatches). "
                    "Raise the cap (--memory / memory=), add devices, or use fewer microbatches in flight "
                    "(1f1b instead of gpipe), bf16 (--dtype bf16) or a lighter optimizer (--optimizer sgd)")


def _first_within(target_s: float, polished) -> tuple[list[int], float]:
    """The best of the (assignment, step) pairs `polished` yields, stopping at the first at most target_s."""
    best = None
    for got in polished:
        if best is None or got[1] < best[1]:
            best = got
        if best[1] <= target_s:
            break
    return best


def _fits(bg, assign, p, v, m, schedule, cap) -> bool:
    if assign is None:
        return False
    plan = evaluate_assignment(bg, assign, p, v, m, schedule, memory_cap_bytes=cap, simulate=False)
    return max(plan.rank_mem_bytes) <= cap


def _gib(n: float) -> str:
    """Bytes for an error message, precise enough that a cap and the memory needed read apart."""
    if n >= 2 ** 28:
        return f"{n / 2 ** 30:.2f} GiB"
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.1f} KiB"
