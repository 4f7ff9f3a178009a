"""partitioner/runtime/gradients.py and the executor's foreach accumulation: a backward's parameter
gradients add into .grad as autograd's AccumulateGrad would (never sharing a tensor between
parameters or with a gradient sent on), and hooks keep autograd's own accumulation."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from dist_utils import max_rel_err

from partitioner.api import compile_parallel
from partitioner.passes.capture import capture
from partitioner.passes.split import plan_from_cuts, valid_cuts
from partitioner.runtime.gradients import accumulate, plain_leaves


def test_a_gradient_autograd_hands_to_two_parameters_is_added_into_two_tensors():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    ga, gb = torch.autograd.grad((a + b).sum(), [a, b])
    assert ga is gb  # what AccumulateGrad guards against by copying
    accumulate([a, b], [ga, gb])
    accumulate([a], [torch.full((3,), 2.0)])
    assert torch.equal(a.grad, torch.full((3,), 3.0)) and torch.equal(b.grad, torch.ones(3))
    assert torch.equal(ga, torch.ones(3))  # the gradient itself is left as it was


def test_parameters_that_got_no_gradient_keep_none_and_sparse_gradients_add():
    a, b, emb = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2)), nn.Parameter(torch.zeros(4, 2))
    sparse = torch.sparse_coo_tensor([[1]], torch.ones(1, 2), (4, 2), check_invariants=True)
    accumulate([a, b, emb], [torch.ones(2), None, sparse])
    accumulate([emb], [sparse])
    assert b.grad is None and torch.equal(a.grad, torch.ones(2))
    assert torch.equal(emb.grad.to_dense()[1], torch.full((2,), 2.0)) and emb.grad.to_dense()[0].abs().sum() == 0


def test_hooked_or_frozen_parameters():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2), requires_grad=False)
    assert plain_leaves([a, b]) == [a]
    a.register_post_accumulate_grad_hook(lambda p: None)
    assert plain_leaves([a, b]) is None


class ShiftChain(nn.Module):
    """Each layer adds a parameter straight to its input: that parameter's gradient and the input's
    are one tensor, which the input's producer stage receives."""

    def __init__(self, width: int = 6, depth: int = 4):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.shifts = nn.ParameterList(nn.Parameter(torch.randn(width)) for _ in range(depth))

    def forward(self, x):
        for lin, shift in zip(self.linears, self.shifts):
            x = torch.tanh(lin(x + shift))
        return x


def _pipeline(model, x, chunks: int = 2):
    captured = capture(model, (x[:2],))
    cuts = [c for c in valid_cuts(captured)]
    step = max(1, len(cuts) // 4)
    plan = plan_from_cuts(captured, cuts[step::step][:3], 2, chunks, "interleaved-1f1b", 4)
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), nn.functional.mse_loss, microbatches=4,
                          schedule="interleaved-1f1b", plan=plan)
    assert not pm.executor.foreach_grads  # eager stages keep AccumulateGrad: it frees each gradient as it goes
    pm.executor.foreach_grads = True  # what compiled stages use
    return pm


def test_shared_gradients_at_stage_boundaries_over_two_steps():
    torch.manual_seed(0)
    model, x, y = ShiftChain(), torch.randn(8, 6), torch.randn(8, 6)
    pm = _pipeline(model, x)
    for step in (1, 2):
        loss = pm.train_step(x, target=y)
        ref = copy.deepcopy(model)
        for _ in range(step):
            for xs, ys in zip(x.chunk(4), y.chunk(4)):
                (nn.functional.mse_loss(ref(xs), ys) / 4).backward()
        assert max_rel_err(loss, nn.functional.mse_loss(model(x), y)) < 1e-5
        for name, p in pm.named_parameters():
            assert max_rel_err(p.grad, ref.get_parameter(name).grad) < 1e-5, name


def test_a_parameter_hook_sees_autograd_s_accumulation_once_per_microbatch():
    torch.manual_seed(0)
    model, x, y = ShiftChain(), torch.randn(8, 6), torch.randn(8, 6)
    pm = _pipeline(model, x)
    calls: list[str] = []
    for name, p in pm.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: calls.append(name))
    pm.train_step(x, target=y)
    assert sorted(calls) == sorted(name for name, _ in pm.named_parameters() for _ in range(4))
    ref = copy.deepcopy(model)
    for xs, ys in zip(x.chunk(4), y.chunk(4)):
        (nn.functional.mse_loss(ref(xs), ys) / 4).backward()
    for name, p in pm.named_parameters():
        assert max_rel_err(p.grad, ref.get_parameter(name).grad) < 1e-5, name
