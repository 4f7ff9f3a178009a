"""Attention masks handed to scaled_dot_product_attention with their last dim contiguous.

Every fused SDPA kernel on a GPU (flash, memory-efficient, cuDNN) needs the mask's last dim at
stride 1 (torch's check_last_dim_stride_equals_1_dense). A mask built from a permuted tensor (a
bias looked up as (L, S, H) and permuted to (H, L, S), as T5 does where its lookup is not
rewritten by onehot_lookup.py) sends SDPA down its math path, which materialises the (B, H, L, S)
scores in fp32 and runs its GEMMs unfused. A contiguous copy of the mask costs one pass over it
and lets the GPU take the fused kernel. Values and gradients are unchanged (a copy).
"""
from __future__ import annotations

import logging

import torch
import torch.fx

from partitioner.passes.graph_nodes import fake_mode_of, provenance
from partitioner.passes.causal_mask import SDPA_TARGETS
from partitioner.passes.constants import val

log = logging.getLogger(__name__)


def _mask_arg(node: torch.fx.Node) -> tuple[int | str, torch.fx.Node] | None:
    """(position or keyword, node) of an SDPA call's attn_mask argument, if it is a node."""
    if len(node.args) > 3:
        return (3, node.args[3]) if isinstance(node.args[3], torch.fx.Node) else None
    mask = node.kwargs.get("attn_mask")
    return ("attn_mask", mask) if isinstance(mask, torch.fx.Node) else None


def strided_last_dim(t) -> bool:
    """Whether tensor `t`'s last dim is neither of size 1 nor at stride 1 (no fused SDPA kernel takes it)."""
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[-1] != 1 and t.stride(-1) != 1


def contiguous_attention_masks(gm: torch.fx.GraphModule) -> int:
    """Give every SDPA call of `gm` whose attn_mask has a strided last dim a contiguous copy of it,
    one copy per mask however many calls share it; returns how many masks were copied."""
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        found = _mask_arg(node)
        if found is None:
            continue
        where, mask = found
        m = val(mask)
        if not strided_last_dim(m):
            continue
        if mask not in copies:
            with gm.graph.inserting_after(mask):
                copy = gm.graph.call_function(torch.ops.aten.clone.default, (mask,),
                                              {"memory_format": torch.contiguous_format})
            with fake_mode_of(m):
                copy.meta = {**provenance(mask), "val": m.clone(memory_format=torch.contiguous_format)}
            copies[mask] = copy
        if isinstance(where, int):
            node.update_arg(where, copies[mask])
        else:
            node.update_kwarg(where, copies[mask])
    if copies:
        gm.graph.lint()
        gm.recompile()
        log.debug("copied %d strided attention masks contiguous", len(copies))
    return len(copies)
