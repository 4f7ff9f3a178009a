"""partitioner/glop.py: a GLOP solve ends, on an LP GLOP cycles on too, and proves nothing past its deadline."""
import math
import time

import pytest
from ortools.linear_solver import pywraplp

from partitioner import glop
from partitioner.glop import solve_within

INF = math.inf
# A node LP of chain_bound (gpipe, 4 ranks, 16 blocks whose backward is twice their forward, a memory
# cap) on which GLOP 9.15's dual simplex cycles for ever after its primal phase ends 6.5e-8 infeasible:
# test_memory_cap_is_respected_and_binding[gpipe-1] hung there. Minimise T (the last variable).
UPPER = [1.0, 1.0, 1.0, 0.0, 0.0, INF, INF, 1.0, 1.0, 1.0, 1.0, 1.0, INF, INF, 1.0, 1.0, 1.0, 1.0, INF, INF, INF]
ROWS = [  # (lower, upper, {variable: coefficient})
    (1.0, 1.0, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}),
    (0.0, 0.0, {0: -0.017664931796877236, 1: -0.039700071460128626, 2: -0.05924850664731197,
                3: -0.08213544784380612, 4: -0.10533348960028129, 5: 1.0}),
    (0.0, 0.0, {0: -0.03532996359393447, 1: -0.07940034292061726, 2: -0.11849721329498393,
                3: -0.16427109568797224, 4: -0.21066717920092257, 6: 1.0}),
    (1.0, 1.0, {7: 1.0, 8: 1.0, 9: 1.0, 10: 1.0, 11: 1.0}),
    (0.0, 0.0, {7: -0.12053791696825054, 8: -0.1349951429912574, 9: -0.16121469018644233,
                10: -0.17918482253268056, 11: -0.19679795423631763, 12: 1.0}),
    (0.0, 0.0, {7: -0.24107603393686108, 8: -0.26999058598305475, 9: -0.3224296803734247,
                10: -0.3583700450660811, 11: -0.39359630847335525, 13: 1.0}),
    (1.0, 1.0, {14: 1.0, 15: 1.0, 16: 1.0, 17: 1.0}),
    (0.0, 0.0, {14: -0.24625434325781786, 15: -0.2724594904270828, 16: -0.293526128347031,
                17: -0.3169145704462268, 18: 1.0}),
    (0.0, 0.0, {14: -0.4925090865163557, 15: -0.5449194808550656, 16: -0.587052756694962,
                17: -0.6338297408935336, 19: 1.0}),
    (0.0, INF, {5: 1.0}),
    (0.0, INF, {6: 1.0}),
    (0.0, INF, {5: -1.0, 12: 1.0}),
    (0.0, INF, {6: -1.0, 13: 1.0}),
    (0.0, INF, {12: -1.0, 18: 1.0}),
    (0.0, INF, {13: -1.0, 19: 1.0}),
    (-0.33333309999958, INF, {18: -1.0}),
    (-0.66666690000042, INF, {19: -1.0}),
    (-INF, -5.666668300002939, {5: 7.0, 19: -7.0, 20: -1.0}),
    (-INF, -1.0, {5: 7.0, 6: 7.0, 20: -1.0}),
    (-INF, -1.0, {5: -7.0, 6: -7.0, 12: 7.0, 13: 7.0, 20: -1.0}),
    (-INF, -1.0, {12: -7.0, 13: -7.0, 18: 7.0, 19: 7.0, 20: -1.0}),
    (-INF, -8.0, {18: -7.0, 19: -7.0, 20: -1.0}),
    (-INF, -1.0, {5: -7.0, 12: 7.0, 13: -7.0, 19: 7.0, 20: -1.0}),
    (-INF, -1.0, {5: -7.0, 6: 7.0, 12: 7.0, 20: -1.0}),
    (-INF, -5.666668300002939, {12: -7.0, 18: 7.0, 19: -7.0, 20: -1.0}),
    (-INF, -1.0, {6: -7.0, 12: -7.0, 13: 7.0, 18: 7.0, 20: -1.0}),
]


def cycling_lp() -> pywraplp.Solver:
    lp = pywraplp.Solver.CreateSolver("GLOP")
    x = [lp.NumVar(0, lp.infinity() if u == INF else u, "") for u in UPPER]
    for lower, upper, coefs in ROWS:
        row = lp.RowConstraint(-lp.infinity() if lower == -INF else lower, lp.infinity() if upper == INF else upper)
        for i, c in coefs.items():
            row.SetCoefficient(x[i], c)
    lp.Minimize(x[-1])
    return lp


def test_solve_within_ends_where_glop_cycles():
    lp = cycling_lp()
    t0 = time.perf_counter()
    assert solve_within(lp) == pywraplp.Solver.OPTIMAL  # the iteration cap, then the retry's looser tolerance
    assert time.perf_counter() - t0 < 2
    assert lp.Objective().Value() == pytest.approx(2.9635618, rel=1e-6)


def test_solve_within_gives_up_at_its_deadline(monkeypatch):
    lp = cycling_lp()
    assert solve_within(lp, time.perf_counter() - 1) == pywraplp.Solver.NOT_SOLVED  # no time left: no solve
    monkeypatch.setattr(glop, "ITERATIONS_PER_ENTRY", 10 ** 9)  # no iteration cap and a retry that cycles
    monkeypatch.setattr(glop, "_RETRY", "")  # too: only the deadline ends it
    t0 = time.perf_counter()
    assert solve_within(lp, t0 + 0.3) == pywraplp.Solver.NOT_SOLVED
    assert time.perf_counter() - t0 < 1.5
