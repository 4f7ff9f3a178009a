"""plan_model: capture -> annotate -> profile -> coarsen -> solve (+ baselines), for one microbatch.

Costs are per microbatch, so the example inputs (a global batch) are cut to
one microbatch along their batch dims (dim 0 unless batch_dims says) before capture, as the runtime does;
compile_parallel, which has cut them already, passes its microbatch instead.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable

import torch

from partitioner import data_parallel_costs as dpm
from partitioner import profile_cache
from partitioner.baselines import all_baselines
from partitioner.cost_models.device import DeviceSpec, get_device_spec
from partitioner.cost_models.loss import profile_loss
from partitioner.cost_models.node_costs import NodeCosts
from partitioner.cost_models.profile import graph_float_dtype, parameter_state_bytes, profile
from partitioner.dataclass_trees import register_dataclasses
from partitioner.errors import PlanError
from partitioner.microbatch import BatchDims, batch_size, split_batch, split_target
from partitioner.passes.annotate import AnnotatedGraph, annotate
from partitioner.passes.capture import capture
from partitioner.passes.capture_io import Captured
from partitioner.passes.coarsen import BlockGraph, attach_loss, coarsen
from partitioner.passes.mixed_precision import capture_mixed, compute_dtype
from partitioner.plan import Plan, PlanOrigin, with_waiting_sends
from partitioner.problem import check_config, check_gap
from partitioner.schedule_choice import AUTO, ChunkChoice, choose_chunks, fixed_chunks
from partitioner.solve import solve
from partitioner.units import human_bytes

# Blocks per virtual stage the automatic depth aims at: finer blocks let stages balance within a few
# percent (8 vs 2 per stage: 1-15% faster simulated steps on gpt2-xl, llama-8b and t5-base at p = 8),
# and the ILP still proves optimality in seconds at these sizes (benchmarks/solve_time.py).
BLOCKS_PER_STAGE = 8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PlanConfig:
    """Everything `partitioner plan` asks for.

    memory_cap_bytes None: the device's memory. microbatches None: 2 x num_ranks.
    schedule None: 1f1b, or interleaved-1f1b when chunks > 1. depth None: the
    shallowest module depth giving ~2 blocks per stage. link_bw_bytes_per_s
    None: the device's intra-node point-to-point bandwidth. gap: a fraction (0.01 = 1%);
    time_limit_s stays the upper limit where no bound comes within it.
    batch / seq: shape of the example inputs (used by the model loader).
    data_parallel: replicas of the pipeline (a DeviceMesh (dp, pp)); the example inputs are then the
    global batch of all of them, each microbatch batch / (data_parallel x microbatches).
    measure: instead of the analytic cost model, time every layer (one per distinct layer) on the device
    the model's weights are on, through torch.compile when compiled; costs are then in the model's own
    dtype (dtype must be None or the model's).
    data_parallel_mode: "fsdp" (parameters, gradients and optimizer state sharded over the replicas
    between steps) or "replicate"; see partitioner/data_parallel_costs.py for what each rank holds.
    dp_bw_bytes_per_s None: the device's intra-node bandwidth when data_parallel x num_ranks GPUs fit
    in one host of gpus_per_host, else its inter-node bandwidth.
    sends_hold_sms: the ranks are processes that send over NCCL (torchrun), so a send waiting for its
    receiver slows its sender's compute (DeviceSpec.waiting_send_slowdown_for the compute dtype); False
    for stages in one process.
    """

    num_ranks: int
    chunks: int | str = 1  # stages per rank; "auto": chosen by predicted step (partitioner/schedule_choice.py)
    microbatches: int | None = None
    schedule: str | None = None
    memory_cap_bytes: int | None = None
    device_type: str | DeviceSpec = "h100"  # a table name, a JSON path or a DeviceSpec
    dtype: str | None = "float32"  # the dtype costs are expressed in; None: the model's own
    mixed_precision: str | None = None  # e.g. "bf16": fp32 parameters, bf16 compute (partitioner/passes/mixed_precision.py)
    compiled: bool = False  # the stages run under torch.compile: costs with inductor's fusion
    measure: bool = False  # time each distinct layer on the model's device (compiled when `compiled`)
    cuda_graphs: bool = False  # each step replays as a CUDA graph: no host dispatch time (runtime/step_graph.py)
    graphs_when_host_bound: bool = False  # plan as cuda_graphs where the costs are host-bound (NodeCosts.host_bound)
    optimizer: str = "adamw"
    depth: int | None = None
    time_limit_s: float = 10.0
    gap: float = 0.01  # stop the search once the plan is proven within this fraction of a lower bound
    batch: int | None = None
    seq: int | None = None
    compare: bool = False
    use_cache: bool = True
    link_bw_bytes_per_s: float | None = None
    data_parallel: int = 1
    data_parallel_mode: str = "fsdp"
    dp_bw_bytes_per_s: float | None = None
    gpus_per_host: int = 8
    sends_hold_sms: bool = True


@dataclass
class PlanResult:
    """Every intermediate of planning, for printing and for the runtime."""

    captured: Captured | None  # None when the profile cache held the model and the graph was not needed
    annotated: AnnotatedGraph
    costs: NodeCosts
    block_graph: BlockGraph
    plan: Plan
    baselines: dict[str, Plan] = field(default_factory=dict)
    microbatch_args: tuple = ()
    microbatch_kwargs: dict = field(default_factory=dict)
    profile_key: str | None = None  # of the model's entry in the profile cache (None: not cached)
    cuda_graphs: bool = False  # planned without host time: config.cuda_graphs, or chosen as host-bound
    launch_and_run_s: tuple[float, float] = (0.0, 0.0)  # a microbatch's host and device time, before graphs
    chunk_choices: list[ChunkChoice] = field(default_factory=list)  # chunks="auto": every candidate planned

    @property
    def host_bound(self) -> bool:
        """The host launches a microbatch's kernels slower than the device runs them (NodeCosts.host_bound)."""
        return self.launch_and_run_s[0] > self.launch_and_run_s[1]


def package_version() -> str:
    """The installed partitioner's version ("unknown" when run from a source tree not installed)."""
    try:
        return version("partitioner")
    except PackageNotFoundError:
        return "unknown"


def microbatch_inputs(example_args: tuple, example_kwargs: dict | None, microbatches: int,
                      data_parallel: int = 1, batch_dims: BatchDims = BatchDims()) -> tuple[tuple, dict]:
    """Cut every tensor whose batch dim (batch_dims.inputs: 0 by default) holds the global batch to
    one microbatch of one replica (the first): batch / (data_parallel x microbatches) samples."""
    inputs = (tuple(example_args), dict(example_kwargs or {}))
    batch = batch_size(inputs, batch_dims.inputs)
    if batch is None:
        return inputs
    if data_parallel > 1:
        dpm.microbatch_size(batch, data_parallel, microbatches)  # PlanError naming both when it does not divide
        microbatches *= data_parallel
    elif batch % microbatches:
        raise PlanError(f"the global batch of the example inputs is {batch}, not divisible into {microbatches} "
                        f"microbatches: use --batch {microbatches * max(1, -(-batch // microbatches))} "
                        f"or --microbatches dividing {batch}")
    args, kwargs = split_batch(inputs, microbatches, "example input", batch, batch_dims.inputs)[0]
    return tuple(args), dict(kwargs)


def check_plan_config(config: PlanConfig) -> tuple[str, int]:
    """The schedule and number of microbatches `config` asks for, or a PlanError saying what is wrong."""
    schedule, m = check_config(1 << 30, config.num_ranks, fixed_chunks(config.chunks, config.schedule),
                               config.microbatches, config.schedule)
    check_gap(config.gap)
    dpm.check_data_parallel(config.data_parallel, config.data_parallel_mode)
    if config.mixed_precision and config.dtype not in (None, "float32"):
        raise PlanError(f"--mixed-precision {config.mixed_precision} keeps the parameters in float32: leave "
                        f"--dtype at float32 (it was {config.dtype})")
    if config.dtype is not None and config.dtype not in DTYPES:
        raise PlanError(f"unknown dtype {config.dtype!r}: use one of {', '.join(DTYPES)}")
    return schedule, m


def plan_model(model: torch.nn.Module, example_args: tuple, example_kwargs: dict | None, config: PlanConfig,
               on_step: Callable[[str], None] | None = None, loss_fn: Callable[[Any, Any], Any] | None = None,
               example_target: Any = None, need_graph: bool = True,
               batch_dims: BatchDims = BatchDims(), microbatch: tuple[tuple, dict] | None = None) -> PlanResult:
    """Plan `model` (called as model(*example_args, **example_kwargs) on a global batch: with
    config.data_parallel replicas, the batch of all of them, costed per microbatch of one replica).

    on_step(msg) is called before each step (progress display).
    loss_fn / example_target (a global batch's target): when both are given, the loss's time and
        memory count on the block producing the output (it runs on the last stage).
    need_graph: capture even when the profile cache holds the model (the runtime splits the
        graph); False (the CLI) leaves PlanResult.captured None on a cache hit.
    config.use_cache: read and write the profile cache (partitioner/profile_cache.py).
    batch_dims: where the batch lies in each input leaf and the target (microbatch.resolve_batch_dims).
    microbatch: (args, kwargs) of the example inputs' first microbatch of one replica, where the caller
        has cut them already (compile_parallel, which checked the batch divides); None: cut here
        (microbatch_inputs).
    """
    step = on_step or (lambda msg: None)
    _, m = check_plan_config(config)
    register_dataclasses((example_args, example_kwargs))
    args, kwargs = microbatch if microbatch is not None else microbatch_inputs(
        example_args, example_kwargs, m, config.data_parallel, batch_dims)
    spec = get_device_spec(config.device_type)
    profiled = _capture_and_profile(model, args, kwargs, config, spec, step, need_graph, loss_fn,
                                    example_target, m * config.data_parallel,
                                    batch_size((example_args, example_kwargs or {}), batch_dims.inputs),
                                    batch_dims)
    result = plan_profiled(profiled.annotated, profiled.costs, profiled.loss_costs, config, on_step,
                           model_name=type(model).__name__)
    result.captured, result.profile_key = profiled.captured, profiled.key
    result.microbatch_args, result.microbatch_kwargs = args, kwargs
    return result


def plan_profiled(annotated: AnnotatedGraph, costs: NodeCosts, loss_costs: NodeCosts | None, config: PlanConfig,
                  on_step: Callable[[str], None] | None = None, model_name: str | None = None) -> PlanResult:
    """The half of plan_model after capture and profiling: coarsen, solve (and score the baselines
    when config.compare). The CLI calls it alone on a profile the cache holds for a zoo model.
    config.chunks "auto": each candidate chunk count planned on the same profile, the chosen one returned
    with every candidate in PlanResult.chunk_choices (schedule_choice.choose_chunks)."""
    if config.chunks == AUTO:
        _, m = check_plan_config(config)
        result, choices = choose_chunks(
            lambda chunks, limit: plan_profiled(annotated, costs, loss_costs, dataclasses.replace(
                config, chunks=chunks, time_limit_s=limit), on_step, model_name),
            lambda r: r.plan.step_time_s, config.num_ranks, m, config.time_limit_s)
        result.chunk_choices = choices
        return result
    step = on_step or (lambda msg: None)
    schedule, m = check_plan_config(config)
    spec = get_device_spec(config.device_type)
    cap = config.memory_cap_bytes if config.memory_cap_bytes is not None else spec.mem_bytes
    bw = config.link_bw_bytes_per_s or spec.intra_node_bw_bytes_per_s
    dp = dpm.DataParallel(config.data_parallel, config.data_parallel_mode,
                          dpm.dp_bandwidth(spec, config.data_parallel, config.num_ranks, config.gpus_per_host,
                                           config.dp_bw_bytes_per_s))
    launch_and_run = costs.launch_and_run_s()
    graphs = config.cuda_graphs or (config.graphs_when_host_bound and costs.host_bound())
    if graphs:
        costs = costs.under_cuda_graphs()
        loss_costs = loss_costs.under_cuda_graphs() if loss_costs is not None else None
    K = config.num_ranks * config.chunks
    bg = coarsen(annotated, costs, depth=config.depth, min_blocks=K, target_blocks=BLOCKS_PER_STAGE * K)
    if loss_costs is not None:
        bg = attach_loss(bg, loss_costs)
    block_params, shared_params = dpm.param_bytes(bg, annotated.param_bytes, costs.param_state_bytes)
    bg = dpm.shard_block_graph(bg, block_params, shared_params, dp)  # the solver's memory cap sees the sharding
    step(f"solving the ILP: {len(bg.blocks)} blocks -> {K} stages (up to {config.time_limit_s:g} s)")
    plan = solve(bg, config.num_ranks, config.chunks, m, schedule, memory_cap_bytes=cap, link_bw_bytes_per_s=bw,
                 time_limit_s=config.time_limit_s, gap=config.gap)
    plan = dataclasses.replace(plan, origin=PlanOrigin(model_name, spec.name, spec.mem_bytes, package_version()))
    compute = compute_dtype(config.mixed_precision) or costs.dtype
    slowdown = spec.waiting_send_slowdown_for(compute) if config.sends_hold_sms else 1.0
    plan = dpm.apply_data_parallel(with_waiting_sends(plan, bg, slowdown), bg, block_params, shared_params, dp)
    baselines = {}
    if config.compare:
        step("scoring the baselines")
        baselines = all_baselines(bg, config.num_ranks, config.chunks, m, schedule, cap, bw)
        baselines = {name: dpm.apply_data_parallel(with_waiting_sends(baseline, bg, slowdown), bg, block_params,
                                                   shared_params, dp)
                     for name, baseline in baselines.items()}
    return PlanResult(None, annotated, costs, bg, plan, baselines, cuda_graphs=graphs,
                      launch_and_run_s=launch_and_run)


def capture_for_training(model: torch.nn.Module, args: tuple, kwargs: dict, mixed_precision: str | None = None):
    """capture(), then the mixed-precision cast when asked for: the graph the stages will run."""
    dtype = compute_dtype(mixed_precision)
    return capture_mixed(model, args, kwargs, dtype) if dtype is not None else capture(model, args, kwargs)


def check_parameter_share(captured: Any, config: PlanConfig, spec: Any, dtype: torch.dtype) -> None:
    """PlanError when the parameters' training state alone (weights, gradients, optimizer states),
    spread evenly over the ranks, exceeds the memory cap: no plan fits, whatever its activations.
    Known from the captured graph, so a model that cannot fit (llama-70b in fp32 with AdamW on
    8 x 80 GiB: 131 GiB a rank) is refused before profiling and solving. The solver checks the
    same sum (the profile's param_state_bytes), so a profile read from the cache is refused there."""
    cap = config.memory_cap_bytes if config.memory_cap_bytes is not None else spec.mem_bytes
    if cap is None or config.data_parallel > 1:  # sharded over replicas: the solver checks the sharded sum
        return
    share = sum(parameter_state_bytes(captured, dtype=dtype, optimizer=config.optimizer).values()) / config.num_ranks
    if share <= cap:
        return
    stages = config.num_ranks * (config.chunks if config.chunks != AUTO else 1)
    raise PlanError(f"memory cap {human_bytes(cap)} per device is too small: no split into "
                    f"{stages} stages fits; the smallest per-device memory that fits is "
                    f"at least {human_bytes(share)} (parameters, gradients and {config.optimizer} states alone, over "
                    f"{config.num_ranks} devices). Raise the cap (--memory / memory=), add devices, or use a "
                    "lighter optimizer (--optimizer sgd)")


@dataclass
class _Profiled:
    captured: Captured | None  # None when read from the cache without need_graph
    annotated: AnnotatedGraph
    costs: NodeCosts
    loss_costs: NodeCosts | None
    key: str | None  # the profile cache's key of the model (None: the cache is off)


def _capture_and_profile(model: torch.nn.Module, args: tuple, kwargs: dict, config: PlanConfig, spec: DeviceSpec,
                         step: Callable[[str], None], need_graph: bool, loss_fn: Any, example_target: Any,
                         parts: int, global_batch: int | None, dims: BatchDims = BatchDims()) -> _Profiled:
    """Capture, annotate and profile one microbatch (and the loss), or read them from the profile cache.

    parts: microbatches of the global batch (x data-parallel replicas); the target is cut to one
    as train_step cuts it (dims: the batch dims)."""
    with_loss = loss_fn is not None and example_target is not None
    target = (split_target(example_target, parts, global_batch, dims)[0]
              if with_loss else None)
    key, hit = None, None
    if config.use_cache:
        options = (config.dtype, config.mixed_precision, config.compiled) + (("measured",) if config.measure else ())
        key = profile_cache.model_key(model, args, kwargs, device_spec=spec, optimizer=config.optimizer,
                                      options=options,
                                      loss_fn=loss_fn if with_loss else None, target=target)
        hit = profile_cache.load(key)
    captured = None
    if hit is None or need_graph:
        step(f"capturing {type(model).__name__} (one microbatch)")
        captured = capture_for_training(model, args, kwargs, config.mixed_precision)
    if hit is not None:
        return _Profiled(captured, hit.annotated, hit.costs, hit.loss_costs, key)
    own_dtype = graph_float_dtype(captured.graph_module)
    dtype = DTYPES[config.dtype] if config.dtype is not None else own_dtype
    if config.measure and dtype != own_dtype:
        raise PlanError(f"measured costs are in the model's own dtype ({own_dtype}), not {dtype}: plan with "
                        f"dtype=None, or cast the model (model.to({dtype})) before measuring")
    check_parameter_share(captured, config, spec, dtype)
    annotated = annotate(captured)
    example_inputs = captured.flatten_inputs(args, kwargs) if config.measure else None
    step(f"{'measuring' if config.measure else 'profiling'} {len(annotated.nodes)} nodes for {spec.name}"
         + (" (one torch.compile per distinct layer)" if config.measure and config.compiled else "")
         + (", then what the compiled stages save (AOTAutograd's partitioner)" if config.compiled else ""))
    costs = profile(captured, annotated, device=spec, dtype=dtype, optimizer=config.optimizer,
                    progress=False, compiled=config.compiled, measure=config.measure, example_inputs=example_inputs)
    loss_costs = None
    if with_loss:
        step("profiling the loss")
        loss_costs = profile_loss(loss_fn, captured, target, device=spec, dtype=dtype, optimizer=config.optimizer,
                                  autocast_fp32=config.mixed_precision is not None)
    if key is not None:
        profile_cache.store(key, profile_cache.CachedProfile(annotated, costs, loss_costs))
    return _Profiled(captured, annotated, costs, loss_costs, key)
