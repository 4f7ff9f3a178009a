"""partitioner/exact.py (reported by benchmarks/plan_quality.py): the pipeline bound is a true lower bound
of the simulated step, and the exact split search finds the best contiguous split."""
import dataclasses
import itertools
import random

import pytest

from benchmarks.plan_quality import lower_bound_s
from partitioner.exact import RelaxedPipeline, best_split_s, pipeline_bound_s
from partitioner.plan import evaluate_assignment
from passes.coarsen import synthetic_block_graph


def split_step_s(bg, cuts: tuple[int, ...], p: int, m: int, bw: float) -> float:
    """Simulated 1F1B step of the contiguous split whose stages 1..p-1 start at `cuts`."""
    starts = (0, *cuts, len(bg.blocks))
    assign = [s for s in range(p) for _ in range(starts[s], starts[s + 1])]
    return evaluate_assignment(bg, assign, p, 1, m, "1f1b", link_bw_bytes_per_s=bw).step_time_s


def random_chain(rng: random.Random, n: int):
    """A path-shaped block graph with uneven blocks, activations that take time to send, a skip
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
    bound = pipeline_bound_s(bg, p, 1, m)
    steps = [split_step_s(bg, cuts, p, m, 1e12) for cuts in itertools.combinations(range(1, n), p - 1)]
    assert bound <= min(steps) * (1 + 1e-9)
    equal = synthetic_block_graph([1e-3] * (2 * p))  # equal stages: the textbook (m + p - 1) t is exact
    assert pipeline_bound_s(equal, p, 1, m) == pytest.approx((m + p - 1) * 2e-3)


def test_no_bound_off_paths_or_with_interleaving():
    branchy = synthetic_block_graph([1e-3] * 4, edges={(0, 1): 0, (0, 2): 0, (1, 3): 0, (2, 3): 0})
    assert pipeline_bound_s(branchy, 2, 1, 4) is None
    assert pipeline_bound_s(synthetic_block_graph([1e-3] * 4), 2, 2, 4) is None
    with pytest.raises(ValueError, match="path-shaped"):
        best_split_s(branchy, 2, 4, 1e10)


@pytest.mark.parametrize("seed", range(15))
def test_best_split_is_the_brute_force_best_and_never_worse_than_its_incumbent(seed):
    rng = random.Random(seed)
    n, p, bw = rng.randint(8, 12), rng.choice([2, 3, 4]), 1e10  # 10 MB take 1 ms: as long as a block
    m = 2 * p
    bg = random_chain(rng, n)
    steps = {cuts: split_step_s(bg, cuts, p, m, bw) for cuts in itertools.combinations(range(1, n), p - 1)}
    best_cuts = min(steps, key=steps.get)
    found = best_split_s(bg, p, m, bw, time_budget_s=30)
    assert found.complete and found.step_time_s == pytest.approx(steps[best_cuts], rel=1e-12)
    assert found.lower_bound_s == found.step_time_s
    assert steps[found.cuts] == found.step_time_s  # its cuts score what it says
    worst = max(steps, key=steps.get)
    from_worst = best_split_s(bg, p, m, bw, steps[worst], 30, worst)
    assert from_worst.step_time_s == pytest.approx(steps[best_cuts], rel=1e-12)
    unreachable = steps[best_cuts] * 0.99  # an incumbent no split beats: it stays
    assert best_split_s(bg, p, m, bw, unreachable, 30).step_time_s == unreachable


@pytest.mark.parametrize("seed", range(5))
def test_relaxed_pipeline_bounds_every_split_and_is_the_simulator_without_communication(seed):
    rng = random.Random(seed)
    n, p = rng.randint(6, 9), rng.choice([3, 4])
    m = 2 * p
    bg = random_chain(rng, n)
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
    bg, p, m, bw = random_chain(rng, 40), 4, 8, 1e10
    cut_short = best_split_s(bg, p, m, bw, time_budget_s=0.0)
    assert not cut_short.complete and cut_short.splits_simulated == 0
    full = best_split_s(bg, p, m, bw, time_budget_s=30)
    assert full.complete
    assert pipeline_bound_s(bg, p, 1, m) <= cut_short.lower_bound_s <= full.step_time_s


@pytest.mark.parametrize("seed", range(5))
def test_bounds_and_search_hold_where_the_host_paces_some_blocks(seed):
    """A stage's pass takes the larger of its device and host sums: the bounds use the same rule."""
    rng = random.Random(seed)
    n, p, bw = rng.randint(8, 11), rng.choice([2, 3]), 1e10
    m = 2 * p
    bg = random_chain(rng, n)
    bg.blocks = [dataclasses.replace(b, host_fwd_time_s=rng.uniform(0, 2 * b.fwd_time_s),
                                     host_bwd_time_s=rng.uniform(0, 2 * b.bwd_time_s)) for b in bg.blocks]
    steps = [split_step_s(bg, cuts, p, m, bw) for cuts in itertools.combinations(range(1, n), p - 1)]
    assert max(lower_bound_s(bg, p, 1, m), pipeline_bound_s(bg, p, 1, m)) <= min(steps) * (1 + 1e-12)
    found = best_split_s(bg, p, m, bw, time_budget_s=30)
    assert found.complete and found.step_time_s == pytest.approx(min(steps), rel=1e-12)
