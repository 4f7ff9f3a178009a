"""GLOP solves that end: a deadline, an iteration cap against cycling, one retry with a looser tolerance.

GLOP has no limit of its own: on a degenerate LP its dual simplex can pivot around a cycle for ever
(a chain bound's node LP under gpipe did, re-optimising an answer 6.5e-8 infeasible after the primal
phase). Every bound's LP goes through solve_within, which gives each solve the time left until the
caller's deadline and at most ITERATIONS_PER_ENTRY pivots per row and column; a solve that stops
there is retried once with the primal tolerance at 1e-7 (the bounds keep a 1e-6 margin for the LP's
tolerance), which ends that cycle. A status other than OPTIMAL or INFEASIBLE proves nothing: callers
keep the bound they had.
"""
from __future__ import annotations

import math
import time

from ortools.linear_solver import pywraplp

ITERATIONS_PER_ENTRY = 20  # per row and column: simplex rarely needs more than a few
_RETRY = "primal_feasibility_tolerance: 1e-7"


def solve_within(lp: pywraplp.Solver, deadline: float = math.inf) -> int:
    """lp.Solve() within `deadline` (time.perf_counter()) and the iteration cap (module docstring);
    the status (pywraplp.Solver.NOT_SOLVED when no time was left)."""
    cap = f"max_number_of_iterations: {ITERATIONS_PER_ENTRY * (lp.NumVariables() + lp.NumConstraints()) + 1000}"
    status = pywraplp.Solver.NOT_SOLVED
    for extra in ("", _RETRY):
        left_s = deadline - time.perf_counter()
        if left_s <= 0:
            break
        if left_s < math.inf:
            lp.SetTimeLimit(max(1, int(left_s * 1000)))
        lp.SetSolverSpecificParametersAsString(f"{cap} {extra}")
        status = lp.Solve()
        if status in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.INFEASIBLE):
            break
    return status
