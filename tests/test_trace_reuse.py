"""partitioner/cost_models/trace_reuse.py: replaying the trace of an alike node gives exactly the costs
that tracing every node gives (per node: FLOPs, kernels, saved bytes deduplicated by storage, the
backward's working bytes, who saves a node's output), and the repeated layers are not traced again."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from partitioner import zoo
from partitioner.cost_models import flops
from partitioner.cost_models.memory import output_savers, saved_bytes_per_node, training_peak_bytes
from partitioner.cost_models.profile import profile
from partitioner.passes.annotate import annotate
from partitioner.passes.capture import capture


def _count_traced(monkeypatch) -> list[str]:
    traced: list[str] = []
    real = flops._NodeTracer._trace

    def spy(self, n, args, kwargs):
        traced.append(n.name)
        return real(self, n, args, kwargs)

    monkeypatch.setattr(flops._NodeTracer, "_trace", spy)
    return traced


@pytest.mark.parametrize("name", ["gpt2", "llama-8b", "t5-base"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reuse_gives_the_same_costs_per_node(name, dtype, monkeypatch):
    zm = zoo.build(name, small=True, batch=2, device="meta")
    captured = capture(zm.model, zm.example_args, zm.example_kwargs)
    annotated = annotate(captured)
    traced = _count_traced(monkeypatch)
    full = profile(captured, annotated, dtype=dtype, progress=False, reuse=False)
    n_full = len(traced)
    traced.clear()
    reused = profile(captured, annotated, dtype=dtype, progress=False, reuse=True)
    assert len(traced) < 0.75 * n_full, "the second layer should replay the first one's nodes"
    assert list(reused.nodes) == list(full.nodes)
    for node, cost in full.nodes.items():
        assert reused.nodes[node] == cost, node
    assert reused.param_state_bytes == full.param_state_bytes


def test_reuse_keeps_the_storage_accounting_of_views_and_shared_inputs():
    """Layers whose nodes save their inputs, views of them and of their outputs: a storage saved
    by the previous layer counts once, there; the traces equal the unreused ones storage for storage."""
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            h = torch.tanh(self.fc(x))  # tanh saves its output
            return (h.view(2, 4, 8).transpose(1, 2) * h.view(2, 8, 4)).reshape(2, 32) @ h.new_ones(32, 32) + h

    model = nn.Sequential(*[Layer() for _ in range(4)])
    captured = capture(model, (torch.randn(2, 32),))
    gm = captured.graph_module
    full = flops.trace_nodes(gm, inputs_require_grad=True, reuse=False)
    reused = flops.trace_nodes(gm, inputs_require_grad=True, reuse=True)
    assert saved_bytes_per_node(reused) == saved_bytes_per_node(full)
    assert output_savers(reused) == output_savers(full)
    assert training_peak_bytes(gm, reused, saved_bytes_per_node(reused)) == \
        training_peak_bytes(gm, full, saved_bytes_per_node(full))
    for name, t in full.items():
        r = reused[name]
        assert (r.fwd_flops, r.bwd_flops, r.fwd_ops, r.bwd_ops, r.input_sizes, r.requires_grad) == \
            (t.fwd_flops, t.bwd_flops, t.fwd_ops, t.bwd_ops, t.input_sizes, t.requires_grad), name
        assert [(s.storage_bytes, s.dtype) for s in r.saved] == [(s.storage_bytes, s.dtype) for s in t.saved], name
