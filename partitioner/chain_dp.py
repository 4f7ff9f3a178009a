"""Exact dynamic programme for the best contiguous split of a chain into stages.

Minimises the bottleneck: the largest stage time, where a stage covering blocks
[a, b) takes sum(times[a:b]) + cut_times[a] (the time to receive what crosses
into it). Optionally each stage must fit a memory cap: static bytes of its
blocks + inflight[stage] x their saved-activation bytes. O(S n^2) with numpy
over the split point; used as the ILP's warm start and as the "dp" baseline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from partitioner.errors import PlanError


@dataclass(frozen=True)
class ChainSplit:
    """starts[s] = first block of stage s (starts[0] == 0); bottleneck in the units of `times`."""

    starts: tuple[int, ...]
    bottleneck: float
    num_blocks: int

    def block_stage(self) -> list[int]:
        ends = list(self.starts[1:]) + [self.num_blocks]
        return [s for s, (a, b) in enumerate(zip(self.starts, ends)) for _ in range(a, b)]


def split_chain(times: Sequence[float], num_stages: int, cut_times: Sequence[float] | None = None,
                static_bytes: Sequence[float] | None = None, saved_bytes: Sequence[float] | None = None,
                inflight: Sequence[float] | None = None, mem_cap_bytes: float | None = None,
                working_bytes: Sequence[float] | None = None) -> ChainSplit:
    """Best split of blocks 0..n-1 into `num_stages` non-empty contiguous stages.

    cut_times[a]: extra time of a stage that starts at block a (0 for a == 0).
    inflight[s]: microbatches whose activations stage s holds at once (default 1).
    working_bytes[b]: transient of block b's backward; a stage pays its blocks' largest.
    Raises PlanError when there are fewer blocks than stages or nothing fits the cap.
    """
    n, S = len(times), num_stages
    if S < 1:
        raise PlanError(f"cannot split into {S} stages: need at least one")
    if n < S:
        raise PlanError(f"cannot split {n} blocks into {S} stages: every stage needs a block")
    P = np.concatenate([[0.0], np.cumsum(np.asarray(times, dtype=float))])
    cut = np.zeros(n + 1) if cut_times is None else np.concatenate([np.asarray(cut_times, float), [0.0]])
    cut[0] = 0.0
    use_mem = mem_cap_bytes is not None
    if use_mem:
        Q = np.concatenate([[0.0], np.cumsum(np.asarray(static_bytes if static_bytes is not None else [0] * n, float))])
        R = np.concatenate([[0.0], np.cumsum(np.asarray(saved_bytes if saved_bytes is not None else [0] * n, float))])
        infl = np.ones(S) if inflight is None else np.asarray(inflight, float)
        work = np.zeros(n) if working_bytes is None else np.asarray(working_bytes, float)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    arg = np.zeros((S + 1, n + 1), dtype=np.int64)
    for s in range(1, S + 1):
        new = np.full(n + 1, np.inf)
        for i in range(s, n - (S - s) + 1):
            a = np.arange(s - 1, i)
            cost = np.maximum(best[a], P[i] - P[a] + cut[a])
            if use_mem:
                mem = (Q[i] - Q[a] + infl[s - 1] * (R[i] - R[a])
                       + np.maximum.accumulate(work[s - 1:i][::-1])[::-1])  # max(work[a:i]) for each a
                cost = np.where(mem <= mem_cap_bytes * (1 + 1e-12), cost, np.inf)
            j = int(np.argmin(cost))
            new[i], arg[s, i] = cost[j], a[j]
        best = new
    if not np.isfinite(best[n]):
        raise PlanError(f"no contiguous split of {n} blocks into {S} stages fits {mem_cap_bytes:.4g} bytes per stage")
    starts, i = [], n
    for s in range(S, 0, -1):
        i = int(arg[s, i])
        starts.append(i)
    return ChainSplit(tuple(reversed(starts)), float(best[n]), n)
