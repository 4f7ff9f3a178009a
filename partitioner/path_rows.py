"""Paths through a schedule's action DAG, as rows of lower bounds on the simulated step.

A schedule fixes every rank's action order (runtime.schedules.make_schedule); the simulator's step
is then the longest path in a DAG of actions whose durations are the stage times. A path is a row:
how many forwards and backwards of each stage it runs, and how many hops between stages. For any
plan, every row's sum at that plan's stage times is at most its step. This module finds the rows
(critical_path of a simulated timeline, ActionDag.longest without communication, synthetic_rows
under made-up times) and bounds what the rows allow over every way of splitting the work
(FluidLp: blocks may split; fluid_bound, prefix_caps). partitioner/critical_path.py adds them to
the partition ILP.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ortools.linear_solver import pywraplp

from partitioner.glop import solve_within
from partitioner.runtime.executor import in_process_order
from partitioner.runtime.schedules import dependencies
from partitioner.runtime.simulator import StageCosts, input_delays, simulate
from partitioner.work_hull import ideal_halfplanes

UNITS = 10_000_000  # one microbatch's whole work is about this many integer units


@dataclass(frozen=True)
class PathRow:
    """A path through the schedule's action DAG: how many forwards and backwards of each stage it runs.

    comm_s: the communication delays on it in the timeline it came from.
    actions: the path, first action first.
    """

    fwd_count: tuple[int, ...]
    bwd_count: tuple[int, ...]
    comm_s: float = 0.0
    actions: tuple = ()
    hops: tuple[int, ...] = ()  # [k]: data edges between stages k - 1 and k on the path (F(k-1) -> F(k), B(k) -> B(k-1))

    @property
    def key(self) -> tuple:
        return self.fwd_count, self.bwd_count, self.hops

    def compute_s(self, fwd_s, bwd_s) -> float:
        """The path's compute with these stage times: a lower bound on the step."""
        return sum(a * f for a, f in zip(self.fwd_count, fwd_s)) + sum(b * t for b, t in zip(self.bwd_count, bwd_s))


def critical_path(timeline, costs) -> PathRow:
    """The path that sets the step of a simulated timeline (runtime.simulator.simulate(schedule, costs)).

    Back from the last action to end, through whichever predecessor its start waited for: the rank's
    previous action or a data dependency plus its delay, exactly as the simulator computes starts.
    compute_s(costs) + comm_s equals timeline.step_time_s.
    """
    s = timeline.schedule
    start, end = timeline.start_s, timeline.end_s
    n = s.num_stages
    prev = {}
    for row in s.actions:
        for i, a in enumerate(row):
            prev[a] = row[i - 1] if i > 0 else None

    fwd, bwd, hops = [0] * n, [0] * n, [0] * n
    path, delay = [], 0.0
    a = max(end, key=lambda x: end[x]) if end else None
    while a is not None:
        path.append(a)
        (fwd if a.kind == "F" else bwd)[a.stage] += 1
        deps = input_delays(s, costs, a)
        if prev[a] is not None:
            deps.append((prev[a], 0.0))
        if start[a] <= 0.0 or not deps:
            break  # a path may start anywhere: every start is at least 0
        d, lag = max(deps, key=lambda x: end[x[0]] + x[1])
        if end[d] + lag != start[a]:
            raise ValueError(f"timeline does not match the costs: {a} starts at {start[a]}, not when its "
                             "inputs arrive")
        if d.kind == a.kind and d.microbatch == a.microbatch and abs(d.stage - a.stage) == 1:
            hops[max(d.stage, a.stage)] += 1
        a = d
        delay += lag
    return PathRow(tuple(fwd), tuple(bwd), delay, tuple(reversed(path)), tuple(hops))


def synthetic_rows(schedule, num_stages: int) -> list[PathRow]:
    """Critical paths of the schedule under made-up stage times: equal stages, then each rank and each
    stage much heavier than the rest (a path through its whole action list with fill and drain)."""
    p, K = schedule.num_ranks, num_stages
    weights = [[1.0] * K]
    weights += [[30.0 if schedule.stage_rank[k] == r else 1.0 for k in range(K)] for r in range(p)]
    if K > p:
        weights += [[30.0 if k == j else 1.0 for k in range(K)] for j in range(K)]
    out = []
    for wt in weights:
        costs = StageCosts(tuple(wt), tuple(2 * x for x in wt), (), (0,) * K)
        out.append(critical_path(simulate(schedule, costs), costs))
    return out


@dataclass(frozen=True)
class StageUnits:
    """Integer block times (rounded down, so every row stays a lower bound) and the scale (units per second).

    cut_halfplanes: (a, c, h) with a F + c B <= h for the device forward and backward units (F, B) of the
    blocks before any cut of any valid plan (partitioner/work_hull.py).
    pass_dev / pass_host: (forward, backward) units of the fixed cost every stage pass adds to the
    stage's device / host sum (BlockGraph.stage_pass), rounded down too. Where only device work is
    modelled (FluidLp, chain_bound.py, chain_sat.py) a row gains pass_dev per action (`passes`):
    every stage of a valid plan holds a block, so each of its passes takes at least its device sum
    plus pass_dev. A pass takes at least its host sum plus pass_host too: StageUnits.of(bg, host=True)
    puts the host's times in the device's place, and those bounds hold over them alike (where the host
    dispatches longer than the device runs, a small batch, only they come near the step).
    """

    scale: float
    fdev: list[int]
    bdev: list[int]
    fhost: list[int]
    bhost: list[int]
    cut_halfplanes: tuple[tuple[int, int, int], ...] = ()
    pass_dev: tuple[int, int] = (0, 0)
    pass_host: tuple[int, int] = (0, 0)

    @classmethod
    def of(cls, bg, host: bool = False) -> "StageUnits":
        """bg's units; host: the host's times in the device's place (and the device's in the host's)."""
        scale = UNITS / (sum(b.time_s for b in bg.blocks) or 1.0)

        def down(attr: str) -> list[int]:
            return [math.floor(getattr(b, attr) * scale) for b in bg.blocks]

        fdev, bdev = down("fwd_time_s"), down("bwd_time_s")
        fhost, bhost = down("host_fwd_time_s"), down("host_bwd_time_s")
        o = bg.stage_pass
        pass_dev = (math.floor(o.fwd_s * scale), math.floor(o.bwd_s * scale))
        pass_host = (math.floor(o.host_fwd_s * scale), math.floor(o.host_bwd_s * scale))
        if host:
            fdev, bdev, fhost, bhost, pass_dev, pass_host = fhost, bhost, fdev, bdev, pass_host, pass_dev
        return cls(scale, fdev, bdev, fhost, bhost, tuple(ideal_halfplanes(bg.graph, fdev, bdev)), pass_dev, pass_host)

    def passes(self, r: PathRow) -> int:
        """The device units of the stage passes on path r: pass_dev once per forward and per backward."""
        return self.pass_dev[0] * sum(r.fwd_count) + self.pass_dev[1] * sum(r.bwd_count)

    def with_passes(self, fwd: list, bwd: list) -> tuple[list, list]:
        """Stages' device sums (units) -> their passes' device times: each plus pass_dev."""
        return [f + self.pass_dev[0] for f in fwd], [b + self.pass_dev[1] for b in bwd]

    @property
    def work(self) -> list[int]:
        """Device forward + backward: a stage takes at least the sum over its blocks."""
        return [f + b for f, b in zip(self.fdev, self.bdev)]


class ActionDag:
    """A schedule's actions in a topological order with their predecessors (the rank's previous action,
    F(k-1) before F(k), F(k) and B(k+1) before B(k)): the longest path without communication, fast.

    Without communication the chain's dependencies imply the simulator's others (F(j), j < k, ends
    before F(k-1) does), so `longest` is the simulated step of those stage times.
    """

    def __init__(self, schedule):
        s = schedule
        self.actions = in_process_order(s)  # every rank's actions, each after what it waits for
        index = {a: i for i, a in enumerate(self.actions)}
        prev = {row[i]: row[i - 1] for row in s.actions for i in range(1, len(row))}
        self.preds = [[index[d] for d in dependencies(s, a)] + ([index[prev[a]]] if a in prev else [])
                      for a in self.actions]
        self.num_stages = s.num_stages
        self.fwd = [a.kind == "F" for a in self.actions]
        self.stage = [a.stage for a in self.actions]

    def longest(self, fwd_s, bwd_s) -> tuple[float, PathRow]:
        """(length, path) of the longest path with these stage times."""
        n = len(self.actions)
        end, arg = [0.0] * n, [-1] * n
        for i in range(n):
            t, a = 0.0, -1
            for j in self.preds[i]:
                if end[j] > t:
                    t, a = end[j], j
            end[i] = t + (fwd_s if self.fwd[i] else bwd_s)[self.stage[i]]
            arg[i] = a
        i = max(range(n), key=end.__getitem__) if n else -1
        fc, bc, hops, path = [0] * self.num_stages, [0] * self.num_stages, [0] * self.num_stages, []
        while i >= 0:
            (fc if self.fwd[i] else bc)[self.stage[i]] += 1
            path.append(self.actions[i])
            j = arg[i]
            if j >= 0 and self.fwd[j] == self.fwd[i] and abs(self.stage[j] - self.stage[i]) == 1 and \
                    self.actions[j].microbatch == self.actions[i].microbatch:
                hops[max(self.stage[i], self.stage[j])] += 1
            i = j
        return (max(end) if n else 0.0), PathRow(tuple(fc), tuple(bc), 0.0, tuple(reversed(path)), tuple(hops))


class FluidLp:
    """Per-stage device forward and backward sums as continuous variables: blocks may split.

    They sum to the plan's totals, keep its range of backward/forward ratios, and every cut point
    (the sums of stages 0..j-1) lies in the hull of the ideals' sums (units.cut_halfplanes), so every
    plan's stage sums are a point of it. Rows bound the step from below: each one is at most `top`
    (a constant, units), or, with top None, at most the variable T. The variables count in whole
    microbatches of work (units / self.unit), which keeps GLOP's numbers near 1: in units, long
    separations ended ABNORMAL.
    """

    def __init__(self, units: StageUnits, num_stages: int, top: float | None = None):
        K = num_stages
        self.units = units
        self.unit = unit = float(sum(units.work) or 1)
        self.lp = lp = pywraplp.Solver.CreateSolver("GLOP")
        self.f = [lp.NumVar(0, lp.infinity(), f"f{k}") for k in range(K)]
        self.b = [lp.NumVar(0, lp.infinity(), f"b{k}") for k in range(K)]
        lp.Add(sum(self.f) == sum(units.fdev) / unit)
        lp.Add(sum(self.b) == sum(units.bdev) / unit)
        ratios = [bd / fd for fd, bd in zip(units.fdev, units.bdev) if fd > 0]
        if ratios:
            for k in range(K):
                lp.Add(self.b[k] >= min(ratios) * self.f[k])
                if all(fd > 0 or bd == 0 for fd, bd in zip(units.fdev, units.bdev)):
                    lp.Add(self.b[k] <= max(ratios) * self.f[k])
        for a, c, h in units.cut_halfplanes:
            norm = math.hypot(a, c)
            for j in range(1, K):
                lp.Add((a / norm) * sum(self.f[:j]) + (c / norm) * sum(self.b[:j]) <= h / norm / unit)
        self.top = top
        self.T = lp.NumVar(0, lp.infinity(), "T") if top is None else None
        self.rows: dict[tuple, tuple[PathRow, object]] = {}
        self.proven = 0.0  # the largest T of an answer so far (units): a bound even if a later solve fails

    def add(self, k: tuple, r: PathRow) -> None:
        e = (sum(c * x for c, x in zip(r.fwd_count, self.f) if c) + sum(c * x for c, x in zip(r.bwd_count, self.b) if c)
             + self.units.passes(r) / self.unit)
        self.rows[k] = r, (self.lp.Add(e <= self.top / self.unit) if self.T is None
                           else self.lp.Add(e - self.T <= 0))

    def stage_units(self) -> tuple[list[float], list[float]]:
        """The answer's forward and backward sum of every stage, in units."""
        return ([x.solution_value() * self.unit for x in self.f], [x.solution_value() * self.unit for x in self.b])

    def value(self) -> float:
        """The answer's T (units)."""
        return self.T.solution_value() * self.unit

    def solve(self, dag: ActionDag, rows: dict, key, max_rounds: int, deadline: float = math.inf) -> bool:
        """Solve, adding the longest path at the answer while it breaks the bound (to `rows` too);
        False when the LP has no answer (infeasible: no plan meets top; or GLOP gave up, out of time
        past `deadline` included: partitioner/glop.py)."""
        for i in range(max_rounds + 1):
            if solve_within(self.lp, deadline) != pywraplp.Solver.OPTIMAL:
                return False
            if self.T is not None:
                self.proven = max(self.proven, self.value())
            if i == max_rounds:
                return True
            bound = self.top if self.T is None else self.value()
            length, r = dag.longest(*self.units.with_passes(*self.stage_units()))
            if length <= bound * (1 + 1e-7) or key(r) in self.rows:
                return True
            rows.setdefault(key(r), r)
            self.add(key(r), r)
        return True


def fluid_bound(rows: dict, units: StageUnits, dag: ActionDag, key=lambda r: r.key,
                max_rounds: int = 200, deadline: float = math.inf) -> tuple[float, list[PathRow]]:
    """(lower bound in seconds, the rows that set it): min T over FluidLp with every path's row.

    Every plan's stage sums are a point of the LP, so its optimum bounds every plan's step (without
    communication and all-reduce) from below; paths violated at the answer are added (to `rows` too)
    until none is, max_rounds or `deadline`. The rows with a positive dual are the ones the bound needs.
    """
    lp = FluidLp(units, dag.num_stages)
    for k, r in rows.items():
        lp.add(k, r)
    lp.lp.Minimize(lp.T)
    if not lp.solve(dag, rows, key, max_rounds, deadline):
        return max(0.0, lp.proven * (1 - 1e-6)) / units.scale, []
    tight = [r for r, con in lp.rows.values() if con.dual_value() < -1e-9 or con.dual_value() > 1e-9]
    return max(0.0, lp.value() * (1 - 1e-6)) / units.scale, tight  # (1 - 1e-6): the LP's tolerance


def prefix_caps(rows: dict, units: StageUnits, dag: ActionDag, upper_s: float, max_rounds: int = 20,
                key=lambda r: r.key, deadline: float = math.inf) -> tuple[list[int], list[int]] | None:
    """(most[j], most_after[j]): the most device work (units) stages 0..j, and stages j..K-1, hold in any
    plan whose step is at most upper_s; None when no plan is, or GLOP gave up (past `deadline` too).

    FluidLp with every row at most upper_s, maximising and minimising the work of stages 0..j, its
    answer checked against every path (ActionDag.longest; a violated one becomes a row, added to
    `rows`, by key(row), too) for up to max_rounds: the caps are those of the fluid problem
    (communication left out). Past `deadline` the caps left stay trivial. A relaxation of every
    plan no slower than upper_s, so the caps are valid.
    """
    K = dag.num_stages
    lp = FluidLp(units, K, upper_s * units.scale * (1 + 1e-9))
    for k, r in rows.items():
        lp.add(k, r)
    total = sum(units.work)
    most, least = [total] * K, [0] * K  # least[j]: the least work stages 0..j hold
    for j in range(K - 1):
        if time.perf_counter() > deadline:
            break  # the caps not computed stay trivial (valid)
        for sense, out in ((1, most), (-1, least)):
            obj = lp.lp.Objective()
            obj.Clear()
            for k in range(j + 1):
                obj.SetCoefficient(lp.f[k], 1)
                obj.SetCoefficient(lp.b[k], 1)
            obj.SetMaximization() if sense > 0 else obj.SetMinimization()
            if not lp.solve(dag, rows, key, max_rounds, deadline):
                return None
            val = obj.Value() * lp.unit  # valid whether or not the separation finished: the LP only grew
            slack = 1e-6 * total + 2  # the LP's tolerances
            out[j] = min(total, math.ceil(val + slack)) if sense > 0 else max(0, math.floor(val - slack))
    after = [total - (least[j - 1] if j > 0 else 0) for j in range(K)]
    return most, after


def fluid_split(rows: dict, units: StageUnits, dag: ActionDag, key=lambda r: r.key, max_rounds: int = 200,
                deadline: float = math.inf) -> list[int] | None:
    """Block -> stage of the split in block order whose cut points' work is nearest the fluid optimum's
    (FluidLp minimising T over every path's row): where blocks are small next to a stage, the best split
    of whole blocks lies near it, a start for the local search that the layer-count splits are not
    (their stages are even, the optimum's are not). None when GLOP gives up (past `deadline` too).

    Every stage keeps at least one block, so the split is valid where the blocks' order is topological.
    """
    K, n = dag.num_stages, len(units.fdev)
    lp = FluidLp(units, K)
    for k, r in rows.items():
        lp.add(k, r)
    lp.lp.Minimize(lp.T)
    if not lp.solve(dag, rows, key, max_rounds, deadline):
        return None
    f, b = lp.stage_units()
    prefix = [0]
    for w in units.work:
        prefix.append(prefix[-1] + w)
    cuts, target = [], 0.0
    for j in range(1, K):  # cut j: the prefix nearest the first j stages' work, leaving each stage a block
        target += f[j - 1] + b[j - 1]
        lo, hi = (cuts[-1] if cuts else 0) + 1, n - (K - j)
        cuts.append(min(range(lo, hi + 1), key=lambda i: abs(prefix[i] - target)))
    out, k = [], 0
    for i in range(n):
        while k < K - 1 and cuts[k] <= i:
            k += 1
        out.append(k)
    return out
