"""Train and eval mode of a ParallelModel: one captured graph per mode.

A captured graph cannot switch modes: torch.export bakes `module.training` into
it (dropout becomes `aten.dropout(x, p, train)`, SDPA gets `dropout_p`, batch
norm picks its training or inference op, Python `if self.training:` branches
are resolved at capture). So the other mode is captured once, lazily, on the
first switch: the original model is traced again in that mode (on FakeTensors:
no weights are copied), split with the same plan (node names matched by op and
module along the topological order, since the graphs differ by a few nodes),
and its stages read the very same parameter and buffer tensors as the first
mode's, so optimizer steps and loaded checkpoints apply to both.
"""
from __future__ import annotations

import copy
import difflib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from partitioner.errors import RuntimeConfigError
from partitioner.plan import Plan
from partitioner.plan_model import capture_for_training
from partitioner.passes.capture import Captured, get_attr, set_attr
from partitioner.passes.split import StageModule, place_on_device, split
from partitioner.runtime.comm_plan import build_comm_plan, forward_only
from partitioner.runtime.compiled import compile_stages, uses_cudagraphs
from partitioner.runtime.executor import Executor, in_process_order
from partitioner.runtime.transport import DistTransport, InProcessTransport

if TYPE_CHECKING:
    from partitioner.parallel_model import ParallelModel


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters and buffers are on the meta device (tied ones still
    tied): enough to capture it again, without keeping the user's weights alive. The model itself
    if it cannot be deep-copied (said once)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        meta = t.detach().to("meta")
        memo[id(t)] = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    try:
        return copy.deepcopy(model, memo)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"ParallelModel keeps a reference to the {type(model).__name__} it was compiled from (to "
                      f"capture it in the other train/eval mode), as it cannot be deep-copied onto the meta "
                      f"device ({type(err).__name__}: {err}); its weights stay in memory.", stacklevel=3)
        return model


@dataclass
class ModeSource:
    """How compile_parallel captured and compiled the model: what capturing it again needs
    (`model`: its meta_skeleton)."""

    model: torch.nn.Module
    args: tuple
    kwargs: dict
    loss_fn: Callable[[Any, Any], torch.Tensor]
    mixed_precision: str | None = None
    compile_options: dict | None = None
    timeout_s: float = 300.0
    check_loss: Callable[[Callable, Callable], Callable] | None = None  # wraps the loss as compile_parallel


@dataclass
class ModeGraphs:
    """What one mode runs: its captured graph, stages and executor."""

    captured: Captured
    stages: list[StageModule]
    executor: Executor


def build_mode(pm: "ParallelModel", training: bool) -> ModeGraphs:
    """Capture pm's model in `training` mode, split it like pm.plan, share pm's tensors, compile
    the stages as compile_parallel did."""
    source = pm.source
    if source is None:
        raise RuntimeConfigError("ParallelModel.train/eval: this ParallelModel keeps no reference to its model, "
                                 "so it cannot capture the other mode; build it with compile_parallel.")
    model = source.model
    was = model.training
    model.train(training)
    try:
        captured = capture_for_training(model, source.args, source.kwargs, source.mixed_precision)
    finally:
        model.train(was)
    stages = split(captured, plan_like(captured, pm.captured, pm.plan))
    local_ranks = list(range(pm.plan.num_ranks)) if pm.rank is None else [pm.rank]
    if pm.data_parallel is not None:
        # FSDP2 swaps the compiled mode's parameters between sharded and gathered ones; the gathered
        # tensors are kept (their storage freed when resharded), so this mode reads those and runs
        # between unshard() and reshard() (ParallelModel.forward)
        pm.data_parallel.unshard()
    tensor_of = {(fqn, st.rank): get_attr(st.graph_module, fqn) for st in pm.stages if st.rank in local_ranks
                 for fqn in [*st.params, *st.buffers]}
    if pm.data_parallel is not None:
        pm.data_parallel.reshard()
    stage_device = {st.stage: pm.devices[st.rank] for st in stages}
    for st in stages:
        if st.rank in local_ranks:
            for fqn in [*st.params, *st.buffers]:
                if (fqn, st.rank) not in tensor_of:  # read in this mode only: a constant of the new capture
                    src = get_attr(captured.graph_module, fqn)
                    if src.device.type == "meta":
                        raise RuntimeConfigError(f"ParallelModel.{'train' if training else 'eval'}: '{fqn}' is read "
                                                 "only in this mode and is on the meta device; materialise it.")
                    tensor_of[(fqn, st.rank)] = src.detach().to(stage_device[st.stage])
                set_attr(st.graph_module, fqn, tensor_of[(fqn, st.rank)])
        place_on_device(st, stage_device[st.stage])
    sched = pm.executor.schedule
    local = [st.stage for st in stages if st.rank in local_ranks]
    if pm.rank is None:
        transport: Any = InProcessTransport(stage_device)
        order, inference_order = in_process_order(sched), in_process_order(forward_only(sched))
    else:
        channels = list(build_comm_plan(stages, sched).channels)
        transport = DistTransport(pm.rank, pm.devices[pm.rank], channels, timeout_s=source.timeout_s,
                                  replicas=pm.layout.replicas, replica=pm.layout.dp_rank,
                                  hold_sends=uses_cudagraphs(source.compile_options))
        order, inference_order = list(sched.actions[pm.rank]), list(forward_only(sched).actions[pm.rank])
    calls = compile_stages({k: stages[k].graph_module for k in local}, source.loss_fn, source.compile_options,
                           last=len(stages) - 1, unflatten=captured.unflatten_outputs, check=source.check_loss)
    executor = Executor(stages, local, sched, transport, calls.loss, captured.unflatten_outputs, stage_device,
                        order, inference_order, calls.runners, stage_loss=calls.stage_loss,
                        cudagraph_steps=calls.cudagraph_steps,
                        foreach_grads=calls.gradients_at_once and pm.data_parallel is None)
    return ModeGraphs(captured, stages, executor)


def plan_like(captured: Captured, planned: Captured, plan: Plan) -> Plan:
    """`plan` carried over to another capture of the same model: compute nodes are matched along
    the topological order by (op, owning module); a node of `captured` with no match joins the
    stage of the node before it, and no node comes before the stages of its inputs."""
    def compute(c: Captured) -> list[torch.fx.Node]:
        return [n for n in c.graph_module.graph.nodes if n.op in ("call_function", "call_method", "call_module")]

    def key(n: torch.fx.Node) -> str:
        stack = n.meta.get("nn_module_stack") or {}
        return f"{n.target}@{list(stack.values())[-1][0] if stack else ''}"

    old, new = compute(planned), compute(captured)
    matcher = difflib.SequenceMatcher(None, [key(n) for n in old], [key(n) for n in new], autojunk=False)
    match = {}
    for block in matcher.get_matching_blocks():
        for i in range(block.size):
            match[block.b + i] = old[block.a + i]
    stage_of: dict[torch.fx.Node, int] = {}
    prev = 0
    for j, n in enumerate(new):
        k = plan.node_stage[match[j].name] if j in match and match[j].name in plan.node_stage else prev
        k = max([k, *(stage_of[i] for i in n.all_input_nodes if i in stage_of)])
        stage_of[n] = prev = k
    return plan.replace(node_stage={n.name: k for n, k in stage_of.items()})


