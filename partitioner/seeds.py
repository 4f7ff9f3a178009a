"""The plans the search starts from: chain DP splits and the baselines' splits, and the incumbent.

Every seed is a valid assignment (block -> stage). The best of them by the ILP's objective
(partitioner.ilp.model_objective), within the memory cap where one fits, is the ILP's
complete hint and its objective an upper bound that prunes the model; all of them seed the
local search (partitioner/refine.py), so the final plan is never worse than any baseline.
"""
from __future__ import annotations

from dataclasses import dataclass

from partitioner.baselines import BASELINES, baseline_assignment
from partitioner.chain_dp import split_chain
from partitioner.errors import PlanError
from partitioner.ilp import model_objective, time_units
from partitioner.plan import evaluate
from partitioner.problem import PlanProblem


@dataclass(frozen=True)
class Seeds:
    """dp: the chain DP by time with receives (within the cap where a contiguous split fits it);
    compute: the chain DP by compute alone; baselines: the baselines' splits in BASELINES order;
    incumbent: the best of them by the ILP's objective (None: not asked for); upper: its
    objective in the ILP's time units, None unless it fits the memory cap."""

    dp: list[int]
    compute: list[int]
    baselines: list[list[int]]
    incumbent: list[int] | None = None
    upper: int | None = None

    def splits(self) -> list[list[int]]:
        """dp, compute, then the baselines."""
        return [self.dp, self.compute] + self.baselines


def make_seeds(problem: PlanProblem, incumbent: bool = True) -> Seeds:
    """Every seed of `problem`, and with `incumbent` the best one by the ILP's objective."""
    bg, K, cap = problem.block_graph, problem.num_stages, problem.memory_cap_bytes
    dp = chain_dp_split(problem)
    compute = split_chain([b.time_s for b in bg.blocks], K).block_stage()
    seeds = Seeds(dp, compute, [baseline_assignment(bg, name, K) for name in BASELINES])
    if not incumbent:
        return seeds
    w, ts = time_units(bg)
    splits = seeds.splits()
    fitting = [a for a in splits if cap is None or fits_memory(problem, a)]
    best = min(fitting or splits, key=lambda a: model_objective(problem, a, w, ts))
    upper = model_objective(problem, best, w, ts) if fitting else None
    return Seeds(dp, compute, seeds.baselines, best, upper)


def chain_dp_split(problem: PlanProblem) -> list[int]:
    """Block -> stage from the chain DP over blocks in topological order (time incl. receives),
    within the memory cap when one is given and some contiguous split fits it; else without."""
    bg, p, v, K = problem.block_graph, problem.num_ranks, problem.chunks, problem.num_stages
    bw, cap = problem.link_bw_bytes_per_s, problem.memory_cap_bytes
    n = len(bg.blocks)
    cut = [0.0] * n
    for val in bg.values:
        last = max(val.consumers, default=val.producer)
        if val.to_output:
            last = n
        for a in range(val.producer + 1, min(last, n - 1) + 1):
            cut[a] += val.bytes / bw
    if p == 1:
        cut = [0.0] * n
    times = [b.time_s for b in bg.blocks]
    if cap is not None:
        infl = problem.inflight()
        try:
            return split_chain(times, K, cut, [b.param_state_bytes for b in bg.blocks],
                               [b.saved_bytes for b in bg.blocks], [infl[k % p] for k in range(K)],
                               cap / v, [b.bwd_working_bytes for b in bg.blocks]).block_stage()
        except PlanError:
            pass
    return split_chain(times, K, cut).block_stage()


def fits_memory(problem: PlanProblem, assign: list[int] | None) -> bool:
    """True when `assign` is given and its closed-form peak memory is within the cap (if any)."""
    if assign is None:
        return False
    if problem.memory_cap_bytes is None:
        return True
    plan = evaluate(problem, assign, simulate=False)
    return max(plan.rank_mem_bytes) <= problem.memory_cap_bytes
