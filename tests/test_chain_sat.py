"""partitioner/chain_sat.py: the CP-SAT bound over a chain's cuts stays below the brute-force best plan
(within a memory cap too), proves it within the gap, and finds faster plans through score()."""
import math
import random

import pytest

from partitioner.chain_sat import chain_sat_bound
from partitioner.path_rows import ActionDag, StageUnits, synthetic_rows
from partitioner.plan import evaluate_assignment
from partitioner.problem import PlanProblem
from partitioner.runtime.schedules import make_schedule
from tests.test_chain_bound import CASES, fits, uneven_graph
from tests.test_critical_path import valid_assignments


def _setup(seed, p, v, schedule, base):
    rng = random.Random(base + seed)
    K, m = p * v, 2 * p
    bg = uneven_graph(rng, K + rng.randint(2, 4), branchy=seed % 2 == 1, comm=seed % 3 == 0)
    sched = make_schedule(schedule, p, m, v)
    rows = {r.key: r for r in synthetic_rows(sched, K)}
    return bg, m, StageUnits.of(bg), ActionDag(sched), rows


@pytest.mark.parametrize("seed,p,v,schedule", CASES)
def test_bound_stays_below_the_brute_force_best_and_proves_it_within_the_gap(seed, p, v, schedule):
    bg, m, units, dag, rows = _setup(seed, p, v, schedule, 50)
    steps = {tuple(a): evaluate_assignment(bg, a, p, v, m, schedule, 1e6).step_time_s
             for a in valid_assignments(bg, p * v)}
    best = min(steps.values())
    for upper in (best, 1.3 * best):
        got = chain_sat_bound(bg, units, dag, dict(rows), upper, 0.01, math.inf)
        assert got.lower_bound_s <= best * (1 + 1e-9)
        if got.complete:
            assert upper <= got.lower_bound_s * 1.01 * (1 + 1e-9)

    found = []

    def score(a):
        found.append(steps[tuple(a)])
        return steps[tuple(a)]

    worst = max(steps.values())
    got = chain_sat_bound(bg, units, dag, dict(rows), worst, 0.01, math.inf, score=score)
    assert got.lower_bound_s <= best * (1 + 1e-9)
    if got.complete:  # proven within the gap of the best plan it found
        assert min(found + [worst]) <= got.lower_bound_s * 1.01 * (1 + 1e-9)


@pytest.mark.parametrize("seed,p,v,schedule", CASES[:6])
def test_bound_under_a_memory_cap_stays_below_the_brute_force_best_within_it(seed, p, v, schedule):
    bg, m, units, dag, rows = _setup(seed, p, v, schedule, 90)
    plans = valid_assignments(bg, p * v)
    mems = sorted(max(evaluate_assignment(bg, a, p, v, m, schedule, 1e6, simulate=False).rank_mem_bytes)
                  for a in plans)
    cap = mems[len(mems) // 4]  # a quarter of the plans fit
    inside = [a for a in plans if fits(bg, a, p, v, m, schedule, cap)]
    best = min(evaluate_assignment(bg, a, p, v, m, schedule, 1e6).step_time_s for a in inside)
    free = min(evaluate_assignment(bg, a, p, v, m, schedule, 1e6).step_time_s for a in plans)
    inflight = PlanProblem(bg, p, v, m, schedule, 1e6, cap).inflight()
    for upper in ((free + best) / 2, best, 1.3 * best):
        got = chain_sat_bound(bg, units, dag, dict(rows), upper, 0.0, math.inf, cap_bytes=cap, inflight=inflight)
        assert got.lower_bound_s <= best * (1 + 1e-9)


def test_past_the_deadline_it_proves_nothing():
    bg, m, units, dag, rows = _setup(0, 2, 2, "interleaved-1f1b", 50)
    got = chain_sat_bound(bg, units, dag, rows, 1e9, 0.01, 0.0)
    assert not got.complete and got.lower_bound_s == 0.0
