"""solve(): the best plan for a block graph, in five steps that each hand the next a plan.

1. Seeds (partitioner/seeds.py): the chain DP splits (by time with receives, by
   compute) and the baselines' splits; the best by the ILP's objective within the
   memory cap is the incumbent.
2. ILP (partitioner/ilp.py): CP-SAT on the closed-form step time, hinted with the
   incumbent and pruned by its objective (on large graphs this leaves each block
   two or three stages; benchmarks/RESULTS.md has the figures).
3. Polish (partitioner/refine.py): local search on the simulated step.
4. Exact (partitioner/exact.py): for 1f1b on path-shaped graphs, the best
   contiguous split.
5. Bound (partitioner/critical_path.py): critical-path row generation where no
   exact search proved the plan.

Before them, when interleaving on a graph that is mostly a chain (a transformer), a quick proof may
end the search: the split nearest the fluid relaxation's optimum (path_rows.fluid_split), polished,
and the bound over the chain's whole-block cuts (partitioner/chain_sat.py) proving it within gap;
the plan's status is then "FLUID_SPLIT+refined" (no ILP ran, its objective is the plan's closed form,
its bound 0). Where it proves nothing, its plan joins the seeds of the polish and the steps above
share what time is left.

The objective is a closed form; the event simulator is the judge. So the
solver's solution and every seed are polished by a local search on the
simulated step time (partitioner/refine.py): move a block, or shift a range of
stage boundaries together, while the move keeps stages ordered, non-empty and
within the memory cap and the simulator says the step gets faster; a third of
the time goes to the seeds alike, the rest to the best (with random kicks once
it stops). Where no exact search follows (interleaving, branchy graphs) the
polish gets POLISH_SHARE of time_limit_s, since there the closed form misjudges
most, and the row generation keeps PATHS_SHARE for its bound. For one stage per rank
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
and the row generation (the rest, at least PATHS_SHARE where no exact search came first,
at most PATHS_TIME_CAP_S).

gap (default 1%) ends the search early once the plan is proven within it: it is
CP-SAT's relative gap limit; for 1f1b on paths the polish stops at a plan within
it of pipeline_bound_s (known before the polish) and the exact search is skipped
then, else it drops partial splits whose bound is within it of the best; the row
generation stops within it. Where no bound comes that close, time_limit_s ends it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from partitioner.critical_path import CHAIN_MIN_SHARE, PathBound, chain_share, path_bound_solve
from partitioner.critical_path import DEFAULT_TOL as PATHS_TOL
from partitioner.errors import PlanError
from partitioner.exact import best_split_s, pipeline_bound_s, split_assignment, split_cuts
from partitioner.ilp import NoSplit, build_ilp, cp_solver
from partitioner.path_rows import ActionDag, StageUnits, fluid_split, synthetic_rows
from partitioner.plan import Plan, SolverReport, evaluate
from partitioner.problem import DEFAULT_LINK_BW_BYTES_PER_S, PlanProblem, check_gap
from partitioner.refine import refine
from partitioner.runtime.schedules import make_schedule
from partitioner.seeds import Seeds, fits_memory, make_seeds

EXACT_TIME_CAP_S = 10.0  # most time the exact split search after refine takes
PATHS_TIME_CAP_S = 30.0  # most time the critical-path row generation after them takes
PATHS_MIN_TIME_S = 0.5  # less time left than this: no row generation
POLISH_SHARE = 0.55  # of time_limit_s for the polish where no exact search follows
PATHS_SHARE = 0.2  # of time_limit_s kept there for the row generation's lower bound
DEFAULT_GAP = 0.01  # stop once the plan is proven within this fraction of a lower bound
QUICK_POLISH_SHARE = 0.15  # of time_limit_s, the polish of the fluid split (interleaving on a chain)
QUICK_PROOF_SHARE = 0.25  # of time_limit_s, the most its proof over the chain's cuts takes after that


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
    problem = PlanProblem.checked(bg, num_ranks, chunks, microbatches, schedule, memory_cap_bytes,
                                  link_bw_bytes_per_s)
    check_gap(gap)
    p, v, m = problem.num_ranks, problem.chunks, problem.microbatches
    exact_follows = v == 1 and problem.schedule == "1f1b" and m >= p and p > 1 and bg.is_path()
    if refine_time_s is None:  # the simulator's polish pays most where no exact search follows it
        # (with a gap the exact search needs only a good incumbent: 0.5 s of polish found the same
        # gpt2-xl plan at p = 8 as 2 s)
        refine_time_s = (min(2.0 if gap == 0 else 0.5, time_limit_s / 4) if exact_follows
                         else POLISH_SHARE * time_limit_s)
    searching = simulate and refine_time_s > 0  # the polish, then the exact search or the row generation
    # where no exact search follows, the row generation needs time of its own for a bound
    paths_reserve_s = PATHS_SHARE * time_limit_s if searching and not exact_follows else 0.0
    t0 = time.perf_counter()
    _check_parameter_share(problem, time_limit_s, workers)
    seeds = make_seeds(problem, incumbent=hint)
    quick = None  # interleaving on a chain: the fluid split, polished, proven within the gap before any ILP
    if searching and v > 1 and gap > 0 and chain_share(bg) >= CHAIN_MIN_SHARE:
        quick, polished = _quick_proof(problem, seeds, time_limit_s, gap, workers)
        if quick.status == "converged":
            plan = evaluate(problem, quick.assignment)
            status = "FLUID_SPLIT+refined" + ("+paths" if quick.assignment != polished else "")  # no ILP ran
            report = SolverReport(solver_status=status, objective=plan.model_step_time_s, bound=0.0, gap=1.0,
                                  solve_time_s=time.perf_counter() - t0, step_lower_bound_s=quick.lower_bound_s,
                                  gap_limit=gap, time_limit_s=time_limit_s)
            return dataclasses.replace(plan, report=report)
        refine_time_s = max(0.0, refine_time_s - (time.perf_counter() - t0))  # the quick proof's time is spent
    # time_limit_s bounds the whole call: model building, the solver and the refinement after it
    reserve = refine_time_s + paths_reserve_s + 0.05 * time_limit_s if simulate else 0.02 * time_limit_s
    found = _solve_ilp(problem, seeds, t0 + time_limit_s - reserve, time_limit_s, workers, gap)
    assign, refined = found.assignment, False
    # a bound on every plan's simulated step, known before the polish: it may stop early
    early_bound = pipeline_bound_s(problem) if simulate and exact_follows and gap > 0 else None
    target_s = early_bound * (1 + gap) if early_bound else 0.0
    if searching:
        extra = [quick.assignment] if quick is not None and quick.assignment is not None else []
        assign = _polish(problem, found.assignment, seeds, refine_time_s, target_s, extra)
        refined = assign != found.assignment
    plan = evaluate(problem, assign, simulate=simulate)
    exact, lower = "", 0.0  # lower: no valid plan within the cap simulates faster (0: not known)
    if early_bound is not None and plan.step_time_s <= target_s:
        lower = early_bound  # proven within the gap: no exact search
    elif searching and exact_follows:
        budget_s = min(EXACT_TIME_CAP_S, max(0.0, time_limit_s - (time.perf_counter() - t0)))
        plan, exact, lower = _exact_split(problem, plan, budget_s, gap, early_bound)
    paths_tol = gap if gap > 0 else PATHS_TOL
    if searching and plan.step_time_s > lower * (1 + paths_tol):
        budget_s = min(PATHS_TIME_CAP_S, time_limit_s - (time.perf_counter() - t0))
        if budget_s >= PATHS_MIN_TIME_S:
            plan, paths, lower = _path_bound(problem, plan, seeds, budget_s, paths_tol, workers, lower)
            exact += paths
    objective = plan.model_step_time_s if math.isnan(found.objective_s) else found.objective_s
    report = SolverReport(solver_status=found.status + ("+refined" if refined else "") + exact,
                          objective=objective, bound=found.bound_s,
                          gap=max(0.0, (objective - found.bound_s) / objective) if objective > 0 else 0.0,
                          solve_time_s=time.perf_counter() - t0, step_lower_bound_s=lower, gap_limit=gap,
                          time_limit_s=time_limit_s)
    return dataclasses.replace(plan, report=report)


@dataclass(frozen=True)
class _IlpAnswer:
    """The ILP's assignment (the incumbent or the chain DP's when it found none in time), CP-SAT's
    status name ("DP_FALLBACK" then) and its objective (nan: none) and bound, in seconds."""

    assignment: list[int]
    status: str
    objective_s: float
    bound_s: float


def _solve_ilp(problem: PlanProblem, seeds: Seeds, deadline: float, time_limit_s: float, workers: int | None,
               gap: float) -> _IlpAnswer:
    """Build the ILP (pruned by the incumbent where that keeps it), hint it, solve it until `deadline`.

    PlanError when nothing fits: the graph's order leaves a stage empty, or the memory cap is too
    small (the message gives the smallest memory that fits; time_limit_s bounds finding it).
    """
    start, upper, cap = seeds.incumbent, seeds.upper, problem.memory_cap_bytes
    ilp = None
    if upper is not None:
        try:
            ilp = build_ilp(problem, upper=upper)
            got = ilp.hint(start, cap)
            if got is None or got[0] > upper or not got[1]:  # the pruning would cut off the incumbent
                ilp = None
        except NoSplit:
            ilp = None
    if ilp is None:
        ilp = build_ilp(problem)
        if start is not None:
            ilp.hint(start, cap)
    ilp.model.Minimize(ilp.objective)
    solver = cp_solver(max(0.1, deadline - time.perf_counter()), workers, gap)
    status = solver.Solve(ilp.model)
    if status == cp_model.INFEASIBLE or (status == cp_model.UNKNOWN and cap is not None
                                         and not fits_memory(problem, start)):
        _raise_no_fit(problem, time_limit_s, workers)
    scale = ilp.time_scale
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return _IlpAnswer(ilp.assignment(solver.Value), solver.StatusName(status),
                          solver.ObjectiveValue() / scale, solver.BestObjectiveBound() / scale)
    # time limit without a solution: the warm start is still a valid plan
    return _IlpAnswer(start or seeds.dp, "DP_FALLBACK", float("nan"), solver.BestObjectiveBound() / scale)


def _polish(problem: PlanProblem, assign: list[int], seeds: Seeds, refine_time_s: float,
            target_s: float, extra: list[list[int]] = ()) -> list[int]:
    """The best plan by the simulator that refine() finds from the ILP's answer and every seed.

    The closed form misjudges interleaved schedules on slow links, where balance beats fewer cuts;
    with the baselines' splits as seeds the result is never worse than any of them. A third of
    the time goes to the seeds alike, the rest to the best of them, with kicks; it stops at the
    first plan within target_s. extra: more plans to start from (the quick proof's best).
    """
    candidates = [assign, *extra, seeds.incumbent, seeds.dp, seeds.compute] + seeds.baselines
    candidates = [a for i, a in enumerate(candidates) if a is not None and a not in candidates[:i]]
    polish_end = time.perf_counter() + refine_time_s
    best = _first_within(target_s, (refine(problem, a, refine_time_s / (3 * len(candidates)), target_s=target_s)
                                    for a in candidates))
    if best[1] > target_s:
        best = refine(problem, best[0], max(0.0, polish_end - time.perf_counter()), kicks=True, target_s=target_s)
    return best[0]


def _exact_split(problem: PlanProblem, plan: Plan, budget_s: float, gap: float,
                 early_bound: float | None) -> tuple[Plan, str, float]:
    """Every valid plan is a contiguous split (1f1b on a path): search them all, `plan` as incumbent.

    Returns (the better plan, the status suffix, a lower bound on every plan's simulated step).
    """
    found = best_split_s(problem, plan.step_time_s, budget_s, split_cuts(plan.block_stage), gap=gap)
    exact = ""
    if found.cuts is not None and found.step_time_s < plan.step_time_s:
        plan = evaluate(problem, split_assignment(found.cuts, problem.num_blocks))
        exact = ("+exact(incomplete)" if not found.complete else "+exact(optimal)" if gap == 0
                 else "+exact(within gap)")
    elif found.complete:
        exact = "+optimal" if gap == 0 else "+exact(within gap)"  # no split beats the refined plan by more
    lower = min(plan.step_time_s, max(found.lower_bound_s, early_bound or pipeline_bound_s(problem)))
    return plan, exact, lower


def _quick_proof(problem: PlanProblem, seeds: Seeds, time_limit_s: float, gap: float,
                 workers: int | None) -> tuple[PathBound, list[int] | None]:
    """The split nearest the fluid optimum (path_rows.fluid_split, over the host's times where they outweigh
    the device's), polished with kicks for QUICK_POLISH_SHARE of time_limit_s, then the bound over the
    chain's cuts (critical_path.path_bound_solve, chain_only) for at most QUICK_PROOF_SHARE: on a chain of
    equal layers it is within the gap of the best plan, proven, long before the ILP and the polish of every
    seed would end. Returns (the bound's outcome, status "converged" when proven; the polished fluid split,
    None where GLOP gave up on the fluid LP)."""
    t0 = time.perf_counter()
    bg = problem.block_graph
    host = sum(b.host_fwd_time_s + b.host_bwd_time_s for b in bg.blocks) > \
        sum(b.fwd_time_s + b.bwd_time_s for b in bg.blocks)  # the split balances the larger side
    units = StageUnits.of(bg, host=host)
    sched = make_schedule(problem.schedule, problem.num_ranks, problem.microbatches, problem.chunks)
    rows = {r.key: r for r in synthetic_rows(sched, problem.num_stages)}
    start = fluid_split(rows, units, ActionDag(sched), deadline=t0 + QUICK_POLISH_SHARE * time_limit_s)
    starts = tuple(a for a in (seeds.incumbent, seeds.dp) if a is not None)
    if start is not None:
        start, _ = refine(problem, start, max(0.0, t0 + QUICK_POLISH_SHARE * time_limit_s - time.perf_counter()),
                          kicks=True)
    budget_s = max(0.0, t0 + (QUICK_POLISH_SHARE + QUICK_PROOF_SHARE) * time_limit_s - time.perf_counter())
    return path_bound_solve(problem, budget_s, start, starts, gap, workers, chain_only=True), start


def _path_bound(problem: PlanProblem, plan: Plan, seeds: Seeds, budget_s: float, tol: float, workers: int | None,
                lower: float) -> tuple[Plan, str, float]:
    """Critical-path row generation: a lower bound for interleaving and branchy graphs, and sometimes a
    faster plan than the closed form's. Returns (the better plan, "+paths" or "", the raised bound)."""
    starts = [seeds.incumbent, seeds.dp] if seeds.incumbent is not None else [seeds.dp]
    found = path_bound_solve(problem, budget_s, plan.block_stage, tuple(starts), tol, workers)
    paths = ""
    if found.assignment is not None and found.step_time_s < plan.step_time_s * (1 - 1e-12):
        plan = evaluate(problem, found.assignment)
        paths = "+paths"
    return plan, paths, max(lower, min(found.lower_bound_s, plan.step_time_s))


def min_memory_bytes(bg, num_ranks: int, chunks: int = 1, microbatches: int | None = None,
                     schedule: str | None = None, time_limit_s: float = 10.0,
                     workers: int | None = None) -> tuple[int, bool]:
    """Smallest per-device memory any valid split needs: (bytes, proven optimal)."""
    return _min_memory(PlanProblem.checked(bg, num_ranks, chunks, microbatches, schedule), time_limit_s, workers)


def _min_memory(problem: PlanProblem, time_limit_s: float, workers: int | None) -> tuple[int, bool]:
    """min_memory_bytes of problem's shape (its cap and link left out)."""
    shape = PlanProblem(problem.block_graph, problem.num_ranks, problem.chunks, problem.microbatches, problem.schedule)
    ilp = build_ilp(shape, with_time=False, need_memory=True)
    peak = ilp.model.NewIntVar(0, 1 << 60, "peak")
    for e in ilp.rank_mem:
        ilp.model.Add(peak >= e)
    ilp.model.Minimize(peak)
    solver = cp_solver(time_limit_s, workers)
    status = solver.Solve(ilp.model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise PlanError(f"could not compute the smallest memory for {problem.num_stages} stages within "
                        f"{time_limit_s:g} s: raise --time-limit")
    plan = evaluate(shape, ilp.assignment(solver.Value), simulate=False)
    return max(plan.rank_mem_bytes), status == cp_model.OPTIMAL


def _raise_no_fit(problem: PlanProblem, time_limit_s: float, workers: int | None) -> None:
    """PlanError: no split is valid (no cap), or none fits the memory cap (with the smallest memory that fits)."""
    cap, K, n = problem.memory_cap_bytes, problem.num_stages, problem.num_blocks
    if cap is None:
        raise PlanError(f"no valid split of {n} blocks into {K} stages: the block graph forces an order "
                        "that leaves a stage empty; use fewer devices or chunks, or a deeper module depth (--depth)")
    need, exact = _min_memory(problem, time_limit_s, workers)
    raise PlanError(f"memory cap {_gib(cap)} per device is too small: no split into {K} stages "
                    f"fits; the smallest per-device memory that fits is {'' if exact else 'at most '}"
                    f"{_gib(need)} ({problem.schedule}, {problem.microbatches} microbatches). Raise the cap "
                    "(--memory / memory=), add devices, or use fewer microbatches in flight (1f1b instead of gpipe)")


def _check_parameter_share(problem: PlanProblem, time_limit_s: float, workers: int | None) -> None:
    """PlanError at once when the parameters' training state alone, spread evenly, exceeds the cap:
    no split fits, and on a large model the ILP would spend the whole time limit finding that out.
    The message gives the smallest memory that fits where the memory ILP finds it within a fifth of
    the time limit, else the even share as a lower bound."""
    bg, p, cap = problem.block_graph, problem.num_ranks, problem.memory_cap_bytes
    if cap is None:
        return
    share = (sum(b.param_state_bytes for b in bg.blocks) + sum(s.state_bytes for s in bg.shared_params)) / p
    if share <= cap:
        return
    try:
        need, exact = _min_memory(problem, time_limit_s / 5, workers)
        least = f"{'' if exact else 'at most '}{_gib(need)}"
    except PlanError:
        least = f"at least {_gib(share)} (parameters, gradients and optimizer states alone, over {p} devices)"
    raise PlanError(f"memory cap {_gib(cap)} per device is too small: no split into {problem.num_stages} stages "
                    f"fits; the smallest per-device memory that fits is {least} ({problem.schedule}, "
                    f"{problem.microbatches} microbatches). Raise the cap (--memory / memory=), add devices, or use "
                    "fewer microbatches in flight (1f1b instead of gpipe), data-parallel replicas that shard the "
                    "optimizer state (--data-parallel N), or a lighter optimizer (--optimizer sgd)")


def _first_within(target_s: float, polished) -> tuple[list[int], float]:
    """The best of the (assignment, step) pairs `polished` yields, stopping at the first at most target_s."""
    best = None
    for got in polished:
        if best is None or got[1] < best[1]:
            best = got
        if best[1] <= target_s:
            break
    return best


def _gib(n: float) -> str:
    """Bytes for an error message, precise enough that a cap and the memory needed read apart."""
    if n >= 2 ** 28:
        return f"{n / 2 ** 30:.2f} GiB"
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.1f} KiB"
