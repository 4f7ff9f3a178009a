"""partitioner/sequence_first.py: a split that would cut the sequences of nn.MultiheadAttention or an
RNN fed sequence-first inputs is refused by name, suggesting batch_dims= for the input; batch-first
models, and models that transpose to sequence-first inside forward, compile and train as the
unpartitioned model does (sequence-first ones with batch_dims: tests/test_batch_dims.py)."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn
from dist_utils import grad_errors, max_rel_err

from partitioner.api import compile_parallel
from partitioner.errors import RuntimeConfigError

SEQ, BATCH, DIM = 6, 4, 16


class Attention(nn.Module):
    """Self-attention blocks; `transpose`: batch-first inputs, turned sequence-first inside forward."""

    def __init__(self, batch_first: bool, transpose: bool = False, keywords: bool = False):
        super().__init__()
        self.transpose, self.keywords = transpose, keywords
        self.atts = nn.ModuleList(nn.MultiheadAttention(DIM, 2, batch_first=batch_first) for _ in range(3))
        self.ffs = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(3))

    def forward(self, x):
        x = x.transpose(0, 1) if self.transpose else x
        for att, ff in zip(self.atts, self.ffs):
            a = att(query=x, key=x, value=x, need_weights=False) if self.keywords else att(x, x, x, need_weights=False)
            x = x + a[0]
            x = x + torch.tanh(ff(x))
        return x.transpose(0, 1) if self.transpose else x


class Recurrent(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.lstm = nn.LSTM(DIM, DIM, num_layers=1, batch_first=batch_first)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x):
        return self.out(self.lstm(torch.tanh(self.inp(x)))[0])


def compile_two(model, x):
    return compile_parallel(model, ["cpu", "cpu"], (x,), nn.functional.mse_loss, example_target=torch.zeros_like(x),
                            microbatches=2)


@pytest.mark.parametrize("model, name", [(Attention(batch_first=False), "'atts.0' (MultiheadAttention"),
                                         (Attention(batch_first=False, keywords=True), "'atts.0' (MultiheadAttention"),
                                         (Recurrent(batch_first=False), "'lstm' (LSTM")],
                         ids=["attention", "attention-keywords", "lstm"])
def test_sequence_first_inputs_are_refused_by_module(model, name):
    x = torch.randn(SEQ, BATCH, DIM)  # (seq, batch, dim): dim 0, which microbatches cut, is the sequence
    with pytest.raises(RuntimeConfigError, match=rf"{re.escape(name)}, batch_first=False\) reads \(6, 4, 16\).*\(3, 4, 16\) per microbatch"
                                                 r": cutting the batch into 2 microbatches \(along dim 0 of 'x'\) cuts its "
                                                 r"sequences.*Pass batch_dims=\{'x': 1\} to compile_parallel.*batch_first=True"):
        compile_two(model, x)


class Encoder(nn.Module):
    """nn.TransformerEncoder (sequence-first) with a (batch, seq) padding mask, which dim 0 does not cut."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(DIM, 2, 32, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, src, src_key_padding_mask):
        return self.enc(src, src_key_padding_mask=src_key_padding_mask)


def test_a_transformer_whose_padding_mask_fails_per_microbatch_is_refused_naming_batch_dims():
    x, mask = torch.randn(SEQ, BATCH, DIM), torch.zeros(BATCH, SEQ, dtype=torch.bool)
    with pytest.raises(RuntimeConfigError, match=r"'enc.layers.0.self_attn' \(MultiheadAttention.*\(3, 4, 16\) per "
                                                 r"microbatch.*Pass batch_dims=\{'src': 1\}"):
        compile_parallel(Encoder(), ["cpu", "cpu"], (x,), nn.functional.mse_loss, microbatches=2,
                         example_kwargs={"src_key_padding_mask": mask})


@pytest.mark.parametrize("model", [Attention(batch_first=True), Attention(batch_first=False, transpose=True),
                                   Recurrent(batch_first=True)], ids=["batch-first", "transposed-inside", "lstm"])
def test_batch_first_inputs_train_as_the_model(model):
    torch.manual_seed(0)
    x, target = torch.randn(BATCH, SEQ, DIM), torch.randn(BATCH, SEQ, DIM)
    ref = copy.deepcopy(model)
    pm = compile_two(model, x)
    loss = pm.train_step(x, target=target)
    want = sum(nn.functional.mse_loss(ref(xs), ts) for xs, ts in zip(x.chunk(2), target.chunk(2))) / 2
    want.backward()
    assert max_rel_err(loss, want.detach()) < 1e-5
    assert max(grad_errors(pm, {n: p.grad for n, p in ref.named_parameters()}).values()) < 1e-5
