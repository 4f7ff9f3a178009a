"""partitioner/refine.py: single moves, ripples and kicks keep plans valid and find what single moves miss."""
from __future__ import annotations

import itertools
import random

import pytest
from test_solve import BW, branchy_dag, random_dag

import partitioner.refine
from partitioner.plan import evaluate_assignment
from partitioner.problem import PlanProblem
from partitioner.refine import _Search, refine
from partitioner.passes.coarsen import synthetic_block_graph


def valid(bg, a: list[int], K: int) -> bool:
    return set(a) == set(range(K)) and all(a[u] <= a[w] for u, w in bg.graph.edges)


def random_plan(rng: random.Random, search: _Search, n: int, K: int) -> list[int]:
    """A contiguous split (valid: blocks are in topological order), then a kick off it."""
    cuts = sorted(rng.sample(range(1, n), K - 1))
    a = [sum(b >= c for c in cuts) for b in range(n)]
    return search.kick(a, rng)


@pytest.mark.parametrize("seed", range(6))
def test_ripples_and_kicks_keep_edges_ordered_and_stages_non_empty(seed):
    rng = random.Random(seed)
    n, p, v = 14, 2, 3
    bg = (random_dag if seed % 2 else branchy_dag)(rng, n)
    K = p * v
    search = _Search(PlanProblem(bg, p, v, 2 * p, "interleaved-1f1b", BW), float("inf"))
    shifted = 0
    for _ in range(10):
        a = random_plan(rng, search, n, K)
        assert valid(bg, a, K)
        for lo, hi in itertools.combinations(range(K), 2):
            for right in (True, False):
                x = a
                for steps in (1, 2, 3):  # a shift by several blocks is one block's shift, repeated
                    before, x = x, search.ripple(x, lo, hi, right)
                    if x is None:
                        break
                    assert valid(bg, x, K), (before, lo, hi, right, x)
                    moved = [b for b in range(n) if x[b] != before[b]]
                    # each boundary between lo and hi moves one block one stage on; a block may pass through
                    assert all(abs(x[b] - before[b]) <= hi - lo and (x[b] > before[b]) == right for b in moved)
                    assert sum(abs(x[b] - before[b]) for b in moved) == hi - lo
                    assert [x.count(k) for k in range(K)] == [before.count(k) - (k == (lo if right else hi))
                                                             + (k == (hi if right else lo)) for k in range(K)]
                    shifted += 1
    assert shifted > 100


def test_a_ripple_leaves_the_optimum_that_single_moves_miss():
    # p = 2, v = 2: stages 0 and 2 on rank 0, 1 and 3 on rank 1. From `stuck` no one-block move
    # shortens the step (49); shifting the boundaries of stages 1..3 left by one block reaches 43,
    # the best of all 35 contiguous splits
    bg = synthetic_block_graph([4.0, 0.9, 0.6, 4.3, 2.4, 3.9, 0.5, 2.5])
    search = _Search(PlanProblem(bg, 2, 2, 4, "interleaved-1f1b", BW), float("inf"))
    stuck = [0, 1, 1, 2, 2, 3, 3, 3]
    assert search.single_moves(list(stuck), search.score(stuck)) == pytest.approx(49.0)
    best = min(search.score([sum(b >= c for c in cuts) for b in range(8)])
               for cuts in itertools.combinations(range(1, 8), 3))
    assign, step = refine(PlanProblem(bg, 2, 2, 4, "interleaved-1f1b", BW), stuck, budget_s=float("inf"))
    assert step == pytest.approx(best) == pytest.approx(43.0)
    assert step == pytest.approx(evaluate_assignment(bg, assign, 2, 2, 4, "interleaved-1f1b", BW).step_time_s)


@pytest.mark.parametrize("seed", range(4))
def test_kicks_never_end_above_the_descent(seed, monkeypatch):
    # no wall clock: an unlimited budget, and the kicks end after KICKS_WITHOUT_GAIN fruitless ones
    monkeypatch.setattr(partitioner.refine, "KICKS_WITHOUT_GAIN", 40)
    kicks = []
    real_kick = _Search.kick
    monkeypatch.setattr(_Search, "kick", lambda self, a, rng: kicks.append(1) or real_kick(self, a, rng))
    rng = random.Random(seed)
    bg = random_dag(rng, 16)
    p, v, m = 2, 2, 4
    search = _Search(PlanProblem(bg, p, v, m, "interleaved-1f1b", BW), float("inf"))
    start = random_plan(rng, search, 16, p * v)
    kicks.clear()
    plain = refine(PlanProblem(bg, p, v, m, "interleaved-1f1b", BW), start, budget_s=float("inf"))
    assert not kicks
    kicked = refine(PlanProblem(bg, p, v, m, "interleaved-1f1b", BW), start, budget_s=float("inf"), kicks=True)
    assert len(kicks) >= 40  # the kicks ran to their count, not to a deadline
    assert kicked[1] <= plain[1] * (1 + 1e-12)
    assert valid(bg, kicked[0], p * v)
    assert kicked[1] == pytest.approx(evaluate_assignment(bg, kicked[0], p, v, m, "interleaved-1f1b", BW).step_time_s)


def test_a_ripple_of_two_blocks_leaves_a_plan_that_one_block_shifts_cannot():
    # p = 2, v = 2; from `stuck` no single move and no one-block ripple shortens the step (80.7);
    # shifting the boundaries of stages 0..2 left by two blocks does (80.1)
    bg = synthetic_block_graph([2.7, 1.5, 2.0, 3.6, 1.2, 4.6, 1.7, 4.6, 1.9, 4.8, 3.7, 2.8])
    search = _Search(PlanProblem(bg, 2, 2, 4, "interleaved-1f1b", BW), float("inf"))
    stuck = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    search.max_shift = 1
    assert search.descend(stuck, search.score(stuck)) == (stuck, pytest.approx(80.7))
    search.max_shift = 2
    assign, step = search.descend(stuck, search.score(stuck))
    assert step <= 80.1 + 1e-9 and valid(bg, assign, 4)
    assert step == pytest.approx(evaluate_assignment(bg, assign, 2, 2, 4, "interleaved-1f1b", BW).step_time_s)
