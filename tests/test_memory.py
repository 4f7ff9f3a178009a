"""Saved-for-backward bytes, parameter bytes and optimizer state bytes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from cost_models.flops import trace_nodes
from cost_models.memory import DtypeScale, param_state_bytes, saved_bytes_per_node, value_bytes
from cost_models.profile import profile
from partitioner.errors import CostModelError

B, IN, HID, OUT = 3, 8, 16, 4


def _gm(act: nn.Module) -> torch.fx.GraphModule:
    model = nn.Sequential(nn.Linear(IN, HID), act, nn.Linear(HID, OUT))
    return torch.export.export(model, (torch.randn(B, IN),), strict=False).module()


def test_saved_bytes_linear_gelu_chain_hand_count():
    saved = saved_bytes_per_node(trace_nodes(_gm(nn.GELU())))
    f32 = 4
    # linear 1 keeps x for its weight gradient; GELU keeps its input; linear 2 keeps
    # GELU's output; weights are parameters, not activations
    assert sum(saved.values()) == B * IN * f32 + B * HID * f32 + B * HID * f32
    # in the captured dtype vs expressed in bf16: every fp32 activation halves
    half = saved_bytes_per_node(trace_nodes(_gm(nn.GELU())), DtypeScale(torch.float32, torch.bfloat16))
    assert sum(half.values()) * 2 == sum(saved.values())


def test_storage_saved_twice_counts_once():
    # ReLU saves its output, and linear 2 saves that same tensor as its input
    saved = saved_bytes_per_node(trace_nodes(_gm(nn.ReLU())))
    assert sum(saved.values()) == B * IN * 4 + B * HID * 4


def test_nothing_saved_without_trainable_parameters():
    model = nn.Sequential(nn.Linear(IN, HID), nn.GELU())
    model.requires_grad_(False)
    gm = torch.export.export(model, (torch.randn(B, IN),), strict=False).module()
    traces = trace_nodes(gm)
    assert sum(saved_bytes_per_node(traces).values()) == 0
    assert sum(t.bwd_flops for t in traces.values()) == 0


def test_param_bytes_and_output_bytes_match_the_model():
    model = nn.Sequential(nn.Linear(IN, HID), nn.GELU(), nn.Linear(HID, OUT))
    gm = torch.export.export(model, (torch.randn(B, IN),), strict=False).module()
    costs = profile(gm, device="h100", optimizer="none")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    get_attrs = [n.name for n in gm.graph.nodes if n.op == "get_attr"]
    assert sum(costs.nodes[n].output_bytes for n in get_attrs) == model_bytes
    assert costs.total("param_bytes") == model_bytes  # each parameter read by one node
    assert sum(costs.param_state_bytes.values()) == 2 * model_bytes  # weight + grad
    out_node = [n for n in gm.graph.nodes if n.op == "call_function"][-1]
    assert costs.nodes[out_node.name].output_bytes == B * OUT * 4


@pytest.mark.parametrize("dtype, optimizer, per_element", [
    (torch.float32, "adamw", 4 + 4 + 8),
    (torch.float32, "adam", 4 + 4 + 8),
    (torch.float32, "sgd-momentum", 4 + 4 + 4),
    (torch.float32, "sgd", 4 + 4),
    (torch.float32, "none", 4 + 4),
    (torch.bfloat16, "adamw", 2 + 2 + 4 + 8),  # 16-bit weight+grad, fp32 master + 2 moments
    (torch.float16, "sgd-momentum", 2 + 2 + 4 + 4),
    (torch.bfloat16, "sgd", 2 + 2 + 4),
    (torch.bfloat16, "none", 2 + 2),
])
def test_optimizer_state_bytes(dtype, optimizer, per_element):
    assert param_state_bytes(1000, dtype, optimizer) == 1000 * per_element


def test_frozen_parameters_and_buffers_hold_only_their_weight():
    assert param_state_bytes(10, torch.float32, "adamw", trainable=False) == 40
    assert param_state_bytes(10, torch.int64, "adamw") == 80
    with pytest.raises(CostModelError, match="unknown optimizer 'lamb'"):
        param_state_bytes(10, torch.float32, "lamb")


def test_profile_in_bf16_expresses_fp32_graph_in_mixed_precision():
    model = nn.Sequential(nn.Linear(IN, HID), nn.GELU(), nn.Linear(HID, OUT))
    gm = torch.export.export(model, (torch.randn(B, IN),), strict=False).module()
    f32 = profile(gm, dtype=torch.float32)
    bf16 = profile(gm, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert sum(f32.param_state_bytes.values()) == 16 * n
    assert sum(bf16.param_state_bytes.values()) == 16 * n
    assert bf16.total("saved_bytes") * 2 == f32.total("saved_bytes")
    assert bf16.total("param_bytes") * 2 == f32.total("param_bytes")
    assert bf16.total("fwd_flops") == f32.total("fwd_flops")
    assert value_bytes([torch.empty(3, dtype=torch.int64), torch.empty(2)]) == 3 * 8 + 2 * 4


def test_dropout_keeps_a_bool_mask_as_on_gpu():
    model = nn.Sequential(nn.Linear(IN, HID), nn.Dropout(0.1))
    gm = torch.export.export(model, (torch.randn(B, IN),), strict=False).module()
    saved = saved_bytes_per_node(trace_nodes(gm))
    assert sum(saved.values()) == B * IN * 4 + B * HID * 1  # linear input + bool mask
