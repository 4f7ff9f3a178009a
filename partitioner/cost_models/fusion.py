"""Node times of a compiled stage: what torch.compile (inductor) removes from the eager roofline.

Inductor keeps matmuls and attention as library kernels and fuses everything
between them: the pointwise ops, norms and reductions between two heavy
kernels become one or a few generated kernels that read their inputs once and
write only the values read later. Modelled per node, in graph order:

- a segment is the run of light (FLOP-free) nodes between two heavy nodes;
- a light node reads an input from memory only if it was made outside its
  segment (by a heavy node, a parameter, a user input or an earlier segment),
  once per segment, and writes its output only if a heavy node, a later
  segment or the graph output reads it; a light node that writes is one launch;
- its backward kernels are fused in the same proportion (bytes scaled by its
  forward's fused/eager ratio, one launch), and read its forward's inputs again
  (inductor recomputes fused pointwise values in the backward rather than save them);
- heavy nodes keep their kernels; no node pays the eager per-op host dispatch
  (the compiled graph launches its kernels from one call, ahead of the GPU).
"""
from __future__ import annotations

from typing import Any

import torch.fx

from partitioner.cost_models.device import DeviceSpec
from partitioner.cost_models.flops import COMPUTE_OPS, NodeTrace
from partitioner.cost_models.memory import DtypeScale, value_bytes
from partitioner.cost_models.time import NodeTime, roofline_time_s


def is_heavy(trace: NodeTrace) -> bool:
    """A node that runs a library kernel inductor does not fuse into: a matmul or attention."""
    return trace.attention is not None or any(op.flops for op in trace.fwd_ops)


def compiled_times(gm: torch.fx.GraphModule, traces: dict[str, NodeTrace], eager: dict[str, NodeTime],
                   spec: DeviceSpec, scale: DtypeScale, op_bytes: Any) -> dict[str, NodeTime]:
    """`eager` node times re-costed as a compiled graph runs them (see the module docstring).

    op_bytes(op) -> bytes an eager OpKernel moves (as the roofline counted them).
    """
    segment: dict[str, int] = {}
    heavy: set[str] = set()
    current = 0
    for node in gm.graph.nodes:
        trace = traces.get(node.name)
        if trace is not None and trace.op in COMPUTE_OPS and is_heavy(trace):
            heavy.add(node.name)
            current += 1
        segment[node.name] = current

    light = {n.name for n in gm.graph.nodes if n.name in traces and traces[n.name].op in COMPUTE_OPS
             and n.name not in heavy}
    read_in: set[tuple[int, str]] = set()
    out: dict[str, NodeTime] = {}
    for node in gm.graph.nodes:
        name = node.name
        if name not in traces:
            continue
        t = eager.get(name, NodeTime(0.0, 0.0))
        if name not in light:
            out[name] = NodeTime(t.fwd_s, t.bwd_s)
            continue
        seg = segment[name]
        is_view = not traces[name].fwd_ops  # aliases its input: its light readers read through it
        if is_view and not any(u.name in light and segment[u.name] == seg for u in node.users):
            out[name] = NodeTime(0.0, 0.0)
            continue
        reads = 0
        for a in node.all_input_nodes:
            if a.name in light and segment[a.name] == seg:
                continue  # made inside this fused kernel
            if (seg, a.name) not in read_in:
                read_in.add((seg, a.name))
                reads += value_bytes(traces[a.name].output, scale) if a.name in traces else 0
        writes = not is_view and any(u.op == "output" or u.name in heavy or segment.get(u.name) != seg
                                     for u in node.users)
        fused = reads + (value_bytes(traces[name].output, scale) if writes else 0)
        eager_bytes = sum(op_bytes(op) for op in traces[name].fwd_ops)
        ratio = min(1.0, fused / eager_bytes) if eager_bytes else 0.0
        fwd_s = roofline_time_s(0.0, fused, int(writes), spec) if fused else 0.0
        # inductor's partitioner recomputes fused pointwise values in the backward from what it saved
        # (cheaper than saving them): the backward kernel reads the segment's inputs again
        bwd_bytes = ratio * sum(op_bytes(op) for op in traces[name].bwd_ops)
        if bwd_bytes:
            bwd_bytes += reads
        bwd_s = roofline_time_s(0.0, bwd_bytes, 1, spec) if bwd_bytes else 0.0
        out[name] = NodeTime(fwd_s, bwd_s)
    return out
