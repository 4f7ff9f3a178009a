"""partitioner/stage_costs.py sums assignments exactly as a plain Python walk of its rules does, and
partitioner.stage_costs.stage_totals passes those sums on."""
from __future__ import annotations

import dataclasses
import random

import networkx as nx
import pytest

from partitioner.cost_models.time import NodeTime
from partitioner.problem import inflight_microbatches
from partitioner.stage_costs import StageCostModel, StageTotals, closed_form_rank_mem_bytes, stage_totals
from partitioner.passes.coarsen import Block, BlockGraph, CrossValue, SharedParam, synthetic_block_graph

BW = 3e9


def random_graph(rng: random.Random, n: int) -> BlockGraph:
    """Blocks with device and host times, working bytes; values read by several blocks, by the
    output, saved by a reader or by no one, with and without gradients; tied parameters, some frozen."""
    blocks = [Block(b, f"b{b}", (f"n{b}", f"m{b}"), (), rng.uniform(0, 3), rng.uniform(0, 6), 0.0, 0.0,
                    rng.randint(0, 10**6), rng.randint(0, 10**7), rng.randint(0, 10**8), 0,
                    host_fwd_time_s=rng.choice([0.0, rng.uniform(0, 3)]),
                    host_bwd_time_s=rng.choice([0.0, rng.uniform(0, 6)]),
                    bwd_working_bytes=rng.randint(0, 10**8)) for b in range(n)]
    values, graph = [], nx.DiGraph()
    graph.add_nodes_from(range(n))
    for u in range(n):
        later = list(range(u + 1, n))
        consumers = tuple(sorted(rng.sample(later, k=min(len(later), rng.randint(0, 3)))))
        to_output = u == n - 1 or rng.random() < 0.2
        if not consumers and not to_output:
            continue
        saver = rng.choice([-1, u, *consumers])
        values.append(CrossValue(f"v{u}", u, consumers, rng.randint(0, 10**9), to_output, saver,
                                 rng.random() < 0.8))
        for c in consumers:
            graph.add_edge(u, c, bytes=values[-1].bytes)
    shared = [SharedParam(f"tied{i}", rng.randint(0, 10**8), rng.randint(0, 10**9),
                          tuple(sorted(rng.sample(range(n), k=rng.randint(1, 3)))), (f"attr{i}",),
                          trainable=rng.random() < 0.7) for i in range(rng.randint(0, 3))]
    stage_pass = rng.choice([NodeTime(0.0, 0.0), NodeTime(rng.uniform(0, 1), rng.uniform(0, 1)),
                             NodeTime(rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0, 2), rng.uniform(0, 2))])
    return BlockGraph(blocks, values, shared, graph, stage_pass=stage_pass)


def reference_stats(bg, block_stage: list[int], p: int, v: int, bw: float) -> StageTotals:
    """The module docstring's rules, one block, value and tied parameter at a time."""
    K = p * v
    rank = [k % p for k in range(K)]
    fwd, bwd, host_fwd, host_bwd = [0.0] * K, [0.0] * K, [0.0] * K, [0.0] * K
    saved, pbytes, static, working, rank_params = [0] * K, [0] * K, [0] * p, [0] * K, [0] * p
    for blk, k in zip(bg.blocks, block_stage):
        fwd[k] += blk.fwd_time_s
        bwd[k] += blk.bwd_time_s
        host_fwd[k] += blk.host_fwd_time_s
        host_bwd[k] += blk.host_bwd_time_s
        saved[k] += blk.saved_bytes
        working[k] = max(working[k], blk.bwd_working_bytes)
        pbytes[k] += blk.param_bytes
        static[rank[k]] += blk.param_state_bytes
        rank_params[rank[k]] += blk.param_bytes
    comm, recv = [[0] * K for _ in range(K)], [0.0] * K
    for val in bg.values:
        j = block_stage[val.producer]
        saver = block_stage[val.saver] if val.saver >= 0 else None
        dests = {block_stage[c] for c in val.consumers} | ({K - 1} if val.to_output else set())
        for k in dests:
            if rank[k] != rank[j]:
                comm[j][k] += val.bytes
                recv[k] += val.bytes / bw
                if val.requires_grad and saver != k:
                    saved[k] += val.bytes  # received, held until k's backward
        if any(k != j for k in dests) and saver != j:
            saved[j] += val.bytes  # sent, held until j's backward
    allreduce, replicated = 0.0, []
    for sp in bg.shared_params:
        stages = {block_stage[b] for b in sp.blocks}
        ranks = {rank[k] for k in stages}
        for r in ranks:
            static[r] += sp.state_bytes
            rank_params[r] += sp.bytes
        if len(stages) > 1:
            replicated.append(sp.fqn)
        if len(ranks) > 1 and sp.trainable:
            allreduce += 2 * sp.bytes / bw
    o, used = bg.stage_pass, set(block_stage)  # each pass of a stage with blocks pays the stage pass once
    fwd_pass = [max(d + o.fwd_s, h + o.host_fwd_s) if k in used else 0.0
                for k, (d, h) in enumerate(zip(fwd, host_fwd))]
    bwd_pass = [max(d + o.bwd_s, h + o.host_bwd_s) if k in used else 0.0
                for k, (d, h) in enumerate(zip(bwd, host_bwd))]
    return StageTotals(fwd_pass, bwd_pass, recv, comm, saved, pbytes, static, rank_params, allreduce, replicated, {}, working)


@pytest.mark.parametrize("seed", range(12))
def test_costs_and_stage_stats_match_the_rules(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 30)
    p, v = rng.choice([(1, 1), (2, 1), (3, 1), (2, 2), (4, 2), (2, 3)])
    bg = random_graph(rng, n)
    scorer = StageCostModel(bg, p, v, BW)
    inflight = inflight_microbatches("interleaved-1f1b" if v > 1 else "1f1b", p, 2 * p, v)
    for _ in range(20):
        assign = [rng.randrange(p * v) for _ in range(n)]  # any assignment: neither prices validity
        st = reference_stats(bg, assign, p, v, BW)
        want = st.stage_costs(BW)
        got, allreduce_s = scorer.costs(assign)
        assert got.fwd_time_s == pytest.approx(want.fwd_time_s, rel=1e-12)
        assert got.bwd_time_s == pytest.approx(want.bwd_time_s, rel=1e-12)
        for row_got, row_want in zip(got.comm_time_s, want.comm_time_s):
            assert row_got == pytest.approx(row_want, rel=1e-12, abs=1e-18)
        assert (got.saved_bytes, got.static_bytes, got.working_bytes) == \
            (want.saved_bytes, want.static_bytes, want.working_bytes)
        assert allreduce_s == pytest.approx(st.allreduce_time_s, rel=1e-12)
        assert closed_form_rank_mem_bytes(got, inflight) == st.rank_mem_bytes(inflight)
        full = stage_totals(bg, assign, p, v, BW)
        for name in ("fwd_time_s", "bwd_time_s", "recv_time_s"):
            assert getattr(full, name) == pytest.approx(getattr(st, name), rel=1e-12)
        for name in ("comm_bytes", "saved_bytes", "param_bytes", "static_bytes", "rank_param_bytes",
                     "working_bytes", "replicated_params"):
            assert getattr(full, name) == getattr(st, name), name
        assert full.allreduce_time_s == pytest.approx(st.allreduce_time_s, rel=1e-12)


def test_every_stage_pays_the_stage_pass_once_per_pass():
    """The same blocks on 4 stages cost 3 stage passes more per forward and per backward than on 1."""
    o = NodeTime(0.1, 0.2)
    bg = synthetic_block_graph([3.0] * 8, stage_pass=o)
    one, _ = StageCostModel(bg, 1, 1, BW).costs([0] * 8)
    four, _ = StageCostModel(bg, 4, 1, BW).costs([b // 2 for b in range(8)])
    assert sum(one.fwd_time_s) == pytest.approx(8.0 + o.fwd_s)
    assert sum(four.fwd_time_s) == pytest.approx(sum(one.fwd_time_s) + 3 * o.fwd_s)
    assert sum(four.bwd_time_s) == pytest.approx(sum(one.bwd_time_s) + 3 * o.bwd_s)
    # host-bound passes: the fixed host cost adds to the host sum, not on top of the device's
    host = dataclasses.replace(bg, stage_pass=NodeTime(0.0, 0.0, 5.0, 0.0))
    alone, _ = StageCostModel(host, 1, 1, BW).costs([0] * 8)
    assert alone.fwd_time_s == (pytest.approx(8.0),)  # max(8 + 0, 0 + 5)
