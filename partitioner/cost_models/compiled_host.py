"""This host's cost of running torch.compile'd stages: per kernel launched and per compiled call.

A compiled stage the host dispatches (no CUDA graph) is host-bound on small and medium models:
every pass calls the compiled graph (dynamo's guards, AOTAutograd's wrapper, the autograd
Function) and its generated code launches each kernel from Python; the backward then
accumulates the parameters' gradients. The cost model (cost_models/fusion.py) counts those
launches; this module times them on the host the plan is for, as host_overheads_s does for
eager dispatch. Hosts differ: the same t5-base stages took 21 us a launch on one H100 machine
and 28 us on an H200 machine, and eager dispatch speed did not predict which.

Method: a small transformer (TransformerEncoderLayer, dim 64) is captured at two depths, each
compiled as a stage is, and trained in steps back to back (forward, backward into .grad): its
kernels are tiny, so a step's wall time is the host's. The fusion model counts each graph's
launches (forward, backward and gradient accumulation); the two depths' walls then give the cost
per launch (the slope) and per compiled call (the rest, over a forward and a backward call).
Opt-in (spec_for_torch_device(compiled=True)): a host's speed drifts by more than this gains
(benchmarks/RESULTS.md, 2026-12-06).
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Callable

import torch

from partitioner.cost_models.device import DeviceSpec, spec_for_gpu_name
from partitioner.cost_models.profile import profile
from partitioner.cost_models.host_calibration import host_bound_encoder
from partitioner.cost_models.measure import grad_outputs, synchronize
from partitioner.passes.capture import capture
from partitioner.runtime.compiled import DEFAULT_OPTIONS
from partitioner.runtime.gradients import accumulate

_CALIBRATION: dict[str, tuple[float, float]] = {}


def modelled_launches(gm: torch.fx.GraphModule, spec: DeviceSpec) -> float:
    """Kernels a compiled training step of `gm` launches as the fusion model counts them (forward,
    backward, the foreach gradient accumulation's share per trainable parameter): its host time at
    1 s a launch."""
    unit = dataclasses.replace(spec, compiled_launch_overhead_s=1.0, stage_pass_s=0.0, compiled_stage_pass_s=0.0)
    costs = profile(gm, device=unit, compiled=True, progress=False)
    return sum(c.host_fwd_time_s + c.host_bwd_time_s for c in costs.nodes.values())


def fit_launch_and_call(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(seconds per launch, seconds per compiled call) from (launches, step wall seconds) of two or
    more graphs, each step one forward and one backward call: the least-squares line's slope, and
    half its intercept (at least 0)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(set(xs)) < 2:
        raise ValueError("need steps of at least two graphs with different launch counts")
    slope, intercept = statistics.linear_regression(xs, ys)
    return max(slope, 0.0), max(intercept, 0.0) / 2


def _step_walls(steps: dict[int, Callable[[], None]], device: torch.device, rounds: int, per_round: int) -> dict[int, float]:
    """Median wall seconds of one step of each graph, the graphs alternating in `rounds` rounds of
    `per_round` steps back to back (the host's speed drifts over seconds)."""
    walls: dict[int, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(per_round):
                step()
            synchronize(device)
            walls[k].append((time.perf_counter() - t0) / per_round)
    return {k: statistics.median(w) for k, w in walls.items()}


def compiled_host_overheads_s(device: torch.device | str, depths: tuple[int, ...] = (1, 3), rounds: int = 7,
                              per_round: int = 20, progress: bool = True) -> tuple[float, float]:
    """This host's (seconds per kernel a compiled graph launches, seconds per compiled call) on
    `device`, as DeviceSpec.compiled_launch_overhead_s and compiled_stage_pass_s count them (see
    the module docstring). Compiles `len(depths)` small graphs: seconds, once per process and device."""
    device = torch.device(device)
    key = str(device)
    if key in _CALIBRATION:
        return _CALIBRATION[key]
    if progress:
        print("partitioner: timing this host's launches of compiled kernels (a small model, compiled once)",
              file=sys.stderr, flush=True)
    spec = spec_for_gpu_name(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    launches, steps = {}, {}
    for depth in depths:
        model, x = host_bound_encoder(depth)
        captured = capture(model, (x,))
        gm = captured.graph_module
        # on the CPU the launch count only serves tests of this function: any GPU entry counts alike
        launches[depth] = modelled_launches(gm, spec or spec_for_gpu_name("h100"))
        gm = gm.to(device)
        inputs = captured.flatten_inputs((x.to(device),), {})
        compiled = torch.compile(gm, **DEFAULT_OPTIONS)

        params = [p for p in gm.parameters() if p.requires_grad]

        def step(compiled=compiled, inputs=inputs, params=params) -> None:
            outs = grad_outputs(compiled(*inputs))
            grads = torch.autograd.grad(outs, params, [torch.ones_like(t) for t in outs], allow_unused=True)
            accumulate(params, grads)  # into .grad, as the executor does

        with torch.enable_grad():
            for _ in range(3):  # compile, then warm up the generated code and the gradients' buffers
                step()
        steps[depth] = step
    with torch.enable_grad():
        walls = _step_walls(steps, device, rounds, per_round)
    _CALIBRATION[key] = fit_launch_and_call([(launches[d], walls[d]) for d in depths])
    return _CALIBRATION[key]
