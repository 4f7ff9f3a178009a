"""solve(): the CP-SAT partition ILP against the chain DP, brute force and memory caps."""
from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner.chain_dp import split_chain
from partitioner.errors import PlanError
from partitioner.plan import evaluate_assignment
from partitioner.solve import min_memory_bytes, solve
from partitioner.passes.coarsen import synthetic_block_graph

BW = 1e9


def random_dag(rng: random.Random, n: int, skip_prob: float = 0.3, shared: bool = False):
    times = [rng.uniform(0.5, 5.0) for _ in range(n)]
    edges = {(b, b + 1): rng.randint(0, 2_000_000_000) for b in range(n - 1)}
    for u in range(n):
        for v in range(u + 2, n):
            if rng.random() < skip_prob:
                edges[u, v] = rng.randint(0, 2_000_000_000)
    tied = [("tied.weight", 4 * rng.randint(0, 4_000_000_000), (0, n - 1))] if shared else None
    return synthetic_block_graph(times, edges, [rng.randint(0, 100) for _ in range(n)],
                                 [rng.randint(0, 10) for _ in range(n)], tied, rng.randint(0, 10**9))


def branchy_dag(rng: random.Random, n: int, shared: bool = False):
    """A DAG where block b need not feed b + 1 (parallel branches): stages need not be contiguous."""
    times = [rng.uniform(0.5, 5.0) for _ in range(n)]
    edges = {}
    for w in range(1, n):
        for u in rng.sample(range(max(0, w - 4), w), k=min(w, rng.randint(1, 2))):
            edges[u, w] = rng.randint(0, 2_000_000_000)
    tied = [("tied.weight", 4 * rng.randint(0, 4_000_000_000), (0, n - 1))] if shared else None
    return synthetic_block_graph(times, edges, [rng.randint(0, 100) for _ in range(n)],
                                 [rng.randint(0, 10) for _ in range(n)], tied, rng.randint(0, 10**9))


def brute_force(bg, p: int, v: int, m: int, cap=None) -> float:
    """Closed-form objective of the best monotone assignment with every stage non-empty."""
    n, K = len(bg.blocks), p * v
    best = float("inf")
    for assign in itertools.product(range(K), repeat=n):
        if len(set(assign)) < K or any(assign[u] > assign[w] for u, w in bg.graph.edges):
            continue
        plan = evaluate_assignment(bg, list(assign), p, v, m, link_bw_bytes_per_s=BW, simulate=False)
        if cap is not None and max(plan.rank_mem_bytes) > cap:
            continue
        best = min(best, plan.model_step_time_s)
    return best


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(times=st.lists(st.floats(0.1, 10.0), min_size=2, max_size=14), p=st.integers(1, 5), m=st.integers(2, 8))
def test_chain_without_comm_matches_dp(times, p, m):
    p = min(p, len(times))
    bg = synthetic_block_graph(times)
    plan = solve(bg, p, microbatches=m, time_limit_s=20, simulate=False)
    dp = split_chain([b.time_s for b in bg.blocks], p)
    assert plan.solver_status == "OPTIMAL"
    assert max(plan.rank_time_s) == pytest.approx(dp.bottleneck, rel=2e-5 * len(times))


@pytest.mark.parametrize("seed", range(6))
def test_dag_with_skips_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(4, 6)
    p, v = rng.choice([(2, 1), (3, 1), (2, 2)]) if n >= 4 else (2, 1)
    m = rng.choice([2, 4])
    bg = random_dag(rng, n, shared=seed % 2 == 1)
    plan = solve(bg, p, chunks=v, microbatches=m, link_bw_bytes_per_s=BW, time_limit_s=20, simulate=False)
    assert plan.solver_status == "OPTIMAL"
    assert plan.model_step_time_s == pytest.approx(brute_force(bg, p, v, m), rel=1e-4)
    assert plan.objective == pytest.approx(plan.model_step_time_s, rel=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_branchy_dag_matches_brute_force(seed):
    rng = random.Random(100 + seed)
    bg = branchy_dag(rng, rng.randint(5, 6), shared=seed % 2 == 0)
    assert any(not bg.graph.has_edge(b, b + 1) for b in range(len(bg.blocks) - 1))
    p, v = [(2, 1), (3, 1), (2, 2)][seed % 3]
    # gap=0: the default 1% early stop may rightly keep a plan up to 1% above the optimum
    plan = solve(bg, p, chunks=v, microbatches=4, link_bw_bytes_per_s=BW, time_limit_s=20, simulate=False, gap=0.0)
    assert plan.solver_status == "OPTIMAL"
    assert plan.model_step_time_s == pytest.approx(brute_force(bg, p, v, 4), rel=1e-4)


@pytest.mark.parametrize("seed", range(8))
def test_pruning_by_the_incumbent_keeps_the_optimum(seed):
    """hint=True prunes stage domains with the best seed's objective; hint=False solves the full model."""
    rng = random.Random(200 + seed)
    if seed < 4:
        bg = random_dag(rng, rng.randint(12, 30), skip_prob=0.1, shared=seed % 2 == 0)
    else:
        bg = branchy_dag(rng, rng.randint(10, 16), shared=seed % 2 == 0)
    p, v = [(2, 1), (4, 1), (2, 2), (3, 2)][seed % 4]
    cap = None
    if seed % 3 == 2:
        need, _ = min_memory_bytes(bg, p, v, 4 * p)
        cap = need + (need >> 3)
    kw = dict(chunks=v, microbatches=4 * p, link_bw_bytes_per_s=BW, memory_cap_bytes=cap, time_limit_s=30,
              simulate=False, gap=0.0)
    pruned, full = solve(bg, p, **kw), solve(bg, p, hint=False, **kw)
    assert pruned.solver_status == full.solver_status == "OPTIMAL"
    assert pruned.objective == pytest.approx(full.objective, rel=1e-6)
    assert pruned.model_step_time_s == pytest.approx(pruned.objective, rel=1e-4)


def synthetic_chain(n: int, seed: int = 0):
    """Like benchmarks/solve_time.py: random block times and activations, 5% short skip edges."""
    rng = random.Random(seed)
    edges = {(b, b + 1): rng.randint(1 << 20, 1 << 25) for b in range(n - 1)}
    for u in range(n - 3):
        if rng.random() < 0.05:
            edges[u, u + rng.randint(2, 3)] = rng.randint(1 << 20, 1 << 25)
    return synthetic_block_graph([rng.uniform(0.5e-3, 2e-3) for _ in range(n)], edges,
                                 [rng.randint(1 << 24, 1 << 28) for _ in range(n)],
                                 [rng.randint(1 << 22, 1 << 26) for _ in range(n)])


def test_thousand_blocks_sixteen_stages_optimal_within_the_time_limit():
    # proven in a few seconds on an idle machine (benchmarks/solve_time.py); the limit leaves room for a
    # busy one, while an ILP that lost its pruning would not prove 1,000 x 16 optimal in it
    bg = synthetic_chain(1000)
    plan = solve(bg, 16, microbatches=32, link_bw_bytes_per_s=50e9, time_limit_s=60, refine_time_s=0, gap=0.0)
    assert plan.solver_status == "OPTIMAL" and plan.gap == 0
    dp = split_chain([b.time_s for b in bg.blocks], 16)
    assert max(plan.rank_time_s) >= dp.bottleneck * (1 - 1e-5)  # the DP's bottleneck bounds every split


@pytest.mark.parametrize("chunks", [1, 2])
def test_time_limit_covers_the_whole_call(chunks, monkeypatch):
    """Every step of solve() gets its share of what time_limit_s leaves. solve() reads a clock on which
    each step (CP-SAT, every polish, the exact search, the row generation) takes exactly the budget it
    is given, so how busy the machine is does not matter: the steps' budgets end within the limit.
    1f1b on a path runs the exact search; interleaving the quick proof, then the row generation (allowed
    a short budget)."""
    import types

    import partitioner.solve as solve_module

    clock = [0.0]  # seconds on solve()'s clock
    steps: list[tuple[str, float]] = []
    monkeypatch.setattr(solve_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(solve_module, "PATHS_MIN_TIME_S", 0.01)

    def takes_its_budget(name: str, real, budget_at: int):
        def step(*args, **kwargs):
            budget = args[budget_at]
            steps.append((name, budget))
            clock[0] += budget
            return real(*args, **kwargs)
        monkeypatch.setattr(solve_module, name, step)

    takes_its_budget("cp_solver", solve_module.cp_solver, 0)
    takes_its_budget("refine", solve_module.refine, 2)
    takes_its_budget("best_split_s", solve_module.best_split_s, 2)
    takes_its_budget("path_bound_solve", solve_module.path_bound_solve, 1)
    limit = 1.5
    bg = synthetic_chain(200, seed=1)
    plan = solve(bg, 8, chunks=chunks, microbatches=16, link_bw_bytes_per_s=50e9, time_limit_s=limit, hint=False)
    assert sorted(set(plan.block_stage)) == list(range(8 * chunks))
    names = [name for name, _ in steps]
    first = ["path_bound_solve"] if chunks == 2 else []  # interleaving on a chain: the quick proof first
    assert names[:len(first) + 1] == first + ["cp_solver"] and "refine" in names
    assert ("best_split_s" if chunks == 1 else "path_bound_solve") in names
    assert all(budget >= 0 for _, budget in steps)
    assert clock[0] <= limit * (1 + 1e-9), steps  # without the shared deadline the steps add up to far more


def test_stages_follow_edges_and_are_non_empty():
    bg = random_dag(random.Random(7), 20)
    plan = solve(bg, 4, chunks=2, microbatches=8, link_bw_bytes_per_s=BW)
    assert all(plan.block_stage[u] <= plan.block_stage[w] for u, w in bg.graph.edges)
    assert sorted(set(plan.block_stage)) == list(range(8))
    assert plan.stage_rank == [k % 4 for k in range(8)]
    assert set(plan.node_stage) >= {n for b in bg.blocks for n in b.nodes}
    assert plan.simulated and plan.step_time_s > 0 and 0 <= plan.bubble < 1
    assert plan.bound <= plan.objective * (1 + 1e-9) and 0 <= plan.gap < 1


@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("gpipe", 1), ("interleaved-1f1b", 2)])
def test_memory_cap_is_respected_and_binding(schedule, v):
    rng = random.Random(3)
    n = 16
    bg = synthetic_block_graph([rng.uniform(1, 2) for _ in range(n)], None,
                               [rng.randint(100, 1000) for _ in range(n)], [rng.randint(10, 200) for _ in range(n)])
    free = solve(bg, 4, chunks=v, microbatches=8, schedule=schedule, simulate=False)
    need, exact = min_memory_bytes(bg, 4, chunks=v, microbatches=8, schedule=schedule)
    assert exact and need <= max(free.rank_mem_bytes)
    cap = (need + max(free.rank_mem_bytes)) // 2
    capped = solve(bg, 4, chunks=v, microbatches=8, schedule=schedule, memory_cap_bytes=cap)
    assert max(capped.rank_mem_bytes) <= cap  # simulated peak
    modelled = evaluate_assignment(bg, capped.block_stage, 4, v, 8, schedule, simulate=False)
    assert max(modelled.rank_mem_bytes) <= cap  # the solver's conservative model
    assert capped.model_step_time_s >= free.model_step_time_s * (1 - 1e-6)


def test_infeasible_cap_states_the_minimum():
    bg = synthetic_block_graph([1.0] * 8, None, [1 << 30] * 8, [1 << 20] * 8)
    need, _ = min_memory_bytes(bg, 2, microbatches=4)
    with pytest.raises(PlanError, match=r"smallest per-device memory that fits is .*GiB") as e:
        solve(bg, 2, microbatches=4, memory_cap_bytes=need - (1 << 28))
    assert f"{need / 2**30:.2f} GiB" in str(e.value)
    plan = solve(bg, 2, microbatches=4, memory_cap_bytes=need)
    assert max(plan.rank_mem_bytes) <= need


def test_tied_parameter_co_located_when_all_reduce_is_expensive():
    # blocks 0 and 2 share a big weight; with p=2 they can sit on one rank (stage 0 = blocks 0..2)
    times = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    big = synthetic_block_graph(times, None, None, None, [("w", 4 * 10**12, (0, 2))])
    plan = solve(big, 2, microbatches=4, link_bw_bytes_per_s=BW, simulate=False)
    assert plan.block_stage[0] == plan.block_stage[2] and plan.allreduce_time_s == 0
    assert plan.replicated_params == []
    small = synthetic_block_graph(times, None, None, None, [("w", 4, (0, 5))])
    plan = solve(small, 2, microbatches=4, link_bw_bytes_per_s=BW, simulate=False)
    assert plan.block_stage == [0, 0, 0, 1, 1, 1] and plan.replicated_params == ["w"]
    assert plan.allreduce_time_s == pytest.approx(2 * 1 / BW)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_ranks=0), "at least 1 device"),
    (dict(num_ranks=5, chunks=2), "only 8 blocks"),
    (dict(num_ranks=3, chunks=2, microbatches=4), "multiple of the 3 devices"),
    (dict(num_ranks=2, chunks=2, schedule="1f1b"), "interleaved-1f1b"),
    (dict(num_ranks=2, schedule="zero-bubble"), "unknown schedule"),
])
def test_bad_pipeline_shapes_raise_plan_error(kwargs, match):
    bg = synthetic_block_graph([1.0] * 8)
    with pytest.raises(PlanError, match=match):
        solve(bg, **kwargs)


def test_single_rank_and_one_block_per_stage():
    bg = synthetic_block_graph([1.0, 2.0, 3.0])
    one = solve(bg, 1, microbatches=2)
    assert one.block_stage == [0, 0, 0] and one.bytes_crossing == 0
    three = solve(bg, 3, microbatches=2)
    assert three.block_stage == [0, 1, 2]


@settings(max_examples=40, deadline=None, database=None)
@given(times=st.lists(st.integers(1, 9), min_size=1, max_size=8), stages=st.integers(1, 4),
       cap=st.integers(5, 40))
def test_chain_dp_is_exact_with_memory_cap(times, stages, cap):
    """The DP's bottleneck equals brute force over every split (stage memory = sum of block sizes)."""
    n = len(times)
    if stages > n:
        with pytest.raises(PlanError):
            split_chain(times, stages)
        return
    cut = [0.5 * (i % 3) for i in range(n)]
    best = float("inf")
    for starts in itertools.combinations(range(1, n), stages - 1):
        bounds = [0, *starts, n]
        spans = list(zip(bounds, bounds[1:]))
        if all(sum(times[a:b]) <= cap for a, b in spans):
            best = min(best, max(sum(times[a:b]) + (cut[a] if a else 0) for a, b in spans))
    if best == float("inf"):
        with pytest.raises(PlanError):
            split_chain(times, stages, cut, static_bytes=times, mem_cap_bytes=cap)
        return
    got = split_chain(times, stages, cut, static_bytes=times, mem_cap_bytes=cap)
    assert got.bottleneck == pytest.approx(best)
    assert len(set(got.block_stage())) == stages


def test_polish_moves_a_side_block_to_any_stage_its_edges_allow():
    # chain 0 -> 2 -> 3 -> 4, one block per stage; side block 1 (0 -> 1 -> 4) starts on stage 0.
    # Its only good place is stage 3, two stages past any neighbour's index
    from partitioner.problem import PlanProblem
    from partitioner.refine import refine
    bg = synthetic_block_graph([2.0, 1.0, 2.0, 2.0, 1.0], {(0, 1): 0, (0, 2): 0, (2, 3): 0, (3, 4): 0, (1, 4): 0})
    start = [0, 0, 1, 2, 3]
    assign, step = refine(PlanProblem(bg, 4, 1, 8, "1f1b", BW), start, budget_s=float("inf"))  # ends by itself
    assert assign == [0, 3, 1, 2, 3]
    best = evaluate_assignment(bg, [0, 3, 1, 2, 3], 4, 1, 8, "1f1b", BW)
    assert step == pytest.approx(best.step_time_s)
    assert step < evaluate_assignment(bg, start, 4, 1, 8, "1f1b", BW).step_time_s


def test_stops_once_proven_within_the_gap(monkeypatch):
    """A path whose plan is proven within the gap early returns without spending the time limit: the
    exact search (if it runs) completes and the row generation, which would fill the rest, never starts."""
    import partitioner.solve as solve_module

    rows = []
    real_paths = solve_module.path_bound_solve
    monkeypatch.setattr(solve_module, "path_bound_solve", lambda *a, **k: rows.append(1) or real_paths(*a, **k))
    rng = random.Random(2)
    bg = synthetic_block_graph([rng.uniform(0.5e-3, 2e-3) for _ in range(64)])
    assert bg.is_path()
    plan = solve(bg, 4, microbatches=8, link_bw_bytes_per_s=50e9, time_limit_s=60)
    assert plan.step_gap is not None and plan.step_gap <= 0.01
    assert not rows and "incomplete" not in plan.solver_status
    monkeypatch.setattr(solve_module, "path_bound_solve", real_paths)
    exact = solve(bg, 4, microbatches=8, link_bw_bytes_per_s=50e9, time_limit_s=60, gap=0.0)
    assert exact.step_gap == 0 and plan.step_time_s <= exact.step_time_s * 1.01


@pytest.mark.parametrize("gap", [-0.01, 1.0, 5.0])
def test_gap_outside_0_to_100_percent_is_refused(gap):
    with pytest.raises(PlanError, match="outside 0-100%"):
        solve(synthetic_chain(8), 2, gap=gap)


def test_parameters_over_the_cap_are_refused_at_once(monkeypatch):
    """Parameters alone over the cap on every split: the error comes before any search (no seed, no
    partition ILP), with the least memory."""
    import partitioner.solve as solve_module

    def no_search(*args, **kwargs):
        raise AssertionError("searched for a plan although none fits")
    monkeypatch.setattr(solve_module, "make_seeds", no_search)
    monkeypatch.setattr(solve_module, "_solve_ilp", no_search)
    bg = synthetic_block_graph([1.0] * 64, None, [1 << 30] * 64, [1 << 20] * 64)
    with pytest.raises(PlanError, match=r"smallest per-device memory that fits is .*GiB"):
        solve(bg, 8, 2, microbatches=16, memory_cap_bytes=4 << 30, time_limit_s=30)


def layered_chain(layers: int, seed: int = 0):
    """A decoder-like chain: an embedding, `layers` equal layers of a small, a middle and a large block
    (norm, attention, MLP), then a head; activations between them."""
    rng = random.Random(seed)
    layer = [0.05e-3, 0.3e-3, 0.9e-3]
    times = [0.2e-3] + layer * layers + [1.5e-3]
    edges = {(b, b + 1): 1 << 22 for b in range(len(times) - 1)}
    return synthetic_block_graph(times, edges, [rng.randint(1 << 20, 1 << 22) for _ in times],
                                 [rng.randint(1 << 20, 1 << 22) for _ in times])


def test_interleaved_layered_chain_is_proven_within_the_gap_before_the_ilp(monkeypatch):
    """Interleaving on a chain of equal layers: the polished fluid split is proven within the gap by the
    bound over the chain's cuts long before the time limit, and the ILP never runs."""
    import partitioner.solve as solve_module

    ilp = []
    real_ilp = solve_module._solve_ilp
    monkeypatch.setattr(solve_module, "_solve_ilp", lambda *a, **k: ilp.append(1) or real_ilp(*a, **k))
    plan = solve(layered_chain(40), 4, chunks=2, microbatches=8, link_bw_bytes_per_s=50e9, time_limit_s=60)
    assert plan.solver_status.startswith("FLUID_SPLIT+refined") and not ilp
    assert plan.step_gap is not None and plan.step_gap <= 0.01 and plan.solve_time_s < 30


def test_interleaved_host_bound_chain_is_proven_within_the_gap_by_the_quick_proof():
    """Host dispatch four times each block's device time (a small batch): the quick proof bounds the
    step by the host's times, so it proves the polished fluid split within the gap as on a device-bound
    chain; over the device's alone its bound would stay near a quarter of the step."""
    import dataclasses

    rng = random.Random(3)
    bg = layered_chain(16)
    bg.blocks = [dataclasses.replace(b, host_fwd_time_s=4 * b.fwd_time_s * rng.uniform(0.8, 1.2),
                                     host_bwd_time_s=4 * b.bwd_time_s * rng.uniform(0.8, 1.2)) for b in bg.blocks]
    plan = solve(bg, 4, chunks=2, microbatches=8, link_bw_bytes_per_s=50e9, time_limit_s=60)
    assert plan.solver_status.startswith("FLUID_SPLIT+refined")
    assert plan.step_gap is not None and plan.step_gap <= 0.01


def test_quick_proof_bound_stays_below_the_brute_force_best():
    p, v, m = 2, 2, 4
    bg = layered_chain(3, seed=1)
    n, K = len(bg.blocks), p * v
    best = min(evaluate_assignment(bg, [sum(b >= c for c in cuts) for b in range(n)], p, v, m,
                                   "interleaved-1f1b", 50e9).step_time_s
               for cuts in itertools.combinations(range(1, n), K - 1))
    plan = solve(bg, p, chunks=v, microbatches=m, link_bw_bytes_per_s=50e9, time_limit_s=30)
    assert plan.step_lower_bound_s <= best * (1 + 1e-9) <= plan.step_time_s * (1 + 1e-9)
