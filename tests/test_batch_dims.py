"""compile_parallel(batch_dims=...): sequence-first models (batch on dim 1: nn.MultiheadAttention,
nn.LSTM with batch_first=False) are pipelined with the batch cut along the dim it lies on, and train
and infer as the unpartitioned model does under gradient accumulation over the same microbatches."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from dist_utils import grad_errors, max_rel_err

from partitioner.api import compile_parallel
from partitioner.errors import RuntimeConfigError

SEQ, BATCH, DIM = 6, 4, 16


class Attention(nn.Module):
    """Sequence-first self-attention blocks: x is (seq, batch, dim), mask (batch, seq) True where padded."""

    def __init__(self, blocks: int = 4):
        super().__init__()
        self.atts = nn.ModuleList(nn.MultiheadAttention(DIM, 2) for _ in range(blocks))
        self.ffs = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(blocks))

    def forward(self, x, mask=None):
        for att, ff in zip(self.atts, self.ffs):
            x = x + att(x, x, x, key_padding_mask=mask, need_weights=False)[0]
            x = x + torch.tanh(ff(x))
        return x


class Recurrent(nn.Module):
    """A sequence-first LSTM between two linear layers: (seq, batch, dim) in and out."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.lstm = nn.LSTM(DIM, DIM, num_layers=2)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x):
        return self.out(self.lstm(torch.tanh(self.inp(x)))[0])


def padding_mask() -> torch.Tensor:
    """(batch, seq): sample b has its last b positions padded."""
    return torch.arange(SEQ).expand(BATCH, SEQ) >= SEQ - torch.arange(BATCH)[:, None]


def reference(model: nn.Module, x: torch.Tensor, target: torch.Tensor, microbatches: int,
              mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of `model` under gradient accumulation over microbatches cut along dim 1
    (the mask along dim 0)."""
    ref = copy.deepcopy(model)
    masks = mask.chunk(microbatches) if mask is not None else [None] * microbatches
    loss = sum(nn.functional.mse_loss(ref(xs, ms) if mask is not None else ref(xs), ts)
               for xs, ts, ms in zip(x.chunk(microbatches, 1), target.chunk(microbatches, 1), masks)) / microbatches
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in ref.named_parameters()}


def check_train_and_infer(model: nn.Module, batch_dims, schedule: str, chunks: int, mask: torch.Tensor | None = None):
    torch.manual_seed(0)
    x, target = torch.randn(SEQ, BATCH, DIM), torch.randn(SEQ, BATCH, DIM)
    kwargs = {"mask": mask} if mask is not None else None
    want_loss, want_grads = reference(model, x, target, 2, mask)
    with torch.no_grad():
        want_out = copy.deepcopy(model).eval()(x, **(kwargs or {}))
    pm = compile_parallel(model, ["cpu", "cpu"], (x,), nn.functional.mse_loss, example_kwargs=kwargs,
                          example_target=target, microbatches=2, schedule=schedule, chunks=chunks,
                          batch_dims=batch_dims, time_limit_s=2.0)
    loss = pm.train_step(x, target=target, **(kwargs or {}))
    assert max_rel_err(loss, want_loss) < 1e-5
    errors = grad_errors(pm, want_grads)
    assert max(errors.values()) < 1e-5, errors
    pm.eval()
    with torch.no_grad():
        out = pm(x, **(kwargs or {}))
    assert out.shape == (SEQ, BATCH, DIM)
    assert max_rel_err(out, want_out) < 1e-5


@pytest.mark.parametrize("schedule, chunks", [("1f1b", 1), ("interleaved-1f1b", 2)], ids=["1f1b", "interleaved"])
@pytest.mark.parametrize("batch_dims", [1, {"x": 1, "target": 1}], ids=["int", "dict"])
def test_sequence_first_attention_trains_and_infers_as_the_model(batch_dims, schedule, chunks):
    check_train_and_infer(Attention(), batch_dims, schedule, chunks)


def test_a_padding_mask_stays_cut_on_dim_0():
    check_train_and_infer(Attention(), {"x": 1, "target": 1}, "1f1b", 1, mask=padding_mask())


def test_sequence_first_lstm_trains_and_infers_as_the_model():
    check_train_and_infer(Recurrent(), 1, "1f1b", 1)


def compile_with(batch_dims, x: torch.Tensor, microbatches: int = 2, **kwargs):
    return compile_parallel(Attention(), ["cpu", "cpu"], (x,), nn.functional.mse_loss, microbatches=microbatches,
                            batch_dims=batch_dims, **kwargs)


def test_an_unknown_input_name_is_refused_with_the_valid_names():
    x = torch.randn(SEQ, BATCH, DIM)
    with pytest.raises(RuntimeConfigError, match=r"batch_dims names 'src'.*the inputs are \['x', 'mask'\]"):
        compile_with({"src": 1}, x, example_kwargs={"mask": padding_mask()})


@pytest.mark.parametrize("batch_dims", [3, {"x": -4}], ids=["int", "dict"])
def test_a_dim_an_input_lacks_is_refused_naming_it(batch_dims):
    with pytest.raises(RuntimeConfigError, match=r"batch of input 'x' on dim -?\d, but it has shape \(6, 4, 16\)"):
        compile_with(batch_dims, torch.randn(SEQ, BATCH, DIM))


def test_a_batch_that_does_not_divide_along_its_dim_is_refused_naming_the_dim():
    x = torch.randn(SEQ, 3, DIM)  # 3 samples on dim 1, 6 (divisible) on dim 0
    with pytest.raises(RuntimeConfigError, match=r"batch of 3 does not split into 2 microbatches.*dim 1 of the first "
                                                 r"tensor input, 'x'"):
        compile_with(1, x)


def test_a_target_without_the_batch_dim_is_refused_at_train_step():
    x = torch.randn(SEQ, BATCH, DIM)
    pm = compile_with({"x": 1, "target": 1}, x)
    with pytest.raises(RuntimeConfigError, match=r"target has shape \(4,\), without a dim 1"):
        pm.train_step(x, target=torch.zeros(BATCH))


def test_a_sequence_first_target_left_on_dim_0_is_refused_naming_its_batch_dim():
    """batch_dims for the inputs only: the (seq, batch) target would be cut along its sequence, and a
    loss that flattens output and target (a token cross-entropy) pairs the wrong tokens silently."""
    x, target = torch.randn(SEQ, BATCH, DIM), torch.randn(SEQ, BATCH, DIM)
    pm = compile_parallel(Attention(), ["cpu", "cpu"], (x,), lambda out, t: nn.functional.mse_loss(
        out.reshape(-1), t.reshape(-1)), microbatches=2, batch_dims={"x": 1})
    with pytest.raises(RuntimeConfigError, match=r"target \(6, 4, 16\) has 6 along its batch dim 0 but the inputs' "
                                                 r"batch 4 along dim 1; pass compile_parallel\(batch_dims=\{..., 'target': 1\}\)"):
        pm.train_step(x, target=target)
