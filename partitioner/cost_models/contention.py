"""Scatter-adds whose indices pile onto one row: the serial chain of atomics in a compiled
embedding backward.

Inductor lowers an embedding's backward to a scatter-add: one atomic add per (index, column)
into the weight's gradient. Atomics on one cache line are serialised while other lines proceed
in parallel, so when many indices hit one row the hottest row's chain, not memory bandwidth,
sets the kernel's time: T5's relative position bias sends every query-key pair into one of 32
buckets, most of them into the farthest ones, and that backward kernel can take half a
microbatch's device time (benchmarks/RESULTS.md). Eager PyTorch sorts the indices and reduces
segments instead; that path is not modelled here.

How many indices hit the hottest row is read from the index values when the graph computes
them from constants alone (positions: aranges and bucketing arithmetic, evaluated here on the
CPU); indices that come from the inputs (token ids) are taken as spread evenly over the rows.
"""
from __future__ import annotations

import math

import torch
import torch.fx

from partitioner.cost_models.device import DeviceSpec

LINE_BYTES = 128  # a GPU cache line
ACCUMULATE_BYTES = 4  # inductor accumulates an embedding's gradient in fp32
_MAX_CONSTANT_NUMEL = 1 << 26  # larger constant subgraphs are not evaluated (uniform hits assumed)
_RANDOM = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial")


def embedding_chains_s(gm: torch.fx.GraphModule, spec: DeviceSpec) -> dict[str, float]:
    """Seconds of the longest serial atomic chain in the compiled backward of every
    aten.embedding node with a trainable-looking weight (a get_attr): the hottest row's hits
    times the atomics of that row that share one cache line, spec.contended_atomic_s each."""
    if spec.contended_atomic_s <= 0:
        return {}
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.embedding.default:
            continue
        weight, indices = node.args[0], node.args[1]
        padding_idx = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_idx", -1)
        sparse = node.args[4] if len(node.args) > 4 else node.kwargs.get("sparse", False)
        shape = _shape(weight)
        if weight.op != "get_attr" or shape is None or len(shape) != 2 or _shape(indices) is None or sparse:
            continue
        rows, columns = shape
        hits = hottest_row_hits(gm, indices, rows, padding_idx)
        out[node.name] = hits * min(columns, LINE_BYTES // ACCUMULATE_BYTES) * spec.contended_atomic_s
    return out


def hottest_row_hits(gm: torch.fx.GraphModule, indices: torch.fx.Node, rows: int, padding_idx: int = -1) -> int:
    """How many of `indices` select the most selected of `rows` rows (the padding row, which
    gets no gradient, left out): counted from the values when the graph computes them from
    constants, else the even spread ceil(numel / rows)."""
    values = constant_value(gm, indices)
    if values is not None and values.numel() and not values.is_floating_point():
        counts = torch.bincount(values.flatten().clamp(0, rows - 1), minlength=rows)
        if 0 <= padding_idx < rows:
            counts[padding_idx] = 0
        return int(counts.max())
    numel = math.prod(_shape(indices) or ())
    return max(1, math.ceil(numel / max(rows, 1)))


def constant_value(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor | None:
    """`node`'s value on the CPU when it depends on no input, parameter or buffer (only on
    calls with literal arguments, e.g. aranges), else None. Random ops and subgraphs with
    tensors over _MAX_CONSTANT_NUMEL elements count as not constant."""
    needed: dict[torch.fx.Node, None] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        if n.op != "call_function" or any(r in str(n.target) for r in _RANDOM):
            return None
        shape = _shape(n)
        if shape is not None and math.prod(shape) > _MAX_CONSTANT_NUMEL:
            return None
        needed[n] = None
        stack.extend(n.all_input_nodes)
    values: dict[torch.fx.Node, object] = {}
    try:
        for n in gm.graph.nodes:  # graph order: in-place ops mutate what later nodes read, as at run time
            if n not in needed:
                continue
            args = torch.fx.node.map_arg(n.args, values.__getitem__)
            kwargs = torch.fx.node.map_arg(n.kwargs, values.__getitem__)
            if "device" in kwargs:
                kwargs = {**kwargs, "device": torch.device("cpu")}
            values[n] = n.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op that will not run on the CPU: fall back to the even spread
        return None
    value = values[node]
    return value if isinstance(value, torch.Tensor) else None


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if isinstance(val, torch.Tensor) and all(isinstance(s, int) for s in val.shape):
        return tuple(val.shape)
    return None
