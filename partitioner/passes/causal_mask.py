"""Fold constant causal attention masks into scaled_dot_product_attention(is_causal=True).

HF transformers materialises a causal mask whenever it is traced by torch.export, even when the
caller passes no attention_mask; an explicit attn_mask rules out the flash-attention kernel on GPU.
A mask computed from constants only (no user input, no parameter) is evaluated once on CPU; if it
is the causal tril (bool, or additive 0/-inf) in every slice it is replaced by is_causal=True, and
a mask that masks nothing is dropped. Other masks are left as they are.
"""
from __future__ import annotations

import itertools
import logging

import torch
import torch.fx

from partitioner.passes.constants import constant_ancestors, constant_value, val

log = logging.getLogger(__name__)

# how a captured graph calls scaled_dot_product_attention (torch.export: aten; symbolic_trace: functional)
SDPA_TARGETS = (torch.ops.aten.scaled_dot_product_attention.default, torch.nn.functional.scaled_dot_product_attention)


def fold_causal_masks(gm: torch.fx.GraphModule) -> int:
    """Rewrite every SDPA call of `gm` whose constant attn_mask is causal (or all-pass); returns their count."""
    verdicts: dict[tuple, str | None] = {}
    dropped: list[torch.fx.Node] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
        if not isinstance(mask, torch.fx.Node) or causal is not False:
            continue
        q, k = (val(a) for a in args[:2])
        if q is None or k is None or not all(isinstance(d, int) for d in (*q.shape, *k.shape)):
            continue
        scores = (*q.shape[:-2], q.shape[-2], k.shape[-2])
        key = (mask, scores)
        if key not in verdicts:
            verdicts[key] = _classify(constant_value(gm, mask), scores)
        kind = verdicts[key]
        if kind is None:
            continue
        if len(args) > 3:
            args[3] = None
        else:
            del kwargs["attn_mask"]
        if kind == "causal":
            if len(args) > 5:
                args[5] = True
            else:
                kwargs["is_causal"] = True
        if len(args) == 4:  # the mask was the last positional argument
            args.pop()
        node.args, node.kwargs = tuple(args), kwargs
        dropped.append(mask)
    if dropped:
        _erase_unused_ancestors(gm, dropped)
        gm.recompile()
        log.debug("folded %d constant attention masks", len(dropped))
    return len(dropped)


def _erase_unused_ancestors(gm: torch.fx.GraphModule, masks: list[torch.fx.Node]) -> None:
    """Erase the dropped masks and the nodes they were computed from that nothing else reads."""
    doomed: set[torch.fx.Node] = set()
    for mask in masks:
        doomed.update(constant_ancestors(mask) or ())
    for node in reversed(list(gm.graph.nodes)):
        if node in doomed and not node.users:
            gm.graph.erase_node(node)


def _classify(mask: torch.Tensor | None, scores: tuple[int, ...]) -> str | None:
    """"causal" if every [L, S] slice of `mask` broadcast to `scores` is the causal tril, "full" if it
    masks nothing, else None. Slices are compared one at a time; broadcast dims are visited once."""
    if mask is None or not (mask.dtype == torch.bool or mask.is_floating_point()):
        return None
    try:
        if torch.broadcast_shapes(mask.shape, scores) != torch.Size(scores):
            return None
    except RuntimeError:
        return None
    L, S = scores[-2:]
    while mask.dim() < 2:
        mask = mask.unsqueeze(0)
    mask = mask.expand(*mask.shape[:-2], L, S)
    tril = torch.ones(L, S, dtype=torch.bool).tril()
    lead = [range(1 if st == 0 else n) for n, st in zip(mask.shape[:-2], mask.stride()[:-2])]
    kinds: set[str] = set()
    for idx in itertools.product(*lead):
        sl = mask[idx]
        if mask.dtype == torch.bool:
            passes, blocked = sl, ~sl
        else:
            passes, blocked = sl == 0, sl <= torch.finfo(mask.dtype).min / 2
        if bool(passes.all()):
            kinds.add("full")
        elif torch.equal(passes, tril) and bool((blocked | tril).all()):
            kinds.add("causal")
        else:
            return None
        if len(kinds) > 1:
            return None
    return kinds.pop() if kinds else None
