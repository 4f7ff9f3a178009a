"""partitioner/critical_path.py: critical paths are exact, and row generation's bound holds against brute force."""
import random

import pytest

from partitioner.critical_path import path_bound_solve
from partitioner.path_rows import ActionDag, critical_path
from partitioner.plan import evaluate_assignment
from partitioner.problem import PlanProblem
from partitioner.solve import solve
from partitioner.cost_models.time import NodeTime
from partitioner.passes.coarsen import synthetic_block_graph
from partitioner.runtime.schedules import Action, dependencies, make_schedule
from partitioner.runtime.simulator import StageCosts, simulate

SHAPES = [("gpipe", 1, 1), ("gpipe", 2, 2), ("gpipe", 3, 2), ("1f1b", 2, 1), ("1f1b", 4, 1),
          ("interleaved-1f1b", 2, 2), ("interleaved-1f1b", 3, 2), ("interleaved-1f1b", 2, 3)]


def random_costs(rng: random.Random, K: int, comm: bool) -> StageCosts:
    fwd = [rng.uniform(0.1, 2.0) for _ in range(K)]
    bwd = [rng.uniform(0.1, 4.0) for _ in range(K)]
    times = tuple(tuple(rng.choice([0.0, rng.uniform(0, 1.5)]) if comm and j < k else 0.0 for k in range(K))
                  for j in range(K))
    return StageCosts(tuple(fwd), tuple(bwd), times, (0,) * K)


@pytest.mark.parametrize("name,p,v", SHAPES)
def test_critical_path_is_the_simulated_step(name, p, v):
    rng = random.Random(hash((name, p, v)) % 1000)
    for trial in range(4):
        m = p * rng.randint(1, 3)
        sched = make_schedule(name, p, m, v)
        costs = random_costs(rng, p * v, comm=trial % 2 == 1)
        tl = simulate(sched, costs)
        path = critical_path(tl, costs)
        assert path.compute_s(costs.fwd_time_s, costs.bwd_time_s) + path.comm_s == pytest.approx(tl.step_time_s,
                                                                                                   rel=1e-12)
        assert sum(path.fwd_count) + sum(path.bwd_count) == len(path.actions)
        rank_of = {a: (r, i) for r, row in enumerate(sched.actions) for i, a in enumerate(row)}
        for a, b in zip(path.actions, path.actions[1:]):  # every step follows rank order or a data dependency
            (ra, ia), (rb, ib) = rank_of[a], rank_of[b]
            data = b.microbatch == a.microbatch and (
                (a.kind == b.kind == "F" and a.stage < b.stage) or (a.kind == b.kind == "B" and a.stage > b.stage)
                or (a.kind == "F" and b.kind == "B" and a.stage == b.stage))
            assert (ra == rb and ib == ia + 1) or data
        if trial % 2 == 0:  # without communication ActionDag.longest is the simulator
            length, row = ActionDag(sched).longest(costs.fwd_time_s, costs.bwd_time_s)
            assert length == pytest.approx(tl.step_time_s, rel=1e-12)
            assert row.compute_s(costs.fwd_time_s, costs.bwd_time_s) == pytest.approx(length, rel=1e-12)


def test_action_dag_uses_the_schedules_dependencies():
    sched = make_schedule("interleaved-1f1b", 2, 4, 2)
    dag = ActionDag(sched)
    index = {a: i for i, a in enumerate(dag.actions)}
    for a, preds in zip(dag.actions, dag.preds):
        assert {dag.actions[j] for j in preds} >= set(dependencies(sched, a))
        assert all(j < index[a] for j in preds)
    assert Action(0, "F", 0) in index


def valid_assignments(bg, K: int):
    """Every assignment with stages ordered along edges and none empty (the ILP's feasible set)."""
    n = len(bg.blocks)
    preds = [list(bg.graph.predecessors(b)) for b in range(n)]

    def extend(prefix):
        b = len(prefix)
        if b == n:
            if len(set(prefix)) == K:
                yield list(prefix)
            return
        for k in range(max([prefix[u] for u in preds[b]], default=0), K):
            yield from extend(prefix + [k])

    return list(extend([]))


def brute_force(bg, p, v, m, schedule, bw, cap=None) -> float:
    """Best simulated step over all valid assignments within the cap (the closed form, as the ILP's)."""
    best = float("inf")
    for a in valid_assignments(bg, p * v):
        plan = evaluate_assignment(bg, a, p, v, m, schedule, bw)
        closed = evaluate_assignment(bg, a, p, v, m, schedule, bw, simulate=False)
        if cap is None or max(closed.rank_mem_bytes) <= cap:
            best = min(best, plan.step_time_s)
    return best


def tiny_graph(rng: random.Random, n: int, skips: bool, comm: bool):
    edges = {(b, b + 1): rng.choice([0, 10 ** 6]) if comm else 0 for b in range(n - 1)}
    if skips:
        for _ in range(2):
            u = rng.randrange(n - 2)
            edges[(u, rng.randrange(u + 2, n))] = rng.choice([0, 10 ** 6]) if comm else 0
        if rng.random() < 0.7:  # a branch: b no longer feeds b + 1
            del edges[(1, 2)]
            edges[(0, 2)] = 0
    return synthetic_block_graph([rng.uniform(0.5, 3.0) for _ in range(n)], edges=edges,
                                 param_state_bytes=[rng.randint(1, 100) for _ in range(n)],
                                 saved_bytes=[rng.randint(1, 30) for _ in range(n)])


CASES = [(seed, p, v, sched) for seed, (p, v, sched) in enumerate(
    [(2, 1, "1f1b"), (3, 1, "1f1b"), (2, 2, "interleaved-1f1b"), (2, 1, "gpipe"), (3, 2, "interleaved-1f1b"),
     (2, 2, "gpipe"), (3, 1, "1f1b"), (2, 2, "interleaved-1f1b")])]


@pytest.mark.parametrize("seed,p,v,schedule", CASES)
def test_bound_is_below_the_brute_force_best_and_meets_it_without_communication(seed, p, v, schedule):
    rng = random.Random(seed)
    n = p * v + rng.randint(3, 5)
    bg = tiny_graph(rng, n, skips=seed % 2 == 1, comm=False)
    m = 2 * p
    steps = {tuple(a): evaluate_assignment(bg, a, p, v, m, schedule, 1e9).step_time_s
             for a in valid_assignments(bg, p * v)}
    best = min(steps.values())
    worst = list(max(steps, key=steps.get)) if seed % 2 else None  # a poor start: the rows have work to do
    got = path_bound_solve(PlanProblem(bg, p, v, m, schedule, 1e9), time_limit_s=20, tol=0.0, incumbent=worst)
    assert got.lower_bound_s <= best * (1 + 1e-9) <= got.step_time_s * (1 + 1e-9)
    assert got.status in ("converged", "stalled")  # no communication: it converges to the optimum
    assert got.step_time_s == pytest.approx(best, rel=1e-12)
    assert got.lower_bound_s == pytest.approx(best, rel=1e-5)  # integer units, rounded down


COMM_CASES = [(2, 1, "1f1b"), (2, 2, "interleaved-1f1b"), (3, 1, "gpipe"), (2, 2, "gpipe"), (3, 1, "1f1b"),
              (3, 2, "interleaved-1f1b"), (2, 1, "1f1b"), (2, 2, "interleaved-1f1b")]


@pytest.mark.parametrize("seed", range(len(COMM_CASES)))
def test_bound_holds_with_communication_and_a_memory_cap(seed):
    """Slow links (1 MB takes a second, as long as a block): the rows model the hops between stages;
    on a chain that is all the communication there is, and the bound meets the optimum."""
    rng = random.Random(100 + seed)
    p, v, schedule = COMM_CASES[seed]
    n, m, bw = p * v + 3, 2 * p, 1e6
    chain = seed < 6
    bg = tiny_graph(rng, n, skips=not chain, comm=True)
    cap = None
    if seed % 2:
        mems = sorted(max(evaluate_assignment(bg, a, p, v, m, schedule, bw, simulate=False).rank_mem_bytes)
                      for a in valid_assignments(bg, p * v))
        cap = mems[len(mems) // 3]
    best = brute_force(bg, p, v, m, schedule, bw, cap)
    got = path_bound_solve(PlanProblem(bg, p, v, m, schedule, bw, cap), time_limit_s=20, tol=0.0)
    assert got.assignment is not None
    assert got.lower_bound_s <= best * (1 + 1e-9) <= got.step_time_s * (1 + 1e-9)
    if chain:
        assert got.step_time_s == pytest.approx(best, rel=1e-12)
        assert got.lower_bound_s == pytest.approx(best, rel=1e-5)
    closed = evaluate_assignment(bg, got.assignment, p, v, m, schedule, bw, simulate=False)
    assert cap is None or max(closed.rank_mem_bytes) <= cap
    assert evaluate_assignment(bg, got.assignment, p, v, m, schedule, bw).step_time_s == got.step_time_s


def test_solve_reports_a_bound_below_every_plan_and_never_a_slower_plan():
    rng = random.Random(7)
    bg = tiny_graph(rng, 7, skips=True, comm=False)
    p, v, m = 2, 2, 4
    best = brute_force(bg, p, v, m, "interleaved-1f1b", 1e9)
    plan = solve(bg, p, v, m, link_bw_bytes_per_s=1e9, time_limit_s=20)
    assert 0 < plan.step_lower_bound_s <= best * (1 + 1e-9) <= plan.step_time_s * (1 + 1e-9)
    assert plan.step_gap is not None and plan.step_gap <= 0.01
    no_paths = solve(bg, p, v, m, link_bw_bytes_per_s=1e9, time_limit_s=20, refine_time_s=0)
    assert no_paths.step_lower_bound_s == 0 and no_paths.step_gap is None


@pytest.mark.parametrize("seed", [1, 4])
def test_a_probe_refutes_a_target_below_the_relaxations_optimum_and_meets_one_above(seed):
    """The relaxation's feasibility probe (used to raise the bound once CP-SAT's dual bound stalls):
    no assignment keeps every row under 99% of the relaxation's optimum T*, one keeps them under
    101% of it; T* is a lower bound on the brute-force best."""
    from ortools.sat.python import cp_model

    from partitioner.critical_path import _Relaxation
    from partitioner.path_rows import StageUnits
    seed_, p, v, schedule = CASES[seed]
    rng = random.Random(seed_)
    bg = tiny_graph(rng, p * v + rng.randint(3, 5), skips=seed_ % 2 == 1, comm=False)
    m = 2 * p
    problem = PlanProblem(bg, p, v, m, schedule, 1e9)
    done = path_bound_solve(problem, time_limit_s=20, tol=0.0)
    rel = _Relaxation(problem, StageUnits.of(bg), None)
    for r in done.paths:
        rel.add_row(r)
    status, optimum, _ = rel.solve(10, 0.0, 1)
    assert status == cp_model.OPTIMAL
    assert optimum <= brute_force(bg, p, v, m, schedule, 1e9) * (1 + 1e-9)
    below, none = rel.probe(0.99 * optimum, 10, 1)
    assert below == cp_model.INFEASIBLE and none == []
    above, plans = rel.probe(1.01 * optimum, 10, 1)
    assert above in (cp_model.FEASIBLE, cp_model.OPTIMAL) and plans


@pytest.mark.parametrize("seed,p,v,schedule", CASES[:4])
def test_bound_and_plans_count_every_stage_pass(seed, p, v, schedule):
    """With a fixed cost per stage pass (device and host parts) the rows count it once per stage: the
    bound stays below the brute-force best and meets it; the plan scores what evaluate_assignment says."""
    rng = random.Random(seed)
    n = p * v + rng.randint(3, 5)
    bg = tiny_graph(rng, n, skips=seed % 2 == 1, comm=False)
    bg.stage_pass = NodeTime(rng.uniform(0, 0.5), rng.uniform(0, 0.5), rng.uniform(0, 1.0), rng.uniform(0, 1.0))
    m = 2 * p
    best = brute_force(bg, p, v, m, schedule, 1e9)
    got = path_bound_solve(PlanProblem(bg, p, v, m, schedule, 1e9), time_limit_s=20, tol=0.0)
    assert got.lower_bound_s <= best * (1 + 1e-9) <= got.step_time_s * (1 + 1e-9)
    assert got.step_time_s == pytest.approx(best, rel=1e-12)
    assert got.lower_bound_s == pytest.approx(best, rel=1e-5)  # integer units, rounded down
    assert evaluate_assignment(bg, got.assignment, p, v, m, schedule, 1e9).step_time_s == got.step_time_s
    plan = solve(bg, p, v, m, schedule=schedule, link_bw_bytes_per_s=1e9, time_limit_s=20)
    assert plan.step_lower_bound_s <= best * (1 + 1e-9) <= plan.step_time_s * (1 + 1e-9)
    assert evaluate_assignment(bg, plan.block_stage, p, v, m, schedule, 1e9).step_time_s == plan.step_time_s


def host_bound_graph(rng: random.Random, n: int, skips: bool):
    """tiny_graph with host dispatch about four times each block's device time (a small batch)."""
    import dataclasses

    bg = tiny_graph(rng, n, skips=skips, comm=False)
    bg.blocks = [dataclasses.replace(b, host_fwd_time_s=4 * b.fwd_time_s * rng.uniform(0.8, 1.2),
                                     host_bwd_time_s=4 * b.bwd_time_s * rng.uniform(0.8, 1.2)) for b in bg.blocks]
    return bg


@pytest.mark.parametrize("seed,p,v,schedule", CASES[:6])
def test_fluid_bound_over_the_host_holds_where_the_host_outweighs_the_device(seed, p, v, schedule):
    """A stage pass takes at least its host sum: the fluid bound over the host's times stays below the
    brute-force best, and above twice the device's alone (which gives about a quarter of it)."""
    from partitioner.path_rows import StageUnits, fluid_bound, synthetic_rows

    rng = random.Random(seed)
    bg = host_bound_graph(rng, p * v + rng.randint(3, 5), skips=seed % 2 == 1)
    m = 2 * p
    best = brute_force(bg, p, v, m, schedule, 1e9)
    sched = make_schedule(schedule, p, m, v)
    bounds = {}
    for host in (False, True):
        rows = {r.key: r for r in synthetic_rows(sched, p * v)}
        bounds[host] = fluid_bound(rows, StageUnits.of(bg, host=host), ActionDag(sched))[0]
    assert 2 * bounds[False] < bounds[True] <= best * (1 + 1e-9)


@pytest.mark.parametrize("seed,p,v,schedule", [(0, 2, 2, "interleaved-1f1b"), (1, 2, 1, "1f1b")])
def test_quick_proof_over_the_host_meets_the_best_plan(seed, p, v, schedule):
    """On a host-bound chain the bound over the chain's cuts alone (chain_only) meets the best plan."""
    rng = random.Random(seed)
    bg = host_bound_graph(rng, p * v + 4, skips=False)
    m = 2 * p
    best = brute_force(bg, p, v, m, schedule, 1e9)
    got = path_bound_solve(PlanProblem(bg, p, v, m, schedule, 1e9), time_limit_s=20, tol=0.0, chain_only=True)
    assert got.lower_bound_s == pytest.approx(best, rel=1e-5) and got.step_time_s == pytest.approx(best, rel=1e-12)
