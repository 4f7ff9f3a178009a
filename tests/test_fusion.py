"""partitioner/cost_models/fusion.py: compiled stages keep their matmuls' times, fuse the light nodes between them
(each external input read once, only values read later written) and pay no per-op dispatch."""
from __future__ import annotations

import torch
import torch.nn as nn
from dist_utils import build

from partitioner.cost_models.fusion import is_heavy
from partitioner.cost_models.profile import profile
from partitioner.passes.capture import capture


class Chain(nn.Module):
    def __init__(self, d: int = 256):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.relu(h * 2.0 + 1.0).sigmoid())


def costs_of(model, x, compiled):
    return profile(capture(model, (x,)), device="h100", progress=False, compiled=compiled)


def test_a_pointwise_chain_reads_once_and_writes_once():
    x = torch.randn(64, 256)
    eager, fused = costs_of(Chain(), x, False), costs_of(Chain(), x, True)
    traces = {n: c for n, c in eager.nodes.items() if c.fwd_flops}
    assert traces, "the chain has matmuls"
    for name in traces:  # heavy nodes keep their device time
        assert fused.nodes[name].fwd_time_s == eager.nodes[name].fwd_time_s
    light = [n for n, c in eager.nodes.items() if not c.fwd_flops and c.fwd_time_s > 0]
    assert len(light) >= 4  # mul, add, relu, sigmoid
    eager_light = sum(eager.nodes[n].fwd_time_s for n in light)
    fused_light = sum(fused.nodes[n].fwd_time_s for n in light)
    # four kernels each reading and writing 64 x 256 floats -> one reading and one writing them
    assert fused_light < eager_light / 2.5
    assert sum(c.host_fwd_time_s + c.host_bwd_time_s for c in fused.nodes.values()) == 0.0


def test_compiled_gpt2_costs_less_and_keeps_its_matmuls():
    zm = build("gpt2")
    captured = capture(zm.model, (zm.example_args[0][:1],))
    eager = profile(captured, device="h100", progress=False)
    fused = profile(captured, device="h100", progress=False, compiled=True)
    assert fused.total("fwd_time_s") + fused.total("bwd_time_s") < eager.total("fwd_time_s") + eager.total("bwd_time_s")
    assert fused.total("fwd_flops") == eager.total("fwd_flops")
    for name, c in eager.nodes.items():
        if c.fwd_flops:
            assert fused.nodes[name].fwd_time_s == c.fwd_time_s and fused.nodes[name].bwd_time_s == c.bwd_time_s
        assert fused.nodes[name].fwd_time_s <= c.fwd_time_s + 1e-12


def test_heavy_means_matmul_or_attention():
    from partitioner.cost_models.flops import trace_nodes
    captured = capture(Chain(), (torch.randn(4, 256),))
    traces = trace_nodes(captured.graph_module)
    heavy = {n for n, t in traces.items() if is_heavy(t)}
    targets = {str(n.target) for n in captured.graph_module.graph.nodes if n.name in heavy}
    assert targets and all("addmm" in t or "linear" in t or "mm" in t for t in targets)
