"""Saved-for-backward bytes, parameter bytes and optimizer state bytes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from partitioner.cost_models.flops import trace_nodes
from partitioner.cost_models.memory import (DtypeScale, param_state_bytes, saved_bytes_per_node, training_peak_bytes,
                                 value_bytes)
from partitioner.cost_models.profile import profile
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


def test_training_peak_linear_gelu_chain_hand_count():
    """The walk of the backward: the peak is at the first linear's backward, when every parameter
    gradient exists, the gradient of GELU's input is in flight and the linear's saved input is
    alive twice (kept, and the workspace of its backward)."""
    gm = _gm(nn.GELU())
    traces = trace_nodes(gm)
    f32 = 4
    x, h, w1, w2 = B * IN * f32, B * HID * f32, (HID * IN + HID) * f32, (OUT * HID + OUT) * f32
    assert training_peak_bytes(gm, traces, saved_bytes_per_node(traces)) == x + h + (w1 + w2) + x
    # the forward alone: everything saved plus the largest value
    assert training_peak_bytes(gm, traces, saved_bytes_per_node(traces)) > x + 2 * h + h


def test_tied_weight_second_gradient_is_a_transient():
    """A weight read twice (tied embedding and head) has one gradient; the second user's backward
    materialises a whole new one and the sum: two weight-sized transients."""
    from partitioner.cost_models.memory import backward_walk

    V, D = 50, 8

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, D)

        def forward(self, ids):
            return self.emb(ids) @ self.emb.weight.t()

    gm = torch.export.export(Tied(), (torch.randint(0, V, (2, 3)),), strict=False).module()
    traces = trace_nodes(gm)
    saved = saved_bytes_per_node(traces)
    steps = {s.node: s for s in backward_walk(gm, traces, saved)}
    weight = V * D * 4
    emb = next(s for name, s in steps.items() if name.startswith("embedding"))
    assert emb.param_grad_bytes == weight  # one gradient for the tied weight
    assert emb.workspace_bytes == saved[emb.node] + 2 * weight  # its own, and the sum
    # for plans (replicas on different ranks) the sum is left out
    apart = {s.node: s for s in backward_walk(gm, traces, saved, tied_sums=False)}
    assert apart[emb.node].workspace_bytes == saved[emb.node]


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
    (torch.bfloat16, "adamw", 2 + 2 + 2 + 2),  # torch.optim's moments take the weight's dtype
    (torch.float16, "sgd-momentum", 2 + 2 + 2),
    (torch.bfloat16, "sgd", 2 + 2),
    (torch.bfloat16, "none", 2 + 2),
])
def test_optimizer_state_bytes(dtype, optimizer, per_element):
    assert param_state_bytes(1000, dtype, optimizer) == 1000 * per_element


def test_frozen_parameters_and_buffers_hold_only_their_weight():
    assert param_state_bytes(10, torch.float32, "adamw", trainable=False) == 40
    assert param_state_bytes(10, torch.int64, "adamw") == 80
    with pytest.raises(CostModelError, match="unknown optimizer 'lamb'"):
        param_state_bytes(10, torch.float32, "lamb")


def test_a_bf16_models_adamw_state_is_bf16():
    """torch.optim.AdamW keeps its moments in the parameter's dtype: the measured bytes."""
    p = nn.Parameter(torch.randn(1000, dtype=torch.bfloat16))
    p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW([p])
    opt.step()
    held = p.nbytes + p.grad.nbytes + sum(t.nbytes for t in opt.state[p].values() if t.dim())
    assert param_state_bytes(p.numel(), p.dtype, "adamw") == held


def test_profile_in_bf16_expresses_fp32_graph_in_bf16():
    model = nn.Sequential(nn.Linear(IN, HID), nn.GELU(), nn.Linear(HID, OUT))
    gm = torch.export.export(model, (torch.randn(B, IN),), strict=False).module()
    f32 = profile(gm, dtype=torch.float32)
    bf16 = profile(gm, dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert sum(f32.param_state_bytes.values()) == 16 * n
    assert sum(bf16.param_state_bytes.values()) == 8 * n
    assert bf16.total("saved_bytes") * 2 == f32.total("saved_bytes")
    assert bf16.total("param_bytes") * 2 == f32.total("param_bytes")
    assert bf16.total("fwd_flops") == f32.total("fwd_flops")
    assert value_bytes([torch.empty(3, dtype=torch.int64), torch.empty(2)]) == 3 * 8 + 2 * 4


def test_dropout_keeps_a_bool_mask_as_on_gpu():
    model = nn.Sequential(nn.Linear(IN, HID), nn.Dropout(0.1))
    gm = torch.export.export(model, (torch.randn(B, IN),), strict=False).module()
    saved = saved_bytes_per_node(trace_nodes(gm))
    assert sum(saved.values()) == B * IN * 4 + B * HID * 1  # linear input + bool mask


# ----------------------------------------------------------------------------- attention

class _BiasedAttention(nn.Module):
    """T5-style attention: a position bias as the additive mask; heads_last keeps it (L, S, H) and
    permutes it, as T5's lookup does (the mask's last dim strided: SDPA's math path)."""

    def __init__(self, H: int, L: int, S: int, trainable: bool = True, heads_last: bool = True):
        super().__init__()
        self.heads_last = heads_last
        self.bias = nn.Parameter(torch.zeros(L, S, H) if heads_last else torch.zeros(1, H, L, S),
                                 requires_grad=trainable)

    def forward(self, q, k, v):
        bias = self.bias.permute(2, 0, 1)[None] if self.heads_last else self.bias
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)


AB, AH, AL, AS, AE = 2, 3, 8, 16, 8


def _attention_gm(dtype: torch.dtype, trainable: bool = True, heads_last: bool = True) -> torch.fx.GraphModule:
    q = torch.randn(AB, AH, AL, AE, dtype=dtype)
    k, v = (torch.randn(AB, AH, AS, AE, dtype=dtype) for _ in range(2))
    model = _BiasedAttention(AH, AL, AS, trainable, heads_last).to(dtype)
    return torch.export.export(model, (q, k, v), strict=False).module()


def _sdpa_saved(gm: torch.fx.GraphModule, scale: DtypeScale | None = None) -> int:
    saved = saved_bytes_per_node(trace_nodes(gm, inputs_require_grad=True), scale)
    return sum(b for name, b in saved.items() if name.startswith("scaled_dot_product_attention"))


def test_math_attention_saves_probabilities_and_scaled_qk():
    q, kv, scores = AB * AH * AL * AE, AB * AH * AS * AE, AB * AH * AL * AS
    # fp32: q * s, k^T * s and P are new fp32 tensors; v is the input itself
    assert _sdpa_saved(_attention_gm(torch.float32)) == 4 * (q + kv + scores + kv)
    # bf16 inputs are upcast: everything saved is fp32, v an upcast copy
    assert _sdpa_saved(_attention_gm(torch.bfloat16)) == 4 * (q + kv + scores + kv)
    # an fp32 graph costed in bf16: the fp32 accumulators stay 4 bytes, v (the input) halves
    assert _sdpa_saved(_attention_gm(torch.float32), DtypeScale(torch.float32, torch.bfloat16)) == \
        4 * (q + kv + scores) + 2 * kv


def test_fused_attention_saves_qkv_out_lse_and_mask():
    q, kv, lse = AB * AH * AL * AE, AB * AH * AS * AE, AB * AH * AL
    # the frozen (1, H, L, S) bias is saved as it is: a parameter, so no activation bytes
    assert _sdpa_saved(_attention_gm(torch.float32, trainable=False, heads_last=False)) == 4 * (q + 2 * kv + q + lse)


def test_bool_mask_is_saved_as_a_float_mask_of_q_dtype():
    class BoolMask(nn.Module):
        def forward(self, q, k, v, mask):
            return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q = torch.randn(AB, AH, AL, AE, dtype=torch.bfloat16)
    k, v = (torch.randn(AB, AH, AS, AE, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(AB, 1, AL, AS, dtype=torch.bool)
    gm = torch.export.export(BoolMask(), (q, k, v, mask), strict=False).module()
    lse_bytes = AB * AH * AL * 4
    expected = 2 * (AB * AH * AL * AE * 2 + AB * AH * AS * AE * 2) + lse_bytes + 2 * AB * AL * AS
    assert _sdpa_saved(gm) == expected


class _RMSNormUpcast(nn.Module):
    """T5LayerNorm: the variance is computed in fp32 even in a bf16 model."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + 1e-6)
        return self.weight * x.to(self.weight.dtype)


def test_explicit_fp32_upcast_in_a_bf16_graph_counts_four_bytes():
    x = torch.randn(B, 5, IN, dtype=torch.bfloat16)
    gm = torch.export.export(_RMSNormUpcast(IN).to(torch.bfloat16), (x,), strict=False).module()
    traces = trace_nodes(gm, inputs_require_grad=True)
    saved = saved_bytes_per_node(traces, DtypeScale(torch.bfloat16, torch.bfloat16))
    pow_node = next(name for name in saved if name.startswith("pow"))
    assert saved[pow_node] == B * 5 * IN * 4  # the fp32 copy pow keeps
    # bf16 x (kept by x * rsqrt), fp32 rsqrt (B, 5, 1), bf16 normalised x (kept by weight * x)
    assert sum(saved.values()) == B * 5 * IN * 4 + B * 5 * IN * 2 + B * 5 * 4 + B * 5 * IN * 2
