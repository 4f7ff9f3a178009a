"""Train and eval mode of a ParallelModel: one captured graph per mode.

A captured graph cannot switch modes: torch.export bakes `module.training` into
it (dropout becomes `aten.dropout(x, p, train)`, SDPA gets `dropout_p`, batch
norm picks its training or inference op, Python `if self.training:` branches
are resolved at capture). So the other mode is captured once, lazily, on the
first switch: the original model is traced again in that mode (on FakeTensors
that keep its weights' devices, as the first capture: no weights are kept),
split with the same plan (node names matched by op and module along the
topological order, since the graphs differ by a few nodes; each parameter read
on a rank that holds it), and its stages read the very same parameter and
buffer tensors as the first mode's, so optimizer steps and loaded checkpoints
apply to both.
"""
from __future__ import annotations

import copy
import difflib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from partitioner.errors import RuntimeConfigError
from partitioner.plan import Plan
from partitioner.plan_model import capture_for_training
from partitioner.passes.graph_nodes import get_attr, mutates, set_attr, written_values
from partitioner.passes.capture_io import Captured
from partitioner.passes.split import StageModule, place_on_device, split
from partitioner.passes.writes import stage_mates, storage_root
from partitioner.runtime.comm_plan import build_comm_plan
from partitioner.runtime.compiled import compile_stages, uses_cudagraphs
from partitioner.runtime.executor import Executor
from partitioner.runtime.transport import DistTransport, InProcessTransport

if TYPE_CHECKING:
    from partitioner.parallel_model import ParallelModel


def fake_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` to capture it again without keeping its weights alive: its parameters and
    buffers are FakeTensors (no storage) that keep their real device, dtype and tied-ness, so the
    capture takes the paths the first one took (code branching on `x.device`: transformers' MoE
    picks its histogram dtype so). A model built on meta stays on meta, where its first capture
    ran. The model itself if it cannot be deep-copied (said once)."""
    on_meta = any(p.is_meta for p in model.parameters())
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if on_meta:
            meta = t.detach().to("meta")
            memo[id(t)] = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
        else:
            memo[id(t)] = mode.from_tensor(t)  # a Parameter stays one, requires_grad kept
    try:
        return copy.deepcopy(model, memo)
    except Exception as err:  # noqa: BLE001
        warnings.warn(f"ParallelModel keeps a reference to the {type(model).__name__} it was compiled from (to "
                      f"capture it in the other train/eval mode), as it cannot be deep-copied with FakeTensors "
                      f"for its weights ({type(err).__name__}: {err}); its weights stay in memory.", stacklevel=3)
        return model


@dataclass
class ModeSource:
    """How compile_parallel captured and compiled the model: what capturing it again needs
    (`model`: its fake_skeleton)."""

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
        # with grad on, as compile_parallel captures: the graph serves train_step too, and the model takes
        # the path it takes when training (nn.TransformerEncoder's inference fast path, taken under no_grad,
        # cannot be traced anyway)
        with torch.enable_grad():
            captured = capture_for_training(model, source.args, source.kwargs, source.mixed_precision)
    finally:
        model.train(was)
    mode = "train" if training else "eval"
    holders = _holders(pm)
    stages = split(captured, plan_like(captured, pm.captured, pm.plan, holders))
    _check_reads_held(pm, stages, mode, holders)
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
                if (fqn, st.rank) not in tensor_of:
                    tensor_of[(fqn, st.rank)] = _read_elsewhere(pm, captured, st, fqn, stage_device[st.stage], mode,
                                                                holders.get(fqn, []))
                set_attr(st.graph_module, fqn, tensor_of[(fqn, st.rank)])
        place_on_device(st, stage_device[st.stage])
    sched = pm.executor.schedule
    local = [st.stage for st in stages if st.rank in local_ranks]
    if pm.rank is None:
        transport: Any = InProcessTransport(stage_device)
    else:
        channels = list(build_comm_plan(stages, sched).channels)
        transport = DistTransport(pm.rank, pm.devices[pm.rank], channels, timeout_s=source.timeout_s,
                                  replicas=pm.layout.replicas, replica=pm.layout.dp_rank,
                                  hold_sends=uses_cudagraphs(source.compile_options))
    calls = compile_stages({k: stages[k].graph_module for k in local}, source.loss_fn, source.compile_options,
                           last=len(stages) - 1, unflatten=captured.unflatten_outputs, check=source.check_loss)
    executor = Executor(stages, local, sched, transport, calls.loss, captured.unflatten_outputs, stage_device,
                        pm.rank, calls.runners, stage_loss=calls.stage_loss,
                        cudagraph_steps=calls.cudagraph_steps,
                        foreach_grads=calls.gradients_at_once and pm.data_parallel is None,
                        loss_weight=pm.executor.loss_weight)
    return ModeGraphs(captured, stages, executor)


Holders = dict[str, list[tuple[int, int]]]  # FQN -> (stage, rank) of every stage holding it, ascending


def _holders(pm: "ParallelModel") -> Holders:
    """Which ranks hold each parameter and buffer in the mode compiled (pm.stages, split from pm.captured
    by pm.plan): the stages that read it; model state no stage reads is rank 0's (stage -1). The one
    answer plan_like places reads by and build_mode reads tensors by."""
    held: Holders = {}
    for st in sorted(pm.stages, key=lambda st: st.stage):
        for fqn in dict.fromkeys([*st.params, *st.buffers]):
            held.setdefault(fqn, []).append((st.stage, st.rank))
    for fqn in pm.store.model_keys:
        held.setdefault(fqn, [(-1, 0)])
    return held


def _describe(held: list[tuple[int, int]]) -> str:
    return ", ".join(f"stage {k} on rank {r}" if k >= 0 else f"rank {r} (no stage reads it)" for k, r in held)


def _check_reads_held(pm: "ParallelModel", stages: list[StageModule], mode: str, holders: Holders) -> None:
    """Under torchrun a rank holds only its own stages' tensors: a stage of this mode reading another
    rank's parameter or buffer (plan_like could not move the read there) is refused, on every rank
    alike (each splits the same graph)."""
    if pm.rank is None:
        return
    for st in stages:
        for fqn in [*st.params, *st.buffers]:
            held = holders.get(fqn, [])
            if held and st.rank not in {r for _, r in held}:
                raise RuntimeConfigError(
                    f"ParallelModel.{mode}: in {mode} mode stage {st.stage} (rank {st.rank}) reads '{fqn}', which "
                    f"{_describe(held)} holds in the mode compiled; the read cannot move to that rank (what it "
                    "needs is computed, or what it computes is needed, on other ranks' stages), and under torchrun "
                    f"a rank holds only its own stages' tensors. Compile the model in {mode} mode (model.{mode}() "
                    "before compile_parallel) so the plan places the read, or run the pipeline in one process.")


def _read_elsewhere(pm: "ParallelModel", captured: Captured, stage: StageModule, fqn: str, device: torch.device,
                    mode: str, held: list[tuple[int, int]]) -> torch.Tensor:
    """The tensor `fqn` for a stage of this mode on a rank whose stages in the mode compiled do not
    read it (`held`: its holders there): in one process the store's tensor there, or a copy kept in
    step with it (plan_like could not move the read to a rank holding it); a constant the new capture
    made, copied from it."""
    if not held:  # a constant of the new capture (made in forward)
        src = get_attr(captured.graph_module, fqn)
        if src.device.type == "meta" or isinstance(src, FakeTensor):
            raise RuntimeConfigError(f"ParallelModel.{mode}: '{fqn}' is read only in {mode} mode, and its value was "
                                     "not kept (a non-persistent buffer?); make it a persistent buffer "
                                     "(register_buffer(..., persistent=True)) and compile again.")
        return src.detach().to(device)
    tensor = pm.store.read_on(fqn, device)
    if tensor is not pm.store.exposed(fqn) and _written_in(stage.graph_module, fqn):
        raise RuntimeConfigError(
            f"ParallelModel.{mode}: in {mode} mode stage {stage.stage} writes '{fqn}' in place on {device}, but "
            f"{_describe(held)} holds it on {pm.store.exposed(fqn).device}; a write into a copy would be lost. "
            f"Compile the model in {mode} mode (model.{mode}() before compile_parallel) so the plan places it, or "
            "put these ranks on one device.")
    return tensor


def _written_in(gm: torch.fx.GraphModule, fqn: str) -> bool:
    """Some op of `gm` writes into its parameter or buffer `fqn` in place (directly or through a view)."""
    return any(mutates(n) and any(r.op == "get_attr" and r.target == fqn for r in map(storage_root, written_values(n)))
               for n in gm.graph.nodes)


def plan_like(captured: Captured, planned: Captured, plan: Plan, holders: Holders) -> Plan:
    """`plan` carried over to another capture of the same model: compute nodes are matched along
    the topological order by (op, owning module); a node of `captured` with no match joins the
    stage of the node before it. Then a node reading a parameter or buffer moves to the nearest
    stage of a rank that holds it (`holders`: _holders of `planned` split by `plan`; state not there:
    rank 0; constants are copied wherever they are read), so that ranks keep reading their own
    tensors: the matching may put a read elsewhere (the graphs differ), or the other mode reads it
    elsewhere (RWKV rescales every block's weights at the start of its eval forward). A node moves
    no earlier than its inputs' stages, and later only as far as its matched readers' stages
    (unmatched readers follow it), so that no other node is pushed off its stage; nodes a split
    keeps together (passes/writes.py: stage_mates) share a stage. A read that cannot move stays
    (build_mode reads the holder's tensor there, or says why it cannot)."""
    old, new = _compute_nodes(planned), _compute_nodes(captured)
    matcher = difflib.SequenceMatcher(None, [_key(n) for n in old], [_key(n) for n in new], autojunk=False)
    match = {}
    for block in matcher.get_matching_blocks():
        for i in range(block.size):
            match[block.b + i] = old[block.a + i]
    base: dict[torch.fx.Node, int] = {}  # the stages by matching alone
    anchored: set[torch.fx.Node] = set()
    prev = 0
    for j, n in enumerate(new):
        if j in match and match[j].name in plan.node_stage:
            prev = plan.node_stage[match[j].name]
            anchored.add(n)
        base[n] = prev = max([prev, *(base[i] for i in n.all_input_nodes if i in base)])
    last = plan.num_stages - 1
    latest: dict[torch.fx.Node, int] = {}  # how late a node may go without pushing a matched one
    for n in reversed(new):
        latest[n] = min([last, *(base[u] if u in anchored else latest[u] for u in n.users if u in base)])
    ranks_of = {fqn: {r for _, r in held} for fqn, held in holders.items()}
    gm = captured.graph_module
    state = {name for name, _ in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers()]}
    stage_of: dict[torch.fx.Node, int] = {}
    for n in new:
        lo = max([0, *(stage_of[i] for i in n.all_input_nodes if i in stage_of)])
        k = max(base[n], lo)
        held = [ranks_of.get(i.target, {0}) for i in n.all_input_nodes if i.op == "get_attr" and i.target in state]
        ranks = set.intersection(*held) if held else set()
        if held and plan.stage_rank[k] not in ranks:
            options = [s for s in range(lo, max(k, latest[n]) + 1) if plan.stage_rank[s] in ranks]
            k = min(options, key=lambda s: (abs(s - k), s), default=k)
        stage_of[n] = k
    _keep_together(new, stage_of)
    return plan.replace(node_stage={n.name: k for n, k in stage_of.items()})


def _compute_nodes(c: Captured) -> list[torch.fx.Node]:
    return [n for n in c.graph_module.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


def _key(n: torch.fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    return f"{n.target}@{list(stack.values())[-1][0] if stack else ''}"


def _keep_together(nodes: list[torch.fx.Node], stage_of: dict[torch.fx.Node, int]) -> None:
    """Raise stages until every node is at or after its inputs' stages and shares the latest stage
    of its stage mates (stages only grow, so this ends)."""
    by_name = {n.name: n for n in nodes}
    changed = True
    while changed:
        changed = False
        for n in nodes:
            group = [n, *(by_name[m] for m in stage_mates(n) if m in by_name)]
            k = max([*(stage_of[m] for m in group), *(stage_of[i] for i in n.all_input_nodes if i in stage_of)])
            for m in group:
                if stage_of[m] != k:
                    stage_of[m], changed = k, True
