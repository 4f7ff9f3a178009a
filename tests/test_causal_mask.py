"""fold_causal_masks: constant causal masks become is_causal=True; every other mask is kept."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from partitioner.passes.capture import capture
from partitioner.passes.causal_mask import fold_causal_masks

SDPA = torch.ops.aten.scaled_dot_product_attention.default
B, H, L, E = 2, 3, 8, 4


def _sdpa_calls(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node | None, bool]]:
    """(attn_mask, is_causal) of every SDPA node."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is SDPA:
            mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
            out.append((mask, n.args[5] if len(n.args) > 5 else n.kwargs.get("is_causal", False)))
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class MaskedAttention(nn.Module):
    """SDPA with a mask that `make_mask(L, S)` builds from constants at every call."""

    def __init__(self, make_mask, scale: float | None = None):
        super().__init__()
        self.make_mask, self.scale = make_mask, scale

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.make_mask(q.shape[-2], k.shape[-2]),
                                              scale=self.scale)


def _qkv(S: int = L) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, L, E, generator=g), torch.randn(B, H, S, E, generator=g),
            torch.randn(B, H, S, E, generator=g))


def _captured(model: nn.Module, S: int = L):
    args = _qkv(S)
    c = capture(model, args)
    out = c.graph_module(*c.flatten_inputs(args))[0]
    assert _rel_err(out, model(*args)) < 1e-5
    return c, _sdpa_calls(c.graph_module)


def test_gpt2_captured_graph_is_causal_without_mask(small_zoo):
    zm = small_zoo("gpt2")
    c = capture(zm.model, zm.example_args, zm.example_kwargs)
    calls = _sdpa_calls(c.graph_module)
    assert calls and all(mask is None and causal is True for mask, causal in calls)
    assert not any(n.target in (torch.ops.aten.le.Tensor, torch.ops.aten.__and__.Tensor)
                   for n in c.graph_module.graph.nodes)  # the mask's computation is gone
    with torch.no_grad():
        out = c.unflatten_outputs(c.graph_module(*c.flatten_inputs(zm.example_args, zm.example_kwargs)))
        want = zm.model(*zm.example_args, **zm.example_kwargs)
    assert _rel_err(out.logits, want.logits) < 1e-5


@pytest.mark.parametrize("make_mask", [
    lambda L, S: torch.ones(L, S, dtype=torch.bool).tril(),
    lambda L, S: torch.full((L, S), float("-inf")).triu(1),
    lambda L, S: torch.full((L, S), torch.finfo(torch.float32).min).triu(1).expand(B, 1, L, S),
], ids=["bool", "additive-inf", "additive-min-broadcast"])
def test_constant_causal_mask_is_folded(make_mask):
    c, calls = _captured(MaskedAttention(make_mask, scale=0.5))
    assert calls == [(None, True)]
    node = next(n for n in c.graph_module.graph.nodes if n.target is SDPA)
    assert node.kwargs.get("scale") == 0.5  # the other arguments are kept
    assert not any(n.target in (torch.ops.aten.tril.default, torch.ops.aten.triu.default)
                   for n in c.graph_module.graph.nodes)


def test_mask_that_masks_nothing_is_dropped():
    _, calls = _captured(MaskedAttention(lambda L, S: torch.zeros(L, S)))
    assert calls == [(None, False)]


@pytest.mark.parametrize("make_mask", [
    lambda L, S: torch.ones(L, S, dtype=torch.bool).tril() & torch.ones(L, S, dtype=torch.bool).triu(-2),
    lambda L, S: ~torch.eye(L, S, dtype=torch.bool) | torch.eye(L, S, dtype=torch.bool).roll(1, 0),
    lambda L, S: torch.ones(L, S, dtype=torch.bool).tril(1),
    lambda L, S: torch.full((L, S), -1.0).triu(1),  # a finite bias, not a mask
    lambda L, S: torch.stack([torch.ones(L, S, dtype=torch.bool).tril(), torch.ones(L, S, dtype=torch.bool)]
                             ).view(B, 1, L, S),  # causal for one sequence only
], ids=["sliding-window", "all-but-diagonal", "shifted-tril", "finite-bias", "mixed-batch"])
def test_non_causal_constant_mask_is_kept(make_mask):
    _, calls = _captured(MaskedAttention(make_mask))
    assert len(calls) == 1 and calls[0][0] is not None and calls[0][1] is False


def test_bottom_right_causal_mask_is_kept_when_lengths_differ():
    """is_causal aligns the triangle top-left; HF's mask with a cache aligns it bottom-right."""
    _, calls = _captured(MaskedAttention(lambda L, S: torch.ones(L, S, dtype=torch.bool).tril(S - L)), S=L + 4)
    assert calls[0][0] is not None


def test_causal_buffer_is_folded_but_parameter_is_kept():
    class WithMask(nn.Module):
        def __init__(self, as_parameter: bool):
            super().__init__()
            mask = torch.zeros(L, L).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
            if as_parameter:  # a trainable (or later loaded) bias: its value at capture means nothing
                self.mask = nn.Parameter(mask, requires_grad=False)
            else:
                self.register_buffer("mask", mask)

        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)

    assert _captured(WithMask(as_parameter=False))[1] == [(None, True)]
    assert _captured(WithMask(as_parameter=True))[1][0][0] is not None


def test_mask_from_an_input_is_kept(small_zoo):
    zm = small_zoo("gpt2")
    ids = zm.example_args[0]
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0  # left padding
    kwargs = {**zm.example_kwargs, "attention_mask": attention_mask}
    c = capture(zm.model, zm.example_args, kwargs)
    calls = _sdpa_calls(c.graph_module)
    assert calls and all(mask is not None and causal is False for mask, causal in calls)
    with torch.no_grad():
        out = c.unflatten_outputs(c.graph_module(*c.flatten_inputs(zm.example_args, kwargs)))
        want = zm.model(*zm.example_args, **kwargs)
    assert _rel_err(out.logits, want.logits) < 1e-5


def test_mask_given_as_keyword_and_shared_mask():
    """Two SDPA calls read one mask, one of them by keyword: both fold, the mask's nodes go."""
    class Two(nn.Module):
        def forward(self, q, k, v):
            mask = torch.ones(L, L, dtype=torch.bool).tril()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) + \
                F.scaled_dot_product_attention(k, q, v, mask)

    args = _qkv()
    gm = torch.export.export(Two(), args, strict=False).module()
    first = next(n for n in gm.graph.nodes if n.target is SDPA)
    first.kwargs = {**first.kwargs, "attn_mask": first.args[3]}
    first.args = first.args[:3]
    gm.recompile()
    want = gm(*args)
    assert fold_causal_masks(gm) == 2
    assert _sdpa_calls(gm) == [(None, True), (None, True)]
    assert not any(n.target is torch.ops.aten.tril.default for n in gm.graph.nodes)
    assert _rel_err(gm(*args), want) < 1e-6
