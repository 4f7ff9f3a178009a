"""Stage costs of many assignments of one block graph, fast: for searches.

`partitioner.plan.stage_stats` walks every block, value and fx node in Python
(0.6 ms on t5-base's 371 blocks and 439 values). The local search and the row
generation price thousands of assignments of the same graph, and need only what
the simulator reads (stage times, link times, saved/static/working bytes) and
the all-reduce. `StageScorer` lays the graph out once as numpy arrays and
prices an assignment with a few bincounts, by the same rules as stage_stats:

- a value crossing to a stage on another rank costs its bytes on that link,
  once per destination stage (the graph's output counts as the last stage);
- the producing stage holds a value it sends elsewhere, and a receiving stage a
  received value that needs a gradient, unless that stage saves it anyway
  (`held_as_output`, `held_as_input`);
- a tied parameter costs its state on every rank holding it, and an all-reduce
  when it sits on more than one rank and trains.

tests/test_stage_scorer.py checks it against stage_stats on random graphs.
"""
from __future__ import annotations

import numpy as np

from runtime.simulator import StageCosts


class StageScorer:
    """The simulator's StageCosts (and the tied parameters' all-reduce) of assignments of `bg`
    to num_ranks x chunks stages (stage k on rank k % num_ranks)."""

    def __init__(self, bg, num_ranks: int, chunks: int, link_bw_bytes_per_s: float):
        self.p, self.K, self.bw = num_ranks, num_ranks * chunks, link_bw_bytes_per_s
        self.rank_of = np.arange(self.K) % num_ranks
        blocks = bg.blocks

        def column(attr: str) -> np.ndarray:
            return np.array([getattr(b, attr) for b in blocks], dtype=np.float64)

        self.fwd, self.bwd = column("fwd_time_s"), column("bwd_time_s")
        self.host_fwd, self.host_bwd = column("host_fwd_time_s"), column("host_bwd_time_s")
        self.saved, self.working = column("saved_bytes"), column("bwd_working_bytes")
        self.param_state = column("param_state_bytes")
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
        self.shared = [(np.array(sp.blocks, dtype=np.int64), sp.state_bytes, 2 * sp.bytes / link_bw_bytes_per_s
                        if sp.trainable else 0.0) for sp in bg.shared_params]

    def costs(self, block_stage: list[int]) -> tuple[StageCosts, float]:
        """(StageCosts, all-reduce seconds per step) of putting block b on stage block_stage[b]."""
        K, p = self.K, self.p
        a = np.asarray(block_stage, dtype=np.int64)

        def per_stage(weights: np.ndarray) -> np.ndarray:
            return np.bincount(a, weights=weights, minlength=K)

        fwd = np.maximum(per_stage(self.fwd), per_stage(self.host_fwd))  # cost_models.time.pass_time_s
        bwd = np.maximum(per_stage(self.bwd), per_stage(self.host_bwd))
        saved = per_stage(self.saved)
        working = np.zeros(K)
        np.maximum.at(working, a, self.working)
        static = np.bincount(self.rank_of[a], weights=self.param_state, minlength=p)

        # every (value, destination stage) once
        src = a[self.producer]
        dest = np.concatenate([a[self.pair_block], np.full(len(self.output_values), K - 1, dtype=np.int64)])
        value = np.concatenate([self.pair_value, self.output_values])
        key = np.unique(value * K + dest)
        value, dest = key // K, key % K
        src_of = src[value]
        nbytes = self.value_bytes[value]
        cross = self.rank_of[dest] != self.rank_of[src_of]
        comm = np.bincount(src_of[cross] * K + dest[cross], weights=nbytes[cross], minlength=K * K)

        saver_stage = np.where(self.saver >= 0, a[np.maximum(self.saver, 0)], -1)
        sent_elsewhere = np.zeros(len(src), dtype=bool)
        sent_elsewhere[value[dest != src_of]] = True
        held_out = sent_elsewhere & (saver_stage != src)
        saved += np.bincount(src[held_out], weights=self.value_bytes[held_out], minlength=K)
        held_in = cross & self.needs_grad[value] & (saver_stage[value] != dest)
        saved += np.bincount(dest[held_in], weights=nbytes[held_in], minlength=K)

        allreduce = 0.0
        for blocks, state_bytes, allreduce_s in self.shared:
            ranks = np.unique(self.rank_of[a[blocks]])
            static[ranks] += state_bytes
            if len(ranks) > 1:
                allreduce += allreduce_s
        comm_time = (comm / self.bw).reshape(K, K).tolist()
        costs = StageCosts(tuple(fwd.tolist()), tuple(bwd.tolist()), tuple(map(tuple, comm_time)),
                           tuple(int(x) for x in np.rint(saved)), tuple(int(x) for x in np.rint(static)),
                           tuple(int(x) for x in np.rint(working)))
        return costs, allreduce

