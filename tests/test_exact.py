"""partitioner/exact.py: the pipeline bound is a true lower bound of the simulated step, the exact
split search finds the brute-force best contiguous split; and solve() with it: for one stage per rank
on path-shaped graphs its plan is the best split within the memory cap, never worse than the ILP and
local search alone."""
import dataclasses
import itertools
import random

import pytest

from partitioner.exact import (PassTimes, RelaxedPipeline, best_split_s, pipeline_bound_s, split_assignment,
                               split_cuts)
from partitioner.plan import evaluate_assignment
from partitioner.problem import PlanProblem
from partitioner.solve import solve
from partitioner.cost_models.time import NodeTime
from partitioner.passes.coarsen import synthetic_block_graph

BW = 1e10  # 10 MB take 1 ms: as long as a block



def problem(bg, p: int, m: int, bw: float = 1e10, v: int = 1) -> PlanProblem:
    return PlanProblem.checked(bg, p, v, m, link_bw_bytes_per_s=bw)

def random_chain(rng: random.Random, n: int):
    """A path-shaped block graph: uneven blocks, activations that take time to send, a skip connection,
    varied parameter and activation bytes, sometimes a tied weight shared by the first and the last block."""
    edges = {(b, b + 1): rng.choice([0, 10 ** 6, 10 ** 7]) for b in range(n - 1)}
    u = rng.randrange(n - 2)
    edges[(u, rng.randrange(u + 2, n))] = 10 ** 7
    shared = [("wte", 4 * 10 ** 7, (0, n - 1))] if rng.random() < 0.5 else None
    return synthetic_block_graph([rng.uniform(0.5e-3, 3e-3) for _ in range(n)], edges,
                                 [rng.randint(0, 100) for _ in range(n)], [rng.randint(0, 10) for _ in range(n)],
                                 shared)


def all_splits(bg, p: int, m: int, cap: int | None = None) -> dict:
    """Simulated step of every contiguous split (cuts -> plan), within the cap."""
    n, out = len(bg.blocks), {}
    for cuts in itertools.combinations(range(1, n), p - 1):
        plan = evaluate_assignment(bg, split_assignment(cuts, n), p, 1, m, "1f1b", link_bw_bytes_per_s=BW,
                                   memory_cap_bytes=cap)
        if cap is None or max(plan.rank_mem_bytes) <= cap:
            out[cuts] = plan
    return out


def test_cuts_and_assignment_round_trip():
    assert split_cuts([0, 0, 1, 2, 2]) == (2, 3)
    assert split_assignment((2, 3), 5) == [0, 0, 1, 2, 2]


@pytest.mark.parametrize("seed", range(12))
def test_solve_is_the_brute_force_best_split(seed):
    rng = random.Random(seed)
    n, p = rng.randint(6, 11), rng.choice([2, 3, 4])
    m = rng.choice([p, 2 * p])
    bg = random_chain(rng, n)
    steps = {c: pl.step_time_s for c, pl in all_splits(bg, p, m).items()}
    plan = solve(bg, p, microbatches=m, link_bw_bytes_per_s=BW, time_limit_s=20, gap=0.0)
    assert plan.step_time_s == pytest.approx(min(steps.values()), rel=1e-12)
    assert steps[split_cuts(plan.block_stage)] == plan.step_time_s  # its split scores what it says
    assert plan.solver_status.endswith("+exact(optimal)") or plan.solver_status.endswith("+optimal")


def test_search_replaces_an_unpolished_plan_by_the_best_split(monkeypatch):
    """With the local search stubbed out the exact search has the ILP's plan to beat: it finds the best."""
    monkeypatch.setattr("partitioner.solve.refine", lambda bg, a, *args, **kwargs: (list(a), float("inf")))
    improved = 0
    for seed in range(12):
        rng = random.Random(seed)
        n, p = rng.randint(6, 11), rng.choice([2, 3, 4])
        m = rng.choice([p, 2 * p])
        bg = random_chain(rng, n)
        best = min(pl.step_time_s for pl in all_splits(bg, p, m).values())
        plan = solve(bg, p, microbatches=m, link_bw_bytes_per_s=BW, time_limit_s=20, gap=0.0)
        assert plan.step_time_s == pytest.approx(best, rel=1e-12)
        improved += plan.solver_status.endswith("+exact(optimal)")
    assert improved > 0


@pytest.mark.parametrize("seed", range(6))
def test_solve_keeps_to_the_memory_cap(seed):
    rng = random.Random(50 + seed)
    n, p, m = rng.randint(6, 10), rng.choice([2, 3]), 8
    bg = random_chain(rng, n)
    free = all_splits(bg, p, m)
    peaks = sorted(max(pl.rank_mem_bytes) for pl in free.values())
    cap = peaks[len(peaks) // 2]  # half the splits fit
    fitting = all_splits(bg, p, m, cap)
    plan = solve(bg, p, microbatches=m, link_bw_bytes_per_s=BW, memory_cap_bytes=cap, time_limit_s=20)
    assert max(plan.rank_mem_bytes) <= cap
    assert plan.step_time_s == pytest.approx(min(pl.step_time_s for pl in fitting.values()), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_never_worse_than_without_the_search(seed, monkeypatch):
    """With no time for the search solve() returns the polished ILP plan, as before the search existed;
    refine_time_s=0 (no simulator polish) and gpipe skip the search."""
    rng = random.Random(100 + seed)
    bg, p = random_chain(rng, rng.randint(10, 16)), rng.choice([2, 4])
    with_search = solve(bg, p, link_bw_bytes_per_s=BW, time_limit_s=20, gap=0.0)
    monkeypatch.setattr("partitioner.solve.EXACT_TIME_CAP_S", 0.0)
    before = solve(bg, p, link_bw_bytes_per_s=BW, time_limit_s=20, gap=0.0)
    assert "+exact" not in before.solver_status and "+optimal" not in before.solver_status
    assert with_search.step_time_s <= before.step_time_s * (1 + 1e-12)
    monkeypatch.undo()
    unpolished = solve(bg, p, link_bw_bytes_per_s=BW, time_limit_s=20, refine_time_s=0)
    gpipe = solve(bg, p, schedule="gpipe", link_bw_bytes_per_s=BW, time_limit_s=20)
    assert "+exact" not in unpolished.solver_status + gpipe.solver_status


def test_no_search_off_paths():
    branchy = synthetic_block_graph([1e-3] * 6, edges={(0, 1): 0, (0, 2): 0, (1, 3): 0, (2, 3): 0, (3, 4): 0,
                                                       (4, 5): 0})
    plan = solve(branchy, 2, link_bw_bytes_per_s=BW, time_limit_s=20)
    assert "+exact" not in plan.solver_status and "+optimal" not in plan.solver_status


# ---------------------------------------------------------------------- bounds and the split search alone


def all_busy_s(bg, p: int, m: int) -> float:
    """Every rank busy all the time: m W / p, the weakest lower bound."""
    return m * PassTimes(bg).work_s(0, len(bg.blocks)) / p


def split_step_s(bg, cuts: tuple[int, ...], p: int, m: int, bw: float) -> float:
    """Simulated 1F1B step of the contiguous split whose stages 1..p-1 start at `cuts`."""
    starts = (0, *cuts, len(bg.blocks))
    assign = [s for s in range(p) for _ in range(starts[s], starts[s + 1])]
    return evaluate_assignment(bg, assign, p, 1, m, "1f1b", link_bw_bytes_per_s=bw).step_time_s


def timed_chain(rng: random.Random, n: int):
    """A path-shaped block graph (times only: no parameter or activation bytes) with uneven blocks, activations that take time to send, a skip
    connection and sometimes a tied weight shared by the first and the last block."""
    edges = {(b, b + 1): rng.choice([0, 10 ** 6, 10 ** 7]) for b in range(n - 1)}
    u = rng.randrange(n - 2)
    edges[(u, rng.randrange(u + 2, n))] = 10 ** 7
    shared = [("wte", 4 * 10 ** 7, (0, n - 1))] if rng.random() < 0.5 else None
    return synthetic_block_graph([rng.uniform(0.5e-3, 3e-3) for _ in range(n)], edges=edges, shared=shared)


@pytest.mark.parametrize("seed", range(20))
def test_pipeline_bound_is_below_every_split_and_reached_by_equal_stages(seed):
    rng = random.Random(seed)
    n, p = rng.randint(4, 8), rng.choice([2, 3])
    m = 2 * p
    bg = synthetic_block_graph([rng.uniform(0.5e-3, 3e-3) for _ in range(n)])
    bound = pipeline_bound_s(problem(bg, p, m, v=1))
    steps = [split_step_s(bg, cuts, p, m, 1e12) for cuts in itertools.combinations(range(1, n), p - 1)]
    assert bound <= min(steps) * (1 + 1e-9)
    equal = synthetic_block_graph([1e-3] * (2 * p))  # equal stages: the textbook (m + p - 1) t is exact
    assert pipeline_bound_s(problem(equal, p, m, v=1)) == pytest.approx((m + p - 1) * 2e-3)


def test_no_bound_off_paths_or_with_interleaving():
    branchy = synthetic_block_graph([1e-3] * 4, edges={(0, 1): 0, (0, 2): 0, (1, 3): 0, (2, 3): 0})
    assert pipeline_bound_s(problem(branchy, 2, 4, v=1)) is None
    assert pipeline_bound_s(problem(synthetic_block_graph([1e-3] * 4), 2, 4, v=2)) is None
    with pytest.raises(ValueError, match="path-shaped"):
        best_split_s(problem(branchy, 2, 4))


@pytest.mark.parametrize("seed", range(15))
def test_best_split_is_the_brute_force_best_and_never_worse_than_its_incumbent(seed):
    rng = random.Random(seed)
    n, p, bw = rng.randint(8, 12), rng.choice([2, 3, 4]), 1e10  # 10 MB take 1 ms: as long as a block
    m = 2 * p
    bg = timed_chain(rng, n)
    steps = {cuts: split_step_s(bg, cuts, p, m, bw) for cuts in itertools.combinations(range(1, n), p - 1)}
    best_cuts = min(steps, key=steps.get)
    found = best_split_s(problem(bg, p, m, bw), time_budget_s=30)
    assert found.complete and found.step_time_s == pytest.approx(steps[best_cuts], rel=1e-12)
    assert found.lower_bound_s == found.step_time_s
    assert steps[found.cuts] == found.step_time_s  # its cuts score what it says
    worst = max(steps, key=steps.get)
    from_worst = best_split_s(problem(bg, p, m, bw), steps[worst], 30, worst)
    assert from_worst.step_time_s == pytest.approx(steps[best_cuts], rel=1e-12)
    unreachable = steps[best_cuts] * 0.99  # an incumbent no split beats: it stays
    assert best_split_s(problem(bg, p, m, bw), unreachable, 30).step_time_s == unreachable


@pytest.mark.parametrize("seed", range(5))
def test_relaxed_pipeline_bounds_every_split_and_is_the_simulator_without_communication(seed):
    rng = random.Random(seed)
    n, p = rng.randint(6, 9), rng.choice([3, 4])
    m = 2 * p
    bg = timed_chain(rng, n)
    relaxed = RelaxedPipeline(p, m)
    fwd = [b.fwd_time_s for b in bg.blocks]
    bwd = [b.bwd_time_s for b in bg.blocks]
    for cuts in itertools.combinations(range(1, n), p - 1):
        starts = (0, *cuts, n)
        f = [sum(fwd[starts[s]:starts[s + 1]]) for s in range(p)]
        b = [sum(bwd[starts[s]:starts[s + 1]]) for s in range(p)]
        step = split_step_s(bg, cuts, p, m, 1e10)
        for k in range(1, p):  # stages 0..k-1 known, the rest a detour of their total time
            assert relaxed.step_s(f[:k], b[:k], sum(f[k:]) + sum(b[k:])) <= step * (1 + 1e-12)
        no_comm = split_step_s(synthetic_block_graph([t.time_s for t in bg.blocks]), cuts, p, m, 1e10)
        assert relaxed.step_s(f, b, 0.0) == pytest.approx(no_comm, rel=1e-12)


def test_best_split_stops_at_its_budget_with_a_valid_bound():
    rng = random.Random(7)
    bg, p, m, bw = timed_chain(rng, 40), 4, 8, 1e10
    cut_short = best_split_s(problem(bg, p, m, bw), time_budget_s=0.0)
    assert not cut_short.complete and cut_short.splits_simulated == 0
    full = best_split_s(problem(bg, p, m, bw), time_budget_s=30)
    assert full.complete
    assert pipeline_bound_s(problem(bg, p, m, v=1)) <= cut_short.lower_bound_s <= full.step_time_s


@pytest.mark.parametrize("seed", range(5))
def test_bounds_and_search_hold_where_the_host_paces_some_blocks(seed):
    """A stage's pass takes the larger of its device and host sums: the bounds use the same rule."""
    rng = random.Random(seed)
    n, p, bw = rng.randint(8, 11), rng.choice([2, 3]), 1e10
    m = 2 * p
    bg = timed_chain(rng, n)
    bg.blocks = [dataclasses.replace(b, host_fwd_time_s=rng.uniform(0, 2 * b.fwd_time_s),
                                     host_bwd_time_s=rng.uniform(0, 2 * b.bwd_time_s)) for b in bg.blocks]
    steps = [split_step_s(bg, cuts, p, m, bw) for cuts in itertools.combinations(range(1, n), p - 1)]
    assert max(all_busy_s(bg, p, m), pipeline_bound_s(problem(bg, p, m, v=1))) <= min(steps) * (1 + 1e-12)
    found = best_split_s(problem(bg, p, m, bw), time_budget_s=30)
    assert found.complete and found.step_time_s == pytest.approx(min(steps), rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_bounds_search_and_solve_hold_with_a_fixed_cost_per_stage_pass(seed):
    """Every stage pass pays bg.stage_pass (device and host parts): the bounds count it once per stage
    and stay below every split, the search and solve() find the brute-force best, and solve's plan
    scores what evaluate_assignment gives it."""
    rng = random.Random(seed)
    n, p, bw = rng.randint(8, 11), rng.choice([2, 3, 4]), 1e10
    m = 2 * p
    bg = timed_chain(rng, n)
    bg.blocks = [dataclasses.replace(b, host_fwd_time_s=rng.uniform(0, 1.5 * b.fwd_time_s),
                                     host_bwd_time_s=rng.uniform(0, 1.5 * b.bwd_time_s)) for b in bg.blocks]
    bg.stage_pass = NodeTime(rng.uniform(0, 5e-4), rng.uniform(0, 5e-4), rng.uniform(0, 1e-3), rng.uniform(0, 1e-3))
    steps = {cuts: split_step_s(bg, cuts, p, m, bw) for cuts in itertools.combinations(range(1, n), p - 1)}
    best = min(steps.values())
    assert max(all_busy_s(bg, p, m), pipeline_bound_s(problem(bg, p, m, v=1))) <= best * (1 + 1e-12)
    found = best_split_s(problem(bg, p, m, bw), time_budget_s=30)
    assert found.complete and found.step_time_s == pytest.approx(best, rel=1e-12)
    plan = solve(bg, p, microbatches=m, link_bw_bytes_per_s=bw, time_limit_s=20, gap=0.0)
    assert plan.step_time_s == pytest.approx(best, rel=1e-12)
    assert evaluate_assignment(bg, plan.block_stage, p, 1, m, "1f1b", link_bw_bytes_per_s=bw).step_time_s \
        == plan.step_time_s
    assert plan.step_lower_bound_s <= plan.step_time_s * (1 + 1e-12)


def test_equal_stages_meet_the_bound_with_their_stage_passes():
    """p equal stages of blocks t plus a pass cost o each: (m + p - 1) (t + o), bound and simulator alike."""
    p, m, o = 3, 6, NodeTime(1e-4, 2e-4)
    equal = synthetic_block_graph([1e-3] * (2 * p), stage_pass=o)
    want = (m + p - 1) * (2e-3 + o.fwd_s + o.bwd_s)
    assert pipeline_bound_s(problem(equal, p, m, v=1)) == pytest.approx(want)
    assert split_step_s(equal, (2, 4), p, m, 1e12) == pytest.approx(want)
