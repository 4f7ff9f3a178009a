"""solve() with the exact split search (partitioner/exact.py): for one stage per rank on path-shaped
graphs its plan is the brute-force best contiguous split, within the memory cap, and never worse
than the ILP and local search alone."""
import itertools
import random

import pytest

from partitioner.exact import split_assignment, split_cuts
from partitioner.plan import evaluate_assignment
from partitioner.solve import solve
from passes.coarsen import synthetic_block_graph

BW = 1e10  # 10 MB take 1 ms: as long as a block


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
    plan = solve(bg, p, microbatches=m, link_bw_bytes_per_s=BW, time_limit_s=20)
    assert plan.step_time_s == pytest.approx(min(steps.values()), rel=1e-12)
    assert steps[split_cuts(plan.block_stage)] == plan.step_time_s  # its split scores what it says
    assert plan.solver_status.endswith("+exact(optimal)") or plan.solver_status.endswith("+optimal")


def test_search_replaces_an_unpolished_plan_by_the_best_split(monkeypatch):
    """With the local search stubbed out the exact search has the ILP's plan to beat: it finds the best."""
    monkeypatch.setattr("partitioner.solve.refine", lambda bg, a, *args: (list(a), float("inf")))
    improved = 0
    for seed in range(12):
        rng = random.Random(seed)
        n, p = rng.randint(6, 11), rng.choice([2, 3, 4])
        m = rng.choice([p, 2 * p])
        bg = random_chain(rng, n)
        best = min(pl.step_time_s for pl in all_splits(bg, p, m).values())
        plan = solve(bg, p, microbatches=m, link_bw_bytes_per_s=BW, time_limit_s=20)
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
    with_search = solve(bg, p, link_bw_bytes_per_s=BW, time_limit_s=20)
    monkeypatch.setattr("partitioner.solve.EXACT_TIME_CAP_S", 0.0)
    before = solve(bg, p, link_bw_bytes_per_s=BW, time_limit_s=20)
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
