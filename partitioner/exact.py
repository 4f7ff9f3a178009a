"""Exact best split for one stage per rank (v = 1, 1F1B) on path-shaped block graphs.

On a path-shaped graph (every block feeds the next) every valid v = 1 plan is a
contiguous split, so a branch and bound over cut positions, scoring complete
splits with the event simulator (partitioner.plan.evaluate_assignment), finds
the best plan. Partial splits are pruned by lower bounds on the simulated 1F1B
step: per-stage bounds (stage_bound_s), their DP over the unassigned stages
(rest_bounds_s, whose value at the root is pipeline_bound_s), and a relaxed
1F1B of the assigned ranks (RelaxedPipeline). solve() runs it after the ILP and
its local search; benchmarks/plan_quality.py reports it against the ILP.
"""
from __future__ import annotations

import time
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from partitioner.plan import evaluate_assignment
from partitioner.problem import PlanProblem
from partitioner.runtime.schedules import Action, make_schedule

EXACT_BUDGET_S = 60.0  # default time budget of best_split_s


class PassTimes:
    """Forward and backward seconds of a run of blocks [a, i) executed as one stage.

    As partitioner.stage_costs.stage_totals: the larger of the run's device and host sums, each with
    the stage pass's fixed cost (bg.stage_pass, NodeTime.fwd_pass_s). Exact for one stage; with
    `stages`, a lower bound on the total of that many stages covering the run (each pays at least
    its own share of both sums and its own fixed cost).
    """

    def __init__(self, bg):
        self.num_blocks = len(bg.blocks)
        self.stage_pass = bg.stage_pass
        # prefix sums of device fwd, host fwd, device bwd, host bwd
        self._pre = np.zeros((4, self.num_blocks + 1))
        self._pre[:, 1:] = np.cumsum([[blk.fwd_time_s, blk.host_fwd_time_s, blk.bwd_time_s, blk.host_bwd_time_s]
                                      for blk in bg.blocks], axis=0).T if bg.blocks else 0.0

    def fwd_s(self, a, i, stages=1) -> float:
        """Forward of [a, i) (numpy index arrays welcome)."""
        dev, host = self._pre[0], self._pre[1]
        return self.stage_pass.fwd_pass_s(dev[i] - dev[a], host[i] - host[a], stages)

    def bwd_s(self, a, i, stages=1) -> float:
        dev, host = self._pre[2], self._pre[3]
        return self.stage_pass.bwd_pass_s(dev[i] - dev[a], host[i] - host[a], stages)

    def work_s(self, a: int, i: int, stages: int = 1) -> float:
        """Forward + backward of [a, i): of one microbatch through the `stages` stages holding it, at least
        (0 stages: an empty run, 0)."""
        return self.fwd_s(a, i, stages) + self.bwd_s(a, i, stages)


def stage_bound_s(k: int, a: int, i: int, times: PassTimes, p: int, m: int) -> float:
    """Lower bound on the 1F1B step from stage k (on rank k) holding blocks [a, i); see pipeline_bound_s.

    Needs only the stage's block range: the stages before it hold [0, a), those after it [i, n).
    It grows with i.
    """
    f, b = times.fwd_s(a, i), times.bwd_s(a, i)
    work = times.work_s(0, times.num_blocks, p)
    return max(times.work_s(0, a, k) + m * (f + b), work + (m - 1) * b + (m - p + k) * f)


def rest_bounds_s(times: PassTimes, p: int, m: int) -> list[list[float]]:
    """rest[k][a]: least over splits of blocks [a, n) into stages k..p-1 of their largest stage_bound_s.

    A lower bound on the step of every split whose stage k starts at block a; rest[0][0] is
    pipeline_bound_s. inf where [a, n) cannot fill p - k non-empty stages.
    """
    n, inf = times.num_blocks, float("inf")
    rest = [[inf] * (n + 1) for _ in range(p + 1)]
    rest[p][n] = 0.0
    work = times.work_s(0, n, p)
    for k in range(p - 1, -1, -1):
        after = np.asarray(rest[k + 1])
        for a in range(k, n - (p - k) + 1):
            i = np.arange(a + 1, n - (p - k - 1) + 1)  # stage k holds [a, i): stage_bound_s, vectorised
            f, b = times.fwd_s(a, i), times.bwd_s(a, i)
            here = np.maximum(times.work_s(0, a, k) + m * (f + b), work + (m - 1) * b + (m - p + k) * f)
            rest[k][a] = float(np.maximum(here, after[i]).min())
    return rest


def pipeline_bound_s(problem: PlanProblem) -> float | None:
    """A true lower bound on the simulated 1F1B step of any plan of `problem` with one stage per rank.

    Two facts about rank k (stage k, forward f_k, backward b_k, W the whole work of a microbatch):
    - it cannot start before the forwards of stages 0..k-1 of a microbatch ran, then runs
      m (f_k + b_k), and its last backward is followed by the backwards of stages k-1..0:
      step >= sum_{j<k} (f_j + b_j) + m (f_k + b_k);
    - in 1F1B it runs p - k forwards before its first backward, which waits for the forwards of
      all stages and the backwards of stages after k; then come its m backwards and m - p + k
      forwards, then the backwards of stages before k: step >= W + (m - 1) b_k + (m - p + k) f_k.
    (stage_bound_s.) The bound is the least over contiguous splits (a DP, rest_bounds_s) of the
    largest of these over k: it bounds every plan when every block feeds the next (every valid
    plan is then a contiguous split) and m >= p; None otherwise, or with interleaving (v > 1),
    where the argument differs. Communication and all-reduce only add to the step. Sums over
    several stages are taken as one pass (PassTimes), which is never more than they take.
    """
    bg, p, v, m = problem.block_graph, problem.num_ranks, problem.chunks, problem.microbatches
    if v != 1 or m < p or not bg.is_path():
        return None
    return rest_bounds_s(PassTimes(bg), p, m)[0][0]


@dataclass(frozen=True)
class ExactResult:
    """Outcome of best_split_s.

    step_time_s: the fastest simulated step found (the incumbent's if nothing beat it);
    cuts: first block of stages 1..p-1 of that split (None: the incumbent's, not given);
    splits_simulated: complete splits scored by the simulator;
    complete: the search finished, so step_time_s is the optimum over all contiguous splits;
    lower_bound_s: no split is faster than this (step_time_s when complete).
    """

    step_time_s: float
    cuts: tuple[int, ...] | None
    splits_simulated: int
    complete: bool
    lower_bound_s: float


class _OutOfTime(Exception):
    """best_split_s ran past its time budget."""


class RelaxedPipeline:
    """1F1B on ranks 0..k-1 alone, the stages after them replaced by one free-flowing detour.

    A microbatch leaving stage k-1 forward comes back to it backward no sooner than
    the forwards and backwards of blocks [a_k, n) (the later stages) take, whatever their
    split. So the event recurrence on ranks < k (the simulator's, in a fixed topological
    order, communication dropped) with that detour gives times no later than the real
    ones: a lower bound on the step of every split that extends the first k stages.
    With k = p it is the simulator's step without communication.
    """

    def __init__(self, p: int, m: int):
        sched = make_schedule("1f1b", p, m, 1)
        index = {a: (r, j) for r, row in enumerate(sched.actions) for j, a in enumerate(row)}
        pos, order = [0] * p, []
        done: set = set()
        while len(order) < len(index):  # Kahn's order: rank order plus the chain's data dependencies
            for r, row in enumerate(sched.actions):
                while pos[r] < len(row):
                    a = row[pos[r]]
                    dep = _chain_dep(a, p)
                    if dep is not None and dep not in done:
                        break
                    order.append(a)
                    done.add(a)
                    pos[r] += 1
        ids = {a: i for i, a in enumerate(order)}
        self.num_actions = len(order)
        self.ops = []  # per k: (id, is_fwd, stage, id of the rank's previous action, id of the data dependency)
        for k in range(p + 1):
            ops = []
            for a in order:
                if a.stage >= k:
                    continue
                r, j = index[a]
                prev = ids[sched.actions[r][j - 1]] if j > 0 else -1
                dep = _chain_dep(a, p)
                if a.kind == "B" and a.stage == k - 1 and k < p:
                    dep = Action(a.stage, "F", a.microbatch)  # the detour through stages k..p-1
                ops.append((ids[a], a.kind == "F", a.stage, prev, ids[dep] if dep is not None else -1))
            self.ops.append(ops)

    def step_s(self, fwd_s: list[float], bwd_s: list[float], detour_s: float) -> float:
        """Lower bound on the step: stages 0..len(fwd_s)-1 take fwd_s/bwd_s, the rest detour_s in all."""
        k = len(fwd_s)
        end = [0.0] * self.num_actions
        last = 0.0
        for idx, is_fwd, stage, prev, dep in self.ops[k]:
            t = end[prev] if prev >= 0 else 0.0
            if dep >= 0:
                d = end[dep] + detour_s if (not is_fwd and stage == k - 1) else end[dep]
                if d > t:
                    t = d
            end[idx] = t + (fwd_s[stage] if is_fwd else bwd_s[stage])
            if end[idx] > last:
                last = end[idx]
        return last


def _chain_dep(a, p: int):
    """The action of another stage that `a` waits for in a chain of p stages (None for the ends)."""
    if a.kind == "F":
        return Action(a.stage - 1, "F", a.microbatch) if a.stage > 0 else None
    return Action(a.stage + 1, "B", a.microbatch) if a.stage + 1 < p else None


def _allreduce_known_s(bg, starts: list[int], bw: float) -> float:
    """All-reduce time of tied parameters whose users already sit on different stages.

    starts: first blocks of the assigned stages and, last, of the unassigned rest (all of it
    on stages after them): a lower bound on the split's all-reduce (partitioner.stage_costs.stage_totals).
    """
    total = 0.0
    for sp in bg.shared_params:
        if sp.trainable and len({bisect_right(starts, b) for b in sp.blocks}) > 1:
            total += 2 * sp.bytes / bw
    return total


def split_cuts(block_stage: list[int]) -> tuple[int, ...]:
    """First block of every stage but the first, of a contiguous split."""
    return tuple(b for b in range(1, len(block_stage)) if block_stage[b] != block_stage[b - 1])


def split_assignment(cuts: tuple[int, ...], num_blocks: int) -> list[int]:
    """Stage of every block of the contiguous split whose stages 1.. start at `cuts`."""
    starts = (0, *cuts, num_blocks)
    return [s for s in range(len(starts) - 1) for _ in range(starts[s], starts[s + 1])]


def best_split_s(problem: PlanProblem, incumbent_s: float = float("inf"), time_budget_s: float = EXACT_BUDGET_S,
                 incumbent_cuts: tuple[int, ...] | None = None, gap: float = 0.0) -> ExactResult:
    """The contiguous split into p 1F1B stages with the fastest simulated step (v = 1), by branch and bound.

    On a path-shaped graph every valid v = 1 plan is a contiguous split, so this is the best plan.
    Stages are cut left to right; a partial split is dropped once a lower bound on every split
    extending it reaches the incumbent (incumbent_s: the step of some split, e.g. the ILP plan's):
    the stage_bound_s of each assigned stage, rest_bounds_s for the unassigned ones, and the
    relaxed 1F1B of the assigned ranks (RelaxedPipeline) plus the tied-weight all-reduce already
    forced. Complete splits are scored by partitioner.plan.evaluate_assignment, as the ILP and the
    baselines are. With problem.memory_cap_bytes, a split whose simulated peak on some rank exceeds it is
    no candidate (the bounds still hold for the splits that fit). Past time_budget_s it stops with
    complete=False. gap > 0 also drops a partial split whose bound is within that fraction of the
    best step: complete then proves the best within the gap (lower_bound_s: the least bound of what was dropped).
    """
    bg, p, m = problem.block_graph, problem.num_ranks, problem.microbatches
    memory_cap_bytes, link_bw_bytes_per_s = problem.memory_cap_bytes, problem.link_bw_bytes_per_s
    if not bg.is_path() or m < p or problem.chunks != 1:
        raise ValueError(f"best_split_s needs a path-shaped block graph, one stage per rank and m >= p "
                         f"(got m={m}, p={p}, chunks={problem.chunks})")
    deadline = time.perf_counter() + time_budget_s
    n, bw = len(bg.blocks), link_bw_bytes_per_s
    times = PassTimes(bg)
    rest = rest_bounds_s(times, p, m)
    relaxed = RelaxedPipeline(p, m)
    margin = (1 - 1e-12) * (1 + gap)  # float noise: the relaxation sums in another order than the simulator
    best = {"step": incumbent_s, "cuts": incumbent_cuts, "splits": 0, "pruned": float("inf")}  # pruned: least
    # bound of a dropped partial split
    exploring: list[float] = []  # bound of the child being explored at every depth (ascending per depth)

    def child_bound(starts: list[int], fwd: list[float], bwd: list[float]) -> float:
        a = starts[-1]
        return (max(relaxed.step_s(fwd, bwd, times.work_s(a, n, p - len(fwd))), rest[len(fwd)][a])
                + _allreduce_known_s(bg, starts[1:], bw))

    def search(starts: list[int], fwd: list[float], bwd: list[float]) -> None:
        k, a = len(fwd), starts[-1]  # stages 0..k-1 assigned; stage k starts at block a
        children = []
        for i in range(a + 1, n - (p - k - 1) + 1) if k < p - 1 else (n,):
            if stage_bound_s(k, a, i, times, p, m) * margin >= best["step"]:
                pruned(stage_bound_s(k, a, i, times, p, m))  # it grows with i: bounds the later ones too
                break
            if rest[k + 1][i] * margin >= best["step"]:
                pruned(rest[k + 1][i])
                continue
            f, b = fwd + [times.fwd_s(a, i)], bwd + [times.bwd_s(a, i)]
            bound = child_bound(starts + [i], f, b)
            if bound * margin < best["step"]:
                children.append((bound, i, f, b))
            else:
                pruned(bound)
        children.sort(key=lambda c: c[0])
        exploring.append(0.0)
        for bound, i, f, b in children:
            if bound * margin >= best["step"]:
                pruned(bound)  # children come in ascending bound
                break
            exploring[-1] = bound
            if time.perf_counter() > deadline:
                raise _OutOfTime
            if k + 1 < p:
                search(starts + [i], f, b)
                continue
            cuts = tuple(starts[1:])
            plan = evaluate_assignment(bg, split_assignment(cuts, n), p, 1, m, "1f1b", link_bw_bytes_per_s=bw,
                                       memory_cap_bytes=memory_cap_bytes)
            best["splits"] += 1
            if memory_cap_bytes is not None and max(plan.rank_mem_bytes) > memory_cap_bytes:
                continue
            if plan.step_time_s < best["step"]:
                best["step"], best["cuts"] = plan.step_time_s, cuts
        exploring.pop()

    def pruned(bound: float) -> None:
        best["pruned"] = min(best["pruned"], bound)

    try:
        search([0], [], [])
        complete, lower = True, min(best["step"], best["pruned"])
    except _OutOfTime:
        # unexplored splits extend a child on the stack or a later sibling, whose bound is no lower
        complete, lower = False, min([best["step"], best["pruned"]] + exploring)
    return ExactResult(best["step"], best["cuts"], best["splits"], complete, lower)
