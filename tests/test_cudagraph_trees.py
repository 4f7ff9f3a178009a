"""Pipelined steps under torch.compile's CUDA graphs (runtime/cudagraph_trees.py).

On the CPU inductor records no graphs, so these check what the step bracket does to gradients and
outputs, and that compiled stages under mode="reduce-overhead" train as compiled stages do; the
recording and replaying itself is checked on a GPU (tests/test_gpu.py).
"""
from __future__ import annotations

import copy

import torch
from dist_utils import build, max_rel_err, run_workers

from partitioner.api import compile_parallel
from partitioner.runtime.cudagraph_trees import CudagraphSteps
from partitioner.runtime.gradients import zero_gradients


def test_gradients_accumulate_into_buffers_made_outside_the_graphs():
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    steps = CudagraphSteps(lambda: [used, unused])
    steps.before_step()
    out = (used * 2).sum()
    out.backward()
    first = used.grad
    steps.after_step()
    assert used.grad is not first and torch.equal(used.grad, first)  # copied out of (what would be) a graph's memory
    assert unused.grad is None
    used.grad = None  # zero_grad()
    steps.before_step()
    buffer = used.grad
    assert buffer is not None and torch.equal(buffer, torch.zeros(3)) and unused.grad is None
    (used * 3).sum().backward()
    steps.after_step()
    assert used.grad is buffer and torch.equal(buffer, torch.full((3,), 3.0))  # accumulated in place


def test_zeroed_gradients_are_views_of_one_buffer_per_dtype():
    params = [torch.nn.Parameter(torch.ones(shape, dtype=dtype))
              for shape, dtype in [((3, 5), torch.float32), ((7,), torch.float32), ((2, 2), torch.bfloat16)]]
    zero_gradients(params)
    for p in params:
        assert p.grad.shape == p.shape and p.grad.dtype == p.dtype and not p.grad.any()
    assert params[0].grad.untyped_storage().data_ptr() == params[1].grad.untyped_storage().data_ptr()
    assert params[1].grad.data_ptr() - params[0].grad.data_ptr() >= 15 * 4  # no overlap
    assert (params[1].grad.data_ptr() - params[0].grad.data_ptr()) % 256 == 0  # each view aligned
    (params[0].sum() * 2 + params[1].sum()).backward()
    assert torch.equal(params[0].grad, torch.full((3, 5), 2.0)) and torch.equal(params[1].grad, torch.ones(7))


def test_outputs_let_go_of_their_autograd_graph_after_the_backward():
    w = torch.nn.Parameter(torch.ones(4))
    steps = CudagraphSteps(lambda: [w])
    steps.before_step()
    y = w * 2
    view = y[:2]
    steps.keep("F0", [y, view, 3])
    y.sum().backward()
    steps.release("F0")
    assert y.grad_fn is None and view.grad_fn is not None  # views are made anew by every call: left alone
    steps.after_step()


def test_stages_under_reduce_overhead_train_as_compiled_stages():
    """compile={"mode": "reduce-overhead"} (the step bracket on, no graphs on the CPU): losses, gradients
    accumulated across steps, and parameters after SGD steps equal compiled stages; eval outputs too."""
    zm = build("gpt2")

    def run(compile):
        pm = compile_parallel(copy.deepcopy(zm.model), ["cpu"] * 2, zm.example_args, zm.loss_fn,
                              example_kwargs=zm.example_kwargs, microbatches=4, compile=compile, time_limit_s=2)
        opt = torch.optim.SGD(pm.parameters(), lr=0.1)
        losses = []
        for _ in range(3):
            losses.append(pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs))
            opt.step()
            opt.zero_grad()
        losses += [pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs) for _ in range(2)]
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
        with torch.no_grad():
            out = pm.eval().forward(*zm.example_args, **zm.example_kwargs)
        return pm, torch.stack(losses), grads, out

    ref, ref_losses, ref_grads, ref_out = run(True)
    pm, losses, grads, out = run({"mode": "reduce-overhead"})
    assert ref.executor.cudagraph_steps is None and pm.executor.cudagraph_steps is not None
    assert max_rel_err(losses, ref_losses) < 1e-5
    assert grads.keys() == ref_grads.keys()
    assert max(max_rel_err(grads[n], g) for n, g in ref_grads.items()) < 1e-5
    assert max_rel_err(out.logits if hasattr(out, "logits") else out, ref_out.logits if hasattr(ref_out, "logits")
                       else ref_out) < 1e-5


def _two_rank_worker(rank: int, world: int, _arg) -> dict:
    zm = build("gpt2")
    out = {}
    for name, compile in (("compiled", True), ("graphs", {"mode": "reduce-overhead"})):
        pm = compile_parallel(copy.deepcopy(zm.model), ["cpu"] * world, zm.example_args, zm.loss_fn,
                              example_kwargs=zm.example_kwargs, microbatches=4, compile=compile, time_limit_s=2,
                              timeout_s=120)
        opt = torch.optim.SGD(pm.parameters(), lr=0.1)
        losses = []
        for step in range(4):
            losses.append(pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs))
            if step < 2:
                opt.step()
                opt.zero_grad()
        out[name] = (torch.stack(losses), {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None},
                     pm.executor.cudagraph_steps is not None)
    return out


def test_stages_under_reduce_overhead_train_across_processes():
    """Two gloo ranks, one stage each: the step bracket works over the process transport, and losses
    and gradients (accumulated over two steps) equal compiled stages."""
    for result in run_workers(_two_rank_worker, 2, timeout_s=300):
        (ref_losses, ref_grads, bracketed), (losses, grads, graphed) = result["compiled"], result["graphs"]
        assert not bracketed and graphed
        assert max_rel_err(losses, ref_losses) < 1e-5
        assert grads.keys() == ref_grads.keys() and grads
        assert max(max_rel_err(grads[n], g) for n, g in ref_grads.items()) < 1e-5
