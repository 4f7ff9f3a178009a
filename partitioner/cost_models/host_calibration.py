"""How fast this host dispatches eager work to a device: seconds per forward node and per backward kernel
(DeviceSpec.cpu_fwd_overhead_s / cpu_bwd_overhead_s), timed on a few small captured transformer layers
whose kernels are so small that a training step's wall time is the host's. Host-bound predictions rest
on it; it is timed once per process and device (benchmarks/RESULTS.md: how the host's drift moves it).
"""
from __future__ import annotations

import torch

from partitioner.cost_models.flops import COMPUTE_OPS, trace_nodes
from partitioner.cost_models.measure import whole_graph_times
from partitioner.passes.capture import capture

_HOST_CALIBRATION: dict[str, tuple[float, float]] = {}
HOST_CALIBRATION_ROUNDS: dict[str, list[tuple[float, float]]] = {}  # every round of host_overheads_s (a record)


def host_bound_encoder(layers: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The host calibrations' model and input: `layers` small transformer layers (dim 64, seeded), whose
    kernels are so small that a training step's wall time is the host's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.TransformerEncoderLayer(64, 4, 256, batch_first=True, norm_first=True)
                                      for _ in range(layers)])
        return model, torch.randn(2, 16, 64)


def host_overheads_s(device: torch.device | str, layers: int = 4, repeats: int = 10,
                     rounds: int = 5) -> tuple[float, float]:
    """This host's dispatch time on `device` (CUDA): (seconds per forward node, per backward kernel),
    as DeviceSpec.cpu_fwd_overhead_s and cpu_bwd_overhead_s count them.

    The median of `rounds` rounds of `host_overheads_round`, as steps are measured as medians. The
    host's speed drifts between rounds and processes (14-22 us per node within one process on one
    H100 host, every round kept in HOST_CALIBRATION_ROUNDS), so host-bound predictions carry that
    noise. Once per process and device.
    """
    device = torch.device(device)
    key = str(device)
    if key not in _HOST_CALIBRATION:
        results = [host_overheads_round(device, layers, repeats) for _ in range(rounds)]
        HOST_CALIBRATION_ROUNDS[key] = results
        _HOST_CALIBRATION[key] = sorted(results, key=sum)[len(results) // 2]
    return _HOST_CALIBRATION[key]


_HOST_BOUND_GRAPHS: dict[tuple[str, int], tuple[torch.fx.GraphModule, list, int, int]] = {}


def host_overheads_round(device: torch.device | str, layers: int = 4, repeats: int = 10) -> tuple[float, float]:
    """One round of the host calibration: (seconds per forward node, per backward kernel) now.

    A few small transformer layers (dim 64) are captured like any model and trained in steps
    back to back for about a second: their kernels are tiny, so the step is host-bound. The
    forward and the backward are timed after a synchronize, and both are scaled to the back-to-back
    wall time (a host that waited for the GPU dispatches slower); then divided by the graph's nodes
    and backward kernels as partitioner/cost_models/flops.py counts them.
    """
    device = torch.device(device)
    key = (str(device), layers)
    if key not in _HOST_BOUND_GRAPHS:
        model, x = host_bound_encoder(layers)
        captured = capture(model, (x,))
        traces = trace_nodes(captured.graph_module)
        nodes = sum(1 for t in traces.values() if t.op in COMPUTE_OPS)
        kernels = sum(len(t.bwd_ops) for t in traces.values())
        _HOST_BOUND_GRAPHS[key] = (captured.graph_module.to(device),
                                   captured.flatten_inputs((x.to(device),), {}), nodes, kernels)
    gm, inputs, nodes, kernels = _HOST_BOUND_GRAPHS[key]
    fwd, bwd, wall = whole_graph_times(gm, inputs, device, repeats, warmup=2, budget_s=1.0)
    scale = min(1.0, wall / (fwd + bwd))
    return fwd * scale / nodes, bwd * scale / kernels
