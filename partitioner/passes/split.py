"""Split a captured graph into one GraphModule per virtual stage.

Every call node goes to the stage `plan.node_stage` names. A value read by a
later stage is sent straight from its producer to every stage that reads it
(no relaying through the stages in between). Parameters and buffers
(`get_attr` nodes) are copied into every stage that reads them, so a tied
weight used on several stages becomes one replica per stage; the runtime shares
replicas of one rank and sums their gradients across ranks. User inputs are
read directly by every stage that needs them (each rank has the microbatch).
A value whose memory is written after it is computed (by a later in-place op, or
a buffer the next microbatch writes) is sent as a copy taken where it is computed
(passes/writes.py: `sent_as_copies`).
The last stage returns the model's flat output leaves; the runtime rebuilds
the output structure and applies the loss there.

Stage graph modules keep the original FQNs as attribute paths: the parameter
"transformer.h.0.attn.c_attn.weight" of stage 3 is
`stages[3].graph_module.get_parameter("transformer.h.0.attn.c_attn.weight")`.
"""
from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx

from partitioner.errors import PlanError
from partitioner.plan import Placement, Plan
from partitioner.passes.graph_nodes import get_attr, module_named, mutates, written_values
from partitioner.passes.capture_io import Captured, meta_like
from partitioner.passes.annotate import has_runtime_size
from partitioner.passes.writes import sent_as_copies, stage_mates

USER_INPUT = -1  # StageModule.input_sources value of a user input


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a value crossing stages (one microbatch), and whether it carries a gradient."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


@dataclass
class StageModule:
    """One virtual stage: `graph_module(*inputs)` returns a tuple.

    inputs: names of the stage's placeholders, in call order: user inputs
        (input_sources[name] == USER_INPUT, flat index in user_inputs[name]) and
        values produced by earlier stages (input_sources[name] = producing stage).
    outputs: values this stage sends to later stages, in return order;
        output_consumers[name] = the stages that read it (ascending).
    The last stage (is_last) returns the model's flat output leaves instead.
    params / buffers: FQNs of the parameters/buffers the stage reads (attribute paths in graph_module).
    value_meta: shape/dtype/requires_grad of every received and sent value.
    mutated_inputs: inputs the stage modifies in place (the runtime gives it a copy).
    """

    stage: int
    rank: int
    graph_module: torch.fx.GraphModule
    inputs: list[str]
    input_sources: dict[str, int]
    outputs: list[str]
    output_consumers: dict[str, list[int]]
    is_last: bool
    user_inputs: dict[str, int] = field(default_factory=dict)
    params: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    value_meta: dict[str, TensorMeta] = field(default_factory=dict)
    mutated_inputs: set[str] = field(default_factory=set)

    def received(self) -> list[str]:
        """Inputs that come from earlier stages (not user inputs), in call order."""
        return [n for n in self.inputs if self.input_sources[n] != USER_INPUT]


def split(captured: Captured, plan: Plan, loss_reads: Collection[int] | None = None) -> list[StageModule]:
    """Cut `captured.graph_module` into plan.num_stages stage modules (see module docstring).
    loss_reads: the flat outputs the loss takes a gradient through (outputs_the_loss_reads; None: all):
    a value that reaches none of them sends no gradient back across a stage boundary."""
    gm = captured.graph_module
    graph = gm.graph
    num_stages = plan.num_stages
    last = num_stages - 1
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    flat_outputs = captured.output_leaves()

    stage_of = _node_stages(nodes, plan)
    _check_order(nodes, stage_of)
    grad = _requires_grad(nodes, gm, flat_outputs if loss_reads is None else
                          [x for i, x in enumerate(flat_outputs) if i in loss_reads])

    # which stages read each node (the last stage reads every output leaf)
    readers: dict[torch.fx.Node, set[int]] = {n: set() for n in nodes}
    for n in nodes:
        if n.op in ("call_function", "call_method", "call_module"):
            for inp in n.all_input_nodes:
                readers[inp].add(stage_of[n])
    for leaf in flat_outputs:
        if isinstance(leaf, torch.fx.Node):
            readers[leaf].add(last)

    consumers: dict[torch.fx.Node, list[int]] = {}
    for n in nodes:
        if n in stage_of:
            later = sorted(s for s in readers[n] if s != stage_of[n])
            if later:
                _check_sendable(n, stage_of[n], later)
                consumers[n] = later

    user_index = {name: i for i, name in enumerate(captured.input_names)}
    copied = sent_as_copies(graph)
    stages = []
    for k in range(num_stages):
        own = [n for n in nodes if stage_of.get(n) == k]
        needed = {inp for n in own for inp in n.all_input_nodes}
        if k == last:
            needed |= {leaf for leaf in flat_outputs if isinstance(leaf, torch.fx.Node)}
        attrs = sorted((n for n in needed if n.op == "get_attr"), key=order.__getitem__)
        ins = sorted((n for n in needed if n.op == "placeholder" or stage_of.get(n, k) < k), key=order.__getitem__)

        new = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        sources: dict[str, int] = {}
        meta: dict[str, TensorMeta] = {}
        for n in ins:
            env[n] = new.placeholder(n.name)
            env[n].meta = dict(n.meta)
            if n.op == "placeholder":
                sources[n.name] = USER_INPUT
            else:
                sources[n.name] = stage_of[n]
                meta[n.name] = _meta(n, grad[n])
        for n in attrs:
            env[n] = new.get_attr(n.target)
            env[n].meta = dict(n.meta)
        sent_value: dict[torch.fx.Node, torch.fx.Node] = {}
        for n in own:
            env[n] = new.node_copy(n, env.__getitem__)
            sent_value[n] = env[n]
            if n in consumers and n in copied:  # a copy taken now: a later write would change the tensor
                sent_value[n] = new.call_function(torch.ops.aten.clone.default, (env[n],))
                sent_value[n].meta = dict(n.meta)
        if k == last:
            sent: list[torch.fx.Node] = []
            new.output(tuple(env[x] if isinstance(x, torch.fx.Node) else x for x in flat_outputs))
        else:
            sent = [n for n in own if n in consumers]
            new.output(tuple(sent_value[n] for n in sent))
            for n in sent:
                meta[n.name] = _meta(n, grad[n])
        stage_gm = torch.fx.GraphModule(gm, new, class_name=f"Stage{k}")
        params = [n.target for n in attrs if isinstance(get_attr(gm, n.target), torch.nn.Parameter)]
        stages.append(StageModule(
            stage=k, rank=plan.stage_rank[k], graph_module=stage_gm,
            inputs=[n.name for n in ins], input_sources=sources,
            outputs=[n.name for n in sent], output_consumers={n.name: consumers[n] for n in sent},
            is_last=k == last,
            user_inputs={n.name: user_index[n.name] for n in ins if n.op == "placeholder"},
            params=params, buffers=[n.target for n in attrs if n.target not in params
                                    and isinstance(get_attr(gm, n.target), torch.Tensor)],  # not a TreeSpec
            value_meta=meta, mutated_inputs=_mutated(own, set(ins))))
    return stages


def _node_stages(nodes: list[torch.fx.Node], plan: Plan) -> dict[torch.fx.Node, int]:
    """Stage of every compute node; placeholders and get_attr nodes go wherever they are read."""
    stage_of = {}
    for n in nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        if n.name not in plan.node_stage:
            raise PlanError(f"split: node '{n.name}' ({n.target}) has no stage in the plan; the plan was made "
                            "for another graph. Plan again for this model and these example inputs.")
        k = plan.node_stage[n.name]
        if not 0 <= k < plan.num_stages:
            raise PlanError(f"split: node '{n.name}' is put on stage {k}, but the plan has stages "
                            f"0..{plan.num_stages - 1}. Fix node_stage or stage_rank.")
        stage_of[n] = k
    return stage_of


def _check_order(nodes: list[torch.fx.Node], stage_of: dict[torch.fx.Node, int]) -> None:
    names = {n.name: n for n in nodes}
    for n in nodes:
        for mate in stage_mates(n):
            if stage_of.get(names[mate]) != stage_of.get(n):
                raise PlanError(f"split: node '{n.name}' ({n.target}) on stage {stage_of.get(n)} and '{mate}' on stage "
                                f"{stage_of.get(names[mate])} belong together (an in-place write, the view it writes "
                                "through and the reads after it, passes/writes.py); put them on one stage "
                                "(passes.split.valid_cuts never separates them).")
        for inp in n.all_input_nodes:
            if n in stage_of and inp in stage_of and stage_of[inp] > stage_of[n]:
                raise PlanError(f"split: node '{n.name}' on stage {stage_of[n]} reads '{inp.name}' from the later "
                                f"stage {stage_of[inp]}; stages must follow the data flow (stage(u) <= stage(v) "
                                "along every edge).")


def _check_sendable(n: torch.fx.Node, stage: int, later: list[int]) -> None:
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise PlanError(f"split: node '{n.name}' ({n.target}) on stage {stage} is read by stage(s) {later}, but its "
                        f"value is a {type(val).__name__}, not a tensor; only tensors cross stages. Move the cut so "
                        f"'{n.name}' and its readers share a stage.")


# ops whose output carries no gradient back to their input although both are floating point
_NO_GRAD_THROUGH = {torch.ops.aten.detach.default, torch.Tensor.detach, "detach"}


def _requires_grad(nodes: list[torch.fx.Node], gm: torch.fx.GraphModule,
                   flat_outputs: Any = ()) -> dict[torch.fx.Node, bool]:
    """Static: a value carries a gradient if it is floating point, depends on a trainable parameter and
    a gradient can flow back into it: it is an output leaf or a differentiable reader carries one.
    (A float value read only by argmax/detach gets no gradient in the model: its producer's parameters
    keep .grad None, so the stage boundary must not send a zero gradient back for it.)"""
    grad: dict[torch.fx.Node, bool] = {}
    for n in nodes:
        if n.op == "get_attr":
            attr = get_attr(gm, n.target)
            dep = isinstance(attr, torch.nn.Parameter) and attr.requires_grad
        else:
            dep = any(grad.get(i, False) for i in n.all_input_nodes)
        val = n.meta.get("val")
        grad[n] = dep and (not isinstance(val, torch.Tensor) or val.is_floating_point() or val.is_complex())
    outputs = {x for x in flat_outputs if isinstance(x, torch.fx.Node)}
    for n in reversed(nodes):
        if grad[n] and n.op != "get_attr" and n not in outputs:
            grad[n] = any(grad.get(u, False) and u.target not in _NO_GRAD_THROUGH for u in n.users
                          if u.op != "output")
    return grad


def outputs_the_loss_reads(loss_fn: Callable[[Any, Any], Any], captured: Captured, target: Any
                           ) -> frozenset[int] | None:
    """Indices of the flat output leaves loss_fn(output, target) takes a gradient through, read by
    running it on meta tensors shaped like the outputs and the target (None where that fails: every
    output then counts as read). An output the loss ignores (an auxiliary head's) then sends no
    gradient back across a stage boundary, so the parameters that feed only it keep .grad None, as
    in the model, rather than a zero gradient that weight decay and momentum would act on."""
    leaves = captured.meta_outputs()
    wrt = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in wrt:
                leaves[i].requires_grad_()
            loss = loss_fn(captured.unflatten_outputs(leaves), meta_like(target))
            grads = torch.autograd.grad(loss, [leaves[i] for i in wrt], allow_unused=True)
    except Exception:  # noqa: BLE001 - a loss that cannot run on meta tensors (data-dependent, needs values)
        return None
    return frozenset(i for i, g in zip(wrt, grads) if g is not None)


def _meta(n: torch.fx.Node, requires_grad: bool) -> TensorMeta:
    val = n.meta["val"]
    if any(isinstance(s, torch.SymInt) for s in val.shape):
        raise PlanError(f"split: node '{n.name}' ({n.target}, in {module_named(n)}) crosses a stage boundary with a shape "
                        f"that depends on data ({tuple(val.shape)}: rows selected by a mask or routed by a mixture "
                        "of experts), which a receiving stage cannot know in advance. Plan with a cut elsewhere "
                        "(e.g. between layers), or make that shape static inside the model.")
    return TensorMeta(tuple(int(s) for s in val.shape), val.dtype, requires_grad)


def _mutated(own: list[torch.fx.Node], inputs: set[torch.fx.Node]) -> set[str]:
    """Inputs written in place by an op of the stage, directly or through a view (aten.relu_ on a
    received activation, `buf[:, 1:] = h` on a received buf)."""
    return {v.name for n in own if mutates(n) for v in written_values(n) if v in inputs}


# ---------------------------------------------------------------------- plans by cutting the node order

_COMPUTE = ("call_function", "call_method", "call_module")


def valid_cuts(captured: Captured) -> list[int]:
    """Positions i (1..n-1) in the topological order of the n compute nodes where cutting before
    node i sends only tensors of a size known in advance across (no tuple, python value or
    data-dependent shape is read on both sides) and no in-place write is cut from a view it writes
    through."""
    compute = [n for n in captured.graph_module.graph.nodes if n.op in _COMPUTE]
    index = {n: i for i, n in enumerate(compute)}
    blocked = [0] * (len(compute) + 2)  # +1 at the first blocked cut, -1 after the last
    for i, n in enumerate(compute):
        if not isinstance(n.meta.get("val"), torch.Tensor) or has_runtime_size(n.meta.get("val")):
            last = max((index.get(u, len(compute)) for u in n.users), default=i)
            blocked[i + 1] += 1
            blocked[min(last, len(compute) - 1) + 1] -= 1
    names = {n.name: i for i, n in enumerate(compute)}
    for i, n in enumerate(compute):
        for mate in stage_mates(n):
            lo, hi = sorted((names[mate], i))
            blocked[lo + 1] += 1
            blocked[hi + 1] -= 1
    cuts, depth = [], 0
    for i in range(1, len(compute)):
        depth += blocked[i]
        if depth == 0:
            cuts.append(i)
    return cuts


def plan_from_cuts(captured: Captured, cuts: list[int], num_ranks: int, chunks: int = 1,
                   schedule: str = "1f1b", microbatches: int = 1, method: str = "cuts") -> Plan:
    """A Plan whose stage k holds compute nodes cuts[k-1]..cuts[k]-1 of the topological order;
    stage k on rank k % num_ranks. len(cuts) must be num_ranks * chunks - 1."""
    compute = [n for n in captured.graph_module.graph.nodes if n.op in _COMPUTE]
    num_stages = num_ranks * chunks
    if len(cuts) != num_stages - 1 or list(cuts) != sorted(cuts):
        raise PlanError(f"plan_from_cuts: need {num_stages - 1} increasing cut positions for {num_stages} stages, "
                        f"got {list(cuts)}.")
    bounds = [0, *cuts, len(compute)]
    node_stage = {n.name: k for k in range(num_stages) for n in compute[bounds[k]:bounds[k + 1]]}
    return Plan(Placement(num_ranks=num_ranks, chunks=chunks, schedule=schedule, microbatches=microbatches,
                          block_stage=[], stage_rank=[k % num_ranks for k in range(num_stages)],
                          node_stage=node_stage, method=method))


def even_plan(captured: Captured, num_ranks: int, chunks: int = 1, schedule: str = "1f1b",
              microbatches: int = 1) -> Plan:
    """Compute nodes cut into num_ranks * chunks runs of about equal length, each cut moved to the
    nearest position where only tensors cross. A fallback and test helper, not a planner."""
    n = sum(1 for node in captured.graph_module.graph.nodes if node.op in _COMPUTE)
    num_stages = num_ranks * chunks
    valid = valid_cuts(captured)
    cuts: list[int] = []
    for j in range(1, num_stages):
        left = len(valid) - (num_stages - 1 - j)  # leave enough cuts for the stages after this one
        options = [c for c in valid[:left] if not cuts or c > cuts[-1]]
        if not options:
            raise PlanError(f"even_plan: the graph has only {len(valid)} places to cut between tensors; "
                            f"it cannot be split into {num_stages} stages. Use fewer ranks or chunks.")
        cuts.append(min(options, key=lambda c: abs(c - round(j * n / num_stages))))
    return plan_from_cuts(captured, cuts, num_ranks, chunks, schedule, microbatches, method="uniform")


def place_on_device(stage: StageModule, device: torch.device) -> None:
    """Point every device argument baked into the stage's graph at `device`.

    torch.export records the device of tensors created inside the model (e.g.
    GPT-2's `arange(..., device=cpu)` for position ids, Llama's rotary table moved
    with `.to(device)`) as a constant; a stage run on another device than the model
    was captured on must create and move them there.
    """
    gm = stage.graph_module
    changed = False
    for node in gm.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device) and node.kwargs["device"] != device:
            node.update_kwarg("device", device)
            changed = True
        for i, arg in enumerate(node.args):  # aten.to.device(x, device, dtype): the device is positional
            if isinstance(arg, torch.device) and arg != device:
                node.update_arg(i, device)
                changed = True
    if changed:
        gm.recompile()
