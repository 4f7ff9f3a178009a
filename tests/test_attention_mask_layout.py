"""contiguous_attention_masks: an attention mask whose last dim is strided reaches SDPA as a
contiguous copy (so a GPU runs the fused kernel), with the model's values and gradients."""
from __future__ import annotations

import copy

import torch
from torch import nn

from partitioner.api import compile_parallel
from partitioner.cost_models.flops import trace_nodes
from partitioner.passes.capture import capture

SDPA = torch.ops.aten.scaled_dot_product_attention.default
H, L, E = 4, 16, 8


class BiasedLayers(nn.Module):
    """Two attention layers sharing one trainable position bias; heads_last stores it (L, L, H)
    and permutes it to (1, H, L, L) (its last dim strided), as T5's lookup returns it."""

    def __init__(self, heads_last: bool):
        super().__init__()
        self.heads_last = heads_last
        self.bias = nn.Parameter(torch.randn(L, L, H) if heads_last else torch.randn(1, H, L, L))
        self.qkv = nn.ModuleList(nn.Linear(H * E, 3 * H * E) for _ in range(2))

    def forward(self, x):
        bias = self.bias.permute(2, 0, 1)[None] if self.heads_last else self.bias
        for qkv in self.qkv:
            q, k, v = qkv(x).view(x.shape[0], L, 3, H, E).permute(2, 0, 3, 1, 4)
            x = x + nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)
        return x


def _sdpa_masks(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n.args[3] for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]


def test_a_strided_mask_reaches_attention_as_one_contiguous_copy():
    x = torch.randn(2, L, H * E)
    gm = capture(BiasedLayers(heads_last=True), (x,)).graph_module
    masks = _sdpa_masks(gm)
    assert len(masks) == 2 and masks[0] is masks[1]  # one copy for both layers
    assert masks[0].target is torch.ops.aten.clone.default and masks[0].meta["val"].is_contiguous()
    backends = [t.attention.backend for t in trace_nodes(gm).values() if t.attention is not None]
    assert backends == ["efficient", "efficient"]

    plain = capture(BiasedLayers(heads_last=False), (x,)).graph_module
    assert all(m.target is not torch.ops.aten.clone.default for m in _sdpa_masks(plain))  # nothing to copy


def test_with_the_copied_mask_a_pipeline_trains_as_the_model():
    torch.manual_seed(0)
    model = BiasedLayers(heads_last=True)
    x, target = torch.randn(4, L, H * E), torch.randn(4, L, H * E)

    def loss_fn(out, t):
        return nn.functional.mse_loss(out, t)

    reference = copy.deepcopy(model)
    for xs, ts in zip(x.chunk(2), target.chunk(2)):
        (loss_fn(reference(xs), ts) / 2).backward()
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), loss_fn, microbatches=2, example_target=target,
                          compile=False)
    pm.train_step(x, target=target)
    want = dict(reference.named_parameters())
    for name, p in pm.named_parameters():
        err = (p.grad - want[name].grad).abs().max() / want[name].grad.abs().max()
        assert err < 1e-5, name


def test_a_learned_bias_s_attention_is_costed_at_the_memory_efficient_kernel_s_rate():
    """A 16-bit attention whose mask requires grad runs the memory-efficient kernel (the one that writes
    the mask's gradient): costed at grad_mask_attention_efficiency, slower than other masked attention."""
    import dataclasses

    from partitioner.cost_models.device import get_device_spec
    from partitioner.cost_models.profile import profile
    captured = capture(BiasedLayers(heads_last=False), (torch.randn(2, L, H * E),))
    h100 = get_device_spec("h100")
    assert 0 < h100.grad_mask_attention_efficiency < h100.masked_attention_efficiency
    costs = {eff: profile(captured, device=dataclasses.replace(h100, grad_mask_attention_efficiency=eff),
                          dtype=torch.bfloat16, progress=False)
             for eff in (h100.grad_mask_attention_efficiency, 0.0)}  # 0: the masked rate
    attention = [n.name for n in captured.graph_module.graph.nodes if n.target is SDPA]
    for name in attention:
        learned, masked = costs[h100.grad_mask_attention_efficiency].nodes[name], costs[0.0].nodes[name]
        assert learned.fwd_time_s > masked.fwd_time_s and learned.bwd_time_s > masked.bwd_time_s
