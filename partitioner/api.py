"""compile_parallel: an nn.Module in, a pipeline-parallel training program (a ParallelModel,
partitioner/parallel_model.py) out.

Reads top to bottom as the compiler's pipeline: slice one microbatch of the
example inputs, capture + plan (or take the given plan), split into stage
modules, make the schedule, place the parameters on their devices, build the
transport and executor.

Under torchrun (torch.distributed initialised, or RANK/WORLD_SIZE set) every
process calls compile_parallel with the same arguments and rank r runs the
stages of rank r on devices[r] (a world of one process runs every stage); where no process group exists yet it creates one
(NCCL on GPUs, gloo on CPU). A gloo group it created is destroyed at exit; destroy
an NCCL one with dist.destroy_process_group() at the end of the script. Without
torchrun one process drives every stage on the devices listed (they may repeat,
e.g. ["cpu"] * 4).
"""
from __future__ import annotations

import inspect
import itertools
import os
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.utils import _pytree as pytree

from partitioner.cost_models.device import spec_for_torch_device
from partitioner.dataclass_trees import check_flattens, register_dataclasses
from partitioner.errors import CaptureError, PlanError, RuntimeConfigError
from partitioner.loss_fn import check_mean_loss, checked_loss, microbatch_loss_weight, model_loss
from partitioner.materialise import materialise
from partitioner.microbatch import (BatchDims, batch_size, leaf_dim, per_sample_lists, resolve_batch_dims,
                                   split_batch, split_target)
from partitioner.modes import ModeSource, fake_skeleton
from partitioner.optimizer_check import watch_model_parameters
from partitioner.parallel_model import ParallelModel
from partitioner.plan import Plan
from partitioner.plan_model import PlanConfig, capture_for_training, plan_model
from partitioner.rank_agreement import agree, check_same_weights, fingerprint, init_distributed
from partitioner.schedule_choice import AUTO, choice_line, fixed_chunks
from partitioner.passes.mixed_precision import compute_dtype, loss_under_autocast
from partitioner.passes.graph_nodes import set_attr
from partitioner.passes.capture_errors import check_inputs_eagerly
from partitioner.passes.capture_io import Captured, input_leaf_names, positional_names
from partitioner.passes.hooks import warn_forward_hooks
from partitioner.passes.kv_cache import configs_with_cache, output_has_cache_field
from partitioner.passes.split import outputs_the_loss_reads, place_on_device, split
from partitioner.runtime.comm_plan import build_comm_plan
from partitioner.runtime.compiled import compile_options, compile_stages, print_once, uses_cudagraphs
from partitioner.runtime.data_parallel import (DATA_PARALLEL_MODES, DataParallelStages, MeshLayout,
                                               check_fsdp_gradients, mesh_layout)
from partitioner.runtime import peer_waits
from partitioner.runtime.parameter_hooks import check_hooks_whole
from partitioner.runtime.replicated_gradients import ReplicatedStages
from partitioner.runtime.executor import Executor
from partitioner.runtime.parameter_store import ParameterStore
from partitioner.runtime.schedules import make_schedule, validate
from partitioner.runtime.step_graph import StepGraph
from partitioner.runtime.transport import DistTransport, InProcessTransport
from partitioner.sequence_first import check_split_keeps_sequences
from partitioner.units import human_time, parse_bytes

if TYPE_CHECKING:
    from partitioner.cost_models.device import DeviceSpec


def compile_parallel(model: torch.nn.Module, devices: list[str | torch.device] | DeviceMesh | None = None,
                     example_inputs: tuple | Any = None, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                     *, mesh: DeviceMesh | None = None, data_parallel: str = "fsdp",
                     example_kwargs: dict | None = None, batch_dims: int | dict[str, int] | None = None,
                     microbatches: int | None = None, schedule: str | None = None, chunks: int | str = 1,
                     plan: Plan | None = None, memory: int | str | None = None, device_type: str | None = None,
                     time_limit_s: float = 10.0, timeout_s: float = 300.0,
                     example_target: Any = None, compile: bool | dict | None = None,
                     mixed_precision: str | None = None, init_fn: Callable[[torch.nn.Module], None] | None = None,
                     checkpoint: str | os.PathLike | None = None, gap: float = 0.01,
                     measure: bool = False, cuda_graph: bool = False) -> "ParallelModel":
    """Partition `model` over `devices` (or a DeviceMesh) and return a ParallelModel that trains it.

    devices: one device per pipeline rank, e.g. ["cuda:0", "cuda:1"] under torchrun, or ["cpu"] * 4
        in one process.
    mesh: instead of devices, a DeviceMesh with dims ("dp", "pp") (or ("pp",)) over every process,
        e.g. init_device_mesh("cuda", (dp, pp), mesh_dim_names=("dp", "pp")): dp replicas of a
        pp-rank pipeline, each training on 1/dp of the global batch (runtime/data_parallel.py); each
        process uses its LOCAL_RANK's GPU. data_parallel: how gradients are reduced across replicas:
        "fsdp" (default: FSDP2 fully_shard, parameters, gradients and optimizer state sharded over dp)
        or "replicate" (whole on every replica, each stage's gradients all-reduced after its last
        backward, runtime/replicated_gradients.py; the one that works with CUDA graphs). Buffers are not
        synchronised, in either mode (as FSDP2, and DDP with broadcast_buffers=False): each replica updates
        its BatchNorm running statistics from its own microbatches and evaluates with them; full_state_dict
        and save take replica 0's.
    example_inputs / example_kwargs: the GLOBAL batch, as model(*example_inputs, **example_kwargs);
        tensors whose batch dim holds the batch size (the first tensor input's size along its batch
        dim) are split along it into dp shares, then each into `microbatches` (default 2 x pipeline
        ranks); other inputs go whole to every microbatch.
    batch_dims: each input's batch dim (default 0), as torch.distributed.pipelining's args_chunk_spec:
        an int for every tensor input and the target (1 for a sequence-first model: nn.MultiheadAttention,
        nn.LSTM / GRU, nn.Transformer* with batch_first=False read (seq, batch, ...)), or a dict from
        input names (forward's parameter names; nested leaves as "batch[0]") and "target" to their dim,
        e.g. {"src": 1, "target": 1}, unnamed inputs on dim 0.
    loss_fn(output, target) -> scalar mean loss of a batch (None: the loss the model computes itself, a Hugging
        Face model's given labels=: output.loss, or a 0-dim output; see model_loss); train_step returns the mean
        over microbatches (a loss module or functools.partial with reduction="sum" is refused: the averaged
        gradient would not be its gradient).
        The target's leaves that hold the batch (or a multiple: labels flattened sample-major) along its
        batch dim are cut as the inputs; others (class weights) go whole; a target with no such leaf is refused.
        Each microbatch runs as the model would under gradient accumulation over the same microbatches:
        BatchNorm normalises with that microbatch's statistics and updates its running statistics once
        per microbatch, in order (num_batches_tracked advances by `microbatches` per step), and a loss
        that couples samples (a contrastive loss) couples those of one microbatch.
    schedule: "gpipe", "1f1b" (default) or "interleaved-1f1b" (default when chunks > 1).
    chunks: stages per rank (interleaving), or "auto": plan 1, 2 and 4 and keep the fastest predicted,
        interleaving only where it predicts at least 2% faster (partitioner/schedule_choice.py; it costs
        what an NCCL send waiting for its receiver takes from the sender's compute under torchrun). In one
        process whose ranks share a device nothing overlaps: 1f1b.
    plan: a Plan to use as is; else partitioner.plan_model plans it (memory: per-device cap, e.g. "24GiB";
        device_type: DeviceSpec name for the cost model (default: the table entry of the GPU in use,
        with this host's dispatch speed measured; the calibrated CPU on CPU); time_limit_s: solver time;
        example_target: a target of the global batch, as train_step will get it: the plan then
        counts the loss's time and memory on the last stage, e.g. a cross-entropy's fp32
        log-probabilities over the vocabulary, and an output the loss ignores (an auxiliary head's)
        sends no gradient back between stages, so its parameters keep .grad None as in the model); gap: the search stops once the plan is proven
        within this fraction of a lower bound (time_limit_s stays the upper limit).
    measure: plan with each distinct layer timed on the first device (through torch.compile when the
        stages are compiled) instead of the analytic cost model: slower to plan (a compilation per
        distinct layer, cached on disk under PARTITIONER_CACHE), closer to the step that runs. The
        model's weights must be on that device.
    timeout_s: how long a rank waits for a peer (a receive, or a collective of the step: the loss, clipping's norm,
        a tied weight's gradient, the data-parallel reduce) before raising RuntimeConfigError naming the rank(s)
        it waited for, whatever the process group's own timeout (runtime/peer_waits.py).
    cuda_graph: replay each training step as one CUDA graph (partitioner/runtime/step_graph.py): the
        host launches a step once instead of every kernel, so a host-bound pipeline (many small
        kernels) runs at its kernels' speed, and the plan is costed without host time. Needs every
        stage on one CUDA device in one process; the first two steps run uncaptured (compiling),
        the third is captured. Inputs must keep their shapes; parameters are read in place.
    compile: run every stage graph (and loss_fn) through torch.compile (inductor); in training the last
        stage and loss_fn compile as one call. None (default): on for CUDA devices, off on CPU; True /
        False; or a dict of torch.compile options (e.g. {"mode": "max-autotune"}). Compilation happens in
        the first train_step / forward; a stage that fails to compile runs eagerly with a warning naming it.
        {"mode": "reduce-overhead"} replays every stage's forward and backward as its own CUDA graph
        (torch's cudagraph trees; partitioner/runtime/cudagraph_trees.py): for host-bound pipelines, in
        one process or under torchrun, planned without host time. The first step runs uncaptured, the
        second records, later ones replay. With data parallelism (a mesh with dp > 1) it needs
        data_parallel="replicate" (FSDP2 gathers parameters into new memory every step). With
        compile=None in one process (no torchrun, no plan= given), stages whose costs say the host
        launches a microbatch's kernels slower than the GPU runs them get this mode, with a line saying
        so; compile=True keeps them without graphs.
    mixed_precision: None (default) runs and plans the model in its own dtype (a bf16 model is planned
        and trained in bf16); "bf16" keeps fp32 parameters, gradients and optimizer state and computes in
        bf16 (each parameter and float input cast where it is read, as FSDP2's MixedPrecisionPolicy; a batch
        norm's weights stay fp32 beside its fp32 statistics) and runs loss_fn under torch.autocast, as the
        usual recipe runs it (a cross-entropy in fp32).
    init_fn / checkpoint: for a model built on the meta device (capture and planning need no weights):
        each rank allocates only its stages' tensors on its device and fills them from `checkpoint` (a
        Hugging Face safetensors or DCP directory, read lazily) and/or `init_fn(module)` per module
        (default: each module's reset_parameters()); see partitioner/materialise.py. A checkpoint also
        overwrites a real model's weights.
    """
    if isinstance(devices, DeviceMesh):
        devices, mesh = None, devices
    if example_inputs is None:
        raise RuntimeConfigError("compile_parallel: pass example_inputs (the global batch) and loss_fn(output, "
                                 "target); e.g. compile_parallel(model, devices, (x,), loss_fn).")
    loss_fn = model_loss if loss_fn is None else loss_fn
    check_mean_loss(loss_fn)
    layout = None
    if mesh is not None:
        if devices is not None:
            raise RuntimeConfigError("compile_parallel: pass devices= or mesh=, not both; the mesh names every "
                                     "process and each uses its LOCAL_RANK's device.")
        layout, devices = _mesh_layout(mesh)
    elif devices is None:
        raise RuntimeConfigError("compile_parallel: pass devices (one per pipeline rank, e.g. ['cuda:0', "
                                 "'cuda:1']) or mesh= (a DeviceMesh with dims ('dp', 'pp')).")
    devices = [torch.device(d) for d in devices]
    p = len(devices)
    dp = layout.dp if layout is not None else 1
    options = compile_options(compile, devices)
    stage_graphs = uses_cudagraphs(options)  # each stage call replays as a CUDA graph
    if cuda_graph and stage_graphs:
        raise RuntimeConfigError(f"compile_parallel(cuda_graph=True, compile={compile!r}): both capture CUDA graphs, "
                                 "the whole step or each stage call; pick one (drop cuda_graph, or compile=True).")
    if p < 1:
        raise RuntimeConfigError("compile_parallel: devices is empty; list one device per pipeline rank.")
    _check_devices(devices)
    if data_parallel not in DATA_PARALLEL_MODES:
        raise RuntimeConfigError(f"compile_parallel: data_parallel={data_parallel!r}; use one of "
                                 f"{list(DATA_PARALLEL_MODES)}.")
    _check_not_partly_meta(model)
    warn_forward_hooks(model)
    if measure and plan is None:
        _check_measurable(model, devices[0])
    if cuda_graph:
        _check_graphable(devices, mesh is not None or "RANK" in os.environ)
    if stage_graphs and dp > 1 and data_parallel == "fsdp":
        raise RuntimeConfigError(f"compile_parallel(compile={compile!r}) with {dp} data-parallel replicas under "
                                 "data_parallel='fsdp': FSDP2 gathers the parameters into new memory every step, so "
                                 "the stages' CUDA graphs would record anew; pass data_parallel='replicate' (whole "
                                 "parameters, gradients all-reduced) or compile=True (no graphs).")
    if plan is not None:
        chunks = plan.chunks
    try:
        fixed_chunks(chunks, schedule)
    except PlanError as err:
        raise RuntimeConfigError(f"compile_parallel: {err}") from None
    if chunks != AUTO:
        schedule = schedule or (plan.schedule if plan is not None else None) or \
            ("interleaved-1f1b" if chunks > 1 else "1f1b")
    defaulted = not microbatches
    microbatches = microbatches or (plan.microbatches if plan is not None else 0) or 2 * p
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    _check_one_argument(model, example_inputs, example_kwargs)
    kwargs = dict(example_kwargs or {})
    register_dataclasses((args, kwargs, example_target))  # a batch as a dataclass of tensors: its fields are leaves
    check_flattens((args, kwargs), "input", input_leaf_names(model, args, kwargs))
    check_flattens(example_target, "example_target")
    rank = init_distributed(devices, timeout_s) if layout is None else (
        layout.pp_rank if dist.get_world_size() > 1 else None)
    if rank is not None and layout is None:
        layout = MeshLayout.single(dist.get_world_size(), rank)
    if chunks == AUTO and _ranks_share_a_device(devices, rank):
        print_once("chunks='auto': ranks share a device in this process, so their stages cannot overlap and "
                   "interleaving would only add passes: 1f1b", rank)
        chunks, schedule = 1, "1f1b"

    dims = resolve_batch_dims(batch_dims, input_leaf_names(model, args, kwargs),
                              pytree.tree_leaves((args, kwargs)))

    if rank is not None:  # every rank must have been called the same way
        where = [f"mesh {layout.replicas} of {devices[0].type}"] if mesh is not None else devices
        agree(fingerprint(model, where, args, kwargs, microbatches, schedule, chunks, plan, dims),
               "the arguments of compile_parallel (model, devices, example inputs, batch_dims, microbatches, "
               "schedule, chunks, plan)", rank, devices)
        check_same_weights(model, rank, devices)

    batch = batch_size((args, kwargs), dims.inputs)
    if batch is not None and batch % (dp * microbatches):
        fits = [d for d in range(1, batch // dp + 1) if batch % (dp * d) == 0]
        origin = (f"the default of 2 x {p} devices" if defaulted and plan is None else
                  "the plan's" if defaulted else "requested")
        share = f" x {dp} data-parallel replicas" if dp > 1 else ""
        first, dim = _first_batched(model, args, kwargs, dims)
        raise RuntimeConfigError(f"compile_parallel: the example batch of {batch} does not split into {microbatches} "
                                 f"microbatches ({origin}){share}; pass microbatches= one of {fits} or a batch that "
                                 f"{dp * microbatches} divides. (The batch size is dim {dim} of the first tensor "
                                 f"input, '{first}'; if it is shared by every sample rather than batched, pass a "
                                 "batched input first, e.g. the shared one as a keyword input: kwargs come after "
                                 "args; if its batch lies on another dim, pass batch_dims=.)")
    check_split_keeps_sequences(model, args, kwargs, dp * microbatches, dims.inputs)
    _warn_per_sample_lists(model, args, kwargs, batch)
    mb_args, mb_kwargs = _first_microbatch(args, kwargs, dp * microbatches, dims)
    # compile's default on CUDA, one process: host-bound stages (as their costs say) replay as CUDA graphs
    graphs_when_host_bound = (compile is None and options is not None and not cuda_graph and dp == 1
                              and rank is None)
    try:
        if plan is None:
            plan, captured, graphs = _plan(model, args, kwargs, mb_args, mb_kwargs, p, chunks, schedule, microbatches,
                                           memory, device_type, time_limit_s, rank, devices, loss_fn, example_target,
                                           mixed_precision, options is not None, gap, dp, data_parallel, measure,
                                           cuda_graph or stage_graphs, graphs_when_host_bound, dims)
            if graphs and not (cuda_graph or stage_graphs):
                options, stage_graphs = {**options, "mode": "reduce-overhead"}, True
            chunks, schedule = plan.chunks, plan.schedule  # chunks="auto": what the planner chose
        else:
            captured = capture_for_training(model, mb_args, mb_kwargs, mixed_precision)
    except CaptureError as err:
        hint = _split_hint(model, args, kwargs, batch, dims) or _fixed_batch_hint(
            model, args, kwargs, batch, dp * microbatches, dims, str(err))
        if not hint:
            raise
        raise CaptureError(f"{err}{hint}") from err
    if rank is not None:
        # the graph may name the device it was captured on (each rank's own GPU): compare without it
        graph_code = re.sub(r"device\(type='\w+'(, index=\d+)?\)", "device", captured.graph_module.code)
        agree(plan.to_json() + graph_code, "the plan or the captured graph", rank, devices)
    _check_plan(plan, p, chunks)
    if configs_with_cache(model, kwargs) and output_has_cache_field(captured.out_spec):
        warnings.warn(f"compile_parallel: {type(model).__name__}'s config has use_cache=True (from_pretrained's "
                      "default); the pipeline runs it with use_cache=False, as a KV cache has no use there (pm(...) "
                      "returns past_key_values=None). Set model.config.use_cache = False to silence this.",
                      RuntimeWarning, stacklevel=2)
    if loss_fn is model_loss:  # say it now, not at the first step
        model_loss(captured.unflatten_outputs(captured.meta_outputs()), None)
    if dp > 1 and data_parallel == "fsdp":
        check_fsdp_gradients(captured.graph_module)
        check_hooks_whole(model, {}, sharded=True)

    try:
        mb_target = None if example_target is None else \
            split_target(example_target, dp * microbatches, batch, dims)[0]
    except RuntimeConfigError:  # train_step names it, with the target it is given
        mb_target = None
    stages = split(captured, plan, loss_reads=outputs_the_loss_reads(loss_fn, captured, mb_target))
    sched = make_schedule(schedule, p, microbatches, chunks)
    validate(sched)
    if tuple(plan.stage_rank) != sched.stage_rank:
        raise RuntimeConfigError(f"compile_parallel: the plan puts stages on ranks {plan.stage_rank}, but schedule "
                                 f"{schedule!r} expects {list(sched.stage_rank)}; plan with the same schedule/chunks.")
    local_ranks = list(range(p)) if rank is None else [rank]
    replicas, replica = (layout.replicas, layout.dp_rank) if layout is not None else (None, 0)
    store = ParameterStore(model, captured, stages, devices, local_ranks, distributed=rank is not None,
                           timeout_s=timeout_s, replicas=replicas, replica=replica)
    if checkpoint is not None or any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        materialise(model, store, rank, init_fn, checkpoint)
    _let_go_of_model_tensors(captured, model)
    watch_model_parameters(model)  # an optimizer built on them would step nothing
    stage_device = {st.stage: devices[st.rank] for st in stages}
    for st in stages:
        place_on_device(st, stage_device[st.stage])
    local = [st.stage for st in stages if st.rank in local_ranks]
    if rank is None:
        transport = InProcessTransport(stage_device)
    else:
        channels = list(build_comm_plan(stages, sched).channels)
        transport = DistTransport(rank, devices[rank], channels, timeout_s=timeout_s, replicas=replicas,
                                  replica=replica, hold_sends=stage_graphs)
    graph_modules = {k: stages[k].graph_module for k in local}
    mixed_dtype = compute_dtype(mixed_precision)
    if mixed_dtype is not None:  # the loss as the recipe runs it: under autocast
        loss_fn = loss_under_autocast(loss_fn, devices[0].type, mixed_dtype)
    calls = compile_stages(graph_modules, loss_fn, options, last=len(stages) - 1,
                           unflatten=captured.unflatten_outputs, check=checked_loss)
    runners, fused = calls.runners, calls.stage_loss
    dp_stages = None
    if dp > 1:  # the mesh's dp dim as a group of our own, whose waits end within timeout_s
        dp_group, dp_ranks = peer_waits.dp_group(layout.replicas, layout.pp_rank, timeout_s)
        waits = (store.peer_waits, dp_ranks)
    if dp > 1 and data_parallel == "fsdp":  # this rank's stages under FSDP2 over the mesh's dp dim
        dp_stages = DataParallelStages(graph_modules, runners, peer_waits.dp_mesh(dp_group, mesh.device_type), *waits)
        store.adopt([stages[k] for k in local])
    elif dp > 1:  # whole parameters, gradients all-reduced over the mesh's dp dim
        dp_stages = ReplicatedStages(graph_modules, runners, dp_group, dp, *waits)
    if dp_stages is not None:
        runners = dp_stages.runners
        fused = dp_stages.with_hooks("loss", fused) if fused is not None else None
    executor = Executor(stages, local, sched, transport, calls.loss, captured.unflatten_outputs,
                        stage_device, rank, runners,
                        stage_backward_done=dp_stages.stage_backward_done if dp_stages is not None else None,
                        stage_loss=fused, cudagraph_steps=calls.cudagraph_steps,
                        foreach_grads=calls.gradients_at_once and not (dp_stages and dp_stages.needs_accumulate_grad),
                        loss_weight=microbatch_loss_weight(model, captured, args, kwargs, dp))
    source = ModeSource(fake_skeleton(model), mb_args, mb_kwargs, loss_fn=loss_fn, mixed_precision=mixed_precision,
                        compile_options=options, timeout_s=timeout_s, check_loss=checked_loss)
    step_graph = StepGraph(executor.train_step, lambda: [t for _, t in store.named_parameters() if t.requires_grad],
                           devices[0]) if cuda_graph else None
    return ParallelModel(captured, plan, stages, executor, store, devices, rank, args, kwargs, microbatches,
                         source=source, layout=layout, data_parallel=dp_stages, step_graph=step_graph,
                         batch_dims=dims, compiled_from=model)


# ---------------------------------------------------------------------- helpers


def _mesh_layout(mesh: DeviceMesh) -> tuple[MeshLayout, list[torch.device]]:
    """This process's place in the mesh, and the pipeline's devices as this process sees them (its
    own device for every pipeline rank: only its own is used)."""
    if not dist.is_initialized():
        raise RuntimeConfigError("compile_parallel: mesh= needs torch.distributed initialised; build the mesh with "
                                 "torch.distributed.device_mesh.init_device_mesh under torchrun.")
    layout = mesh_layout(mesh, dist.get_rank(), dist.get_world_size())
    if mesh.device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        torch.cuda.set_device(device)
    else:
        device = torch.device(mesh.device_type)
    return layout, [device] * layout.pp


def _ranks_share_a_device(devices: list[torch.device], rank: int | None) -> bool:
    """One process drives every rank (no torchrun) and some share a device: their work runs in turn."""
    return rank is None and len(set(devices)) < len(devices)


def _check_devices(devices: list[torch.device]) -> None:
    """CUDA devices need a CUDA build of torch and that many GPUs."""
    cuda = [d for d in devices if d.type == "cuda"]
    if cuda and not torch.cuda.is_available():
        raise RuntimeConfigError(f"compile_parallel: devices name {cuda[0]} but torch.cuda.is_available() is False "
                                 f"(torch {torch.__version__}: a CPU-only build, or no GPU visible); pass "
                                 f"devices=['cpu'] * {len(devices)} or install a CUDA build of torch.")
    count = torch.cuda.device_count() if cuda else 0
    missing = [d for d in cuda if d.index is not None and d.index >= count]
    if missing:
        raise RuntimeConfigError(f"compile_parallel: devices name {missing[0]} but this machine has {count} GPU(s) "
                                 f"(cuda:0..cuda:{count - 1}); list only GPUs that exist.")


def _warn_per_sample_lists(model: torch.nn.Module, args: tuple, kwargs: dict, batch: int | None) -> None:
    """Say where an input looks per-sample but goes whole to every microbatch (microbatch.per_sample_lists):
    a model indexing it by sample would read the first microbatch's values for every microbatch."""
    lists = per_sample_lists(args, kwargs, positional_names(model, len(args)), batch)
    if lists:
        warnings.warn(f"compile_parallel: input {', '.join(lists)} is a list of Python values, as many as the batch "
                      "has samples; values that are not tensors are constants of the captured graph and go whole to "
                      "every microbatch, not cut with the batch (a model reading value i for sample i reads the first "
                      "microbatch's for every microbatch). If they are per-sample, pass a tensor (torch.tensor(...)).",
                      RuntimeWarning, stacklevel=3)


def _check_one_argument(model: torch.nn.Module, example_inputs: Any, example_kwargs: dict | None) -> None:
    """example_inputs that is not a tuple is ONE positional argument: a list [x, mask] or a batch dict
    meant as model(*inputs) / model(**batch) would reach forward whole and fail deep inside the
    capture; refused up front where forward's signature cannot take it so, naming the fix. A mapping whose
    keys are all forward's parameter names (a tokenizer's BatchEncoding, a collator's dict) is a batch meant
    as model(**batch), though forward would take it whole as its first input (HF's input_ids)."""
    if not isinstance(example_inputs, (list, Mapping)):
        return
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # no signature to read: the capture says what fails
        return
    try:
        signature.bind(example_inputs, **dict(example_kwargs or {}))
    except TypeError as err:
        name = type(model).__name__
        if isinstance(example_inputs, list):
            fix = (f"pass a tuple, example_inputs=tuple(inputs), for {name}(*inputs), and call "
                   "pm.train_step(*inputs, target=...)")
        else:
            fix = (f"pass example_inputs=() and example_kwargs=batch for {name}(**batch), and call "
                   "pm.train_step(**batch, target=...)")
        raise RuntimeConfigError(f"compile_parallel: example_inputs is a {type(example_inputs).__name__}, which is "
                                 f"{name}'s ONE positional argument (as {name}(example_inputs)), but its forward "
                                 f"does not take it so ({err}); {fix}.") from err
    keys = list(example_inputs) if isinstance(example_inputs, Mapping) else []
    if keys and all(isinstance(k, str) and k in signature.parameters for k in keys):
        name = type(model).__name__
        raise RuntimeConfigError(f"compile_parallel: example_inputs is a {type(example_inputs).__name__} with keys "
                                 f"{keys}, the names of {name}.forward's parameters, but as example_inputs it is ONE "
                                 f"positional argument ({name}(example_inputs)); for {name}(**batch) pass "
                                 "example_inputs=() and example_kwargs=dict(batch), and call "
                                 "pm.train_step(**batch, target=...).")


def _check_not_partly_meta(model: torch.nn.Module) -> None:
    """Either every weight is real, or none is: a model half on meta trains garbage or fails deep inside.
    Every parameter on meta with buffers real (partitioner.materialise.meta_parameters()) is a meta model."""
    if all(p.is_meta for p in model.parameters()):
        return
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    meta = next((n for n, t in tensors if t.is_meta), None)
    real = next(((n, t.device) for n, t in tensors if not t.is_meta), None)
    if meta is not None and real is not None:
        raise RuntimeConfigError(f"compile_parallel: the model is partly on the meta device: '{meta}' is on meta but "
                                 f"'{real[0]}' is on {real[1]}; load every weight (e.g. model.to_empty(device=...) "
                                 "then load_state_dict) before compiling, or build every parameter on meta and pass "
                                 "init_fn= or checkpoint=.")


def _let_go_of_model_tensors(captured: Captured, model: torch.nn.Module) -> None:
    """The stages hold their own copies now (ParameterStore): the captured graph's references to the
    model's parameters and buffers become meta stand-ins (ties kept), so that the ParallelModel keeps
    none of the model's memory alive; a model built on the GPU the stages use is freed once the caller
    drops it."""
    mine = {id(t) for t in [*model.parameters(), *model.buffers()]}
    gm = captured.graph_module
    stand_ins: dict[int, torch.Tensor] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if id(t) in mine and not t.is_meta:
            if id(t) not in stand_ins:
                meta = torch.empty_like(t, device="meta")
                stand_ins[id(t)] = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
            set_attr(gm, name, stand_ins[id(t)])


def _first_batched(model: torch.nn.Module, args: tuple, kwargs: dict, dims: BatchDims) -> tuple[str, int]:
    """The name and batch dim of the input the batch size is read from (the first tensor with its batch dim)."""
    leaves = pytree.tree_leaves((args, kwargs))
    names = input_leaf_names(model, args, kwargs)
    for i, (n, x) in enumerate(zip(names, leaves)):
        d = leaf_dim(dims.inputs, i)
        if batch_size(x, d) is not None:
            return n, d
    raise AssertionError("no input holds the batch")  # the caller found a batch size


def _split_hint(model: torch.nn.Module, args: tuple, kwargs: dict, batch: int | None, dims: BatchDims) -> str:
    """Name the inputs besides the first that were cut into microbatches only because their size
    along their batch dim happens to equal the batch size (e.g. a shared (T, T) mask with T ==
    batch): capture saw them cut."""
    leaves = pytree.tree_leaves((args, kwargs))
    names = input_leaf_names(model, args, kwargs)
    per_leaf = [leaf_dim(dims.inputs, i) for i in range(len(leaves))]
    tensors = [(n, x, d) for n, x, d in zip(names, leaves, per_leaf) if batch_size(x, d) is not None]
    # an input shaped as the first one (an attention mask, labels or token types beside input_ids) is batched as it is
    cut = [(f"'{n}' {tuple(x.shape)}", d) for n, x, d in tensors[1:] if batch is not None and batch_size(x, d) == batch
           and (x.shape, d) != (tensors[0][1].shape, tensors[0][2])]
    if not cut:
        return ""
    first, first_dim = _first_batched(model, args, kwargs, dims)
    along = sorted({d for _, d in cut})
    return (f" Note: compile_parallel captured ONE microbatch, and cut input(s) {', '.join(c for c, _ in cut)} along "
            f"their batch dim ({', '.join(f'dim {d}' for d in along)}) because its size equals the batch size "
            f"{batch} (dim {first_dim} of the first tensor input, '{first}'). If such an input is not batched (e.g. "
            "a mask shared by the batch), give it a size of 1 there (e.g. a leading dim of 1) to broadcast, or use "
            "a batch size different from that size.")


def _fixed_batch_hint(model: torch.nn.Module, args: tuple, kwargs: dict, batch: int | None, parts: int,
                      dims: BatchDims, error: str) -> str:
    """Where the model fails on the one microbatch it is captured on but runs on the whole batch: say so,
    and that the model likely fixes a size to the batch."""
    if batch is None or parts == 1 or "fails on the example inputs" not in error:
        return ""
    try:  # as capture ran it on the microbatch: no gradients, buffers and random state kept
        check_inputs_eagerly(model, args, kwargs, input_leaf_names(model, args, kwargs),
                             pytree.tree_leaves((args, kwargs)))
    except CaptureError:  # it fails on the whole batch too: the error says what
        return ""
    return (f" Note: compile_parallel captures the model on ONE microbatch, {batch // parts} of the {batch} samples "
            "(the example inputs above), and the model runs on the whole batch but not on it: a size fixed to the "
            f"batch inside the model (a tensor made with {batch} rows, a view or expand to {batch}) does not fit a "
            "microbatch; take it from the input (x.shape[0]).")


def _first_microbatch(args: tuple, kwargs: dict, microbatches: int, dims: BatchDims) -> tuple[tuple, dict]:
    return split_batch((args, kwargs), microbatches, "example input", batch_size((args, kwargs), dims.inputs),
                       dims.inputs)[0]


def _plan(model: torch.nn.Module, args: tuple, kwargs: dict, mb_args: tuple, mb_kwargs: dict, p: int, chunks: int | str,
          schedule: str, microbatches: int, memory: int | str | None, device_type: str | DeviceSpec | None,
          time_limit_s: float, rank: int | None, devices: list[torch.device], loss_fn: Callable[[Any, Any], Any],
          example_target: Any, mixed_precision: str | None, compiled: bool,
          gap: float = 0.01, dp: int = 1, dp_mode: str = "fsdp", measure: bool = False,
          cuda_graph: bool = False, graphs_when_host_bound: bool = False,
          dims: BatchDims = BatchDims()) -> tuple[Plan, Captured, bool]:
    """Plan on global rank 0 (the solver is not deterministic across processes) and share the plan,
    and whether it was planned for CUDA graphs (cuda_graph, or graphs_when_host_bound and host-bound)."""
    planner = rank is None or dist.get_rank() == 0
    if planner:
        if isinstance(memory, str):
            memory = parse_bytes(memory)
        if device_type is None:
            device_type = "cpu" if devices[0].type == "cpu" else "h100"
            if devices[0].type == "cuda" and torch.cuda.is_available():
                # this GPU, this host's eager dispatch speed; compiled launches keep the table's cost: timing
                # them here (spec_for_torch_device(compiled=True)) read 20-34 us a launch within minutes on
                # one H100 host and did not yet predict better (benchmarks/RESULTS.md, 2026-12-06)
                device_type = spec_for_torch_device(devices[0])
        config = PlanConfig(num_ranks=p, chunks=chunks, schedule=schedule, microbatches=microbatches,
                            memory_cap_bytes=memory, device_type=device_type, time_limit_s=time_limit_s,
                            dtype=None, mixed_precision=mixed_precision, compiled=compiled, gap=gap,
                            data_parallel=dp, data_parallel_mode=dp_mode, measure=measure, cuda_graphs=cuda_graph,
                            graphs_when_host_bound=graphs_when_host_bound, sends_hold_sms=rank is not None)
        result = plan_model(model, args, kwargs, config, loss_fn=loss_fn, example_target=example_target,
                            batch_dims=dims, microbatch=(mb_args, mb_kwargs))
        plan, captured, graphs = result.plan, result.captured, result.cuda_graphs
        if result.chunk_choices:
            print_once(choice_line(result.chunk_choices, plan.chunks), rank)
        if compiled and result.host_bound and not cuda_graph:
            print_once(_host_bound_line(*result.launch_and_run_s, graphs), rank)
    if rank is None:
        return plan, captured, graphs
    box = [(plan.to_json(), graphs) if planner else None]
    dist.broadcast_object_list(box, src=0)
    if not planner:
        plan, graphs = Plan.from_json(box[0][0]), box[0][1]
        captured = capture_for_training(model, mb_args, mb_kwargs, mixed_precision)
    return plan, captured, graphs


def _host_bound_line(launch_s: float, run_s: float, graphs: bool) -> str:
    """What compile_parallel says of compiled stages whose microbatch takes the host launch_s to
    launch and the device run_s to run: that they replay as CUDA graphs (graphs), or how to."""
    figures = f"a microbatch's kernels take {human_time(launch_s)} to launch, {human_time(run_s)} to run"
    if graphs:
        return (f"the stages are host-bound ({figures}): each stage call replays as a CUDA graph "
                "(compile={'mode': 'reduce-overhead'}; the first step compiles, the second records); "
                "compile=True compiles them without graphs")
    return (f"the stages are host-bound: {figures}; compile={{'mode': 'reduce-overhead'}} replays each stage call "
            "as a CUDA graph (cuda_graph=True the whole step, one process on one GPU)")


def _check_measurable(model: torch.nn.Module, device: torch.device) -> None:
    """measure=True times the model's own layers: its weights must be real and on the devices' type."""
    where = {t.device.type for t in itertools.chain(model.parameters(), model.buffers())}
    if where and where != {device.type}:
        raise RuntimeConfigError(f"compile_parallel(measure=True) times the model's layers where its weights are, "
                                 f"but they are on {sorted(where)} and the stages run on '{device.type}': move the "
                                 f"model there first (model.to('{device}')), or plan with measure=False.")


def _check_graphable(devices: list[torch.device], distributed: bool) -> None:
    """cuda_graph=True captures one process's whole step on one GPU."""
    if distributed:
        raise RuntimeConfigError("compile_parallel(cuda_graph=True) captures the stages of one process on one GPU; "
                                 "under torchrun the steps send over NCCL, which it does not capture yet: drop "
                                 "cuda_graph (or run the stages in one process: devices=['cuda:0'] * k).")
    if any(d.type != "cuda" for d in devices) or len({torch.device(d.type, d.index or 0) for d in devices}) > 1:
        raise RuntimeConfigError(f"compile_parallel(cuda_graph=True) needs every stage on one CUDA device, but devices "
                                 f"are {[str(d) for d in devices]}; pass devices=['cuda:0'] * {len(devices)}, or "
                                 "drop cuda_graph.")


def _check_plan(plan: Plan, p: int, chunks: int) -> None:
    if plan.num_ranks != p:
        raise RuntimeConfigError(f"compile_parallel: the plan is for {plan.num_ranks} ranks but {p} devices were "
                                 "given; plan for these devices or pass as many devices as the plan has ranks.")
    if plan.num_stages != p * chunks:
        raise RuntimeConfigError(f"compile_parallel: the plan has {plan.num_stages} stages but {p} devices x "
                                 f"{chunks} chunks need {p * chunks}; plan with the same chunks.")
