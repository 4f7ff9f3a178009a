"""partitioner/ilp.py: Ilp.hint completes a solution from an assignment, the model's memory is the
closed form's, and model_objective is the objective the model reads at a hinted assignment."""
from __future__ import annotations

import dataclasses
import random

import pytest
from ortools.sat.python import cp_model
from test_solve import BW, branchy_dag, random_dag

from partitioner.ilp import build_ilp, flat_expr, model_objective, time_units
from partitioner.problem import PlanProblem, inflight_microbatches
from partitioner.seeds import chain_dp_split, make_seeds
from partitioner.stage_costs import stage_totals


@pytest.mark.parametrize("seed", range(3))
def test_warm_start_hint_is_a_solution(seed):
    """Ilp.hint fills every variable from the assignment: fixing them all to it leaves a feasible model."""
    bg = random_dag(random.Random(seed), 12, shared=True)
    problem = PlanProblem(bg, 3, 2, 6, "interleaved-1f1b", BW)
    ilp = build_ilp(problem)
    start = chain_dp_split(problem)
    assert ilp.hint(start, None) is not None
    proto = ilp.model.Proto()
    for i, value in zip(proto.solution_hint.vars, proto.solution_hint.values):
        ilp.model.Add(ilp.model.GetIntVarFromProtoIndex(i) == value)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = 10
    assert solver.Solve(ilp.model) in (cp_model.OPTIMAL, cp_model.FEASIBLE)


@pytest.mark.parametrize("seed", range(6))
def test_ilp_memory_equals_the_plans_including_held_values(seed):
    """The ILP's per-rank memory, read at a hinted assignment, is StageTotals' closed form: saved
    activations plus the values a stage sends or receives that it does not save itself."""
    rng = random.Random(seed)
    bg = branchy_dag(rng, 9) if seed % 2 else random_dag(rng, 9)
    n = len(bg.blocks)
    values = [dataclasses.replace(v, bytes=rng.randint(0, 50), requires_grad=rng.random() < 0.7,
                                  saver=rng.choice([-1, v.producer, *v.consumers])) for v in bg.values]
    bg = dataclasses.replace(bg, values=values)
    p, v = (2, 2) if seed < 3 else (3, 1)
    schedule, m = ("interleaved-1f1b", 4) if v > 1 else ("1f1b", 3)
    ilp = build_ilp(PlanProblem(bg, p, v, m, schedule, BW), with_time=False, need_memory=True)
    assert ilp.mem_scale == 1.0
    checked = 0
    for _ in range(40):
        assign = sorted(rng.sample(range(n), 1) + [rng.randrange(p * v) for _ in range(n - 1)])
        if len(set(assign)) < p * v or any(assign[a] > assign[b] for a, b in bg.graph.edges):
            continue
        if ilp.hint(assign, None) is None:
            continue
        hints = dict(zip(ilp.model.Proto().solution_hint.vars, ilp.model.Proto().solution_hint.values))
        got = []
        for e in ilp.rank_mem:
            offset, terms = flat_expr(e)
            got.append(offset + sum(c * hints[i] for i, c in terms))
        st = stage_totals(bg, assign, p, v, BW)
        assert got == st.rank_mem_bytes(inflight_microbatches(schedule, p, m, v))
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("seed", range(4))
def test_hinted_objective_is_model_objective(seed):
    """The objective Ilp.hint reads off the model at every seed equals model_objective computed directly."""
    rng = random.Random(seed)
    bg = branchy_dag(rng, 10, shared=True) if seed % 2 else random_dag(rng, 10, shared=True)
    p, v = (2, 2) if seed < 2 else (3, 1)
    problem = PlanProblem.checked(bg, p, v, 2 * p, link_bw_bytes_per_s=BW)
    ilp = build_ilp(problem)
    w, ts = time_units(bg)
    for assign in make_seeds(problem).splits():
        got = ilp.hint(assign, None)
        assert got is not None and got[0] == model_objective(problem, assign, w, ts)
