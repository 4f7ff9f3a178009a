"""Critical-path row generation: a lower bound on the simulated step of every plan, and plans that meet it.

For a fixed schedule (every rank's action order, runtime.schedules.make_schedule) the simulator's
step is the longest path in a DAG whose nodes are the actions (F or B of stage k on one microbatch,
lasting f_k or b_k) and whose edges are rank order (no delay) and data dependencies (F(j) -> F(k)
and B(k) -> B(j) for j < k, delayed by comm_time_s[j][k] across ranks). The DAG does not depend
on the plan, only the durations do. So every path P bounds every plan's step from below:

    step >= sum_k alpha_P[k] f_k + beta_P[k] b_k + gamma_P[k] l_k (+ the all-reduce of tied weights)

with alpha/beta the numbers of P's forwards/backwards of stage k and gamma_P[k] its hops between
stages k - 1 and k (F(k-1) -> F(k), B(k) -> B(k-1)), each waiting comm_time_s[k-1][k] >= l_k.
All of it is linear in the partition ILP's assignment: f_k >= the sum of the stage's device times,
f_k >= the sum of its host times (partitioner.stage_costs.stage_totals takes their max; the minimiser
makes one tight); l_k sums the values produced on k - 1 and read on k (a crossing indicator per
value, linear on path-shaped graphs). l_k is modelled only where links could matter (more than
a tenth of tol of the step); elsewhere, and for hops between stages further apart, communication
is left out, which only weakens the bound.

The rows and the fluid LP over them live in partitioner/path_rows.py. A stage pass takes at least its
device sum and at least its host sum, so the fluid LP runs over either (StageUnits.of(bg, host=True));
the larger bound holds, and its side's work prunes the relaxation (prefix_caps) and is what the chain's
searches below split: where the host dispatches longer than the device runs, the device's alone bound
the step far below any plan and prune nothing.
path_bound_solve minimises T subject to T >= every row over the ILP's feasible set
(partitioner.ilp.build_ilp without its closed-form time model: stage order, non-empty stages,
the memory cap), simulates the answers CP-SAT finds, adds their critical paths (with and without
communication) as new rows and repeats. The relaxation's proven bound is a lower bound on every
plan's step; the best simulated answer within the cap is an upper bound. Durations are scaled to
integers rounded down, so the bound stays valid. Plans no faster than the best found are pruned
(prefix_caps: an LP over per-stage work with its own path separation bounds how much work the
first j stages hold), which keeps the model small. Once no answer brings a new path the bound is
the optimum up to the communication left out (exact on chains). Where CP-SAT neither closes a
relaxation nor raises its dual bound, that bound stays near the LP's; probes then ask whether
every row can stay under a target a third of the way from the bound to the best plan: a
refutation raises the bound to it, an answer brings its paths or a better plan (benchmarks/
RESULTS.md has the CNN case where probes matter). Before all of it, on graphs that are mostly a chain,
the fluid LP's branch and bound over the chain's cuts (partitioner/chain_bound.py) proves the best plan
within tol or finds faster ones; where it proves nothing, CP-SAT over the chain's whole-block cuts
(partitioner/chain_sat.py) tries (equal layers give the branch and bound too many equal nodes).

The memory cap is the ILP's closed form (StageTotals.rank_mem_bytes), which the simulated peak
never exceeds; the bound holds for every plan within it.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from partitioner.chain_bound import chain_blocks, chain_bound
from partitioner.chain_sat import chain_sat_bound
from partitioner.ilp import NoSplit, build_ilp, cp_solver, on_stage
from partitioner.path_rows import (UNITS, ActionDag, PathRow, StageUnits, critical_path, fluid_bound, prefix_caps,
                                   synthetic_rows)
from partitioner.problem import PlanProblem
from partitioner.runtime.schedules import make_schedule
from partitioner.runtime.simulator import StageCosts, simulate
from partitioner.seeds import chain_dp_split
from partitioner.stage_costs import StageCostModel, closed_form_rank_mem_bytes

DEFAULT_TOL = 0.005  # stop once the best plan is within this fraction of the bound
CHAIN_SHARE = 0.5  # of the time limit, the most the fluid LP's branch and bound over a chain's cuts takes
CHAIN_SAT_SHARE = 0.9  # of the time limit, by when CP-SAT over them (partitioner/chain_sat.py) ends after it
CHAIN_MIN_SHARE = 0.95  # of the work, the least a graph's chain (chain_blocks) holds for that search
_MIN_SLICE_S = 1.0  # least time one relaxation gets
_log = logging.getLogger(__name__)


@dataclass
class PathBound:
    """Outcome of path_bound_solve.

    assignment: the best plan found within the memory cap (block -> stage), None if none fits;
    step_time_s: its simulated step (+ all-reduce); lower_bound_s: no valid plan within the cap
    is faster; iterations: relaxations solved; rows: paths in the last one; status: "converged"
    (the plan is within tol of the bound), "stalled" (the relaxation's optimum brought no new
    path: what is left is the communication the rows leave out), "time_limit" or "infeasible"
    (no plan fits the cap).
    """

    assignment: list[int] | None
    step_time_s: float
    lower_bound_s: float
    iterations: int
    rows: int
    status: str
    solve_time_s: float = 0.0
    paths: list[PathRow] = field(default_factory=list)  # the relaxation's rows (to start another run from)

    @property
    def gap(self) -> float:
        """(step - bound) / step: how much faster any plan could be, at most."""
        if self.assignment is None or self.step_time_s <= 0:
            return 0.0
        return max(0.0, (self.step_time_s - self.lower_bound_s) / self.step_time_s)


class _Collect(cp_model.CpSolverSolutionCallback):
    """The assignments of the last few solutions CP-SAT finds (each better than the one before)."""

    def __init__(self, ilp, keep: int = 8):
        super().__init__()
        self.ilp, self.keep = ilp, keep
        self.assignments: list[list[int]] = []
        self.objectives: list[float] = []  # the relaxation's T of each (units)

    def on_solution_callback(self) -> None:
        a = self.ilp.assignment(self.Value)
        if a not in self.assignments:
            self.assignments = (self.assignments + [a])[-self.keep:]
            self.objectives = (self.objectives + [self.ObjectiveValue()])[-self.keep:]


class _PathScorer:
    """Simulated step (+ all-reduce) and closed-form fit of assignments, and their critical paths."""

    def __init__(self, problem: PlanProblem):
        p, v = problem.num_ranks, problem.chunks
        self.cap = problem.memory_cap_bytes
        self.sched = make_schedule(problem.schedule, p, problem.microbatches, v)
        self.inflight = problem.inflight()
        self.cost_model = StageCostModel(problem.block_graph, p, v, problem.link_bw_bytes_per_s)

    def score(self, assign: list[int]) -> tuple[float, bool, list[PathRow]]:
        """(step, within the cap, critical paths with and without communication)."""
        costs, allreduce_s = self.cost_model.costs(assign)
        fits = self.cap is None or max(closed_form_rank_mem_bytes(costs, self.inflight)) <= self.cap
        tl = simulate(self.sched, costs)
        free = StageCosts(costs.fwd_time_s, costs.bwd_time_s, (), costs.saved_bytes)
        return (tl.step_time_s + allreduce_s, fits,
                [critical_path(tl, costs), critical_path(simulate(self.sched, free), free)])


class _Relaxation:
    """min T subject to T >= every row, over the partition ILP's feasible set (partitioner.ilp.build_ilp)."""

    def __init__(self, problem: PlanProblem, units: StageUnits, prefix: tuple[list[int], list[int]] | None,
                 comm: bool = False, prefix_work: list[int] | None = None):
        p, m, v = problem.num_ranks, problem.microbatches, problem.chunks
        self.cap, self.units = problem.memory_cap_bytes, units
        K, scale = problem.num_stages, units.scale
        dc = (prefix_work or units.work, *prefix) if prefix is not None else None
        self.ilp = ilp = build_ilp(problem, with_time=False, domain_cap=dc)
        md = self.model = ilp.model
        per_pass = max(*units.pass_dev, *units.pass_host)
        hi = (UNITS + 2 * per_pass) * 4 * (m * v + K) + sum(math.floor(sec * scale) for sec, _ in ilp.allreduce)
        self.fwd, self.bwd = [], []
        for k in range(K):  # every stage holds a block (build_ilp): each pass pays the stage pass's cost
            for out, dev, host, (o_dev, o_host), name in (
                    (self.fwd, units.fdev, units.fhost, (units.pass_dev[0], units.pass_host[0]), "F"),
                    (self.bwd, units.bdev, units.bhost, (units.pass_dev[1], units.pass_host[1]), "B")):
                var = md.NewIntVar(0, hi, f"{name}{k}")
                for wts, o in ((dev, o_dev), (host, o_host)) if any(host) or o_host else ((dev, o_dev),):
                    e = ilp.stage_sum(k, wts) + o
                    md.Add(var >= e)
                    ilp.rules.append((var, e, 1))
                out.append(var)
        self.allreduce = sum(math.floor(sec * scale) * rep for sec, rep in ilp.allreduce)
        self.hop = self._hops(problem.block_graph, p, problem.link_bw_bytes_per_s) if comm and p > 1 else [0] * K
        self.top = md.NewIntVar(0, hi, "T")
        md.Minimize(self.top)

    def _hops(self, bg, p: int, bw: float) -> list:
        """[k]: a lower bound (units) on comm_time_s[k-1][k], what a hop between stages k-1 and k waits.

        Every value whose producer sits on k - 1 and some reader on k (or k = K - 1 the output)
        crosses: z >= x[producer, k-1] + x[reader, k] - 1; on a path-shaped graph a value b -> b+1
        crosses iff y[b+1, k] - y[b, k] = 1 (stages are contiguous), no variable needed.
        """
        y, md, K = self.ilp.y, self.model, len(self.ilp.y[0]) - 1

        def x(b: int, k: int):
            return on_stage(y, b, k)

        path = bg.is_path()
        hop: list = [0] * K
        for ci, val in enumerate(bg.values):
            cost = math.floor(val.bytes / bw * self.units.scale)
            if cost <= 0:
                continue
            u = val.producer
            for k in range(1, K):
                if (k - 1) % p == k % p:
                    continue
                if path and tuple(val.consumers) == (u + 1,) and not val.to_output:
                    hop[k] += cost * (y[u + 1][k] - y[u][k])
                    continue
                src = x(u, k - 1)
                need = [x(w, k) for w in val.consumers] + ([1] if val.to_output and k == K - 1 else [])
                need = [e for e in need if not isinstance(e, int) or e > 0]
                if (isinstance(src, int) and src <= 0) or not need:
                    continue
                z = md.NewBoolVar(f"hop{ci}_{k}")
                for e in need:
                    md.Add(z >= src + e - 1)
                    self.ilp.rules.append((z, src + e - 1, 1))
                hop[k] += cost * z
        out = []
        for k, e in enumerate(hop):
            if isinstance(e, int):
                out.append(e)
                continue
            var = md.NewIntVar(0, sum(math.floor(val.bytes / bw * self.units.scale) for val in bg.values), f"L{k}")
            md.Add(var >= e)
            self.ilp.rules.append((var, e, 1))
            out.append(var)
        return out

    def domain_size(self) -> int:
        """Free (block, stage) order variables: how large the model is."""
        return sum(1 for row in self.ilp.y for e in row if not isinstance(e, int))

    def add_row(self, r: PathRow) -> None:
        e = sum(c * x for c, x in zip(r.fwd_count, self.fwd) if c) + \
            sum(c * x for c, x in zip(r.bwd_count, self.bwd) if c) + self.allreduce + \
            sum(c * h for c, h in zip(r.hops, self.hop) if c and not (isinstance(h, int) and h == 0))
        self.model.Add(self.top >= e)
        self.ilp.rules.append((self.top, e, 1))

    def bound_top(self, lower_s: float, upper_s: float) -> None:
        """T lies in [lower, upper] (a proven bound, the best plan's step): prunes the search."""
        scale = self.units.scale
        self.model.Add(self.top >= math.floor(lower_s * scale))
        if upper_s < math.inf:
            self.model.Add(self.top <= math.ceil(upper_s * scale))

    def hint(self, assign: list[int]) -> bool:
        """Hint the solver with a plan; False when it lies outside the (pruned) model."""
        return self.ilp.hint(assign, self.cap) is not None

    def solve(self, time_s: float, tol: float, workers: int | None):
        """(status, proven bound in seconds, [(assignment, its T in seconds)] of the last solutions found)."""
        solver = cp_solver(time_s, workers or min(8, os.cpu_count() or 1))  # more workers than cores only thrash
        solver.parameters.relative_gap_limit = tol / 2
        found = _Collect(self.ilp)
        got = solver.Solve(self.model, found)
        _log.debug("relaxation %s in %.2f s: bound %.6g s, %d order variables, %d solutions",
                   solver.StatusName(got), solver.WallTime(), solver.BestObjectiveBound() / self.units.scale,
                   self.domain_size(), len(found.assignments))
        return (got, solver.BestObjectiveBound() / self.units.scale,
                [(a, t / self.units.scale) for a, t in zip(found.assignments, found.objectives)])

    def probe(self, upper_s: float, time_s: float, workers: int | None):
        """Can every row stay within upper_s? (status, assignments found). INFEASIBLE proves every
        plan in the model slower than upper_s: CP-SAT refutes a tight cap on T much faster than
        it raises the dual bound of the min-max, which stays near the LP's on branchy graphs."""
        md = self.model.clone()
        md.ClearObjective()
        md.Add(md.GetIntVarFromProtoIndex(self.top.Index()) <= math.floor(upper_s * self.units.scale))
        solver = cp_solver(time_s, workers or min(8, os.cpu_count() or 1))
        found = _Collect(self.ilp)
        got = solver.Solve(md, found)
        _log.debug("probe at %.6g s: %s in %.2f s", upper_s, solver.StatusName(got), solver.WallTime())
        return got, found.assignments


def path_bound_solve(problem: PlanProblem, time_limit_s: float = 10.0, incumbent: list[int] | None = None,
                     seeds: tuple = (), tol: float = DEFAULT_TOL, workers: int | None = None,
                     paths: tuple = (), chain_only: bool = False) -> PathBound:
    """Row generation over critical paths (module docstring): the best plan found and a proven lower bound.

    incumbent / seeds: assignments to start from (default: the chain DP's split); the best of them
    within the cap is the first upper bound. Stops when the best plan is within `tol` of the bound,
    when no new path turns up, or after time_limit_s. Each relaxation's domains are pruned by the
    prefix caps the rows and the best plan's step allow (prefix_caps); the model is rebuilt when
    they shrink it. chain_only: stop after CP-SAT's bound over the chain's cuts (a quick proof or none).
    """
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s
    bg, p, m, K = problem.block_graph, problem.num_ranks, problem.microbatches, problem.num_stages
    bw = problem.link_bw_bytes_per_s
    scorer = _PathScorer(problem)
    rows: dict[tuple, PathRow] = {}  # the relaxation's, by key (the row's coefficients in the model)
    lp_rows: dict[tuple, PathRow] = {}  # prefix_caps': these and the fluid LP's own
    best, best_step, comm = None, math.inf, False

    def key(r: PathRow) -> tuple:
        return r.key if comm else r.key[:2]

    def add(r: PathRow) -> bool:
        lp_rows.setdefault(key(r), r)
        return rows.setdefault(key(r), r) is r

    def consider(assign: list[int]) -> float:
        """Score a plan (the best within the cap is kept) and add its critical paths; its step."""
        return _consider(assign)[0]

    def _consider(assign: list[int]) -> tuple[float, bool]:
        nonlocal best, best_step
        step, fits, paths = scorer.score(assign)
        if fits and step < best_step:
            best, best_step = list(assign), step
        for r in paths:
            add(r)
        return step, fits

    def fitting_step(assign: list[int]) -> float:
        """consider(); inf for a plan beyond the memory cap."""
        step, fits = _consider(assign)
        return step if fits else math.inf

    starts = [a for a in ([incumbent] if incumbent is not None else []) + list(seeds) if a is not None]
    for a in starts or [chain_dp_split(problem)]:
        consider(a)
    # model the links when the hops of a path (2 per stage boundary and microbatch, at most the
    # largest value each) could add more than a tenth of tol to the least step (m W / p)
    hop_s = max((val.bytes / bw for val in bg.values), default=0.0)
    comm = p > 1 and 2 * (K - 1) * hop_s > tol / 10 * m * sum(b.time_s for b in bg.blocks) / p
    found_rows, rows, lp_rows = list(rows.values()), {}, {}
    for r in list(paths) + synthetic_rows(scorer.sched, K) + found_rows:
        add(r)
    units = StageUnits.of(bg)
    dag = ActionDag(scorer.sched)

    def caps_now():
        if best is None or time.perf_counter() > deadline - 0.1:
            return None
        return prefix_caps(lp_rows, lp_units, dag, best_step, key=key, deadline=deadline)

    def relaxation(prefix):
        if time.perf_counter() > deadline - 0.1:
            return None
        try:
            rel = _Relaxation(problem, units, prefix, comm, lp_units.work)
        except NoSplit:
            return None
        if best is not None and not rel.hint(best):
            return None  # the caps cut off the best plan (rounding): not safe
        for r in rows.values():
            rel.add_row(r)
        rel.bound_top(lower, best_step)
        return rel

    # the fluid bound (blocks may split) and the rows that set it: the relaxation's LP needs them
    lower, tight, lp_units = _fluid(bg, units, lp_rows, dag, key, deadline)
    for r in tight:
        add(r)
    iterations, status = 0, "time_limit"
    if best is not None and best_step > lower * (1 + tol) and chain_share(bg) >= CHAIN_MIN_SHARE:
        # whole blocks on a chain: a branch and bound over the cuts closes most of what the fluid misses
        if not chain_only:  # the fluid LP's branch and bound first: on few, unequal blocks it closes fast
            chained = chain_bound(bg, lp_units, dag, lp_rows, best_step, tol, t0 + CHAIN_SHARE * time_limit_s, key,
                                  fitting_step, problem.memory_cap_bytes, scorer.inflight)
            _log.debug("chain bound %.6g s (%s, %d nodes); best %.6g s", chained.lower_bound_s,
                       "complete" if chained.complete else "incomplete", chained.nodes, best_step)
            lower = max(lower, chained.lower_bound_s)
        if best_step > lower * (1 + tol):
            chained = chain_sat_bound(bg, lp_units, dag, lp_rows, best_step, tol, t0 + CHAIN_SAT_SHARE * time_limit_s,
                                      key, fitting_step, problem.memory_cap_bytes, scorer.inflight)
            _log.debug("chain CP-SAT bound %.6g s (%s, %d solves); best %.6g s", chained.lower_bound_s,
                       "complete" if chained.complete else "incomplete", chained.nodes, best_step)
            lower = max(lower, chained.lower_bound_s)
    if (best is not None and best_step <= lower * (1 + tol)) or chain_only:
        return PathBound(best, best_step, min(lower, best_step), iterations, len(rows),
                         "converged" if best is not None and best_step <= lower * (1 + tol) else "time_limit",
                         time.perf_counter() - t0, list(rows.values()))
    caps = caps_now()
    rel = (relaxation(caps) if caps is not None else None) or relaxation(None)
    slice_s = first_slice_s = max(_MIN_SLICE_S, time_limit_s / 16)  # a relaxation's time
    probing = False  # after a relaxation that neither closed nor raised the bound: probe a third of the way up
    while rel is not None and time.perf_counter() < deadline - 0.1:
        if best is not None:
            rel.hint(best)
        if probing and best is not None:
            target = lower + (best_step - lower) / 3  # near the bound: refuted fastest
            got, answers = rel.probe(target, min(deadline - time.perf_counter(), 2 * slice_s), workers)
            iterations += 1
            before = len(rows)
            if got == cp_model.INFEASIBLE:  # probe on, a third of the gap higher
                lower = max(lower, target)
            else:  # a plan within the target, or new paths that cut the answer off; or out of time
                for a in answers:
                    consider(a)
                probing = False
            if best_step <= lower * (1 + tol):
                status = "converged"
                break
            for r in list(rows.values())[before:]:
                rel.add_row(r)
            rel.bound_top(lower, best_step)
            continue
        got, bound, found = rel.solve(min(deadline - time.perf_counter(), slice_s), tol, workers)
        iterations += 1
        if got == cp_model.INFEASIBLE:  # nothing fits the cap (or, with an incumbent, nothing beats it)
            status = "infeasible" if best is None else "converged"
            lower = best_step if best is not None else math.inf
            break
        stuck = bound <= lower * (1 + tol / 10)  # this relaxation did not raise the bound
        lower = max(lower, bound)
        before = len(rows)
        steps = [consider(a) for a, _ in found]
        missing = steps[-1] / found[-1][1] - 1 if found and found[-1][1] > 0 else 0.0  # what the rows miss
        _log.debug("rows miss %.2f%% of the answer's step; best %.6g s, bound %.6g s", 100 * missing, best_step, lower)
        if best is not None and best_step <= lower * (1 + tol):
            status = "converged"
            break
        if len(rows) == before and got == cp_model.OPTIMAL:  # the answer's paths are all rows
            status = "stalled"  # only the communication the rows leave out is left
            break
        # while the rows miss much of the answers' steps, short relaxations gather paths faster;
        # once they describe them, longer ones prove the bound
        slice_s = first_slice_s if missing > tol else slice_s * 2
        probing = got != cp_model.OPTIMAL and stuck
        fresh = list(rows.values())[before:]
        tighter = caps_now()
        if tighter is not None and tighter != caps:
            again = relaxation(tighter)
            if again is not None and again.domain_size() < 0.95 * rel.domain_size():
                rel, caps, fresh = again, tighter, []
        for r in fresh:
            rel.add_row(r)
        rel.bound_top(lower, best_step)
    if best is not None:
        lower = min(lower, best_step)
    return PathBound(best, best_step, lower, iterations, len(rows), status, time.perf_counter() - t0,
                     list(rows.values()))


def _fluid(bg, units: StageUnits, rows: dict, dag: ActionDag, key, deadline: float
           ) -> tuple[float, list[PathRow], StageUnits]:
    """fluid_bound over the device's times and, where the graph has host times, over the host's
    (a stage pass takes at least either sum): (the larger bound, its rows, the units that gave it)."""
    lower, tight = fluid_bound(rows, units, dag, key, deadline=deadline)
    if not any(units.fhost) and not any(units.bhost) and not any(units.pass_host):
        return lower, tight, units
    host = StageUnits.of(bg, host=True)
    got = fluid_bound(rows, host, dag, key, deadline=deadline)
    return (*got, host) if got[0] > lower else (lower, tight, units)


def chain_share(bg) -> float:
    """The share of the work on bg's chain (chain_blocks): 1 on a path, less where the graph branches."""
    total = sum(b.time_s for b in bg.blocks)
    return sum(bg.blocks[b].time_s for b in chain_blocks(bg)) / total if total > 0 else 1.0
