"""partitioner/grad_clip.py: the clipped norm and gradients equal torch's on the unsplit model,
a tied embedding counted once, in one process and over 4 gloo ranks."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from dist_utils import build, max_rel_err, run_workers

from partitioner.api import compile_parallel
from partitioner.passes.capture import capture
from partitioner.passes.split import even_plan


def _reference(zm, max_norm: float, norm_type: float):
    model = copy.deepcopy(zm.model)
    zm.loss_fn(model(*zm.example_args, **zm.example_kwargs), zm.target).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)
    return norm, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _clip(zm, devices, max_norm: float, norm_type: float):
    captured = capture(zm.model, tuple(x[:1] for x in zm.example_args))
    pm = compile_parallel(copy.deepcopy(zm.model), devices, zm.example_args, zm.loss_fn, microbatches=4,
                          plan=even_plan(captured, len(devices), microbatches=4), timeout_s=60)
    pm.train_step(*zm.example_args, target=zm.target)
    norm = pm.clip_grad_norm_(max_norm, norm_type)
    return pm, norm


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clip_equals_torch_on_the_unsplit_model_with_a_tied_embedding(norm_type):
    zm = build("gpt2")
    # "cpu:0"/"cpu:1": two devices in one process, so the tied embedding has a replica on each
    pm, norm = _clip(zm, ["cpu:0", "cpu:1"], 0.05, norm_type)
    assert any(len(c) > 1 for c in pm.store.replicas.values())
    want_norm, want_grads = _reference(zm, 0.05, norm_type)
    assert max_rel_err(norm, want_norm) < 1e-6
    for name, p in pm.named_parameters():
        assert max_rel_err(p.grad, want_grads[name]) < 1e-6, name


def _worker(rank: int, world: int, _arg) -> dict:
    zm = build("gpt2")
    pm, norm = _clip(zm, ["cpu"] * world, 0.05, 2.0)
    want_norm, want_grads = _reference(zm, 0.05, 2.0)
    return {"norm": max_rel_err(norm, want_norm), "grads": max(max_rel_err(p.grad, want_grads[n])
                                                               for n, p in pm.named_parameters()),
            "tied_here": "transformer.wte.weight" in dict(pm.named_parameters())}


def test_clip_over_four_gloo_ranks_counts_the_tied_embedding_once():
    results = run_workers(_worker, 4, None, timeout_s=120)
    assert results[0]["tied_here"] and results[3]["tied_here"]  # replicated on the first and last rank
    for r in results:
        assert r["norm"] < 1e-6 and r["grads"] < 1e-6, r
