"""What an assignment of a block graph's blocks to stages costs, per stage and per rank.

Three names, three uses:
- `StageCostModel` lays the graph out once as numpy arrays and prices assignments with
  bincounts: `costs(block_stage)` gives the simulator's input, `totals(block_stage)` a
  `StageTotals`. The local search and the row generation, which price thousands of
  assignments of one graph, call `costs` on one model: array sums instead of a Python walk
  over the blocks and values, which the search cannot afford per move (benchmarks/RESULTS.md).
- `StageTotals`: one assignment's sums as Python numbers, with where every fx node goes
  (`stage_totals`): what partitioner.plan.evaluate_assignment turns into a Plan.
- `StageCosts` (partitioner/runtime/simulator.py): the simulator's input, the link bytes as
  seconds; it knows nothing of blocks.
The rules:

- a pass (forward or backward of one microbatch) over a stage takes the larger
  of its device and host time (the host queues kernels ahead,
  cost_models.time.pass_time_s), each the sum over its blocks plus, once per
  pass of a non-empty stage, the fixed cost of a stage pass (BlockGraph.stage_pass:
  the executor's action, the backward call, a compiled stage's call machinery):
  max(sum device + o.device, sum host + o.host) (NodeTime.fwd_pass_s);
- a value crossing to a stage on another rank costs its bytes on that link,
  once per destination stage (the graph's output counts as the last stage);
- the producing stage holds, per in-flight microbatch, a value it sends to
  another stage, unless it also saves it (the executor keeps a stage's outputs
  until their backward); a stage that receives a value needing a gradient from
  another rank holds it until its backward, unless it saves it anyway (a stage
  on the producer's rank shares the producer's tensor);
- a tied parameter costs its state on every rank holding it, and an all-reduce
  when it sits on more than one rank and trains.

tests/test_stage_costs.py checks it against a plain Python walk of these rules
on random graphs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from partitioner.runtime.simulator import StageCosts


@dataclass(frozen=True)
class StageTotals:
    """Per-stage and per-rank costs of one assignment (times per microbatch)."""

    fwd_time_s: list[float]
    bwd_time_s: list[float]
    recv_time_s: list[float]  # values crossing into the stage from another rank, once per value
    comm_bytes: list[list[int]]  # [j][k]: bytes stage j sends to stage k (another rank)
    saved_bytes: list[int]  # per in-flight microbatch: saved activations + held inputs/outputs
    param_bytes: list[int]  # per stage, own (unshared) parameters
    static_bytes: list[int]  # per rank: param + grad + optimizer state, shared replicas included
    rank_param_bytes: list[int]
    allreduce_time_s: float
    replicated_params: list[str]  # shared FQNs used by more than one stage
    node_stage: dict[str, int]
    working_bytes: list[int]  # per stage: transient of its backward

    def rank_mem_bytes(self, inflight: list[int]) -> list[int]:
        """Closed-form peak per rank (`closed_form_rank_mem_bytes`)."""
        return closed_form_rank_mem_bytes(self, inflight)

    def stage_costs(self, link_bw_bytes_per_s: float, waiting_send_slowdown: float = 1.0) -> StageCosts:
        """The simulator's StageCosts of these stages."""
        return StageCosts(tuple(self.fwd_time_s), tuple(self.bwd_time_s),
                          tuple(tuple(b / link_bw_bytes_per_s for b in row) for row in self.comm_bytes),
                          tuple(self.saved_bytes), tuple(self.static_bytes), tuple(self.working_bytes),
                          waiting_send_slowdown)


def closed_form_rank_mem_bytes(costs, inflight: list[int]) -> list[int]:
    """Peak per rank of a StageTotals or the simulator's StageCosts: static + in-flight microbatches x
    the rank's largest saved activations + the largest backward transient among its stages."""
    p = len(costs.static_bytes)
    return [costs.static_bytes[r] + inflight[r] * max(costs.saved_bytes[r::p]) + max(costs.working_bytes[r::p])
            for r in range(p)]


def stage_totals(bg, block_stage: list[int], num_ranks: int, chunks: int,
                 link_bw_bytes_per_s: float) -> StageTotals:
    """Costs of putting block b on stage block_stage[b] (stage k on rank k % num_ranks): the sums of
    StageCostModel, and where every fx node goes."""
    st = StageCostModel(bg, num_ranks, chunks, link_bw_bytes_per_s).totals(block_stage)
    node_stage = {n: k for blk, k in zip(bg.blocks, block_stage) for n in blk.nodes}
    replicated = []
    for sp in bg.shared_params:
        stages = {block_stage[b] for b in sp.blocks}
        if len(stages) > 1:
            replicated.append(sp.fqn)
        else:
            node_stage.update(dict.fromkeys(sp.nodes, stages.pop()))
    return dataclasses.replace(st, replicated_params=replicated, node_stage=node_stage)


class StageCostModel:
    """The simulator's StageCosts (and the tied parameters' all-reduce) of assignments of `bg`
    to num_ranks x chunks stages (stage k on rank k % num_ranks)."""

    def __init__(self, bg, num_ranks: int, chunks: int, link_bw_bytes_per_s: float):
        self.p, self.K, self.bw = num_ranks, num_ranks * chunks, link_bw_bytes_per_s
        self.rank_of = np.arange(self.K) % num_ranks
        self.stage_pass = bg.stage_pass
        blocks = bg.blocks

        def column(attr: str) -> np.ndarray:
            return np.array([getattr(b, attr) for b in blocks], dtype=np.float64)

        self.fwd, self.bwd = column("fwd_time_s"), column("bwd_time_s")
        self.host_fwd, self.host_bwd = column("host_fwd_time_s"), column("host_bwd_time_s")
        self.saved, self.working = column("saved_bytes"), column("bwd_working_bytes")
        self.param_state, self.param_bytes = column("param_state_bytes"), column("param_bytes")
        values = bg.values
        self.producer = np.array([v.producer for v in values], dtype=np.int64)
        self.value_bytes = np.array([v.bytes for v in values], dtype=np.float64)
        self.saver = np.array([v.saver for v in values], dtype=np.int64)
        self.needs_grad = np.array([v.requires_grad for v in values], dtype=bool)
        # one (value, reader) pair per consumer block, and one per value the output reads
        pairs = [(i, c) for i, v in enumerate(values) for c in v.consumers]
        self.pair_value = np.array([i for i, _ in pairs], dtype=np.int64)
        self.pair_block = np.array([c for _, c in pairs], dtype=np.int64)
        self.output_values = np.array([i for i, v in enumerate(values) if v.to_output], dtype=np.int64)
        self.shared = [(np.array(sp.blocks, dtype=np.int64), sp.state_bytes, sp.bytes,
                        2 * sp.bytes / link_bw_bytes_per_s if sp.trainable else 0.0) for sp in bg.shared_params]

    def totals(self, block_stage: list[int]) -> StageTotals:
        """Per-stage and per-rank sums of putting block b on stage block_stage[b], as a StageTotals
        without the placement of fx nodes (replicated_params and node_stage empty; stage_totals adds them)."""
        t = self._sums(block_stage)
        return StageTotals(t.fwd.tolist(), t.bwd.tolist(), t.recv.tolist(), _ints(t.comm).tolist(),
                          _ints(t.saved).tolist(), _ints(t.param).tolist(), _ints(t.static).tolist(),
                          _ints(t.rank_params).tolist(), t.allreduce, [], {}, _ints(t.working).tolist())

    def costs(self, block_stage: list[int]) -> tuple[StageCosts, float]:
        """(StageCosts, all-reduce seconds per step) of putting block b on stage block_stage[b]; for
        searches, which call it thousands of times (it skips totals' conversion to Python ints)."""
        t = self._sums(block_stage)
        return (StageCosts(tuple(t.fwd.tolist()), tuple(t.bwd.tolist()), tuple(map(tuple, (t.comm / self.bw).tolist())),
                           tuple(_ints(t.saved).tolist()), tuple(_ints(t.static).tolist()),
                           tuple(_ints(t.working).tolist())), t.allreduce)

    def _sums(self, block_stage: list[int]) -> _Sums:
        K, p = self.K, self.p
        a = np.asarray(block_stage, dtype=np.int64)

        def per_stage(weights: np.ndarray) -> np.ndarray:
            return np.bincount(a, weights=weights, minlength=K)

        used = np.bincount(a, minlength=K) > 0  # an empty stage makes no pass
        fwd = self.stage_pass.fwd_pass_s(per_stage(self.fwd), per_stage(self.host_fwd), used)
        bwd = self.stage_pass.bwd_pass_s(per_stage(self.bwd), per_stage(self.host_bwd), used)
        saved = per_stage(self.saved)
        working = np.zeros(K)
        np.maximum.at(working, a, self.working)
        static = np.bincount(self.rank_of[a], weights=self.param_state, minlength=p)
        rank_params = np.bincount(self.rank_of[a], weights=self.param_bytes, minlength=p)

        # every (value, destination stage) once, in value order
        src = a[self.producer]
        dest = np.concatenate([a[self.pair_block], np.full(len(self.output_values), K - 1, dtype=np.int64)])
        value = np.concatenate([self.pair_value, self.output_values])
        key = np.unique(value * K + dest)
        value, dest = key // K, key % K
        src_of = src[value]
        nbytes = self.value_bytes[value]
        cross = self.rank_of[dest] != self.rank_of[src_of]
        comm = np.bincount(src_of[cross] * K + dest[cross], weights=nbytes[cross], minlength=K * K)
        recv = np.bincount(dest[cross], weights=nbytes[cross] / self.bw, minlength=K)

        saver_stage = np.where(self.saver >= 0, a[np.maximum(self.saver, 0)], -1)
        sent_elsewhere = np.zeros(len(src), dtype=bool)
        sent_elsewhere[value[dest != src_of]] = True
        held_out = sent_elsewhere & (saver_stage != src)
        saved += np.bincount(src[held_out], weights=self.value_bytes[held_out], minlength=K)
        held_in = cross & self.needs_grad[value] & (saver_stage[value] != dest)
        saved += np.bincount(dest[held_in], weights=nbytes[held_in], minlength=K)

        allreduce = 0.0
        for blocks, state_bytes, nbytes_param, allreduce_s in self.shared:
            ranks = np.unique(self.rank_of[a[blocks]])
            static[ranks] += state_bytes
            rank_params[ranks] += nbytes_param
            if len(ranks) > 1:
                allreduce += allreduce_s
        return _Sums(fwd, bwd, recv, comm.reshape(K, K), saved, per_stage(self.param_bytes), static, rank_params,
                     working, allreduce)


class _Sums(NamedTuple):
    """StageTotals' sums as float64 arrays."""

    fwd: np.ndarray
    bwd: np.ndarray
    recv: np.ndarray
    comm: np.ndarray
    saved: np.ndarray
    param: np.ndarray
    static: np.ndarray
    rank_params: np.ndarray
    working: np.ndarray
    allreduce: float


def _ints(x: np.ndarray) -> np.ndarray:
    """Byte sums, exact in float64 below 2**53, back to Python ints."""
    return np.rint(x).astype(np.int64)
