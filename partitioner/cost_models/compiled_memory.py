"""What a compiled graph saves for backward, per node: AOTAutograd's own partitioner, on fake tensors.

torch.compile splits each stage's joint forward-backward graph with the min-cut partitioner
(`min_cut_rematerialization_partition`): it saves the matmuls' inputs and the attention
kernels' outputs, and recomputes cheap pointwise chains in the backward rather than keep their
values (dropout masks, norm statistics, activation outputs), so a compiled stage holds much
less per microbatch in flight than the eager graph saves (benchmarks/saved_bytes.py measures
both). This runs the same partitioner on fake tensors, so nothing is allocated, and charges
every saved storage to the captured node whose value it is.

Fused attention is kept whole: on meta tensors scaled_dot_product_attention would decompose
into its math path (and save the score matrix), so the SDPA nodes the cost model runs on a
fused kernel are traced as one opaque op that saves what the GPU's kernels save (q, k, v,
the output, the log-sum-exp and the mask).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from partitioner.cost_models.attention import sdpa_arguments
from partitioner.cost_models.flops import NodeTrace
from partitioner.cost_models.memory import DtypeScale


@torch.library.custom_op("partitioner::fused_attention", mutates_args=())
def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     dropout_p: float, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stands for a fused SDPA kernel while tracing: (output, log-sum-exp)."""
    raise NotImplementedError("traced on fake tensors only")


@_fused_attention.register_fake
def _(q, k, v, mask, dropout_p, is_causal):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("partitioner::fused_attention_backward", mutates_args=())
def _fused_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor,
                              mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused kernel's backward while tracing: (dq, dk, dv)."""
    raise NotImplementedError("traced on fake tensors only")


@_fused_attention_backward.register_fake
def _(grad, q, k, v, out, lse, mask):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, mask, _, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    dq, dk, dv = _fused_attention_backward(grad_out, q, k, v, out, lse, mask)
    return dq, dk, dv, None, None, None


_fused_attention.register_autograd(_backward, setup_context=_setup)


def compiled_saved_bytes(gm: torch.fx.GraphModule, traces: dict[str, NodeTrace],
                         scale: DtypeScale | None = None) -> dict[str, int]:
    """Captured node -> bytes the compiled graph saves for backward that are its values,
    re-expressed through `scale` (parameters and buffers never count; nodes that save nothing
    are absent)."""
    scale = scale or DtypeScale()
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table
    import torch._inductor.lowering  # noqa: F401 - max_pool2d's decomposition reads it, imported by a compile only
    from torch._subclasses.fake_tensor import FakeTensorMode
    import torch.fx.traceback as fx_traceback

    graph = _with_fused_attention(gm, traces)
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    recorded: dict[str, torch.fx.GraphModule] = {}

    def forward_compiler(fw: torch.fx.GraphModule, _inputs):
        recorded["fw"] = fw
        return fw.forward

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, fx_traceback.preserve_node_meta():
        inputs = [_fake_input(n, traces) for n in placeholders]
        aot_module_simplified(graph, inputs, fw_compiler=forward_compiler, bw_compiler=lambda g, _: g.forward,
                              partition_fn=min_cut_rematerialization_partition,
                              decompositions=select_decomp_table())
    fw = recorded["fw"]
    fw_placeholders = [n for n in fw.graph.nodes if n.op == "placeholder"]
    state = fw_placeholders[:len(fw_placeholders) - len(placeholders)]  # AOT lifts parameters and buffers first
    excluded = {StorageWeakRef(n.meta["val"].untyped_storage()) for n in state
                if isinstance(n.meta.get("val"), torch.Tensor)}
    outputs = pytree.tree_leaves(next(n for n in fw.graph.nodes if n.op == "output").args[0])
    user_outputs = len(pytree.tree_leaves(next(n for n in gm.graph.nodes if n.op == "output").args[0]))
    originals = [n for n in gm.graph.nodes if n.op == "placeholder"]  # the copy may rename them
    by_input = {fw_ph.name: ph.name for fw_ph, ph in zip(fw_placeholders[len(state):], originals)}
    names = {n.name for n in gm.graph.nodes}
    seen: set = set()
    out: dict[str, int] = {}
    for node in outputs[user_outputs:]:
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor):
            continue
        key = StorageWeakRef(val.untyped_storage())
        if key in excluded or key in seen:
            continue
        seen.add(key)
        owner = _captured_owner(node, by_input, names)
        if owner is not None:
            out[owner] = out.get(owner, 0) + scale.storage_bytes(val.untyped_storage().nbytes(), val.dtype)
    return out


def _with_fused_attention(gm: torch.fx.GraphModule, traces: dict[str, NodeTrace]) -> torch.fx.GraphModule:
    """A copy of `gm` (sharing its parameters) whose SDPA nodes costed on a fused kernel call
    partitioner::fused_attention instead."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        trace = traces.get(node.name)
        call = trace.attention if trace is not None else None
        if call is not None and call.backend != "math":
            bound = sdpa_arguments(node.args, node.kwargs)
            q, k, v = (env[bound[name]] for name in ("query", "key", "value"))
            mask = bound.get("attn_mask")
            pair = graph.call_function(torch.ops.partitioner.fused_attention.default,
                                       (q, k, v, env[mask] if isinstance(mask, torch.fx.Node) else None,
                                        float(bound.get("dropout_p") or 0.0), bool(bound.get("is_causal") or False)))
            pair.meta = dict(node.meta)
            env[node] = graph.create_node("call_function", operator.getitem, (pair, 0), name=node.name)
            env[node].meta = dict(node.meta)
            continue
        env[node] = graph.node_copy(node, env.__getitem__)
    return torch.fx.GraphModule(gm, graph)


def _fake_input(node: torch.fx.Node, traces: dict[str, NodeTrace]) -> Any:
    val = node.meta.get("val")
    if val is None and node.name in traces:
        val = traces[node.name].output
    if isinstance(val, torch.Tensor):  # made inside the fake mode: a fake tensor where the parameters are
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype,
                                   device=val.device).requires_grad_(val.requires_grad)
    return val


def _captured_owner(node: torch.fx.Node, by_input: dict[str, str], names: set[str]) -> str | None:
    """The captured node whose value `node` (of the partitioned forward) is: its provenance, else
    that of the nearest input it was computed from (views and decompositions carry none)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            if n.name in by_input:
                return by_input[n.name]
            continue
        owner = _source_in(n.meta.get("from_node") or [], names)
        if owner is not None:
            return owner
        stack.extend(n.all_input_nodes)
    return None


def _source_in(sources: list, names: set[str]) -> str | None:
    """The first node of `names` in a provenance chain (torch.fx.traceback.NodeSource)."""
    for source in sources:
        name = source[0] if isinstance(source, tuple) else getattr(source, "name", None)  # older torch: (name, target)
        if name in names:
            return name
        found = _source_in(getattr(source, "from_node", None) or [], names)
        if found is not None:
            return found
    return None
