"""Values a captured graph computes from constants alone, evaluated once on the CPU.

Positions, causal masks and relative position buckets are built from aranges and arithmetic on
literals (and on constant buffers): their values do not depend on the inputs or the weights, so
passes may read them to rewrite the graph (causal_mask.py, onehot_lookup.py) and cost models to
price what they feed (cost_models/contention.py).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from partitioner.passes.graph_nodes import get_attr, mutates

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")


def val(node: Any) -> Any:
    """The node's meta["val"] (a FakeTensor or a Python value); None for a non-node."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def constant_ancestors(node: torch.fx.Node, allow_writes: bool = False) -> list[torch.fx.Node] | None:
    """The nodes `node` is computed from (itself included), in graph order; None if one of them is
    not a pure computation on constants (an input, a random draw, an in-place write).

    allow_writes: in-place writes among those nodes are part of the computation (T5 adds into its
    bucket tensor in place) and run in graph order; a write by another node that comes before
    `node` still makes it not constant. Only for reading the value: erasing such nodes is unsafe.
    """
    seen: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        writes = mutates(n) or any(mutates(u) for u in n.users)
        if n.op not in ("call_function", "call_method", "get_attr") or _impure(n) or (writes and not allow_writes):
            return None
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    if allow_writes and any(mutates(u) and u not in seen and order[u] < order[node] for n in seen for u in n.users):
        return None
    return sorted(seen, key=order.__getitem__)


def _impure(node: torch.fx.Node) -> bool:
    """Draws random numbers or has other side effects: its value is not a constant of the graph."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags:
        return True
    return node.op == "call_function" and node.is_impure() and not mutates(node)


def constant_value(gm: torch.fx.GraphModule, node: torch.fx.Node, allow_writes: bool = False) -> torch.Tensor | None:
    """The value of `node` computed on the CPU; None if it depends on an input or a parameter, reads a
    buffer without data (meta, or a FakeTensor), would need more than half the free host memory, or fails.
    allow_writes: as constant_ancestors (the buffers read are copied first: writes stay here)."""
    nodes = constant_ancestors(node, allow_writes)
    if nodes is None:
        return None
    need = sum(v.numel() * v.element_size() for v in map(val, nodes) if isinstance(v, torch.Tensor))
    if need > _free_bytes() // 2:  # at most what the nodes produce; a huge context must not exhaust the host
        log.warning("constant %s (%.1f GiB to evaluate) not evaluated: not enough free memory", node.name, need / 2**30)
        return None
    last_use = {a: n for n in nodes for a in n.all_input_nodes}
    env: dict[torch.fx.Node, Any] = {}
    try:
        for n in nodes:
            if n.op == "get_attr":
                value = get_attr(gm, n.target)
                if isinstance(value, torch.nn.Parameter) or (isinstance(value, torch.Tensor) and (
                        value.is_meta or isinstance(value, FakeTensor))):
                    return None  # trainable, loaded later, or without data (modes.fake_skeleton's buffers)
                env[n] = value.to(_CPU, copy=allow_writes) if isinstance(value, torch.Tensor) else value
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
                if last_use[a] is n and a is not node:
                    del env[a]
    except Exception as err:  # noqa: BLE001 (a value we cannot evaluate is left alone)
        log.debug("constant %s not evaluated: %s", node.name, err)
        return None
    value, ref = env.get(node), val(node)
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
