"""Scatter-adds whose indices pile onto one row: the serial chain of atomics in a compiled
embedding backward.

Inductor lowers an embedding's backward to a scatter-add: one atomic add per (index, column)
into the weight's gradient. Atomics on one cache line are serialised while other lines proceed
in parallel, so when many indices hit one row the hottest row's chain, not memory bandwidth,
sets the kernel's time: T5's relative position bias sends every query-key pair into one of 32
buckets, most of them into the farthest ones, and that backward kernel can take half a
microbatch's device time (benchmarks/RESULTS.md). Capture rewrites such lookups of constant
indices as one-hot matmuls where the one-hot fits (partitioner/passes/onehot_lookup.py); this
prices the ones left. Eager PyTorch sorts the indices and reduces segments instead; that path is
not modelled here.

How many indices hit the hottest row is read from the index values when the graph computes
them from constants alone (positions: aranges and bucketing arithmetic, evaluated here on the
CPU); indices that come from the inputs (token ids) are taken as spread evenly over the rows.
"""
from __future__ import annotations

import math

import torch
import torch.fx

from partitioner.cost_models.device import DeviceSpec
from partitioner.passes.constants import constant_value
from partitioner.passes.onehot_lookup import embedding_call

LINE_BYTES = 128  # a GPU cache line
ACCUMULATE_BYTES = 4  # inductor accumulates an embedding's gradient in fp32


def embedding_chains_s(gm: torch.fx.GraphModule, spec: DeviceSpec) -> dict[str, float]:
    """Seconds of the longest serial atomic chain in the compiled backward of every
    aten.embedding node with a trainable-looking weight (a get_attr): the hottest row's hits
    times the atomics of that row that share one cache line, spec.contended_atomic_s each."""
    if spec.contended_atomic_s <= 0:
        return {}
    out = {}
    for node in gm.graph.nodes:
        call = embedding_call(node)
        if call is None:
            continue
        shape = _shape(call.weight)
        if call.weight.op != "get_attr" or shape is None or len(shape) != 2 or _shape(call.indices) is None or call.sparse:
            continue
        rows, columns = shape
        hits = hottest_row_hits(gm, call.indices, rows, call.padding_idx)
        out[node.name] = hits * min(columns, LINE_BYTES // ACCUMULATE_BYTES) * spec.contended_atomic_s
    return out


def hottest_row_hits(gm: torch.fx.GraphModule, indices: torch.fx.Node, rows: int, padding_idx: int = -1) -> int:
    """How many of `indices` select the most selected of `rows` rows (the padding row, which
    gets no gradient, left out): counted from the values when the graph computes them from
    constants, else the even spread ceil(numel / rows)."""
    values = constant_value(gm, indices, allow_writes=True)
    if values is not None and values.numel() and not values.is_floating_point():
        counts = torch.bincount(values.flatten().clamp(0, rows - 1), minlength=rows)
        if 0 <= padding_idx < rows:
            counts[padding_idx] = 0
        return int(counts.max())
    numel = math.prod(_shape(indices) or ())
    return max(1, math.ceil(numel / max(rows, 1)))


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if isinstance(val, torch.Tensor) and all(isinstance(s, int) for s in val.shape):
        return tuple(val.shape)
    return None
