"""The partition ILP as a CP-SAT model: build_ilp(problem) -> Ilp.

Blocks b, virtual stages k = 0..K-1 (K = p * v), stage k on rank k % p.
- Order encoding: y[b,k] boolean = (stage(b) >= k), y[b,k+1] <= y[b,k];
  x[b,k] = y[b,k] - y[b,k+1] is a linear expression, not a variable. Along
  every edge u -> v (transitive reduction only) y[u,k] <= y[v,k]; every stage
  holds a block. y is fixed outside each block's stage domain (ilp_domains.stage_domains).
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
- The fixed cost o of a stage pass (BlockGraph.stage_pass, forward + backward) is left out of
  the closed form: every stage holds a block, so it would add (m + K - 1) o (v = 1) or
  (m v + p - 1) o (v > 1) to every solution whose M is set by compute, not by a link, and
  rank none of them differently. The simulator and the row generation
  (partitioner/critical_path.py) count it.
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
  blocks saves (the executor holds them until the backward; partitioner/stage_costs.py
  says when), one boolean per value and stage where they can occur.
- Shared parameters: rep_s boolean; without it all users sit on one rank
  (sum_r h[s,r] <= 1), with it every holder pays the memory and the step pays
  an all-reduce of 2 * bytes / link bandwidth. The solver picks.

Pruning by an incumbent (`upper`, its objective U): any better solution has every stage's
compute <= C (v = 1: (U - total) / (m - 1); v > 1: (U - m * M_lb) / (p - 1)), so block b,
whose ancestors fill stages 0..s(b), needs s(b) >= ceil(work(b and ancestors) / C) - 1, and
likewise towards the end. The pruned model still holds the incumbent, and what it cuts off is
worse than it. Lower bounds on M and S come from the average and, for paths, the chain DP's
bottleneck.

build_ilp assembles the model from one function per part, in this order (CP-SAT's search
depends on the order variables are made in): order variables, latency, shared parameters,
memory, objective. Every variable other than y gets rules that give its least feasible value
from y, so Ilp.hint turns an assignment into a complete solution hint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from partitioner.ilp_domains import caps_below, closure, stage_domains, time_lower_bounds
from partitioner.problem import PlanProblem

TIME_UNITS = 1_000_000  # total work is scaled to about this many integer units
_MEM_LIMIT = 1 << 52  # bytes are exact below this total, scaled above


class NoSplit(Exception):
    """No assignment satisfies the pruned stage domains (the caller drops `upper`, or reports the graph)."""


@dataclass
class Ilp:
    """The CP-SAT model and how to read and seed it.

    y[b][k] = stage(b) >= k, for k = 0..K: the int 1 or 0 where fixed, else a BoolVar.
    rules: (var, expr, div) for every variable other than y: the smallest value the
    constraints allow is max(its lower bound, ceil(expr / div)) over its rules, so a
    full hint follows from y alone (see hint).
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

    def hint(self, assign: list[int], cap: int | None) -> tuple[int, bool] | None:
        """Hint every variable from `assign`; (model objective, within the memory cap), None if out of domain.

        y follows from the split, every other variable from its rules, so CP-SAT starts
        from a complete solution (with x alone it often found none within the time
        limit on 1,000 blocks x 16 stages).
        """
        md = self.model
        proto = md.Proto()
        val = [var.domain[0] for var in proto.variables]
        for b, row in enumerate(self.y):
            for k, e in enumerate(row):
                want = int(assign[b] >= k)
                if is_var(e):
                    val[e.Index()] = want
                elif e != want:
                    return None  # outside the block's stage domain
        for var, expr, div in self.rules:
            offset, terms = flat_expr(expr)
            i = var.Index()
            dom = proto.variables[i].domain  # (its [-1] reads 0 in this ortools: index from the front)
            val[i] = min(dom[len(dom) - 1], max(val[i], -(-(offset + sum(c * val[j] for j, c in terms)) // div)))

        def value(expr) -> int:
            offset, terms = flat_expr(expr)
            return offset + sum(c * val[j] for j, c in terms)

        md.ClearHints()
        for i, x in enumerate(val):
            md.AddHint(md.GetIntVarFromProtoIndex(i), x)
        fits = cap is None or all(value(e) <= int(cap * self.mem_scale) for e in self.rank_mem)
        return value(self.objective), fits


def on_stage(y: list[list], b: int, k: int):
    """x[b,k] = y[b][k] - y[b][k + 1]: 1 iff block b sits on stage k (an int where fixed)."""
    return y[b][k] - y[b][k + 1]


def is_var(e) -> bool:
    """True for a CP-SAT expression, False for a fixed 0/1 int."""
    return not isinstance(e, int)


def flat_expr(expr) -> tuple[int, list[tuple[int, int]]]:
    """(offset, [(var index, coefficient)]) of a linear expression or an int."""
    if isinstance(expr, int):
        return expr, []
    f = cp_model.FlatIntExpr(expr)
    return f.offset, [(v.index, c) for v, c in zip(f.vars, f.coeffs)]


def cp_solver(time_limit_s: float, workers: int | None, gap: float = 0.0) -> cp_model.CpSolver:
    """CP-SAT with a time limit, `gap` as its relative gap limit, and workers (default: at least 8,
    CP-SAT's portfolio wants that many subsolvers even on fewer cores)."""
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = workers or max(8, os.cpu_count() or 1)
    if gap > 0:
        solver.parameters.relative_gap_limit = float(gap)
    return solver


def time_units(bg) -> tuple[list[int], float]:
    """Integer fwd+bwd time of every block (total about TIME_UNITS) and the scale (units per second)."""
    ts = TIME_UNITS / (sum(b.time_s for b in bg.blocks) or 1.0)
    return [round(b.time_s * ts) for b in bg.blocks], ts


def model_objective(problem: PlanProblem, assign: list[int], w: list[int], ts: float) -> int:
    """The ILP's objective (integer units, block times w at ts units per second) of a valid
    assignment, computed directly."""
    bg, p, v, m = problem.block_graph, problem.num_ranks, problem.chunks, problem.microbatches
    bw, K = problem.link_bw_bytes_per_s, problem.num_stages
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


def build_ilp(problem: PlanProblem, with_time: bool = True, upper: int | None = None,
              domain_cap: tuple[list[int], list[int], list[int]] | None = None,
              need_memory: bool | None = None) -> Ilp:
    """The model; with `upper` (an incumbent's objective) only solutions at least as good remain.

    with_time False: no latency and no objective (the memory ILP and the row generation add their own).
    need_memory (default: a cap is given): model the values stages hold at their boundaries
    (extra booleans); without it rank_mem leaves them out.
    domain_cap (weights, most, most_after): prune the stage domains as if stages 0..j held at most
    most[j] of the weights and stages j..K-1 at most most_after[j] (ilp_domains.stage_domains), in
    place of the pruning `upper` gives; the caller vouches for it.
    Raises NoSplit when `upper` prunes some block's domain empty.
    """
    if need_memory is None:
        need_memory = problem.memory_cap_bytes is not None
    w, ts = time_units(problem.block_graph)
    order = _order_variables(problem, w, upper if with_time else None, domain_cap)
    K = problem.num_stages
    c = [order.stage_sum(k, w) for k in range(K)]
    lat = _latency(order, problem, ts) if problem.num_ranks > 1 and with_time else [0] * K
    t = [c[k] + lat[k] for k in range(K)]
    allreduce, reps, holds = _shared_params(order, problem, ts)
    mem_scale = _mem_scale(problem)
    rank_mem = _memory(order, problem, holds, mem_scale, need_memory)
    objective = _objective(order, problem, w, c, lat, t, allreduce) if with_time else 0
    return Ilp(order.md, order.y, rank_mem, objective, ts, mem_scale, order.rules, order.stage_sum, reps)


@dataclass
class _Order:
    """The order variables y (stage(b) >= k) over the stage domains, and the model and rules the
    later parts of build_ilp add to."""

    md: cp_model.CpModel
    y: list[list]
    dom: list[range]
    path: bool
    rules: list
    stage_cap: int | None  # most compute of one stage in any solution better than `upper`
    top_cap: int | None  # largest M in any such solution

    def x(self, b: int, k: int):
        return on_stage(self.y, b, k)

    def stage_sum(self, k: int, weights: list[int]):
        """sum_b weights[b] * x[b,k] as one weighted sum."""
        vs, cs, const = [], [], 0
        for j, sign in ((k, 1), (k + 1, -1)):
            for b in range(len(self.y)):
                e = self.y[b][j]
                if weights[b] == 0:
                    continue
                if is_var(e):
                    vs.append(e)
                    cs.append(sign * weights[b])
                else:
                    const += sign * weights[b] * e
        return cp_model.LinearExpr.WeightedSum(vs, cs) + const


def _order_variables(problem: PlanProblem, w: list[int], upper: int | None,
                     domain_cap: tuple[list[int], list[int], list[int]] | None) -> _Order:
    """y over each block's stage domain, monotone in k, ordered along every edge, no stage empty."""
    bg, p, v, m, K = problem.block_graph, problem.num_ranks, problem.chunks, problem.microbatches, problem.num_stages
    n = len(bg.blocks)
    md = cp_model.CpModel()
    path = bg.is_path()
    anc, desc = closure(bg)
    stage_cap, top_cap = caps_below(upper, w, p, v, m, path)
    if domain_cap is not None:
        dom = stage_domains(bg, K, domain_cap[0], None, anc, desc, path, domain_cap[1:])
    else:
        dom = stage_domains(bg, K, w, stage_cap, anc, desc, path)
    if upper is not None and any(len(d) == 0 for d in dom):
        raise NoSplit()
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
    order = _Order(md, y, dom, path, [], stage_cap, top_cap)
    if path:  # consecutive blocks differ by at most one stage, so none is left empty
        for b in range(n - 1):
            for k in range(1, K - 1):
                _imply(md, y[b + 1][k + 1], y[b][k])
    else:
        for k in range(K):
            md.Add(order.stage_sum(k, [1] * n) >= 1)
    return order


def _latency(order: _Order, problem: PlanProblem, ts: float) -> list:
    """Per stage: the time (units) of receiving every value that crosses into it from another rank."""
    bg, p, v, K = problem.block_graph, problem.num_ranks, problem.chunks, problem.num_stages
    md, y, dom, x = order.md, order.y, order.dom, order.x
    lat: list = [0] * K
    for ci, val in enumerate(bg.values):
        cost = round(val.bytes / problem.link_bw_bytes_per_s * ts)
        if cost <= 0:
            continue
        u = val.producer
        if order.path and tuple(val.consumers) == (u + 1,) and not val.to_output:
            # s(u+1) - s(u) is 0 or 1: the value crosses into k iff s(u) < k <= s(u+1)
            for k in range(1, K):
                if is_var(y[u + 1][k]) or is_var(y[u][k]) or y[u + 1][k] != y[u][k]:
                    lat[k] += cost * (y[u + 1][k] - y[u][k])
            continue
        for k, need in _readers(val, dom, x, K).items():
            # the producer on k's rank at a stage <= k (for v = 1: at k, i.e. s(u) >= k)
            same = y[u][k] if v == 1 else sum(x(u, j) for j in range(k % p, k + 1, p) if j in dom[u])
            if not is_var(same) and all(not is_var(e) for e in need):
                lat[k] += cost * max(0, max(need) - same)
                continue
            z = md.NewBoolVar(f"z{ci}_{k}")
            for e in need:
                md.Add(z >= e - same)
                order.rules.append((z, e - same, 1))
            lat[k] += cost * z
    return lat


def _shared_params(order: _Order, problem: PlanProblem, ts: float) -> tuple[list, list, list[list[tuple]]]:
    """Tied parameters: holders per rank, co-located or replicated (rep).

    Returns (all-reduce terms in time units, [(all-reduce seconds, rep)], per rank [(state bytes, holds)]).
    """
    md, p, bw = order.md, problem.num_ranks, problem.link_bw_bytes_per_s
    allreduce, reps = [], []
    holds: list[list[tuple]] = [[] for _ in range(p)]
    for si, sp in enumerate(problem.block_graph.shared_params):
        h = [md.NewBoolVar(f"h{si}_{r}") for r in range(p)]
        for b in sp.blocks:
            for k in order.dom[b]:
                md.Add(h[k % p] >= order.x(b, k))
                order.rules.append((h[k % p], order.x(b, k), 1))
        rep = md.NewBoolVar(f"rep{si}")
        md.Add(sum(h) <= 1 + (p - 1) * rep)
        order.rules.append((rep, sum(h) - 1, max(1, p - 1)))
        if sp.trainable:
            allreduce.append(round(2 * sp.bytes / bw * ts) * rep)
            reps.append((2 * sp.bytes / bw, rep))
        for r in range(p):
            holds[r].append((sp.state_bytes, h[r]))
    return allreduce, reps, holds


def _mem_scale(problem: PlanProblem) -> float:
    """Memory units per byte: 1 unless the bytes the model could sum to pass _MEM_LIMIT."""
    bg, p, v, m = problem.block_graph, problem.num_ranks, problem.chunks, problem.microbatches
    total_mem = sum(b.param_state_bytes + b.saved_bytes * m * v + b.bwd_working_bytes for b in bg.blocks) + \
        sum(s.state_bytes * p for s in bg.shared_params) + 2 * m * v * sum(val.bytes for val in bg.values)
    return min(1.0, _MEM_LIMIT / max(total_mem, 1))


def _memory(order: _Order, problem: PlanProblem, holds: list[list[tuple]], mem_scale: float,
            need_memory: bool) -> list:
    """Per rank: static bytes + in-flight microbatches x its largest stage's activations + the largest
    backward transient (memory units), each <= the cap where there is one."""
    bg, p, K, cap = problem.block_graph, problem.num_ranks, problem.num_stages, problem.memory_cap_bytes
    md, rules, dom, x, stage_sum = order.md, order.rules, order.dom, order.x, order.stage_sum
    inflight = problem.inflight()
    static_w = [int(b.param_state_bytes * mem_scale + 0.999) for b in bg.blocks]
    saved_w = [int(b.saved_bytes * mem_scale + 0.999) for b in bg.blocks]
    held = _held_bytes(order, problem, mem_scale) if need_memory else [0] * K
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
    return rank_mem


def _objective(order: _Order, problem: PlanProblem, w: list[int], c: list, lat: list, t: list,
               allreduce: list):
    """The step's closed form (module docstring) as a linear expression over M (and S for v > 1)."""
    p, v, m, K = problem.num_ranks, problem.chunks, problem.microbatches, problem.num_stages
    md, rules = order.md, order.rules
    hi = sum(w) + 10 * TIME_UNITS * K
    busy = t if v > 1 else c  # see the module docstring
    # lower bounds: average work; for paths the best contiguous split's bottleneck
    # (v = 1: the busiest rank holds one stage; v > 1: the largest chunk)
    lb_rank, lb_stage = time_lower_bounds(w, p, v, order.path)
    top_cap, stage_cap = order.top_cap, order.stage_cap
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
        return (m - 1) * top + sum(t) + sum(allreduce)
    biggest = md.NewIntVar(lb_stage, max(lb_stage, min(hi, stage_cap if stage_cap is not None else hi)), "S")
    for k in range(K):
        md.Add(biggest >= t[k])
        rules.append((biggest, t[k], 1))
    return m * top + (p - 1) * biggest + sum(allreduce)


def _readers(val, dom: list[range], x, K: int) -> dict[int, list]:
    """Stage -> the 0/1 expressions "this reader of `val` sits on it" (the graph output on the last)."""
    needs: dict[int, list] = {}
    for c in val.consumers:
        for k in dom[c]:
            needs.setdefault(k, []).append(x(c, k))
    if val.to_output:
        needs.setdefault(K - 1, []).append(1)
    return needs


def _held_bytes(order: _Order, problem: PlanProblem, mem_scale: float) -> list:
    """Per stage: bytes of the values it holds past its saved activations (the rules of
    partitioner/stage_costs.py), as lower-bounded booleans (memory only ever wants them 0)."""
    md, rules, dom, x = order.md, order.rules, order.dom, order.x
    p, K = problem.num_ranks, problem.num_stages
    held: list = [0] * K
    for ci, val in enumerate(problem.block_graph.values):
        size = int(val.bytes * mem_scale + 0.999)
        if size == 0:
            continue
        u, s = val.producer, val.saver

        def at(b: int, k: int):
            return x(b, k) if b >= 0 and k in dom[b] else 0

        def lower(terms: list, name: str, k: int) -> None:
            """held[k] += size * h, h >= each term (0/1 expressions)."""
            terms = [t for t in terms if is_var(t) or t > 0]
            if not terms:
                return
            if all(not is_var(t) for t in terms):
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


def _imply(md: cp_model.CpModel, a, b) -> None:
    """a <= b for literals or the constants 0/1."""
    if is_var(a) and is_var(b):
        md.AddImplication(a, b)
    elif is_var(a) or is_var(b):
        md.Add(a <= b)
    elif a > b:
        md.AddBoolOr([])  # infeasible; the caller reports it
