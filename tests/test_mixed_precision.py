"""partitioner/passes/mixed_precision.py: fp32 parameters, bf16 compute.

The reference is the unpartitioned model computing in bf16 (a bf16 copy, float inputs cast),
as FSDP2's MixedPrecisionPolicy(param_dtype=bf16) runs it. Our gradients accumulate over
microbatches in fp32 where the copy's are one bf16 backward, so gradients compare within a
stated bf16 tolerance: relative L2 error over all gradients < 2e-2; the loss within 1e-3.
"""
from __future__ import annotations

import copy

import pytest
import torch
from dist_utils import build, run_workers
from test_api import compile_zoo

from partitioner.errors import CaptureError
from partitioner.plan_model import capture_for_training
from partitioner.passes.mixed_precision import compute_dtype

LOSS_RTOL = 1e-3
GRAD_RTOL = 2e-2


def bf16_reference(zm):
    model = copy.deepcopy(zm.model).to(torch.bfloat16)
    args = [a.to(torch.bfloat16) if a.is_floating_point() else a for a in zm.example_args]
    loss = zm.loss_fn(model(*args, **zm.example_kwargs), zm.target)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def grad_rel_l2(named_params, ref_grads) -> float:
    got = {n: p.grad for n, p in named_params}
    num = sum(((got[n].float() - g) ** 2).sum() for n, g in ref_grads.items() if n in got)
    den = sum((g ** 2).sum() for n, g in ref_grads.items() if n in got)
    return float((num / den) ** 0.5)


@pytest.mark.parametrize("name,chunks", [("mlp", 1), ("gpt2", 1), ("llama-1b", 1), ("t5-base", 2)])
def test_bf16_compute_with_fp32_parameters_equals_the_bf16_model(name, chunks):
    zm = build(name)
    before = {n: p.detach().clone() for n, p in zm.model.named_parameters()}
    pm = compile_zoo(zm, chunks=chunks, mixed_precision="bf16")
    # the user's model is untouched; parameters, gradients stay fp32; values sent between stages are bf16
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in zm.model.named_parameters())
    floats = [m.dtype for st in pm.stages for m in st.value_meta.values() if m.dtype.is_floating_point]
    assert floats and set(floats) == {torch.bfloat16}
    loss = pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
    ref_loss, ref_grads = bf16_reference(zm)
    assert abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()) < LOSS_RTOL
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for _, p in pm.named_parameters())
    assert grad_rel_l2(pm.named_parameters(), ref_grads) < GRAD_RTOL


def test_the_plan_counts_fp32_parameters_and_bf16_activations():
    zm = build("gpt2")
    args = tuple(x[:1] for x in zm.example_args)
    plain = capture_for_training(zm.model, args, {})
    mixed = capture_for_training(zm.model, args, {}, "bf16")
    attrs = {n.target: n.meta["val"].dtype for n in mixed.graph_module.graph.nodes if n.op == "get_attr"}
    assert attrs and all(d == torch.float32 for fqn, d in attrs.items() if "weight" in fqn)
    matmuls = [n for n in mixed.graph_module.graph.nodes if n.op == "call_function" and "mm" in str(n.target)]
    assert matmuls and all(n.meta["val"].dtype == torch.bfloat16 for n in matmuls)
    assert len(list(mixed.graph_module.graph.nodes)) > len(list(plain.graph_module.graph.nodes))


def _two_rank_worker(rank: int, world: int, _):
    zm = build("gpt2")
    pm = compile_zoo(zm, ranks=world, mixed_precision="bf16", timeout_s=60)
    loss = pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
    ref_loss, ref_grads = bf16_reference(zm)
    return abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()), grad_rel_l2(pm.named_parameters(), ref_grads)


def test_two_processes_send_bf16_values():
    for loss_err, grad_err in run_workers(_two_rank_worker, 2, timeout_s=180):
        assert loss_err < LOSS_RTOL and grad_err < GRAD_RTOL


def test_an_unknown_mixed_precision_is_one_line():
    with pytest.raises(CaptureError, match="mixed_precision='int8' is not known"):
        compute_dtype("int8")


def test_the_plan_follows_the_model_dtype_and_mixed_precision():
    zm = build("gpt2")
    fp32 = compile_zoo(zm, time_limit_s=2)
    zm16 = build("gpt2")
    zm16.model.to(torch.bfloat16)
    bf16 = compile_zoo(zm16, time_limit_s=2)
    mixed = compile_zoo(zm, mixed_precision="bf16", time_limit_s=2)
    assert sum(bf16.plan.rank_param_bytes) * 2 == sum(fp32.plan.rank_param_bytes)
    assert sum(mixed.plan.rank_param_bytes) == sum(fp32.plan.rank_param_bytes)  # fp32 masters
    assert sum(bf16.plan.stage_saved_bytes) < sum(fp32.plan.stage_saved_bytes)  # bf16 activations


def test_a_model_already_in_bf16_or_a_bf16_dtype_is_refused():
    zm = build("mlp")
    zm.model.to(torch.bfloat16)
    with pytest.raises(CaptureError, match="parameters are torch.bfloat16 already"):
        capture_for_training(zm.model, (zm.example_args[0][:1].to(torch.bfloat16),), {}, "bf16")
    from partitioner.errors import PlanError
    from partitioner.plan_model import PlanConfig, plan_model
    with pytest.raises(PlanError, match="leave --dtype at float32"):
        plan_model(build("mlp").model, build("mlp").example_args, None,
                   PlanConfig(num_ranks=2, dtype="bfloat16", mixed_precision="bf16"))


def test_an_autocast_around_train_step_matches_the_model_and_says_how_to_plan_for_it():
    """The stage graphs run under the user's autocast as the model does; the plan did not know."""
    import copy
    import warnings

    from dist_utils import build

    from partitioner.api import compile_parallel
    zm = build("gpt2")
    reference = copy.deepcopy(zm.model)
    with torch.autocast("cpu", torch.bfloat16):
        want = zm.loss_fn(reference(*zm.example_args), zm.target)
    pm = compile_parallel(copy.deepcopy(zm.model), ["cpu"] * 2, zm.example_args, zm.loss_fn, microbatches=1,
                          time_limit_s=1)
    with torch.autocast("cpu", torch.bfloat16), pytest.warns(RuntimeWarning, match="mixed_precision='bf16'"):
        loss = pm.train_step(*zm.example_args, target=zm.target)
    assert torch.equal(loss, want.detach().float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: not on later steps
        with torch.autocast("cpu", torch.bfloat16):
            pm.train_step(*zm.example_args, target=zm.target)
