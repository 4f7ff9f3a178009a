"""Order in-place writes in the data flow: a tensor's readers after a write read it through the write.

A captured graph keeps in-place writes into values it computed, e.g. HF T5's and BART's shift of
`labels` into decoder inputs (`shifted[..., 1:] = labels[..., :-1]`). Their readers depend on the
write only through the tensor's identity, not through an edge of the graph, so a split into stages
could run the write on a stage after the one that sends the tensor on, and no gradient would flow
back through it. `order_writes` gives every later reader an edge through the write: it reads
`after_write(x, write)` (which returns x) instead of x. A split keeps a write with the views it
writes through and with its `after_write` (`stage_mates`); stages then follow the write like any
value, the tensor's gradient flows back through the write's stage, and a stage that receives a
tensor it writes into clones it first (passes/split.py: `StageModule.mutated_inputs`).
"""
from __future__ import annotations

import torch
import torch.fx

from partitioner.passes.capture import is_view, mutates, written_values


def after_write(value: torch.Tensor, *writes: object) -> torch.Tensor:
    """`value` once `writes` (the in-place ops that wrote into it) have run."""
    return value


def order_writes(gm: torch.fx.GraphModule) -> int:
    """Route the readers of every tensor written in place (not a parameter or buffer: those stay with
    their module's stage) after the write through `after_write`; returns how many writes it ordered."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    ordered = 0
    for write in [n for n in graph.nodes if mutates(n)]:
        for value in written_values(write):
            if value.op == "get_attr":
                continue
            later = [u for u in value.users if order.get(u, -1) > order[write]]
            if not later:
                continue
            with graph.inserting_after(write):
                after = graph.call_function(after_write, (value, write))
            after.meta = {**write.meta, "val": value.meta.get("val")}
            order[after] = order[write]  # readers of `after` come later still: they may be ordered again
            for user in later:
                user.replace_input_with(value, after)
            ordered += 1
    if ordered:
        graph.lint()
        gm.recompile()
    return ordered


def stage_mates(node: torch.fx.Node) -> tuple[str, ...]:
    """Names of the nodes a split must keep on `node`'s stage: the views an in-place write goes
    through (`copy_(slice(buf), h)` -> the slice: else the write lands in a copy of the view), and
    the writes an `after_write` follows (else the written tensor would leave its stage without them)."""
    if node.op == "call_function" and node.target is after_write:
        return tuple(w.name for w in node.args[1:] if isinstance(w, torch.fx.Node))
    if not mutates(node):
        return ()
    return tuple(v.name for v in written_values(node) if is_view(v))
