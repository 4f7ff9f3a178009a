"""The partitioners people use today, as contiguous splits of the block chain.

Every baseline returns a Plan scored by the same code as the ILP
(plan.evaluate_assignment: per-stage costs, then the event simulator), so the
numbers compare in one unit. For a DAG the blocks are taken in their
topological order (block ids), which keeps every edge going forward.

- uniform:    Megatron-LM: an equal number of repeated layers (ModuleList
              entries, e.g. transformer.h.3) per stage; embedding with the
              first stage, final norm and head with the last.
- torchtitan: pipeline_module_split's weighting: the input modules and the
              output modules each count as one extra layer, then equal counts.
- parameters: DeepSpeed partition_method="parameters": stages with balanced
              parameter counts (min-max over contiguous splits).
- flops:      equal forward+backward FLOPs (min-max).
- size:       PiPPy split_into_equal_size: walk the blocks, close a stage once it
              holds total_param_bytes / stages (greedy).
- dp:         the best contiguous split by forward+backward time (chain DP).
"""
from __future__ import annotations

import re

from partitioner.chain_dp import split_chain
from partitioner.plan import Plan, evaluate_assignment
from partitioner.problem import DEFAULT_LINK_BW_BYTES_PER_S, check_config

BASELINES = ("uniform", "torchtitan", "parameters", "flops", "size", "dp")

_LAYER = re.compile(r"^(.*?\.\d+)(\.|$)")  # "transformer.h.3.attn" -> "transformer.h.3"


def layer_key(block_name: str) -> str | None:
    """The repeated layer (ModuleList entry) a block belongs to, or None for embeddings/heads."""
    first = block_name.split("..")[0]
    match = _LAYER.match(first)
    return match.group(1) if match else None


def _starts_from_units(units: list[list[int]], K: int) -> list[int]:
    """Equal numbers of units per stage (extra units go to the later stages); starts of stages."""
    U = len(units)
    cuts = [round(k * U / K) if U >= K else k for k in range(K)]
    return [units[min(c, U - 1)][0] for c in cuts]


def _layer_units(bg) -> tuple[list[int], list[list[int]], list[int]]:
    """(blocks before the first layer, layers as block lists, blocks after the last layer)."""
    keys = [layer_key(b.name) for b in bg.blocks]
    layered = [i for i, k in enumerate(keys) if k is not None]
    if not layered:
        return [], [[i] for i in range(len(bg.blocks))], []
    first, last = layered[0], layered[-1]
    layers: list[list[int]] = []
    for i in range(first, last + 1):
        if keys[i] is not None and (not layers or keys[i] != keys[layers[-1][0]]):
            layers.append([i])
        else:
            layers[-1].append(i)  # glue blocks between layers join the layer before
    return list(range(first)), layers, list(range(last + 1, len(bg.blocks)))


def _repair(starts: list[int], n: int) -> list[int]:
    """Make stage starts strictly increasing with starts[0] = 0 and every stage non-empty."""
    K = len(starts)
    out = []
    for k, s in enumerate(starts):
        lo = 0 if k == 0 else out[-1] + 1
        out.append(min(max(s, lo), n - (K - k)))
    out[0] = 0
    return out


def _stages_from_starts(starts: list[int], n: int) -> list[int]:
    ends = starts[1:] + [n]
    return [k for k, (a, b) in enumerate(zip(starts, ends)) for _ in range(a, b)]


def _shared_bytes(bg) -> list[int]:
    extra = [0] * len(bg.blocks)
    for sp in bg.shared_params:
        for b in sp.blocks:
            extra[b] += sp.bytes
    return extra


def baseline_assignment(bg, method: str, num_stages: int) -> list[int]:
    """Block -> stage of baseline `method` over `num_stages` contiguous stages."""
    n, K = len(bg.blocks), num_stages
    if method in ("uniform", "torchtitan"):
        head, layers, tail = _layer_units(bg)
        if method == "torchtitan":
            units = ([head] if head else []) + layers + ([tail] if tail else [])
            starts = _starts_from_units(units, K)
        else:
            starts = _starts_from_units(layers, K)
            starts[0] = 0  # the embedding goes with the first stage; the head with the last
    elif method in ("parameters", "flops", "dp"):
        if method == "parameters":
            extra = _shared_bytes(bg)
            weights = [b.param_bytes + e for b, e in zip(bg.blocks, extra)]
        elif method == "flops":
            weights = [b.fwd_flops + b.bwd_flops for b in bg.blocks]
        else:
            weights = [b.time_s for b in bg.blocks]
        starts = list(split_chain(weights, K).starts)
    elif method == "size":
        extra = _shared_bytes(bg)
        sizes = [b.param_bytes + e for b, e in zip(bg.blocks, extra)]
        threshold = sum(sizes) / K
        starts, acc = [0], 0.0
        for i, s in enumerate(sizes):
            if acc >= threshold and len(starts) < K:
                starts.append(i)
                acc = 0.0
            acc += s
        starts += [n] * (K - len(starts))
    else:
        raise ValueError(f"unknown baseline {method!r}; known: {', '.join(BASELINES)}")
    return _stages_from_starts(_repair(starts, n), n)


def baseline_plan(bg, method: str, num_ranks: int, chunks: int = 1, microbatches: int | None = None,
                  schedule: str | None = None, memory_cap_bytes: int | None = None,
                  link_bw_bytes_per_s: float = DEFAULT_LINK_BW_BYTES_PER_S, simulate: bool = True) -> Plan:
    """Plan of baseline `method`, scored like the ILP's (memory cap recorded, not enforced)."""
    schedule, microbatches = check_config(len(bg.blocks), num_ranks, chunks, microbatches, schedule)
    assign = baseline_assignment(bg, method, num_ranks * chunks)
    plan = evaluate_assignment(bg, assign, num_ranks, chunks, microbatches, schedule, link_bw_bytes_per_s,
                               memory_cap_bytes, method=method, simulate=simulate)
    return plan.replace(solver_status=method)


def all_baselines(bg, num_ranks: int, chunks: int = 1, microbatches: int | None = None,
                  schedule: str | None = None, memory_cap_bytes: int | None = None,
                  link_bw_bytes_per_s: float = DEFAULT_LINK_BW_BYTES_PER_S, simulate: bool = True) -> dict[str, Plan]:
    """Every baseline's plan, by name."""
    return {m: baseline_plan(bg, m, num_ranks, chunks, microbatches, schedule, memory_cap_bytes,
                             link_bw_bytes_per_s, simulate) for m in BASELINES}
