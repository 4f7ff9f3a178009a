"""In-place writes into values the graph computed (passes/writes.py): a pipeline equals the model
wherever the plan puts the write, its tensor's producer and its readers."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from partitioner.api import compile_parallel
from partitioner.passes.capture import capture
from partitioner.passes.writes import after_write, stage_mates


class ShiftWrite(nn.Module):
    """`buf[:, 1:] = h[:, :-1]` halfway through a chain, read at the end (the shape of HF T5's
    `_shift_right`); `grad_buf` writes into a tensor that carries a gradient of its own."""

    def __init__(self, grad_buf: bool):
        super().__init__()
        self.grad_buf = grad_buf
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(6))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.tanh(self.layers[0](x))
        buf = h * 2 if self.grad_buf else torch.zeros_like(x)
        for layer in self.layers[1:]:
            h = torch.tanh(layer(h))
            if layer is self.layers[3]:
                buf[:, 1:] = h[:, :-1]
                buf[:, 0] = 1.0
        return self.head(h + buf)


def loss_fn(out, target):
    return nn.functional.cross_entropy(out, target)


@pytest.mark.parametrize("grad_buf", [False, True])
@pytest.mark.parametrize("ranks,chunks", [(2, 1), (3, 1), (4, 1), (2, 2)])
def test_pipelines_with_an_in_place_write_equal_the_model(grad_buf, ranks, chunks):
    torch.manual_seed(0)
    model, x, y = ShiftWrite(grad_buf), torch.randn(8, 16), torch.randint(0, 4, (8,))
    reference = copy.deepcopy(model)
    want = loss_fn(reference(x), y)
    want.backward()
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * ranks, (x,), loss_fn, microbatches=4, chunks=chunks,
                          time_limit_s=1)
    loss = pm.train_step(x, target=y)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    got = dict(pm.named_parameters())
    largest = max(p.grad.abs().max().item() for p in reference.parameters())
    for name, p in reference.named_parameters():
        assert (got[name].grad - p.grad).abs().max().item() <= 1e-5 * largest, name


def test_readers_after_a_write_read_through_it_and_nothing_is_dropped():
    captured = capture(ShiftWrite(False), (torch.randn(8, 16),))
    graph = captured.graph_module.graph
    writes = [n for n in graph.nodes if n.op == "call_function" and n.target in
              (torch.ops.aten.copy_.default, torch.ops.aten.fill_.Tensor, torch.ops.aten.fill_.Scalar)]
    assert len(writes) == 2, "an in-place write whose result nobody reads was dropped"
    ordered = [n for n in graph.nodes if n.target is after_write]
    assert ordered and all(n.args[1] in writes for n in ordered)
    head_input = next(n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.add.Tensor
                      and any(a.target is after_write for a in n.all_input_nodes))
    assert head_input is not None


@pytest.mark.parametrize("grad_buf", [False, True])
def test_every_valid_cut_gives_the_models_gradients(grad_buf):
    from partitioner.passes.split import valid_cuts
    torch.manual_seed(0)
    model, x, y = ShiftWrite(grad_buf), torch.randn(8, 16), torch.randint(0, 4, (8,))
    reference = copy.deepcopy(model)
    loss_fn(reference(x), y).backward()
    captured = capture(model, (x[:2],))
    cuts = valid_cuts(captured)
    compute = [n for n in captured.graph_module.graph.nodes if n.op in ("call_function", "call_method")]
    position = {n.name: i for i, n in enumerate(compute)}
    pairs = [sorted((position[m], i)) for i, n in enumerate(compute) for m in stage_mates(n)]
    assert pairs and not any(lo < c <= hi for c in cuts for lo, hi in pairs), "a cut separates stage mates"
    for _ in pipelines_at(cuts, captured, model, reference, x, y):
        pass


def pipelines_at(cuts, captured, model, reference, x, y):
    """For each cut: a 2-stage pipeline of `model` cut there, after one step whose gradients equal
    `reference`'s (1e-5 of the largest)."""
    from partitioner.passes.split import plan_from_cuts
    largest = max(p.grad.abs().max().item() for p in reference.parameters())
    for cut in cuts:
        plan = plan_from_cuts(captured, [cut], 2, microbatches=4)
        pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), loss_fn, microbatches=4, plan=plan)
        pm.train_step(x, target=y)
        got = dict(pm.named_parameters())
        for name, p in reference.named_parameters():
            assert (got[name].grad - p.grad).abs().max().item() <= 1e-5 * largest, (cut, name)
        yield cut, pm


def test_a_plan_that_cuts_a_write_from_its_view_is_refused():
    from partitioner.errors import PlanError
    from partitioner.passes.split import plan_from_cuts, split
    x = torch.randn(2, 16)
    captured = capture(ShiftWrite(False), (x,))
    compute = [n for n in captured.graph_module.graph.nodes if n.op in ("call_function", "call_method")]
    write = next(i for i, n in enumerate(compute) if n.target is torch.ops.aten.copy_.default)
    with pytest.raises(PlanError, match=r"belong together"):
        split(captured, plan_from_cuts(captured, [write], 2, microbatches=1))


def test_batch_norm_buffers_update_as_with_gradient_accumulation():
    """A buffer's in-place update that nothing reads (BatchNorm's num_batches_tracked += 1) is kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16),
                          nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
    reference = copy.deepcopy(model)
    for xb, yb in zip(x.chunk(4), y.chunk(4)):  # BatchNorm normalises per microbatch
        (loss_fn(reference(xb), yb) / 4).backward()
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), loss_fn, microbatches=4, time_limit_s=1)
    pm.train_step(x, target=y)
    buffers = dict(pm.named_buffers())
    for name, want in reference.named_buffers():
        assert torch.allclose(buffers[name].float(), want.float(), atol=1e-6), name
    assert int(buffers["1.num_batches_tracked"]) == 4


class CountedScale(nn.Module):
    """A step counter (a buffer) bumped at the start of forward and read at the end, as `buf += 1`
    (the graph reads the in-place op's result), `buf.add_(1)`, `buf += 1` under torch.no_grad (export
    records it as copy_(buf, detach(add_(buf, 1))) at the end of the graph) or through a view
    (`buf[0] = ...`, the graph reads the buffer itself after the write)."""

    def __init__(self, bump: str):
        super().__init__()
        self.bump = bump
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.head = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x):
        if self.bump == "iadd":
            self.calls += 1
        elif self.bump == "add_":
            self.calls.add_(1)
        elif self.bump == "no_grad":
            with torch.no_grad():
                self.calls += 1
        else:
            self.calls[0] = self.calls[0] + 1
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x) * self.calls


@pytest.mark.parametrize("bump", ["iadd", "add_", "no_grad", "view"])
def test_a_buffer_written_in_forward_is_read_as_of_each_microbatch_at_every_cut(bump):
    """Each microbatch reads the counter as it left it, on whichever stage it is read, and the
    counter ends at the number of microbatches. The write keeps only its reads on its stage: the
    layers in between can be cut anywhere."""
    from partitioner.passes.split import valid_cuts
    torch.manual_seed(0)
    model, x, y = CountedScale(bump), torch.randn(8, 8), torch.randint(0, 3, (8,))
    reference = copy.deepcopy(model)
    for xb, yb in zip(x.chunk(4), y.chunk(4)):
        (loss_fn(reference(xb), yb) / 4).backward()
    captured = capture(copy.deepcopy(model), (x[:2],))
    cuts = valid_cuts(captured)
    assert len(cuts) >= 7, cuts  # after every linear and tanh of the four layers but the last
    for cut, pm in pipelines_at(cuts, captured, model, reference, x, y):
        assert dict(pm.named_buffers())["calls"].item() == 4, cut


def _distributed_worker(rank: int, world_size: int, grad_buf: bool):
    torch.manual_seed(0)
    model, x, y = ShiftWrite(grad_buf), torch.randn(8, 16), torch.randint(0, 4, (8,))
    pm = compile_parallel(model, ["cpu"] * world_size, (x,), loss_fn, microbatches=4, time_limit_s=1)
    loss = pm.train_step(x, target=y)
    return loss.item(), {n: p.grad.clone() for n, p in pm.named_parameters()}


def test_in_place_writes_across_processes():
    """gloo ranks: the written tensor and its gradient travel between processes like any value."""
    from dist_utils import run_workers
    torch.manual_seed(0)
    model, x, y = ShiftWrite(True), torch.randn(8, 16), torch.randint(0, 4, (8,))
    want = loss_fn(model(x), y)
    want.backward()
    results = run_workers(_distributed_worker, 2, True, timeout_s=180)
    grads = {n: g for _, rank_grads in results for n, g in rank_grads.items()}
    assert all(abs(loss - want.item()) <= 1e-5 * abs(want.item()) for loss, _ in results)
    largest = max(p.grad.abs().max().item() for p in model.parameters())
    for name, p in model.named_parameters():
        assert (grads[name] - p.grad).abs().max().item() <= 1e-5 * largest, name
