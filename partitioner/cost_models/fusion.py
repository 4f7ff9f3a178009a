"""Node times of a compiled stage: what torch.compile (inductor) removes from the eager roofline.

Inductor keeps matmuls and attention as library kernels and fuses everything
between them: the pointwise ops, norms and reductions between two heavy
kernels become one or a few generated kernels that read their inputs once and
write only the values read later. Modelled per node, in graph order:

- a segment is the set of light (FLOP-free) nodes with as many heavy nodes on their longest
  path from the inputs: no heavy node lies between two of them, so inductor may fuse them;
- an alias (a view, getitem or other node that launches no kernel) costs nothing forward:
  whoever reads it reads the tensor it aliases; backward, one whose gradient is a new tensor (a
  split's cat, an expand's sum) made from gradients a library kernel wrote (a matmul's, attention's)
  runs as a kernel of its own (gpt2's qkv split), else inside the pointwise gradient kernels;
- a light node that repeats an earlier one (the same op on the same inputs; not a random op)
  costs nothing, as an alias of the earlier one: inductor's common-subexpression elimination
  computes it once (t5-base's `where(mask, bias, min)`, one per layer, ran as one kernel);
- a light node reads an input from memory only if it was made outside its
  segment (by a heavy node, a parameter, a user input or an earlier segment),
  once per segment, and writes its output only if a heavy node, a later
  segment or the graph output reads it (through aliases); a light node that
  writes is one launch;
- its backward kernels are fused in the same proportion (bytes and launches scaled by its
  forward's fused/eager ratio, at least one launch), and read its forward's inputs again
  (inductor recomputes fused pointwise values in the backward rather than save them);
- heavy nodes keep their kernels, matmuls at aligned shapes (inductor pads
  misaligned ones);
- no node pays the eager per-op dispatch: the host's work is launching the
  graph's kernels, spec.compiled_launch_overhead_s each, ahead of the GPU;
- a light node that broadcasts an activation requiring grad (T5's position bias into every
  layer's mask) adds to its backward the reduction of its output's gradient to that input's
  shape, a kernel of its own (inductor does not fuse a reduction over other dims into the
  pointwise kernels): one launch reading the gradient and writing the smaller one;
- a light node that broadcasts a trainable parameter over outer dims, directly or through
  casts (a norm's weight and bias, RMSNorm's `weight * x`), reduces its gradient over the rows
  in a split reduction of its own: two launches reading the output's gradient and the node's
  other full-size inputs (the normalised values it multiplies, recomputed). gpt2-xl's layer
  norms ran their backward as one fused input-gradient kernel and two weight-gradient ones;
- an embedding's backward (a scatter-add of atomics) takes at least its hottest
  row's serial chain (partitioner/cost_models/contention.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch.fx

from partitioner.cost_models.contention import embedding_chains_s
from partitioner.cost_models.device import DeviceSpec
from partitioner.cost_models.flops import COMPUTE_OPS, GATHERS, NodeTrace
from partitioner.cost_models.memory import DtypeScale, value_bytes
from partitioner.cost_models.time import Kernel, NodeTime, kernels_time_s, roofline_time_s

KernelsOf = Callable[[NodeTrace], "tuple[list[Kernel], list[Kernel]]"]


def is_heavy(trace: NodeTrace) -> bool:
    """A node that runs a library kernel inductor does not fuse into: a matmul or attention."""
    return trace.attention is not None or any(op.flops for op in trace.fwd_ops)


def broadcast_grad(a: torch.fx.Node, node: torch.fx.Node, traces: dict[str, NodeTrace],
                   source: Callable[[torch.fx.Node], torch.fx.Node]) -> bool:
    """True when light `node` broadcasts input `a`, an activation that requires grad (made by a
    compute node, not a parameter): its backward sums the output's gradient over the broadcast
    dims, a reduction whose iteration space is not the pointwise kernels' (T5's relative-position
    bias, (1, H, L, S), into every layer's (B, H, L, S) mask), so inductor runs it as a kernel of
    its own that reads the whole gradient again. Outer dims only (the innermost one kept)."""
    ta, tn = traces.get(a.name), traces.get(node.name)
    if ta is None or tn is None or not ta.requires_grad or source(a).op not in COMPUTE_OPS:
        return False
    small, big = ta.output, tn.output
    if not (isinstance(small, torch.Tensor) and isinstance(big, torch.Tensor)) or small.dim() == 0:
        return False
    # over outer dims only: a norm's per-row statistics, broadcast along the row (x * rsqrt(var)),
    # reduce in the row kernel that inductor fuses them into
    if not (0 < small.numel() < big.numel() and small.shape[-1] == big.shape[-1]):
        return False
    try:  # a broadcast, not a larger output made otherwise (a cat along an outer dim: its backward slices)
        return torch.broadcast_shapes(small.shape, big.shape) == big.shape
    except RuntimeError:
        return False


def _op_name(node: torch.fx.Node) -> str | None:
    """The aten op a node calls, without its overload ("add" for aten.add.Tensor); None for others."""
    return getattr(getattr(node.target, "_overloadpacket", None), "__name__", None)


def parameter_grad_bytes(node: torch.fx.Node, traces: dict[str, NodeTrace], scale: DtypeScale,
                         origin: Callable[[torch.fx.Node], torch.fx.Node]) -> int:
    """Bytes the weight-gradient reduction of light `node` reads: its output's gradient and its
    full-size activation inputs, when it broadcasts a trainable parameter along outer dims (same
    innermost dim, fewer elements); 0 when it broadcasts none. `origin(a)`: the node input `a`
    comes from through views and casts (a parameter: a get_attr or placeholder node; mixed
    precision casts the weight first). A parameter only added (a bias) needs the gradient alone."""
    out = traces[node.name].output
    if not isinstance(out, torch.Tensor) or not out.dim():
        return 0
    params = [a for a in node.all_input_nodes if a.name in traces and origin(a).op in ("placeholder", "get_attr")
              and traces[a.name].requires_grad and isinstance(traces[a.name].output, torch.Tensor)
              and 0 < traces[a.name].output.numel() < out.numel()
              and traces[a.name].output.shape[-1:] == out.shape[-1:]]
    if not params:
        return 0
    nbytes = value_bytes(out, scale)
    if _op_name(node) in ("add", "sub"):
        return nbytes
    for a in node.all_input_nodes:
        t = traces.get(a.name)
        if a not in params and t is not None and isinstance(t.output, torch.Tensor) and t.output.numel() == out.numel():
            nbytes += value_bytes(t.output, scale)
    return nbytes


_RANDOM = ("rand", "bernoulli", "dropout", "normal", "uniform", "multinomial")


def repeats(gm: torch.fx.GraphModule, light: set[str], traces: dict[str, NodeTrace]) -> dict[str, torch.fx.Node]:
    """Light nodes that repeat an earlier one, mapped to it: the same target on the same inputs
    (inputs that are repeats count as the node they repeat) and the same constants. Random ops
    (dropout) never repeat: each call draws anew; nor do in-place ops: each writes again."""
    same: dict[str, torch.fx.Node] = {}
    first: dict[str, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if (node.name not in light or (schema is not None and schema.is_mutable)
                or any(k in op.name for op in traces[node.name].fwd_ops for k in _RANDOM)):
            continue
        key = repr((node.target, torch.fx.node.map_arg((node.args, node.kwargs),
                                                       lambda a: same.get(a.name, a).name)))
        if key in first:
            same[node.name] = first[key]
        else:
            first[key] = node
    return same


def fuse_pointwise_runs(kernels: list[Kernel]) -> list[Kernel]:
    """`kernels` (one op's eager sequence) with every run of consecutive FLOP-free kernels
    fused into one launch, as inductor generates it: the fused kernel reads the run's first
    input and writes its last output, which for passes over one tensor's elements (SDPA's math
    path: casts, scaling, mask add, softmax) is what the run's largest member moves."""
    out: list[Kernel] = []
    for k in kernels:
        if out and not k.flops and not out[-1].flops:
            last = out.pop()
            k = Kernel(0.0, max(last.bytes_moved, k.bytes_moved), k.dtype, launches=1)
        out.append(k)
    return out


def _view_backward(trace: NodeTrace, grad_from_heavy: bool, spec: DeviceSpec, kernels_of: KernelsOf,
                   launch_s: float) -> NodeTime:
    """Times of a view (no forward kernel) whose backward may copy: a split's backward concatenates its
    outputs' gradients, an expand's sums them. Where those gradients come from a library kernel (a
    matmul's or attention's backward: gpt2's fused qkv split, read by attention) the backward runs as
    one kernel of its own that reads them and writes the input's gradient (gpt2-xl: a 9.5 us `cat` a
    layer on an H200); made by generated kernels, they are written into place by those (free)."""
    _, bwd = kernels_of(trace)
    if not grad_from_heavy or not bwd:
        return NodeTime(0.0, 0.0)
    bwd = fuse_pointwise_runs(bwd)
    return NodeTime(0.0, kernels_time_s(bwd, spec), 0.0, launch_s * sum(k.launches for k in bwd))


def compiled_times(gm: torch.fx.GraphModule, traces: dict[str, NodeTrace], spec: DeviceSpec,
                   scale: DtypeScale, kernels_of: KernelsOf) -> dict[str, NodeTime]:
    """Every node's times as a compiled graph runs it (see the module docstring).

    kernels_of(trace) -> (forward kernels, backward kernels) the node runs eagerly, matmuls padded.
    """
    launch_s = spec.compiled_launch_overhead_s
    heavy = {name for name, t in traces.items() if t.op in COMPUTE_OPS and is_heavy(t)}
    # a node's segment: the most heavy nodes on a path from the inputs to it. Two light nodes of one
    # segment have no heavy node between them, so inductor can fuse them (SwiGLU's silu(gate) * up
    # fuses although the up projection comes between them in graph order)
    segment: dict[str, int] = {}
    for node in gm.graph.nodes:
        segment[node.name] = max((segment[a.name] + (a.name in heavy) for a in node.all_input_nodes), default=0)
    light = {n.name for n in gm.graph.nodes if n.name in traces and traces[n.name].op in COMPUTE_OPS
             and n.name not in heavy}
    alias = {name for name in light if not traces[name].fwd_ops}
    same = repeats(gm, light, traces)  # computed once by inductor: aliases of the node they repeat
    copies: dict[str, list[torch.fx.Node]] = {}  # a node -> the later nodes that repeat it
    for node in gm.graph.nodes:
        if node.name in same:
            copies.setdefault(same[node.name].name, []).append(node)

    def source(node: torch.fx.Node) -> torch.fx.Node:
        """The node whose tensor `node` aliases or repeats (itself when it does neither)."""
        while True:
            if node.name in same:
                node = same[node.name]
            elif node.name in alias and node.all_input_nodes:
                node = node.all_input_nodes[0]
            else:
                return node

    def origin(node: torch.fx.Node) -> torch.fx.Node:
        """Where `node`'s value comes from through aliases and other one-input light nodes (casts)."""
        while node.name in light and len(node.all_input_nodes) == 1:
            node = node.all_input_nodes[0]
        return node

    def readers(node: torch.fx.Node) -> list[torch.fx.Node]:
        """The nodes reading `node`'s tensor, through aliases and the nodes repeating it."""
        out = []
        for u in [*node.users, *copies.get(node.name, [])]:
            out.extend(readers(u) if u.name in alias or u.name in same else [u])
        return out

    read_in: set[tuple[int, str]] = set()
    out: dict[str, NodeTime] = {}
    for node in gm.graph.nodes:
        name = node.name
        if name not in traces:
            continue
        if name not in light:
            fwd, bwd = kernels_of(traces[name])
            out[name] = NodeTime(kernels_time_s(fwd, spec), kernels_time_s(bwd, spec),
                                 launch_s * sum(k.launches for k in fwd), launch_s * sum(k.launches for k in bwd))
            continue
        if name in same:
            out[name] = NodeTime(0.0, 0.0)
            continue
        if name in alias:  # a view: free, unless its backward copies gradients a heavy kernel wrote
            from_heavy = bool(traces[name].bwd_ops) and any(r.name in heavy for r in readers(node))
            out[name] = _view_backward(traces[name], from_heavy, spec, kernels_of, launch_s)
            continue
        seg = segment[name]
        gather = _op_name(node) in GATHERS
        reads = 0
        for a in node.all_input_nodes:
            made = source(a)
            if made.name in light and made.name not in alias and segment[made.name] == seg:
                continue  # made inside this fused kernel
            read = same[a.name].name if a.name in same else a.name  # a repeated value is one tensor
            if (seg, read) not in read_in:
                read_in.add((seg, read))
                nbytes = value_bytes(traces[a.name].output, scale) if a.name in traces else 0
                if gather and a is node.all_input_nodes[0]:  # a lookup reads the rows it writes
                    nbytes = min(nbytes, value_bytes(traces[name].output, scale))
                reads += nbytes
        writes = any(u.op == "output" or u.name not in light or segment.get(u.name) != seg for u in readers(node))
        fused = reads + (value_bytes(traces[name].output, scale) if writes else 0)
        fwd_kernels, bwd_kernels = kernels_of(traces[name])
        eager_bytes = sum(k.bytes_moved for k in fwd_kernels)
        ratio = min(1.0, fused / eager_bytes) if eager_bytes else 0.0
        fwd_s = roofline_time_s(0.0, fused, int(writes), spec)  # the reads of a chain, one launch where it writes
        # inductor's partitioner recomputes fused pointwise values in the backward from what it saved
        # (cheaper than saving them): the backward kernel reads the segment's inputs again
        bwd_bytes = ratio * sum(k.bytes_moved for k in bwd_kernels)
        bwd_launches = 0
        if bwd_bytes:
            bwd_bytes += reads
            bwd_launches = max(1, math.ceil(ratio * sum(k.launches for k in bwd_kernels)))  # reductions stay apart
        for a in node.all_input_nodes:  # an activation it broadcast: its gradient, a reduction of its own
            if broadcast_grad(a, node, traces, source):
                bwd_bytes += value_bytes(traces[name].output, scale) + value_bytes(traces[a.name].output, scale)
                bwd_launches += 1
        param_bytes = parameter_grad_bytes(node, traces, scale, origin) if bwd_bytes else 0
        if param_bytes:  # a split reduction: partial sums per block of rows, then their sum
            bwd_bytes += param_bytes
            bwd_launches += 2
        bwd_s = roofline_time_s(0.0, bwd_bytes, bwd_launches, spec)
        out[name] = NodeTime(fwd_s, bwd_s, launch_s * int(writes), launch_s * bwd_launches)
    for name, chain_s in embedding_chains_s(gm, spec).items():  # a backward's atomics piled on one row
        if name in out and traces[name].bwd_ops:
            out[name] = dataclasses.replace(out[name], bwd_s=max(out[name].bwd_s, chain_s))
    return out
