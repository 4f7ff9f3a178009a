"""partitioner/cost_models/contention.py: a compiled embedding backward whose indices pile onto one
row pays the hottest row's serial chain of atomics; the hits come from the index values when
the graph computes them from constants, else from an even spread."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from partitioner.cost_models.contention import LINE_BYTES, embedding_chains_s, hottest_row_hits
from partitioner.cost_models.device import get_device_spec
from partitioner.cost_models.profile import profile
from partitioner.passes.capture import capture


@pytest.fixture(autouse=True)
def keep_lookups(monkeypatch):
    """These lookups stay embeddings (capture would rewrite them as one-hot matmuls,
    partitioner/passes/onehot_lookup.py): the cost of those it leaves is under test."""
    monkeypatch.setattr("partitioner.passes.onehot_lookup.MIN_HOT_HITS", 1 << 62)


def buckets(length: int, reach: int) -> torch.Tensor:
    """Relative positions clipped to +-reach: most pairs land in the two outermost buckets."""
    pos = torch.arange(length)
    return (pos[None, :] - pos[:, None]).clamp(-reach, reach) + reach


class PositionBias(nn.Module):
    """Attention-score bias from a small table indexed by bucketed relative positions (T5's idea)."""

    def __init__(self, length: int, reach: int = 4, heads: int = 4):
        super().__init__()
        self.length, self.reach = length, reach
        self.bias = nn.Embedding(2 * reach + 1, heads)
        self.tokens = nn.Embedding(1000, heads)

    def forward(self, ids):
        pos = torch.arange(self.length, device=ids.device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.reach, self.reach) + self.reach
        scores = self.tokens(ids)[:, :, None, :] + self.bias(rel)[None]
        return scores.sum(dim=(1, 2))


def captured_bias(length: int):
    model = PositionBias(length)
    return capture(model, (torch.randint(0, 1000, (2, length)),))


def embedding_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.embedding.default]


def test_constant_positions_count_the_hottest_rows_hits():
    length = 64
    gm = captured_bias(length).graph_module
    tokens, bias = sorted(embedding_nodes(gm), key=lambda n: n.args[0].meta["val"].shape[0], reverse=True)
    expected = int(torch.bincount(buckets(length, 4).flatten()).max())
    assert expected > length * length / 9  # the clipped buckets are hotter than an even spread
    assert hottest_row_hits(gm, bias.args[1], 9) == expected
    # token ids are data: taken as spread evenly over the 1000 rows
    assert hottest_row_hits(gm, tokens.args[1], 1000) == math.ceil(2 * length / 1000)


def test_the_chain_is_hits_times_one_lines_atomics():
    length = 64
    gm = captured_bias(length).graph_module
    spec = get_device_spec("h100")
    chains = embedding_chains_s(gm, spec)
    bias = max(embedding_nodes(gm), key=lambda n: chains[n.name])
    hits = int(torch.bincount(buckets(length, 4).flatten()).max())
    columns = min(4, LINE_BYTES // 4)
    assert chains[bias.name] == pytest.approx(hits * columns * spec.contended_atomic_s)
    assert embedding_chains_s(gm, get_device_spec("cpu")) == {}  # not modelled where atomics are not costed


def test_a_compiled_stage_pays_the_chain_and_an_eager_one_does_not():
    length = 512  # 512 x 512 pairs into 9 buckets: a chain of ~0.6 ms on an H100
    captured = captured_bias(length)
    chains = embedding_chains_s(captured.graph_module, get_device_spec("h100"))
    name = max(chains, key=chains.get)
    assert chains[name] > 1e-4
    compiled = profile(captured, device="h100", progress=False, compiled=True)
    eager = profile(captured, device="h100", progress=False, compiled=False)
    assert compiled.nodes[name].bwd_time_s == pytest.approx(chains[name])
    assert eager.nodes[name].bwd_time_s < chains[name]


def test_indices_from_an_input_are_not_evaluated():
    """A value that depends on an input, or that random ops make, falls back to the even spread."""
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(4, 8)

        def forward(self, x):
            idx = (torch.rand(256, device=x.device) * 4).long()
            return self.table(idx).sum() + x.sum()

    gm = capture(Noisy(), (torch.randn(3),)).graph_module
    (node,) = embedding_nodes(gm)
    assert hottest_row_hits(gm, node.args[1], 4) == 64


def test_the_padding_row_gets_no_gradient_and_a_sparse_table_no_atomics():
    class Padded(nn.Module):
        def __init__(self, padding_idx=None, sparse=False):
            super().__init__()
            self.table = nn.Embedding(4, 8, padding_idx=padding_idx, sparse=sparse)

        def forward(self, x):
            idx = torch.arange(64, device=x.device) % 3  # rows 0, 1, 2: 22, 21, 21 hits
            return self.table(idx).sum() + x.sum()

    spec = get_device_spec("h100")
    for padding_idx, hits in ((None, 22), (0, 21)):
        gm = capture(Padded(padding_idx), (torch.randn(3),)).graph_module
        (node,) = embedding_nodes(gm)
        assert embedding_chains_s(gm, spec)[node.name] == pytest.approx(hits * 8 * spec.contended_atomic_s)
    gm = capture(Padded(sparse=True), (torch.randn(3),)).graph_module
    assert embedding_chains_s(gm, spec) == {}
