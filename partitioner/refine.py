"""Local search on the simulator's step time, run after the ILP.

The ILP optimises a closed-form step time; the simulator plays the real
schedule (warm-up, interleaving, per-stage communication). Starting from the
ILP's answer and from every baseline split, `refine` moves single blocks across
stage boundaries while the simulated step time drops, so the final plan is
never worse (in the simulator) than any of its seeds.
"""
from __future__ import annotations

import time

from partitioner.plan import inflight_microbatches, stage_stats


def refine(bg, assign: list[int], p: int, v: int, m: int, schedule: str, bw: float, cap: int | None,
           budget_s: float) -> tuple[list[int], float]:
    """Local search on the simulated step time from `assign`; returns (assignment, step time)."""
    from runtime.schedules import make_schedule
    from runtime.simulator import simulate

    deadline = time.perf_counter() + budget_s
    sched = make_schedule(schedule, p, m, v)
    inflight = inflight_microbatches(schedule, p, m, v)
    preds = [list(bg.graph.predecessors(b)) for b in range(len(bg.blocks))]
    succs = [list(bg.graph.successors(b)) for b in range(len(bg.blocks))]

    def score(a: list[int]) -> float:
        st = stage_stats(bg, a, p, v, bw)
        if cap is not None and max(st.rank_mem_bytes(inflight)) > cap:
            return float("inf")
        return simulate(sched, st.stage_costs(bw)).step_time_s + st.allreduce_time_s

    a = list(assign)
    best = score(a)
    counts = [0] * (p * v)
    for k in a:
        counts[k] += 1
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for b in range(len(a)):
            for to in (a[b] - 1, a[b] + 1):
                if not 0 <= to < p * v or counts[a[b]] == 1:
                    continue
                if any(a[u] > to for u in preds[b]) or any(a[w] < to for w in succs[b]):
                    continue
                if not any(a[c] == to for c in preds[b] + succs[b] + [b - 1, b + 1] if 0 <= c < len(a)):
                    continue  # only boundary moves
                old = a[b]
                a[b] = to
                new = score(a)
                if new < best * (1 - 1e-9):
                    best, improved = new, True
                    counts[old] -= 1
                    counts[to] += 1
                else:
                    a[b] = old
                if time.perf_counter() > deadline:
                    return a, best
    return a, best
