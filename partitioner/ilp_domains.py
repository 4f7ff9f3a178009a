"""Stage domains of the partition ILP: which stages each block can take.

The graph's order alone leaves a block only the stages that its ancestors and descendants can
be spread around (every stage holds a block). An incumbent's objective bounds each stage's
compute in any better solution, so a block and its ancestors must fill stages 0..s(b), and a
block and its descendants stages s(b)..K-1: on large graphs this leaves each block two or three
stages. partitioner/ilp.py fixes the order variables outside them.
"""
from __future__ import annotations

import numpy as np

from partitioner.chain_dp import split_chain


def closure(bg) -> tuple[list[int], list[int]]:
    """Bitsets of the ancestors and of the descendants of every block (ids are topological)."""
    n = len(bg.blocks)
    anc, desc = [0] * n, [0] * n
    for b in range(n):
        for u in bg.graph.predecessors(b):
            anc[b] |= anc[u] | (1 << u)
    for b in reversed(range(n)):
        for s in bg.graph.successors(b):
            desc[b] |= desc[s] | (1 << s)
    return anc, desc


def _bit_sums(bits: list[int], wv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per bitset: how many bits it has and the sum of wv over them (one row at a time: O(n) memory)."""
    n, nbytes = len(wv), max(1, (len(wv) + 7) // 8)
    counts, sums = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for i, x in enumerate(bits):
        row = np.unpackbits(np.frombuffer(x.to_bytes(nbytes, "little"), dtype=np.uint8), bitorder="little")[:n]
        counts[i], sums[i] = row.sum(), row @ wv
    return counts, sums


def stage_domains(bg, K: int, w: list[int], stage_cap: int | None, anc: list[int], desc: list[int],
             path: bool, prefix: tuple[list[int], list[int]] | None = None) -> list[range]:
    """Stages block b can take.

    Every stage before b's holds a block that is not b's descendant, every stage
    after it one that is not b's ancestor. With stage_cap (the most compute a
    stage holds in any solution better than the incumbent) b and its ancestors
    also fill stages 0..s(b): s(b) >= ceil(work / cap) - 1, and b and its
    descendants stages s(b)..K-1. prefix (most[j], most_after[j]) generalises it:
    the most work stages 0..j, and stages j..K-1, hold.
    """
    n, wv = len(bg.blocks), np.asarray(w, dtype=np.int64)
    if path:  # ancestors are exactly the lower ids, descendants the higher ones
        n_anc, n_desc = np.arange(n), n - 1 - np.arange(n)
        w_anc = np.concatenate([[0], np.cumsum(wv)])[:n]
        w_desc = wv.sum() - w_anc - wv
    else:
        (n_anc, w_anc), (n_desc, w_desc) = _bit_sums(anc, wv), _bit_sums(desc, wv)
    out = []
    for b in range(n):
        lo, hi = max(0, K - n + int(n_anc[b])), min(K - 1, n - 1 - int(n_desc[b]))
        if stage_cap is not None and stage_cap > 0:
            lo = max(lo, -(-(int(w_anc[b]) + w[b]) // stage_cap) - 1)
            hi = min(hi, K - -(-(int(w_desc[b]) + w[b]) // stage_cap))
        if prefix is not None:
            before, after = int(w_anc[b]) + w[b], int(w_desc[b]) + w[b]
            lo = max(lo, next((j for j in range(K) if prefix[0][j] >= before), K))
            hi = min(hi, next((j for j in reversed(range(K)) if prefix[1][j] >= after), -1))
        out.append(range(lo, hi + 1))
    return out


def time_lower_bounds(w: list[int], p: int, v: int, path: bool) -> tuple[int, int]:
    """Lower bounds on the busiest rank's and the largest stage's time (units).

    Average work; for paths also the best contiguous split's bottleneck, which is
    exact for the largest stage and, for v = 1, for the busiest rank.
    """
    K, total = p * v, sum(w)
    lb_rank, lb_stage = -(-total // p), -(-total // K)
    if path:
        lb_stage = max(lb_stage, int(split_chain(w, K).bottleneck))
        if v == 1:
            lb_rank = max(lb_rank, lb_stage)
    return lb_rank, lb_stage


def caps_below(upper: int | None, w: list[int], p: int, v: int, m: int, path: bool) -> tuple[int | None, int | None]:
    """(most compute of one stage, largest M) in any solution with objective <= upper."""
    if upper is None:
        return None, None
    lb_rank, lb_stage = time_lower_bounds(w, p, v, path)
    if v == 1:  # objective >= (m - 1) M + total, and every stage's compute <= M
        if m == 1:
            return None, None
        top = (upper - sum(w)) // (m - 1)
        return top, top
    if p == 1:
        return None, None
    # objective >= m M + (p - 1) S, and every stage's compute <= S
    return (upper - m * lb_rank) // (p - 1), (upper - (p - 1) * lb_stage) // m
