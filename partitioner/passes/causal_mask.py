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
import os
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from partitioner.passes.capture import get_attr, mutates

log = logging.getLogger(__name__)

_SDPA = (torch.ops.aten.scaled_dot_product_attention.default, torch.nn.functional.scaled_dot_product_attention)
_CPU = torch.device("cpu")


def fold_causal_masks(gm: torch.fx.GraphModule) -> int:
    """Rewrite every SDPA call of `gm` whose constant attn_mask is causal (or all-pass); returns their count."""
    verdicts: dict[tuple, str | None] = {}
    dropped: list[torch.fx.Node] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
        if not isinstance(mask, torch.fx.Node) or causal is not False:
            continue
        q, k = (_val(a) for a in args[:2])
        if q is None or k is None or not all(isinstance(d, int) for d in (*q.shape, *k.shape)):
            continue
        scores = (*q.shape[:-2], q.shape[-2], k.shape[-2])
        key = (mask, scores)
        if key not in verdicts:
            verdicts[key] = _classify(_evaluate(gm, mask), scores)
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
        doomed.update(_ancestors(mask) or ())
    for node in reversed(list(gm.graph.nodes)):
        if node in doomed and not node.users:
            gm.graph.erase_node(node)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _ancestors(mask: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The nodes `mask` is computed from, in graph order; None if one is not a pure constant computation."""
    seen: set[torch.fx.Node] = set()
    stack = [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op not in ("call_function", "call_method", "get_attr") or _impure(n) or any(mutates(u) for u in n.users):
            return None
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _impure(node: torch.fx.Node) -> bool:
    """Draws random numbers or has other side effects: its value is not a constant of the graph."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags:
        return True
    return mutates(node) or (node.op == "call_function" and node.is_impure())


def _evaluate(gm: torch.fx.GraphModule, mask: torch.fx.Node) -> torch.Tensor | None:
    """The value of `mask`, computed on CPU; None if it depends on an input or a parameter, or fails."""
    nodes = _ancestors(mask)
    if nodes is None:
        return None
    need = sum(v.numel() * v.element_size() for v in map(_val, nodes) if isinstance(v, torch.Tensor))
    if need > _free_bytes() // 2:  # at most what the nodes produce; a huge context must not exhaust the host
        log.warning("attention mask %s (%.1f GiB to evaluate) left unfolded: not enough free memory",
                    mask.name, need / 2**30)
        return None
    last_use = {a: n for n in nodes for a in n.all_input_nodes}
    env: dict[torch.fx.Node, Any] = {}
    try:
        for n in nodes:
            if n.op == "get_attr":
                value = get_attr(gm, n.target)
                if isinstance(value, torch.nn.Parameter) or (isinstance(value, torch.Tensor) and value.is_meta):
                    return None  # trainable, loaded later, or without data
                env[n] = value.to(_CPU) if isinstance(value, torch.Tensor) else value
                continue
            # on CPU whatever the device traced on (meta, cuda): a constant's values do not depend on it
            args, kwargs = pytree.tree_map(
                lambda a: env[a] if isinstance(a, torch.fx.Node) else _CPU if isinstance(a, torch.device) else a,
                (tuple(n.args), dict(n.kwargs)))
            if "device" in kwargs:
                kwargs["device"] = _CPU
            if n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                env[n] = n.target(*args, **kwargs)
            for a in n.all_input_nodes:  # free intermediates (a long-context mask is large)
                if last_use[a] is n and a is not mask:
                    del env[a]
    except Exception as err:  # noqa: BLE001 (a mask we cannot evaluate is left alone)
        log.debug("attention mask %s not evaluated: %s", mask.name, err)
        return None
    value, ref = env.get(mask), _val(mask)
    if not isinstance(value, torch.Tensor):
        return None
    if isinstance(ref, torch.Tensor) and (tuple(ref.shape) != tuple(value.shape) or ref.dtype != value.dtype):
        return None
    return value


def _free_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: no limit
        return 1 << 62


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
