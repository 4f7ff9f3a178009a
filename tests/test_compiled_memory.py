"""partitioner/cost_models/compiled_memory.py: what a compiled graph saves for backward, from
AOTAutograd's min-cut partitioner on fake tensors, charged to the captured nodes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from partitioner.cost_models import profile as profile_module
from partitioner.cost_models.compiled_memory import compiled_saved_bytes
from partitioner.cost_models.flops import trace_nodes
from partitioner.cost_models.memory import DtypeScale, measured_saved_bytes
from partitioner.cost_models.profile import profile
from partitioner.passes.capture import capture


class Block(nn.Module):
    """Pre-norm MLP block with dropout: norm statistics, GELU's input and the dropout mask are
    what eager saves beyond the matmuls' inputs."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(self.down(torch.nn.functional.gelu(self.up(self.norm(x)))))


def test_the_partitioner_on_fake_tensors_saves_what_the_compiled_graph_saves():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).train()
    x = torch.randn(8, 32, 64, requires_grad=True)
    captured = capture(model, (x,))
    gm = captured.graph_module
    traces = trace_nodes(gm)
    predicted = compiled_saved_bytes(gm, traces)
    assert set(predicted) <= {n.name for n in gm.graph.nodes}  # charged to captured nodes
    (placeholder,) = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert predicted.get(placeholder, 0) <= x.nbytes  # the input holds only itself: the rest is the layers' values
    assert len(predicted) >= 4
    compiled = torch.compile(gm, dynamic=False)
    measured_saved_bytes(compiled, (x,), list(gm.parameters()))  # compiles (under the hooks, as measured)
    measured = measured_saved_bytes(compiled, (x,), list(gm.parameters()))
    assert measured != measured_saved_bytes(gm, (x,), list(gm.parameters()))  # not what eager saves
    assert sum(predicted.values()) == pytest.approx(measured, rel=0.02)
    half = compiled_saved_bytes(gm, traces, DtypeScale(torch.float32, torch.bfloat16))
    assert sum(half.values()) == pytest.approx(sum(predicted.values()) / 2, rel=0.05)


def test_a_compiled_profile_counts_the_compiled_saved_bytes():
    model = nn.Sequential(Block(), Block()).train()
    captured = capture(model, (torch.randn(8, 32, 64),))
    compiled = profile(captured, progress=False, compiled=True)
    gm = captured.graph_module
    assert compiled.total("saved_bytes") == sum(compiled_saved_bytes(gm, trace_nodes(gm)).values())


def test_a_graph_the_partitioner_cannot_take_costs_the_eager_bytes_with_a_warning(monkeypatch):
    captured = capture(Block(), (torch.randn(4, 64),))

    def fail(*args, **kwargs):
        raise RuntimeError("no")
    monkeypatch.setattr(profile_module, "compiled_saved_bytes", fail)
    with pytest.warns(RuntimeWarning, match="AOTAutograd could not partition"):
        compiled = profile(captured, progress=False, compiled=True)
    assert compiled.total("saved_bytes") == profile(captured, progress=False).total("saved_bytes")


def test_a_max_pool_partitions_before_anything_was_compiled():
    """Inductor's max_pool2d decomposition reads torch._inductor.lowering, which only a compilation imports:
    in a fresh process (planning comes before the first compile) it raised AttributeError and a CNN's compiled
    stages were costed with the eager saved bytes, with a warning. A process of its own, so nothing compiled
    before."""
    import subprocess
    import sys
    code = ("import torch, warnings\n"
            "from partitioner.cost_models.compiled_memory import compiled_saved_bytes\n"
            "from partitioner.cost_models.flops import trace_nodes\n"
            "from partitioner.passes.capture import capture\n"
            "m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1))\n"
            "gm = capture(m, (torch.randn(2, 3, 16, 16),)).graph_module\n"
            "print(sum(compiled_saved_bytes(gm, trace_nodes(gm)).values()))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.split()[-1]) > 0
