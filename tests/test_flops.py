"""FLOPs per node equal the closed forms (FlopCounterMode on fake tensors)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from partitioner.cost_models.attention import sdpa_backend
from partitioner.cost_models.flops import module_flops, node_flops, trace_nodes


def _export(model: nn.Module, *args: torch.Tensor) -> torch.fx.GraphModule:
    return torch.export.export(model, args, strict=False).module()


def _only(flops: dict, prefix: str):
    hits = [f for name, f in flops.items() if name.startswith(prefix)]
    assert len(hits) == 1, (prefix, list(flops))
    return hits[0]


def test_linear_fwd_is_2BIO_and_bwd_twice_that_when_input_needs_grad():
    B, I, O = 6, 32, 48
    gm = _export(nn.Linear(I, O), torch.randn(B, I))
    f = _only(node_flops(gm, inputs_require_grad=True), "linear")
    assert f.fwd == 2 * B * I * O
    assert f.bwd == 2 * f.fwd  # grad of input and of weight
    # the model input needs no gradient: only the weight gradient is computed
    f = _only(node_flops(gm), "linear")
    assert f.bwd == f.fwd


class _MatMul(nn.Module):
    def forward(self, a, b):
        return torch.matmul(a, b)


def test_batched_matmul_closed_form():
    B, M, K, N = 3, 5, 7, 11
    gm = _export(_MatMul(), torch.randn(B, M, K), torch.randn(B, K, N))
    flops = node_flops(gm, inputs_require_grad=True)
    total_fwd = sum(f.fwd for f in flops.values())
    total_bwd = sum(f.bwd for f in flops.values())
    assert total_fwd == 2 * B * M * K * N
    assert total_bwd == 4 * B * M * K * N
    # without gradients there is no backward at all
    assert sum(f.bwd for f in node_flops(gm).values()) == 0


def test_conv2d_closed_form():
    B, Cin, Cout, H, W, k = 2, 3, 8, 10, 12, 3
    conv = nn.Conv2d(Cin, Cout, k, padding=1)
    gm = _export(conv, torch.randn(B, Cin, H, W))
    f = _only(node_flops(gm, inputs_require_grad=True), "conv2d")
    assert f.fwd == 2 * B * Cout * H * W * Cin * k * k
    assert f.bwd == 2 * f.fwd


class _Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=False)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_sdpa_closed_form(device):
    B, H, L, S, D = 2, 3, 16, 24, 8
    q, k, v = (torch.randn(B, H, n, D, device=device) for n in (L, S, S))
    gm = _export(_Attention(), q, k, v)
    f = _only(node_flops(gm, inputs_require_grad=True), "scaled_dot_product_attention")
    assert f.fwd == 4 * B * H * L * S * D  # QK^T and PV
    assert f.bwd == 10 * B * H * L * S * D  # flash backward: recompute QK^T, then dV, dP, dQ, dK


def test_meta_model_and_module_rollup():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    gm = _export(model, torch.randn(5, 16, device="meta"))
    flops = node_flops(gm)
    paths = {n.name: list(n.meta["nn_module_stack"].values())[-1][0] if n.meta.get("nn_module_stack") else ""
             for n in gm.graph.nodes}
    per_module = module_flops(flops, paths)
    assert per_module["0"].fwd == 2 * 5 * 16 * 32
    assert per_module["2"].fwd == 2 * 5 * 32 * 4
    assert per_module[""].fwd == per_module["0"].fwd + per_module["2"].fwd
    # first layer: weight grad only; second: weight and input grads
    assert per_module["0"].bwd == per_module["0"].fwd
    assert per_module["2"].bwd == 2 * per_module["2"].fwd


# ----------------------------------------------------------------------------- SDPA backend

@pytest.mark.parametrize("dtype, q, k, v, mask, mask_strided, causal, expected", [
    (torch.bfloat16, (2, 4, 16, 64), (2, 4, 16, 64), (2, 4, 16, 64), False, False, True, "flash"),  # GPT-2-like
    (torch.bfloat16, (2, 4, 8, 64), (2, 4, 16, 64), (2, 4, 16, 64), False, False, True, "efficient"),  # causal L != S
    (torch.bfloat16, (2, 4, 16, 64), (2, 4, 16, 64), (2, 4, 16, 64), True, False, False, "efficient"),  # additive mask
    (torch.bfloat16, (2, 4, 16, 12), (2, 4, 16, 12), (2, 4, 16, 12), True, False, False, "math"),  # 12 % 8
    (torch.float32, (2, 4, 16, 64), (2, 4, 16, 64), (2, 4, 16, 64), False, False, False, "efficient"),  # no fp32 flash
    (torch.float32, (2, 4, 16, 6), (2, 4, 16, 6), (2, 4, 16, 6), False, False, False, "math"),  # 6 % 4
    (torch.bfloat16, (2, 4, 16, 64), (2, 4, 16, 64), (2, 4, 16, 64), True, True, False, "math"),  # (L, S, H) bias
    (torch.float32, (2, 4, 16, 64), (2, 4, 16, 64), (2, 4, 16, 64), True, True, False, "math"),
])
def test_sdpa_backend_rule(dtype, q, k, v, mask, mask_strided, causal, expected):
    assert sdpa_backend(q, k, v, dtype, has_mask=mask, mask_strided=mask_strided, is_causal=causal) == expected


class _BiasedAttention(nn.Module):
    """T5-style: a trainable (1, H, L, S) position bias passed as the additive attn_mask; heads_last
    keeps it as (L, S, H) permuted, as T5's lookup returns it (the mask's last dim strided)."""

    def __init__(self, H: int, L: int, S: int, heads_last: bool = False):
        super().__init__()
        self.heads_last = heads_last
        self.bias = nn.Parameter(torch.zeros(L, S, H) if heads_last else torch.zeros(1, H, L, S))

    def forward(self, q, k, v):
        bias = self.bias.permute(2, 0, 1)[None] if self.heads_last else self.bias
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


@pytest.mark.parametrize("heads_last", [False, True])
def test_trainable_bias_runs_fused_attention_unless_its_last_dim_is_strided(heads_last):
    B, H, L, S, E = 2, 3, 8, 16, 8
    q, k, v = torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, S, E)
    gm = _export(_BiasedAttention(H, L, S, heads_last), q, k, v)
    traces = trace_nodes(gm, inputs_require_grad=True)
    t = _only(traces, "scaled_dot_product_attention")
    assert t.attention.mask_requires_grad
    assert t.fwd_flops == 4 * B * H * L * S * E  # Q K^T and P V
    if heads_last:
        assert t.attention.backend == "math"
        assert t.bwd_flops == 8 * B * H * L * S * E  # dP, dV, dQ, dK: no recompute
    else:
        assert t.attention.backend == "efficient"  # memory-efficient attention writes the mask's gradient
        assert t.bwd_flops == 10 * B * H * L * S * E  # and recomputes Q K^T
    # the same attention with a frozen bias is fused (memory-efficient): flash's counts
    model = _BiasedAttention(H, L, S).requires_grad_(False)
    t = _only(trace_nodes(_export(model, q, k, v), inputs_require_grad=True), "scaled_dot_product_attention")
    assert t.attention.backend == "efficient" and t.bwd_flops == 10 * B * H * L * S * E


def test_causal_attention_without_mask_is_fused():
    B, H, L, E = 2, 3, 16, 8

    class Causal(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(B, H, L, E, dtype=torch.bfloat16)
    t = _only(trace_nodes(_export(Causal(), q, q.clone(), q.clone()), inputs_require_grad=True),
              "scaled_dot_product_attention")
    assert t.attention.backend == "flash"
    assert (t.fwd_flops, t.bwd_flops) == (4 * B * H * L * L * E, 10 * B * H * L * L * E)


def test_a_sparse_embedding_traces_and_its_gradient_counts_the_rows_it_holds():
    """nn.Embedding(sparse=True): the gradient has no storage to measure (planning such a model failed
    with "Cannot access storage of SparseTensorImpl"); it counts its values, the B x L rows, not V."""
    V, D, B, L = 1000, 16, 2, 3
    gm = torch.export.export(nn.Embedding(V, D, sparse=True), (torch.randint(0, V, (B, L)),), strict=False).module()
    traces = trace_nodes(gm)
    (emb,) = [traces[n.name] for n in gm.graph.nodes if str(n.target) == "aten.embedding.default"]
    written = [numel for k in emb.bwd_ops for numel, dtype, _ in k.tensors if dtype == torch.float32]
    assert written and max(written) == B * L * D


def test_op_kernels_record_flops_and_the_bytes_each_op_moves():
    """Every aten op a node dispatches is one OpKernel: a matmul's FLOPs, a broadcast input at its
    storage's size, and an embedding reading only the rows it gathers (not the whole table)."""
    V, D, B, L = 1000, 16, 2, 3

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, D)
            self.proj = nn.Linear(D, D, bias=False)
            self.scale = nn.Parameter(torch.ones(D))

        def forward(self, ids):
            return self.proj(self.emb(ids)) * self.scale  # scale broadcasts over (B, L)

    gm = torch.export.export(Net(), (torch.randint(0, V, (B, L)),), strict=False).module()
    traces = trace_nodes(gm)
    by_target = {str(n.target): traces[n.name] for n in gm.graph.nodes if n.name in traces}
    emb = by_target["aten.embedding.default"]
    (gather,) = emb.fwd_ops
    assert gather.name == "embedding"
    assert sum(numel for numel, _, _ in gather.tensors) == B * L * D + B * L + B * L * D  # rows, ids, out
    assert [k.name for k in emb.bwd_ops] == ["embedding_dense_backward"]
    linear = by_target["aten.linear.default"]
    assert sum(k.flops for k in linear.fwd_ops) == 2 * B * L * D * D == linear.fwd_flops
    assert linear.fwd_kernels == 1 and linear.bwd_kernels == 2  # input and weight gradients
    assert sum(k.flops for k in linear.bwd_ops) == 2 * linear.fwd_flops
    mul = by_target["aten.mul.Tensor"]
    (op,) = mul.fwd_ops
    assert sorted(numel for numel, _, _ in op.tensors) == [D, B * L * D, B * L * D]


class _MatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w.t(), x.t() @ grad


def test_a_model_s_autograd_function_is_costed_by_its_forward_and_backward_ops():
    """The Function is one opaque op in the graph (passes/autograd_functions.py); its FLOPs are those of
    the ops its forward runs, and backward those of the recomputed forward and its own backward."""
    from partitioner.cost_models.profile import profile
    from partitioner.passes.annotate import annotate
    from partitioner.passes.capture import capture

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(256, 128))

        def forward(self, x):
            return _MatmulFunction.apply(x, self.w)

    captured = capture(Model(), (torch.randn(64, 256),))
    costs = profile(captured, annotate(captured), device="h100", progress=False)
    node = costs.nodes["autograd_function"]
    assert node.fwd_flops == 2 * 64 * 256 * 128
    assert node.bwd_flops == 3 * 2 * 64 * 256 * 128
