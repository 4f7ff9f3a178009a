"""Time of every node measured on the real device (the analytic model: cost_models/time.py).

`measure_block_times` cuts each group of nodes (a block) out as its own
GraphModule, feeds it real tensors of the captured shapes and times its forward and
its forward+backward (warm-up, then medians of repeats). On CUDA the GPU's busy time
and the host's dispatch time are measured apart (the call is queued behind a sleep
kernel, see `time_fwd_bwd`): blocks timed one by one cannot overlap one block's host
work with another's kernels as a whole step does, so summing their wall times
overstates host-bound runs; a stage takes max(sum GPU, sum host) per pass instead.
A block alone dispatches slower than inside a whole graph, so with example inputs each
block's host time is also measured inside whole steps (`_host_in_context`: a timestamp
after every node of the forward, a gradient hook at every block's outputs in the
backward) and the smaller of the two kept. On CPU, perf_counter of repeats back to back.
Results are cached on disk, keyed by the block's code, shapes, dtypes and device, in
$PARTITIONER_CACHE or ~/.cache/partitioner/.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree

from partitioner.cost_models.time import NodeTime
from partitioner.errors import CostModelError

def cache_dir() -> Path:
    """Where measured times are cached: $PARTITIONER_CACHE or ~/.cache/partitioner."""
    return Path(os.environ.get("PARTITIONER_CACHE") or Path.home() / ".cache" / "partitioner")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{torch.get_num_threads()}threads"


@dataclass
class _Block:
    module: torch.fx.GraphModule
    inputs: list[torch.fx.Node]  # nodes of the original graph feeding each placeholder
    key: str = ""


def extract_block(gm: torch.fx.GraphModule, names: Sequence[str]) -> _Block:
    """A GraphModule computing the nodes `names` of `gm` from placeholders for everything else.

    get_attr nodes (parameters) become placeholders too, so the block holds no
    weights; non-tensor values of outside nodes are inlined as constants. Node
    names are canonical (v0, v1, ...) so identical layers produce identical code.
    """
    wanted = set(names)
    nodes = [n for n in gm.graph.nodes if n.name in wanted and n.op not in ("placeholder", "get_attr", "output")]
    if not nodes:
        raise CostModelError(f"block {list(names)[:3]}... has no computing node to measure")
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    inputs: list[torch.fx.Node] = []
    inside = set(nodes)

    def outside_value(n: torch.fx.Node) -> Any:
        if n not in env:
            val = n.meta.get("val")
            if val is None or any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(val)):
                env[n] = graph.placeholder(f"in{len(inputs)}")
                inputs.append(n)
            else:
                env[n] = val  # a python constant (int, bool, shape...)
        return env[n]

    for i, n in enumerate(nodes):
        args, kwargs = torch.fx.map_arg((n.args, n.kwargs), lambda a: env[a] if a in inside else outside_value(a))
        env[n] = graph.create_node(n.op, n.target, args, kwargs, name=f"v{i}")
    users_outside = [n for n in nodes if any(u not in inside for u in n.users)] or nodes[-1:]
    graph.output(tuple(env[n] for n in users_outside))
    module = torch.fx.GraphModule(gm, graph)
    shapes = [[(tuple(t.shape), str(t.dtype)) for t in pytree.tree_leaves(n.meta.get("val"))
               if isinstance(t, torch.Tensor)] for n in inputs]
    key = hashlib.sha256(repr((module.code, shapes)).encode()).hexdigest()[:32]
    return _Block(module, inputs, key)


def _make_input(node: torch.fx.Node, device: torch.device, requires_grad: bool, real: Any = None) -> Any:
    val = node.meta.get("val")
    if real is None and isinstance(val, (list, tuple)):  # e.g. the outputs of split, read by getitem
        return type(val)(_make_tensor(node, v, device, requires_grad) for v in val)
    return _make_tensor(node, val, device, requires_grad, real)


def _make_tensor(node: torch.fx.Node, val: Any, device: torch.device, requires_grad: bool, real: Any = None) -> Any:
    if real is not None:
        if isinstance(real, (list, tuple)):
            return type(real)(_make_tensor(node, None, device, requires_grad, r) for r in real)
        t = real
    elif not isinstance(val, torch.Tensor):
        raise CostModelError(f"cannot measure: input '{node.name}' has no meta['val'] tensor to size it")
    elif val.is_floating_point():
        t = torch.randn(tuple(val.shape), dtype=val.dtype, device=device)
    else:
        t = torch.zeros(tuple(val.shape), dtype=val.dtype, device=device)  # index 0 is always valid
    if isinstance(t, torch.Tensor):
        t = t.detach().to(device)
        if requires_grad and t.is_floating_point():
            t.requires_grad_(True)
    return t


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def grad_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of `out` that require grad (what a backward starts from)."""
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]


def time_fwd_bwd(fn: Callable[[], Any], device: torch.device, grad_inputs: list[torch.Tensor],
                 warmup: int = 2, repeats: int = 5, *, separate_host: bool = True) -> NodeTime:
    """Forward and backward seconds of `fn()` (backward w.r.t. `grad_inputs`), per call.

    On CUDA with separate_host, the device and host times come apart (`_queued_call_s`):
    each call is issued behind a sleep kernel, so the host never waits for the GPU; medians
    over `repeats`; the host time is capped by the back-to-back loop's wall time. Otherwise
    (CPU, separate_host=False, or a call that can't be queued whole: a host sync inside it)
    `repeats` calls run back to back, synchronising only around the loop, as a training step
    runs them: the wall time per call, host overlapping GPU.
    backward = (forward+backward) - forward.
    """
    grads: list[torch.Tensor] | None = None
    for _ in range(max(1, warmup)):
        outs = grad_outputs(fn())
        grads = [torch.ones_like(t) for t in outs]
        if outs and grad_inputs:
            torch.autograd.grad(outs, grad_inputs, grads, allow_unused=True)
        del outs
    backward = bool(grads) and bool(grad_inputs)

    def call(with_backward: bool) -> None:
        outs = grad_outputs(fn())
        if with_backward:
            torch.autograd.grad(outs, grad_inputs, grads, allow_unused=True)

    def loop(with_backward: bool) -> float:
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(repeats):
            call(with_backward)
        if device.type == "cuda":
            end.record()
        synchronize(device)
        elapsed = start.elapsed_time(end) / 1e3 if device.type == "cuda" else time.perf_counter() - t0
        return elapsed / repeats

    if device.type == "cuda" and separate_host:
        fwd = _queued_call_s(lambda: call(False), device, repeats)
        total = _queued_call_s(lambda: call(True), device, repeats) if backward else (0.0, 0.0)
        if fwd is not None and total is not None:
            # a host that waited idle for the GPU dispatches slower than one in a busy loop: the
            # loop's wall time, max(GPU, host), bounds the host time from above
            host_fwd = min(fwd[1], loop(False))
            host_total = min(total[1], loop(True)) if backward else 0.0
            return NodeTime(fwd[0], max(0.0, total[0] - fwd[0]) if backward else 0.0,
                            host_fwd, max(0.0, host_total - host_fwd) if backward else 0.0)
    fwd_s = loop(False)
    if not backward:
        return NodeTime(fwd_s, 0.0)
    return NodeTime(fwd_s, max(0.0, loop(True) - fwd_s))


def step_walls_s(fn: Callable[[], Any], device: torch.device, grad_inputs: list[torch.Tensor], repeats: int = 5,
                 min_loops: int = 5, max_loops: int = 30, budget_s: float = 8.0) -> list[float]:
    """Wall seconds per forward + backward of `fn` run back to back, as training runs steps: one
    value per loop of `repeats` steps; loops run until `max_loops`, or `budget_s` seconds once
    `min_loops` are done.

    Why several seconds of loops: the speed of a GPU machine's host varies over seconds. On an
    H100 machine a fixed pure-Python loop took 9.0-17.4 ms from one 0.4 s sample to the next,
    and a host-bound step (t5-base bf16) 66-114 ms with it; a GPU-bound step varies < 1%.
    """
    walls: list[float] = []
    for _ in _budgeted_runs(min_loops, max_loops, budget_s):
        t = time_fwd_bwd(fn, device, grad_inputs, warmup=1 if walls else 2, repeats=repeats, separate_host=False)
        walls.append(t.fwd_s + t.bwd_s)
    return walls


def _budgeted_runs(min_runs: int, max_runs: int, budget_s: float) -> Iterator[int]:
    """0, 1, 2, ...: at least min_runs, then more while budget_s seconds (from the first) have not
    passed, never more than max_runs."""
    t0, i = time.perf_counter(), 0
    while i < max_runs and (i < min_runs or time.perf_counter() - t0 < budget_s):
        yield i
        i += 1


def step_wall_s(fn: Callable[[], Any], device: torch.device, grad_inputs: list[torch.Tensor], repeats: int = 5,
                **loops: Any) -> float:
    """The median of `step_walls_s` (same arguments)."""
    return statistics.median(step_walls_s(fn, device, grad_inputs, repeats, **loops))


_SLEEP_CYCLES_PER_S: dict[int, float] = {}


def _sleep_cycles_per_s(device: torch.device) -> float:
    """Clock cycles per second of torch.cuda._sleep on `device` (timed once per process)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SLEEP_CYCLES_PER_S:
        cycles = 20_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles // 10)  # wake the clocks up
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _SLEEP_CYCLES_PER_S[index] = cycles / (start.elapsed_time(end) / 1e3)
    return _SLEEP_CYCLES_PER_S[index]


def _queued_call_s(call: Callable[[], None], device: torch.device, repeats: int) -> tuple[float, float] | None:
    """(GPU seconds, host seconds) of one `call`, medians over `repeats`; None if it can't be queued.

    A sleep kernel holds the GPU while the host issues the call: perf_counter around the call
    is the host's dispatch time alone, and CUDA events recorded after the sleep and after the
    call time the GPU running the call's kernels back to back, with no launch gaps. Valid only
    if the host finished before the sleep did (the start event still pending); a call that
    syncs with the GPU, or queues more kernels than the launch queue holds, never is: None.
    """
    synchronize(device)
    t0 = time.perf_counter()
    call()
    synchronize(device)
    sleep_s = 2 * (time.perf_counter() - t0) + 2e-3  # the synchronised wall time bounds the host time
    gpu, host = [], []
    for _ in range(max(1, repeats)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(sleep_s * _sleep_cycles_per_s(device)))
        start.record()
        t0 = time.perf_counter()
        call()
        host_s = time.perf_counter() - t0
        end.record()
        queued_whole = not start.query()
        end.synchronize()
        if not queued_whole:
            return None
        gpu.append(start.elapsed_time(end) / 1e3)
        host.append(host_s)
    return statistics.median(gpu), statistics.median(host)


class _DiskCache:
    """JSON dict key -> [fwd_s, bwd_s, host_fwd_s, host_bwd_s] in cache_dir()/block_times.json."""

    def __init__(self):
        self.path = cache_dir() / "block_times.json"
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def get(self, key: str) -> NodeTime | None:
        v = self.data.get(key)
        return NodeTime(*v) if v else None

    def put(self, key: str, t: NodeTime) -> None:
        self.data[key] = [t.fwd_s, t.bwd_s, t.host_fwd_s, t.host_bwd_s]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)


def _real_values(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], needed: set[torch.fx.Node]) -> dict[str, Any]:
    """Run `gm` once without grad and keep the values of `needed` nodes."""
    kept: dict[str, Any] = {}

    class Keep(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in needed:  # a copy: a later in-place op must not change what the block is fed
                kept[n.name] = pytree.tree_map_only(torch.Tensor, torch.clone, out)
            return out

    with torch.no_grad():
        Keep(gm).run(*example_inputs)
    return kept


def measure_block_times(gm: torch.fx.GraphModule, node_groups: Sequence[Sequence[str]],
                        example_inputs: Sequence[Any] | None = None, device: torch.device | str | None = None, *,
                        requires_grad: dict[str, bool] | None = None, warmup: int = 2, repeats: int = 5,
                        use_cache: bool = True, progress: Callable[[int], None] | None = None,
                        compile_options: dict[str, Any] | None = None) -> list[NodeTime]:
    """Measure forward+backward time of each group of nodes on `device`.

    example_inputs: the graph's flat inputs; when given, the graph runs once and
        each block is fed the real values it reads (valid indices, masks, and
        the module's weights); when None, blocks get random floats and zero ints.
    requires_grad: node name -> whether its value depends on a trainable
        parameter (NodeTrace.requires_grad); float inputs that do get gradients.
        Default: every float input does.
    progress: called with 1 after each group (e.g. a rich progress bar's advance).
    compile_options: time each group through torch.compile(**compile_options), as compiled stages
        run it (fused kernels, one call's dispatch); a group of the same code and shapes as one
        measured before is compiled once. The host times are then the compiled calls' own: the
        eager graph's host times in context (`_host_in_context`) do not apply.
    """
    vals = [n.meta.get("val") for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    captured_on = vals[0].device if vals else torch.device("cpu")
    if captured_on.type == "meta":
        raise CostModelError("cannot measure a graph captured on the meta device (its weights do not exist): "
                             "build the model on 'cpu' or 'cuda' and capture it there, or use the analytic times")
    device = torch.device(device) if device is not None else captured_on
    if device.type != captured_on.type:
        raise CostModelError(f"the graph was captured on '{captured_on}' but is to be measured on '{device}': "
                             "capture the model on the device you measure on (device-specific constants are baked in)")
    blocks = [extract_block(gm, g) for g in node_groups]
    real = {}
    if example_inputs is not None:
        real = _real_values(gm, example_inputs, {n for b in blocks for n in b.inputs})
    cache = _DiskCache() if use_cache else None
    dev = _device_name(device)
    measured: dict[str, NodeTime] = {}
    results = []
    for block in blocks:
        key = f"{block.key}:{dev}:{torch.__version__}:{example_inputs is not None}:v2"
        if compile_options is not None:
            key += f":compiled{sorted(compile_options.items())!r}:net-of-call"
        t = measured.get(key) or (cache.get(key) if cache else None)
        if t is None:
            module = block.module.to(device)
            if compile_options is not None:  # the first warm-up call compiles forward and backward
                module = torch.compile(module, **compile_options)
            args = [_make_input(n, device, (requires_grad or {}).get(n.name, True), real.get(n.name))
                    for n in block.inputs]
            grad_inputs = [a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor) and a.requires_grad]
            with torch.enable_grad():
                t = time_fwd_bwd(lambda: module(*args), device, grad_inputs, warmup, repeats)
            if compile_options is not None:  # a stage pays its compiled call's fixed cost once, not per block
                t = _less(t, compiled_call_overhead(device, compile_options, warmup, repeats))
            if cache:
                cache.put(key, t)
        measured[key] = t
        results.append(t)
        if progress:
            progress(1)
    if (device.type == "cuda" and example_inputs is not None and compile_options is None
            and any(t.host_fwd_s or t.host_bwd_s for t in results)):
        results = _host_in_context(gm, example_inputs, device, node_groups, results, repeats)
    return results


_CALL_OVERHEAD: dict[str, NodeTime] = {}


def compiled_call_overhead(device: torch.device, compile_options: dict[str, Any], warmup: int = 2,
                           repeats: int = 5) -> NodeTime:
    """What calling a compiled function costs beyond its kernels (guards, the autograd wrapper, one
    tiny kernel), forward and backward: time_fwd_bwd of a compiled `x * 2` on a small tensor. Each
    separately measured block pays it, the stage that runs them only once (2-core CPU, the zoo's small
    llama, 2 stages: the blocks' sum was 13% / 10% over the compiled stage's forward / backward, about
    this overhead times the blocks beyond the first). Once per process, device and options."""
    key = f"{_device_name(device)}:{sorted(compile_options.items())!r}"
    if key not in _CALL_OVERHEAD:
        x = torch.randn(8, 64, device=device, requires_grad=True)
        double = torch.compile(lambda t: t * 2, **compile_options)
        with torch.enable_grad():
            _CALL_OVERHEAD[key] = time_fwd_bwd(lambda: double(x), device, [x], warmup, max(repeats, 20))
    return _CALL_OVERHEAD[key]


def _less(t: NodeTime, overhead: NodeTime) -> NodeTime:
    """`t` without `overhead`, each part at least zero."""
    return NodeTime(max(0.0, t.fwd_s - overhead.fwd_s), max(0.0, t.bwd_s - overhead.bwd_s),
                    max(0.0, t.host_fwd_s - overhead.host_fwd_s), max(0.0, t.host_bwd_s - overhead.host_bwd_s))


def _backward_to(params: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    """A whole graph's backward: from every output that requires grad (ones), to `params`."""
    if outs and params:
        torch.autograd.grad(outs, params, [torch.ones_like(t) for t in outs], allow_unused=True)


def whole_graph_times(gm: torch.fx.GraphModule, inputs: Sequence[Any], device: torch.device, repeats: int,
                       warmup: int, budget_s: float = 8.0) -> tuple[float, float, float]:
    """(forward, backward, step) seconds of the whole graph: its forward and its backward call
    each timed with perf_counter after a synchronize (medians of `repeats` after `warmup`; an
    upper bound on each pass's dispatch time), and the wall time of whole steps run back to
    back (`step_wall_s`). The backward starts from every output that requires grad."""
    params = [p for p in gm.parameters() if p.requires_grad]
    fwd_s, bwd_s = [], []
    with torch.enable_grad():
        for i in range(warmup + repeats):
            synchronize(device)
            t0 = time.perf_counter()
            outs = grad_outputs(gm(*inputs))
            t1 = time.perf_counter()
            _backward_to(params, outs)
            t2 = time.perf_counter()
            del outs
            if i >= warmup:
                fwd_s.append(t1 - t0)
                bwd_s.append(t2 - t1)
        synchronize(device)
        wall_s = step_wall_s(lambda: gm(*inputs), device, params, repeats, budget_s=budget_s)
    return statistics.median(fwd_s), statistics.median(bwd_s), wall_s


class _HostStamps:
    """What an instrumented graph records while it runs (see `_host_in_context`)."""

    def __init__(self, hook_block: dict[int, int]):
        self.hook_block = hook_block  # node index -> the block whose output it is
        self.fwd: list[tuple[int, float]] = []  # (node index, perf_counter after it ran)
        self.bwd: list[tuple[int, float]] = []  # (block, perf_counter when its outputs' gradient was ready)


_STAMPS: _HostStamps | None = None


def _stamp(i: int, value: Any) -> Any:
    """Node i of an instrumented graph has run: note the time, hook the block outputs' gradients."""
    rec = _STAMPS
    rec.fwd.append((i, time.perf_counter()))
    block = rec.hook_block.get(i)
    if block is not None:
        for t in pytree.tree_leaves(value):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad, block=block: rec.bwd.append((block, time.perf_counter())))
    return value


def _stamped_copy(gm: torch.fx.GraphModule, node_groups: Sequence[Sequence[str]]
                  ) -> tuple[torch.fx.GraphModule, list[int | None], dict[int, int]]:
    """A copy of `gm` that calls `_stamp` after every computing node: (the copy, each stamped
    node's group or None, stamped node index -> group for the nodes whose value leaves the group)."""
    block_of = {name: b for b, group in enumerate(node_groups) for name in group}
    graph, env, order, hook_block = torch.fx.Graph(), {}, [], {}
    for n in gm.graph.nodes:
        if n.op == "output":
            graph.output(torch.fx.map_arg(n.args[0], lambda a: env[a]))
            continue
        copied = graph.node_copy(n, lambda a: env[a])
        if n.op in ("placeholder", "get_attr"):
            env[n] = copied
            continue
        b = block_of.get(n.name)
        if b is not None and any(block_of.get(u.name) != b for u in n.users):
            hook_block[len(order)] = b
        env[n] = graph.call_function(_stamp, (len(order), copied))
        order.append(b)
    return torch.fx.GraphModule(gm, graph), order, hook_block


def _host_in_context(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], device: torch.device,
                     node_groups: Sequence[Sequence[str]], blocks: list[NodeTime], repeats: int,
                     budget_s: float = 8.0, max_steps: int = 60) -> list[NodeTime]:
    """The blocks' host times as measured inside whole steps, where smaller than alone.

    A block timed on its own dispatches slower than the same nodes inside a whole graph,
    mostly in the backward (one H100 host, bf16: gpt2's blocks 10.8 ms forward and 18.4 ms
    backward alone, 11.9 and 10.5 ms inside steps; t5-base's 28.6 and 65.0 ms against 30.0 and
    45.5 ms). So whole steps run on a copy of the graph that notes perf_counter after every
    node (a node's forward host time is the time since the previous note) and hooks the
    gradient of every block's outputs (a block's backward host time runs from its outputs'
    gradient being ready to the next block's); medians over at least `repeats` steps and over
    `budget_s` seconds of them (at most `max_steps`), as the host's speed moves within seconds
    (`step_walls_s`). The GPU runs ahead of a host-bound step and behind a GPU-bound one, where
    a full launch queue can hold the host back and a block's reading then includes waiting:
    the smaller of the two readings is kept. The GPU's times are kept as measured alone.
    """
    global _STAMPS
    stamped, order, hook_block = _stamped_copy(gm, node_groups)
    params = [p for p in gm.parameters() if p.requires_grad]
    fwd_runs, bwd_runs = [], []
    try:
        with torch.enable_grad():
            for step in _budgeted_runs(repeats + 1, max(repeats, max_steps) + 1, budget_s):
                _STAMPS = rec = _HostStamps(hook_block)
                synchronize(device)
                t_start = time.perf_counter()
                outs = grad_outputs(stamped(*example_inputs))
                _backward_to(params, outs)
                t_end = time.perf_counter()
                del outs
                fwd, bwd = [0.0] * len(blocks), [0.0] * len(blocks)
                prev = t_start
                for k, t in rec.fwd:
                    if order[k] is not None:
                        fwd[order[k]] += t - prev
                    prev = t
                events = sorted(rec.bwd, key=lambda e: e[1])
                for (b, t), (_, t_next) in zip(events, events[1:] + [(None, t_end)]):
                    bwd[b] += t_next - t
                if step:  # step 0 warms up
                    fwd_runs.append(fwd)
                    bwd_runs.append(bwd)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return blocks  # the whole graph does not fit: keep the blocks' own host times
    finally:
        _STAMPS = None
    return [NodeTime(t.fwd_s, t.bwd_s, min(t.host_fwd_s, statistics.median(r[b] for r in fwd_runs)),
                     min(t.host_bwd_s, statistics.median(r[b] for r in bwd_runs)))
            for b, t in enumerate(blocks)]
