"""partitioner/passes/split.py: stage modules compose back to the model, values go straight to every reader."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn
from dist_utils import build

from partitioner.errors import PlanError
from partitioner.passes.capture import capture
from partitioner.passes.split import USER_INPUT, even_plan, place_on_device, plan_from_cuts, split, valid_cuts


def run_stages(stages, flat_inputs):
    """Run stage modules one after another, passing values by name: the model's flat outputs."""
    values = {}
    for st in stages:
        args = [flat_inputs[st.user_inputs[n]] if st.input_sources[n] == USER_INPUT else values[n] for n in st.inputs]
        outs = st.graph_module(*args)
        if st.is_last:
            return list(outs)
        values.update(zip(st.outputs, outs))


def random_cuts(captured, num_stages, seed):
    return sorted(random.Random(seed).sample(valid_cuts(captured), num_stages - 1))


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt2", "t5-base"])
def test_stages_compose_to_the_model(name):
    zm = build(name, batch=2)
    captured = capture(zm.model, zm.example_args, zm.example_kwargs)
    flat = captured.flatten_inputs(zm.example_args, zm.example_kwargs)
    want = captured.graph_module(*flat)
    for seed, num_stages in [(0, 2), (1, 4), (2, 5)]:
        plan = plan_from_cuts(captured, random_cuts(captured, num_stages, seed), num_ranks=num_stages)
        stages = split(captured, plan)
        assert len(stages) == num_stages and stages[-1].is_last
        got = run_stages(stages, flat)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        for st in stages:  # only what the stage reads is in it
            used = {n.target for n in st.graph_module.graph.nodes if n.op == "get_attr"}
            assert set(st.params) | set(st.buffers) == used
            assert {k for k, _ in st.graph_module.named_parameters()} == set(st.params)


class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.l0(x)
        top = h.argmax(-1)
        return self.l2(self.l1(h)) + h, top


def test_value_read_by_several_stages_is_sent_to_each():
    captured = capture(Skip(), (torch.randn(2, 4),))
    names = [n.name for n in captured.graph_module.graph.nodes if n.op == "call_function"]
    # stage 0: l0, stage 1: l1 (+ argmax), stage 2: l2 and the add
    plan = plan_from_cuts(captured, [1, names.index("linear_2")], num_ranks=3)
    stages = split(captured, plan)
    h = stages[0].outputs[0]
    assert stages[0].output_consumers[h] == [1, 2]
    assert stages[2].input_sources[h] == 0  # straight from stage 0, not relayed by stage 1
    assert h not in stages[1].outputs
    assert stages[0].value_meta[h].requires_grad
    argmax = next(n for n in stages[1].outputs if n.startswith("argmax"))
    assert not stages[1].value_meta[argmax].requires_grad  # integer values carry no gradient
    assert stages[0].user_inputs == {"x": 0}


def test_tied_weight_is_replicated_into_every_stage_that_reads_it():
    zm = build("gpt2", batch=2)
    captured = capture(zm.model, zm.example_args)
    stages = split(captured, even_plan(captured, 2))
    tied = captured.tied[0][0]
    assert all(tied in st.params for st in stages)


class Chunky(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        a, b = self.l(x).chunk(2, dim=-1)
        return a * b


def test_non_tensor_value_crossing_stages_is_an_error():
    captured = capture(Chunky(), (torch.randn(2, 4),))
    names = [n.name for n in captured.graph_module.graph.nodes if n.op == "call_function"]
    bad = names.index("chunk") + 1
    assert bad not in valid_cuts(captured)
    with pytest.raises(PlanError, match="'chunk'.*not a tensor"):
        split(captured, plan_from_cuts(captured, [bad], num_ranks=2))


def test_plan_against_the_data_flow_is_an_error():
    captured = capture(Skip(), (torch.randn(2, 4),))
    plan = plan_from_cuts(captured, [1], num_ranks=2)
    first = next(n for n, k in plan.node_stage.items() if k == 0)
    plan = plan.replace(node_stage={n: 1 - k for n, k in plan.node_stage.items()})
    with pytest.raises(PlanError, match="later stage"):
        split(captured, plan)
    del plan.node_stage[first]
    with pytest.raises(PlanError, match=f"'{first}'.*no stage"):
        split(captured, plan)


def test_in_place_write_on_a_received_value_is_marked():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4))
    captured = capture(model, (torch.randn(2, 4),))
    stages = split(captured, plan_from_cuts(captured, [1], num_ranks=2))
    assert stages[1].mutated_inputs == {stages[0].outputs[0]}


def test_place_on_device_moves_positional_device_arguments():
    """Llama's rotary table is moved with `.to(device)`: aten.to.device takes the device positionally."""
    zm = build("llama-1b")
    captured = capture(zm.model, tuple(x[:1] for x in zm.example_args))
    stages = split(captured, even_plan(captured, 2))
    target = torch.device("meta")
    for st in stages:
        place_on_device(st, target)
        for node in st.graph_module.graph.nodes:
            devices = [a for a in [*node.args, *node.kwargs.values()] if isinstance(a, torch.device)]
            assert all(d == target for d in devices), node.format_node()
