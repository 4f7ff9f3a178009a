"""profile(): the NodeCosts of a captured graph, for one microbatch.

One pass over the graph on fake tensors (partitioner/cost_models/flops.py) gives every
node's FLOPs, kernels and saved tensors; memory.py turns those into bytes and
time.py into seconds (roofline from a DeviceSpec), or measure.py (per block on this
machine's device and spread over the block's nodes in proportion to their
roofline times).

dtype: costs may be asked for in another dtype than the graph was captured in
(e.g. a model captured in fp32, planned for bf16 training). Then floating
tensors of the captured dtype count at the new dtype's size, FLOP counts stay
(they do not depend on dtype), and times use that dtype's peak FLOP/s. Nodes
that explicitly compute in another dtype (fp32 softmax in a bf16 model) are not
re-expressed: capture in the target dtype when that matters.
"""
from __future__ import annotations

import operator
import warnings
from collections import Counter
from typing import Any, Sequence

import torch
import torch.fx

from partitioner.cost_models.compiled_memory import compiled_saved_bytes
from partitioner.cost_models.device import DeviceSpec, get_device_spec
from partitioner.cost_models.flops import COMPUTE_OPS, NodeTrace, OpKernel, trace_nodes
from partitioner.cost_models.fusion import compiled_times, fuse_pointwise_runs
from partitioner.cost_models.memory import (OPTIMIZER_STATES, DtypeScale, backward_walk, output_savers, params_state_bytes,
                                 saved_bytes_per_node, value_bytes)
from partitioner.cost_models.node_costs import NodeCost, NodeCosts
from partitioner.cost_models.measure import compiled_call_overhead, measure_block_times
from partitioner.cost_models.time import (NO_TIME, Kernel, NodeTime, analytic_node_time, gemm_efficiency,
                                          math_attention_kernels, roofline_time_s)
from partitioner.errors import CostModelError
from partitioner.runtime.compiled import DEFAULT_OPTIONS as DEFAULT_COMPILE_OPTIONS
from partitioner.runtime.gradients import foreach_launches
from partitioner.units import dtype_name


def graph_float_dtype(gm: torch.fx.GraphModule) -> torch.dtype:
    """The most common floating dtype among the graph's parameters (else its values), default fp32."""
    counts: Counter = Counter()
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            counts[val.dtype] += val.numel() * (1000 if n.op == "get_attr" else 1)
    return counts.most_common(1)[0][0] if counts else torch.float32


def _canonical_fqns(gm: torch.fx.GraphModule, tied: Sequence[Sequence[str]]) -> dict[str, str]:
    """FQN -> canonical FQN: Captured.tied groups, plus get_attr targets that are one and the
    same tensor object in `gm` (a tied weight loaded under two names)."""
    canonical = {fqn: group[0] for group in tied for fqn in group}
    first_by_id: dict[int, str] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        target = str(n.target)
        try:
            obj = operator.attrgetter(target)(gm)
        except AttributeError:
            continue
        if isinstance(obj, torch.Tensor):
            first = first_by_id.setdefault(id(obj), canonical.get(target, target))
            canonical.setdefault(target, first)
    return canonical


def module_paths_from_graph(gm: torch.fx.GraphModule) -> dict[str, str]:
    """node name -> owning module FQN from nn_module_stack (used when no AnnotatedGraph is given)."""
    out = {}
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        if n.op == "get_attr":
            path = str(n.target).rpartition(".")[0]
        out[n.name] = path
    return out


def layer_key(module_path: str, depth: int = 2) -> str:
    """The layer a module belongs to: its path up to the first numeric component
    ("transformer.h.3.attn" -> "transformer.h.3", "encoder.block.0.layer.1" -> "encoder.block.0"),
    or its first `depth` components when it is in no numbered container."""
    parts = module_path.split(".") if module_path else []
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:depth])


def default_measure_groups(gm: torch.fx.GraphModule, module_paths: dict[str, str]) -> list[list[str]]:
    """Runs of consecutive computing nodes of the same layer (see layer_key): one block per
    transformer layer, plus the embeddings, final norm and head around them."""
    groups: list[list[str]] = []
    last = None
    for n in gm.graph.nodes:
        if n.op not in COMPUTE_OPS:
            continue
        key = layer_key(module_paths.get(n.name, ""))
        if key != last or not groups:
            groups.append([])
            last = key
        groups[-1].append(n.name)
    return groups


def _spread(total: float, weights: list[float]) -> list[float]:
    s = sum(weights)
    if s <= 0:
        return [total / len(weights)] * len(weights)
    return [total * w / s for w in weights]


def profile(captured: Any, annotated: Any = None, *, device: str | DeviceSpec = "h100",
            dtype: torch.dtype = torch.float32, optimizer: str = "adamw", measure: bool = False,
            example_inputs: Sequence[Any] | None = None, measure_groups: list[list[str]] | None = None,
            inputs_require_grad: bool = False, progress: bool = True, compiled: bool = False,
            reuse: bool = True) -> NodeCosts:
    """Cost every node of `captured` (a passes.capture_io.Captured, or a bare GraphModule) for one microbatch.

    annotated: the AnnotatedGraph (module paths for measured blocks); optional.
    device: DeviceSpec (or table name / JSON path) used by the roofline times.
    dtype: dtype the costs are expressed in (see the module docstring).
    optimizer: whose state counts in param_state_bytes (adamw, adam, sgd-momentum, sgd, none).
    measure: time blocks of nodes on the device the graph was captured on instead of the
        roofline; example_inputs (flat, as the placeholders take them) give real values.
    compiled: the stages run under torch.compile: analytic times with inductor's fusion
        (partitioner/cost_models/fusion.py), or with measure each block timed through torch.compile
        (one compilation per distinct block: the identical layers of a transformer share one).
    """
    if optimizer not in OPTIMIZER_STATES:
        raise CostModelError(f"unknown optimizer '{optimizer}': choose one of {sorted(OPTIMIZER_STATES)}")
    gm = captured if isinstance(captured, torch.fx.GraphModule) else captured.graph_module
    tied = getattr(captured, "tied", None) or (annotated.tied if annotated is not None else [])
    spec = get_device_spec(device)
    scale = DtypeScale(graph_float_dtype(gm), dtype)

    traces = trace_nodes(gm, inputs_require_grad=inputs_require_grad, reuse=reuse)
    saved = saved_bytes_per_node(traces, scale)
    savers = output_savers(traces)
    # per node, for plans: a tied weight's users usually sit on different ranks (replicas), so
    # the sums of its gradients on one device are left out
    working = {s.node: s.grads_in_flight_bytes + s.workspace_bytes
               for s in backward_walk(gm, traces, saved, scale, tied_sums=False)}
    compiled_saved = _compiled_saved(gm, traces, scale) if compiled else None
    if compiled_saved is not None:  # the backward's working memory stays the eager walk's
        saved = {name: compiled_saved.get(name, 0) for name in traces}
        savers = {name: name for name, b in compiled_saved.items()
                  if traces[name].op != "output" and 0 < value_bytes(traces[name].output, scale) <= b}
    graph_nodes = {n.name: n for n in gm.graph.nodes}

    param_bytes_by_node: dict[str, int] = {}
    for name, trace in traces.items():
        node = graph_nodes[name]
        param_bytes_by_node[name] = sum(value_bytes(traces[a.name].output, scale) for a in node.all_input_nodes
                                        if a.op == "get_attr")

    if compiled:
        times = compiled_times(gm, traces, spec, scale, lambda t: node_kernels(t, spec, scale, padded=True))
    else:
        times = {name: _analytic(t, spec, scale) for name, t in traces.items()}
    times.update(_gradient_accumulation(gm, traces, spec, scale, compiled))
    if measure:
        times = _measured_times(gm, traces, times, annotated, example_inputs, measure_groups, progress,
                                compile_options=dict(DEFAULT_COMPILE_OPTIONS) if compiled else None)

    nodes = {}
    for name, trace in traces.items():
        out_bytes = 0 if trace.op == "output" else value_bytes(trace.output, scale)
        nodes[name] = NodeCost(name=name, fwd_flops=float(trace.fwd_flops), bwd_flops=float(trace.bwd_flops),
                               param_bytes=param_bytes_by_node[name], output_bytes=out_bytes,
                               saved_bytes=saved[name], bwd_working_bytes=working.get(name, 0),
                               fwd_time_s=times[name].fwd_s, bwd_time_s=times[name].bwd_s,
                               host_fwd_time_s=times[name].host_fwd_s, host_bwd_time_s=times[name].host_bwd_s,
                               output_saved_by=savers.get(name, ""), output_requires_grad=trace.requires_grad)
    return NodeCosts(nodes=nodes, param_state_bytes=parameter_state_bytes(gm, tied, dtype, optimizer),
                     device=spec.name, dtype=dtype_name(dtype), optimizer=optimizer,
                     time_source="measured" if measure else "analytic", stage_pass=stage_pass_time(spec, compiled))


def stage_pass_time(spec: DeviceSpec, compiled: bool) -> NodeTime:
    """NodeCosts.stage_pass on `spec`: spec.stage_pass_s per pass, plus for compiled stages the
    compiled call's machinery. On the CPU device (host time 0 by convention) device time, the
    compiled part measured here (compiled_call_overhead: a compiled `x * 2`, forward and
    backward; 0, with a warning, where this CPU cannot compile); on a GPU host time, the
    compiled part spec.compiled_stage_pass_s."""
    if spec.name != "cpu":
        host = spec.stage_pass_s + (spec.compiled_stage_pass_s if compiled else 0.0)
        return NodeTime(0.0, 0.0, host, host)
    call = NO_TIME
    if compiled:
        try:
            call = compiled_call_overhead(torch.device("cpu"), dict(DEFAULT_COMPILE_OPTIONS))
        except Exception as err:  # noqa: BLE001 - no C++ compiler, or inductor failed: the pass's rest stands
            warnings.warn(f"a compiled stage's per-call cost: torch.compile failed on this CPU ({type(err).__name__}: "
                          f"{str(err)[:200]}); costing the stage pass without it.", RuntimeWarning, stacklevel=3)
    return NodeTime(spec.stage_pass_s + call.fwd_s, spec.stage_pass_s + call.bwd_s)


def _compiled_saved(gm: torch.fx.GraphModule, traces: dict[str, NodeTrace], scale: DtypeScale) -> dict[str, int] | None:
    """compiled_saved_bytes, or None (the eager saved bytes stand) with a warning where
    AOTAutograd cannot partition the graph on fake tensors."""
    try:
        return compiled_saved_bytes(gm, traces, scale)
    except Exception as err:  # noqa: BLE001 - an upper bound remains: the eager saved bytes
        warnings.warn(f"compiled stages' activation memory: AOTAutograd could not partition the graph on fake "
                      f"tensors ({type(err).__name__}: {str(err)[:200]}); costing what the eager graph saves, an "
                      "upper bound.", RuntimeWarning, stacklevel=3)
        return None


def parameter_state_bytes(captured: Any, tied: Sequence[Sequence[str]] = (), dtype: torch.dtype = torch.float32,
                          optimizer: str = "adamw") -> dict[str, int]:
    """FQN -> bytes of weight, gradient and optimizer state (cost_models.memory.param_state_bytes)
    of every parameter and buffer the graph reads, a tied one once under its first FQN, in `dtype`
    (see the module docstring): profile()'s NodeCosts.param_state_bytes, known from the graph alone."""
    gm = captured if isinstance(captured, torch.fx.GraphModule) else captured.graph_module
    tied = tied or getattr(captured, "tied", None) or []
    scale = DtypeScale(graph_float_dtype(gm), dtype)
    canonical = _canonical_fqns(gm, tied)
    rows: dict[str, tuple[str, int, torch.dtype, bool]] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        target = str(n.target)
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor):
            val = operator.attrgetter(target)(gm)
            if not isinstance(val, torch.Tensor):
                continue
        trainable = (val.is_floating_point() or val.is_complex()) and _is_trainable(gm, target)
        fqn = canonical.get(target, target)
        rows[fqn] = (fqn, val.numel(), val.dtype, trainable)
    return params_state_bytes(rows.values(), optimizer, scale)


def _is_trainable(gm: torch.fx.GraphModule, target: str) -> bool:
    try:
        return bool(gm.get_parameter(target).requires_grad)
    except AttributeError:
        return False


_ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")

# ops eager CUDA runs as several kernels: kernels beyond the first, and passes over their
# bytes (layer norm's backward reduces the weight and bias gradients apart from the input
# gradient; the embedding backward sorts the indices and reduces segments)
_EXTRA_LAUNCHES = {"native_layer_norm_backward": 2, "embedding_dense_backward": 20}
_EXTRA_PASSES = {"native_layer_norm_backward": 1.5}
_GEMM_OPS = ("mm", "bmm", "addmm", "baddbmm", "addbmm")


def op_kernel(op: OpKernel, spec: DeviceSpec, scale: DtypeScale, padded: bool = False) -> Kernel:
    """The Kernel `op` runs in `scale.to_dtype`: its bytes, and for FLOPs the efficiency of
    fused attention, of a 16-bit matmul over a tensor whose innermost dimension is not a
    multiple of 16 bytes (tensor cores fall back to slow kernels; not when `padded`: inductor
    pads such matmuls to aligned shapes), or of a plain matmul (gemm_efficiency: an fp32 one
    with K or N at most one head wide runs the CUDA cores' narrow SIMT kernels)."""
    moved = sum(scale.nbytes(numel, dt) for numel, dt, _ in op.tensors) * _EXTRA_PASSES.get(op.name, 1.0)
    floats = [(scale.to_dtype if dt == scale.from_dtype else dt, last) for _, dt, last in op.tensors
              if dt.is_floating_point]
    dtype = floats[-1][0] if floats else scale.to_dtype
    eff, reduction, width = None, 0, 0
    if op.flops:
        width = op.tensors[-1][2] if op.name in _GEMM_OPS and op.tensors else 0  # the output's N
        eff, reduction = gemm_efficiency(spec, dtype, op.reduction, width), op.reduction
        if any(key in op.name for key in _ATTENTION_OPS):
            eff, reduction = spec.attention_efficiency, 0
        elif not padded and any(dt.itemsize < 4 and (last * dt.itemsize) % 16 for dt, last in floats):
            eff = spec.misaligned_matmul_efficiency
    return Kernel(float(op.flops), moved, dtype, matmul=bool(op.flops), flops_efficiency=eff,
                  launches=1 + _EXTRA_LAUNCHES.get(op.name, 0), reduction=reduction, width=width)


def node_kernels(trace: NodeTrace, spec: DeviceSpec, scale: DtypeScale,
                 padded: bool = False) -> tuple[list[Kernel], list[Kernel]]:
    """The kernels a node's forward and its backward launch on a GPU. padded: as a compiled
    stage runs them (op_kernel's padded matmuls; the math attention path's pointwise passes fused)."""
    if trace.op not in COMPUTE_OPS:
        return [], []
    call = trace.attention
    if call is not None:  # the kernel(s) a GPU runs, not what fake tensors ran
        dtype = scale.to_dtype if call.dtype == scale.from_dtype else call.dtype
        if call.backend == "math":
            fwd, bwd = math_attention_kernels(call, dtype)
            if padded:
                fwd, bwd = fuse_pointwise_runs(fwd), fuse_pointwise_runs(bwd)
        else:
            eff = spec.masked_attention_efficiency if call.mask_numel and dtype.itemsize < 4 else spec.attention_efficiency
            grad_mask = call.mask_numel and call.mask_requires_grad and dtype.itemsize < 4
            if grad_mask and spec.grad_mask_attention_efficiency:  # the memory-efficient kernel, writing the mask grad
                eff = spec.grad_mask_attention_efficiency
            if call.is_causal and not call.mask_numel:
                eff *= spec.causal_attention_speedup
            moved = call.io_numel() * dtype.itemsize
            mask_grad = call.mask_numel * dtype.itemsize if call.mask_requires_grad else 0  # written by the backward
            fwd = [Kernel(call.fwd_flops(), moved, dtype, True, eff)]
            bwd = [Kernel(call.bwd_flops(), 2 * moved + mask_grad, dtype, True, eff, launches=3)]  # dO.O, main, dQ cast
        return fwd, bwd if trace.bwd_flops else []
    return ([op_kernel(k, spec, scale, padded) for k in trace.fwd_ops],
            [op_kernel(k, spec, scale, padded) for k in trace.bwd_ops])


def _gradient_accumulation(gm: torch.fx.GraphModule, traces: dict[str, NodeTrace], spec: DeviceSpec,
                           scale: DtypeScale, compiled: bool) -> dict[str, NodeTime]:
    """The backward of every trainable parameter's node: adding its gradient into .grad, as each
    microbatch does (read both, write one). Compiled stages add with one foreach add over the
    stage's parameters (runtime/gradients.py): the node's share of its launches, on the device and
    the host, at the foreach add's bandwidth (spec.foreach_bw_efficiency); eager stages with
    autograd's AccumulateGrad, a launch each (its host time is left to the eager dispatch constants)."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.name in traces and _is_trainable(gm, node.target):
            nbytes = 3 * value_bytes(traces[node.name].output, scale)
            if compiled and spec.foreach_bw_efficiency:  # roofline_time_s assumes mem_bw_efficiency
                nbytes *= spec.mem_bw_efficiency / spec.foreach_bw_efficiency
            launches = foreach_launches(traces[node.name].output.numel()) if compiled else 1
            out[node.name] = NodeTime(0.0, roofline_time_s(0.0, nbytes, launches, spec), 0.0,
                                      launches * spec.compiled_launch_overhead_s if compiled else 0.0)
    return out


def _analytic(trace: NodeTrace, spec: DeviceSpec, scale: DtypeScale) -> NodeTime:
    if trace.op not in COMPUTE_OPS:
        return NodeTime(0.0, 0.0)
    return analytic_node_time(*node_kernels(trace, spec, scale), spec, dispatched=True)


def _measured_times(gm: torch.fx.GraphModule, traces: dict[str, NodeTrace], analytic: dict[str, NodeTime],
                    annotated: Any, example_inputs: Sequence[Any] | None, groups: list[list[str]] | None,
                    progress: bool, compile_options: dict[str, Any] | None = None) -> dict[str, NodeTime]:
    """Measure blocks (through torch.compile with compile_options), then give each node its share
    of its block's device time and of its host time, in proportion to its analytic ones."""
    if groups is None:
        paths = ({n.name: n.module_path for n in annotated.nodes} if annotated is not None
                 else module_paths_from_graph(gm))
        groups = default_measure_groups(gm, paths)
    requires_grad = {name: t.requires_grad for name, t in traces.items()}
    if progress:
        from rich.progress import Progress  # lazy: only measured mode shows a progress bar
        with Progress(transient=True) as bar:
            task = bar.add_task(f"measuring {len(groups)} blocks", total=len(groups))
            measured = measure_block_times(gm, groups, example_inputs, requires_grad=requires_grad,
                                           progress=lambda k: bar.advance(task, k), compile_options=compile_options)
    else:
        measured = measure_block_times(gm, groups, example_inputs, requires_grad=requires_grad,
                                       compile_options=compile_options)
    times = {name: NodeTime(0.0, 0.0) for name in traces}
    for group, block_time in zip(groups, measured):
        fwd = _spread(block_time.fwd_s, [analytic[n].fwd_s for n in group])
        bwd = _spread(block_time.bwd_s, [analytic[n].bwd_s for n in group])
        host_fwd = _spread(block_time.host_fwd_s, [analytic[n].host_fwd_s for n in group])
        host_bwd = _spread(block_time.host_bwd_s, [analytic[n].host_bwd_s for n in group])
        for n, f, b, hf, hb in zip(group, fwd, bwd, host_fwd, host_bwd):
            times[n] = NodeTime(f, b, hf, hb)
    return times


def module_costs(costs: NodeCosts, gm: torch.fx.GraphModule, module_paths: dict[str, str] | None = None,
                 depth: int | None = None, tied: Sequence[Sequence[str]] = ()) -> dict[str, NodeCost]:
    """Costs per module: every prefix (up to `depth` components) of a node's module path.

    FLOPs, saved bytes and times are sums over the module's nodes; param_bytes are
    the parameters the module owns (its get_attr nodes; a tied weight counts once,
    at its first get_attr);
    output_bytes are the values it produces that are read outside it (its
    activations crossing the module boundary). "" (the root) holds the totals.
    module_paths: node name -> NodeInfo.module_path (default: from nn_module_stack).
    Modules come in tree pre-order (a parent, then its children in execution order).
    """
    paths = module_paths if module_paths is not None else module_paths_from_graph(gm)
    canonical = _canonical_fqns(gm, tied)
    counted_params: set[str] = set()
    sums: dict[str, dict[str, float]] = {}
    summed = ("fwd_flops", "bwd_flops", "saved_bytes", "fwd_time_s", "bwd_time_s", "host_fwd_time_s",
              "host_bwd_time_s")

    def prefixes(path: str) -> list[str]:
        parts = path.split(".") if path else []
        top = len(parts) if depth is None else min(depth, len(parts))
        return [".".join(parts[:i]) for i in range(top + 1)]

    zero = dict.fromkeys((*summed, "param_bytes", "output_bytes"), 0)
    for n in gm.graph.nodes:
        c = costs.nodes.get(n.name)
        if c is None:
            continue
        new_param = False
        if n.op == "get_attr":
            fqn = canonical.get(str(n.target), str(n.target))
            new_param = fqn not in counted_params
            counted_params.add(fqn)
        mine = prefixes(paths.get(n.name, ""))
        readers = [prefixes(paths.get(u.name, "")) if u.op != "output" else [None] for u in n.users]
        for key in mine:
            acc = sums.setdefault(key, dict(zero))
            for f in summed:
                acc[f] += getattr(c, f)
            if n.op == "get_attr":
                acc["param_bytes"] += c.output_bytes if new_param else 0
            elif n.op != "placeholder" and any(key not in r for r in readers):
                acc["output_bytes"] += c.output_bytes
    # tree pre-order: children after their parent, siblings in order of their first computing node
    first: dict[str, int] = {}
    nodes = list(gm.graph.nodes)
    for i, n in enumerate(nodes):
        index = i if n.op not in ("get_attr", "placeholder") else len(nodes) + i
        for key in prefixes(paths.get(n.name, "")):
            first[key] = min(first.get(key, index), index)

    def order(key: str) -> tuple[int, ...]:
        parts = key.split(".") if key else []
        return tuple(first.get(".".join(parts[:i]), 0) for i in range(len(parts) + 1))

    return {k: NodeCost(name=k, **{f: (int(v) if f.endswith("bytes") else float(v)) for f, v in sums[k].items()})
            for k in sorted(sums, key=order)}
