"""lookups_as_matmuls: contended lookups of constant indices become one-hot matmuls with the same
values and gradients; other lookups stay embeddings."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from partitioner.api import compile_parallel
from partitioner.passes.capture import capture

EMBEDDING = torch.ops.aten.embedding.default


@pytest.fixture
def low_threshold(monkeypatch):
    """Small test graphs rewrite as large ones do."""
    monkeypatch.setattr("partitioner.passes.onehot_lookup.MIN_HOT_HITS", 8)


class PositionBias(nn.Module):
    """Scores from token embeddings plus a bias looked up by clipped relative positions (T5's idea)."""

    def __init__(self, length: int = 24, reach: int = 3, heads: int = 4, padding_idx: int | None = None,
                 heads_first: bool = False):
        super().__init__()
        self.length, self.reach, self.heads_first = length, reach, heads_first
        self.bias = nn.Embedding(2 * reach + 1, heads, padding_idx=padding_idx)
        self.tokens = nn.Embedding(50, heads)

    def forward(self, ids):
        pos = torch.arange(self.length, device=ids.device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.reach, self.reach) + self.reach
        if self.heads_first:  # T5's layout: the bias as (heads, L, L), read along L
            bias = self.bias(rel).permute(2, 0, 1)
            scores = self.tokens(ids).transpose(1, 2)[:, :, :, None] * bias[None]
        else:
            scores = self.tokens(ids)[:, :, None, :] * self.bias(rel)[None]
        return scores.square().sum(dim=(1, 2))


def _lookups(gm: torch.fx.GraphModule) -> list[str]:
    """The sorted tables every remaining aten.embedding reads."""
    return sorted(str(n.args[0].target) for n in gm.graph.nodes if n.op == "call_function" and n.target is EMBEDDING)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach().clamp_min(1e-12))


def _matmul_shapes(gm: torch.fx.GraphModule) -> list[tuple[int, ...]]:
    return [tuple(n.meta["val"].shape) for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.aten.mm.default]


@pytest.mark.parametrize("heads_first", [False, True])
def test_a_contended_constant_lookup_is_a_matmul_with_the_same_values_and_gradients(low_threshold, heads_first):
    torch.manual_seed(0)
    model = PositionBias(heads_first=heads_first)
    ids = torch.randint(0, 50, (2, model.length))
    c = capture(model, (ids,))
    assert _lookups(c.graph_module) == ["tokens.weight"]  # the token ids are data: that lookup stays
    # permuted heads-first, the matmul writes (heads, L * L): the permuted bias is then contiguous
    assert _matmul_shapes(c.graph_module) == [(4, 24 * 24) if heads_first else (24 * 24, 4)]

    got = c.graph_module(*c.flatten_inputs((ids,)))[0]
    want = model(ids)
    assert _rel_err(got, want) < 1e-6
    params = dict(c.graph_module.named_parameters())
    grads = torch.autograd.grad(got.sum(), [params["bias.weight"], params["tokens.weight"]])
    want_grads = torch.autograd.grad(want.sum(), [model.bias.weight, model.tokens.weight])
    for g, w in zip(grads, want_grads):
        assert _rel_err(g, w) < 1e-5


def test_lookups_that_are_not_contended_constants_stay(low_threshold, monkeypatch):
    ids = torch.randint(0, 50, (2, 24))
    # a padding row gets no gradient from an embedding, but would from a matmul
    assert _lookups(capture(PositionBias(padding_idx=0), (ids,)).graph_module) == ["bias.weight", "tokens.weight"]
    monkeypatch.setattr("partitioner.passes.onehot_lookup.MIN_HOT_HITS", 10_000)  # no row that hot
    assert _lookups(capture(PositionBias(), (ids,)).graph_module) == ["bias.weight", "tokens.weight"]
    monkeypatch.setattr("partitioner.passes.onehot_lookup.MIN_HOT_HITS", 8)
    monkeypatch.setattr("partitioner.passes.onehot_lookup.ONEHOT_BUDGET_BYTES", 1024)  # one-hot too large
    assert _lookups(capture(PositionBias(), (ids,)).graph_module) == ["bias.weight", "tokens.weight"]


@pytest.mark.parametrize("compiled", [False, True])
def test_t5_with_its_bias_lookups_rewritten_trains_as_the_model(low_threshold, small_zoo, compiled):
    """The zoo's T5: both relative-attention-bias lookups become matmuls; pipelined over 2 stages,
    loss and gradients equal the unpartitioned model's (fp32, rel err < 1e-5; compiled 1e-4)."""
    zm = small_zoo("t5-base")
    model = copy.deepcopy(zm.model).train()
    c = capture(model, zm.example_args, zm.example_kwargs)
    assert not [t for t in _lookups(c.graph_module) if "relative_attention_bias" in t]

    reference = copy.deepcopy(model)
    want_loss = zm.loss_fn(reference(*zm.example_args, **zm.example_kwargs), zm.target)
    want_loss.backward()
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, zm.example_args, zm.loss_fn, microbatches=2,
                          example_kwargs=zm.example_kwargs, example_target=zm.target, compile=compiled)
    loss = pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
    tol = 1e-4 if compiled else 1e-5
    assert abs(loss.item() - want_loss.item()) <= tol * abs(want_loss.item())
    want = dict(reference.named_parameters())
    largest = max(p.grad.abs().max().item() for p in want.values() if p.grad is not None)
    for name, p in pm.named_parameters():
        if want[name].grad is None:
            continue
        scale = max(want[name].grad.abs().max().item(), 1e-3 * largest)
        assert (p.grad - want[name].grad).abs().max().item() <= tol * scale, name
