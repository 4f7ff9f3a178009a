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

A parameter or buffer written in forward (a step counter, an EMA) is state every microbatch writes:
`snapshot_state_reads` has its readers after a write read a copy taken there, its reads and writes
share a stage (`stage_mates`), and a value whose memory is written later is sent as a copy taken
where it is computed (`sent_as_copies`).
"""
from __future__ import annotations

import torch
import torch.fx

from partitioner.passes.graph_nodes import get_attr, is_view, mutates, provenance, written_values


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
    through (`copy_(slice(buf), h)` -> the slice: else the write lands in a copy of the view), the
    writes an `after_write` follows (else the written tensor would leave its stage without them),
    and for a node that reads a parameter or buffer written in forward, the writes into it (the
    state lives on one stage: a read on another would see another microbatch's value, or under
    torchrun a copy that is never written)."""
    if node.op == "call_function" and node.target is after_write:
        mates = [w for w in node.args[1:] if isinstance(w, torch.fx.Node)]
    elif mutates(node):
        mates = [v for v in written_values(node) if is_view(v)]
    else:
        mates = []
    for state in node.all_input_nodes:
        if state.op == "get_attr":
            mates += [w for w in _writes_into(state) if w is not node and w not in mates]
    return tuple(m.name for m in mates)


def _writes_into(state: torch.fx.Node) -> list[torch.fx.Node]:
    """The in-place ops that write into `state` (a get_attr node), directly or through its views."""
    writes, frontier = [], [state]
    while frontier:
        value = frontier.pop()
        for user in value.users:
            if mutates(user) and value in written_values(user) and user not in writes:
                writes.append(user)
            elif is_view(user) and user.args[0] is value:
                frontier.append(user)
    return writes


def inference_writes_per_call(gm: torch.fx.GraphModule) -> int:
    """For a graph captured in eval mode: a parameter written in forward is written in a copy taken
    at each call, not in the parameter; returns how many parameters it copied.

    An eval forward that writes its weights does so once, guarded by Python state the graph cannot
    hold (RWKV divides its output weights by 2^(layer // rescale_every) on the first eval call, sets
    a flag, and multiplies them back on the first training call). Captured, the write would run on
    every microbatch of every call, compounding; in a copy, every call computes what the model's
    computes and the parameters stay as training leaves them. Buffers keep their writes (state)."""
    graph = gm.graph
    copied = 0
    for state in [n for n in graph.nodes if n.op == "get_attr"]:
        if not isinstance(get_attr(gm, state.target), torch.nn.Parameter):
            continue
        writes = _writes_into(state)
        if not writes:
            continue
        with graph.inserting_after(state):
            copy = graph.call_function(torch.ops.aten.clone.default, (state,))
        val = state.meta.get("val")
        copy.meta = {**provenance(writes[0]), "val": val.clone() if isinstance(val, torch.Tensor) else val}
        state.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
        copied += 1
    if copied:
        graph.lint()
        gm.recompile()
    return copied


def snapshot_state_reads(gm: torch.fx.GraphModule) -> int:
    """Readers of a parameter or buffer after an in-place write into it read a copy taken just after
    the last write before them; returns how many copies it made.

    The model runs a microbatch's forward and backward before the next one's forward writes the
    state again (a step counter, an EMA); a pipeline runs several forwards first. Read as the tensor
    itself, the state would have moved on by the time a later stage reads it or a backward uses it
    (autograd: "modified by an inplace operation"). The copy follows its write (`after_write`), on
    the write's stage; ops that write the state again keep writing the state itself."""
    graph = gm.graph
    for n in list(graph.nodes):  # copy_(buf, add_(buf, 1)), export's record of the write: already done
        if n.target is torch.ops.aten.copy_.default and not n.users and isinstance(n.args[1], torch.fx.Node):
            # under torch.no_grad export records copy_(buf, detach(add_(buf, 1))): a detach is the tensor
            # itself, where copying a real view (buf.t()) into buf would change it
            chain = _alias_chain(n.args[1])
            if chain[-1] is n.args[0] and not any(is_view(a) and a.target not in _SAME_TENSOR for a in chain):
                graph.erase_node(n)
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    written_through = {v for n in nodes if mutates(n) for v in written_values(n)}
    writes_of: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for n in nodes:
        if mutates(n):
            for root in {storage_root(v) for v in written_values(n)}:
                if root.op == "get_attr":
                    writes_of.setdefault(root, []).append(n)
    # the results of in-place ops on a whole state (`add_(buf, 1)` is buf), not on its views
    in_place_results: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for n in nodes:
        if _returns_written(n) is not None:
            chain = _alias_chain(n)
            if chain[-1] in writes_of and not any(is_view(a) for a in chain):
                in_place_results.setdefault(chain[-1], []).append(n)
    copies = 0
    for state, writes in writes_of.items():
        aliases = [state, *in_place_results.get(state, [])]
        snapshot: dict[torch.fx.Node, torch.fx.Node] = {}
        for alias in aliases:
            for user in list(alias.users):
                before = [w for w in writes if order[w] < order.get(user, -1)]
                if not before or user in written_through or user.op == "output" or (
                        mutates(user) and any(storage_root(v) is state for v in written_values(user))):
                    continue
                write = before[-1]
                if write not in snapshot:
                    with graph.inserting_after(write):
                        after = graph.call_function(after_write, (state, write))
                    with graph.inserting_after(after):
                        copy = graph.call_function(torch.ops.aten.clone.default, (after,))
                    val = state.meta.get("val")
                    after.meta = {**write.meta, "val": val}
                    copy.meta = {**write.meta, "val": val.clone() if isinstance(val, torch.Tensor) else val}
                    snapshot[write] = copy
                    copies += 1
                user.replace_input_with(alias, snapshot[write])
    if copies:
        graph.lint()
        gm.recompile()
    return copies


_SAME_TENSOR = (torch.ops.aten.detach.default, torch.ops.aten.alias.default)  # views equal to their input


def storage_root(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose tensor `node`'s value lives in: through views, the results of in-place ops
    (`add_(buf, 1)` is buf) and `after_write`."""
    return _alias_chain(node)[-1]


def _alias_chain(node: torch.fx.Node) -> list[torch.fx.Node]:
    """`node`, then each value it aliases in turn, down to the one that owns the memory."""
    chain = [node]
    while True:
        if node.op == "call_function" and node.target is after_write or is_view(node):
            node = node.args[0]
        elif (written := _returns_written(node)) is not None:
            node = written
        else:
            return chain
        chain.append(node)


def _returns_written(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input an in-place op writes and returns (`add_(x, 1)`, `x.mul_(2)`: x); None for other ops
    (batch_norm writes its running statistics but returns a new tensor)."""
    t = node.target
    if node.op == "call_method" and mutates(node):
        return node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or not t._schema.returns:
        return None
    returned = t._schema.returns[0].alias_info
    if returned is None or not returned.is_write:
        return None
    for i, arg in enumerate(t._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.before_set == returned.before_set:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            return value if isinstance(value, torch.fx.Node) else None
    return None


def sent_as_copies(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Values a stage must send as a copy taken where they are computed, not as the tensor itself:
    those whose memory is written after them, by a later op of the graph or, for a parameter or
    buffer, by the next microbatch's forward (which a pipeline may run before a later stage reads
    this microbatch's value, or while a send between processes is in flight)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    last_write: dict[torch.fx.Node, int] = {}
    for n in graph.nodes:
        if mutates(n):
            for v in written_values(n):
                root = storage_root(v)
                last_write[root] = max(last_write.get(root, -1), order[n])
    copies = set()
    for n in graph.nodes:
        if n.op in ("call_function", "call_method", "call_module") and isinstance(n.meta.get("val"), torch.Tensor):
            root = storage_root(n)
            if root in last_write and (root.op == "get_attr" or last_write[root] > order[n]):
                copies.add(n)
    return copies
