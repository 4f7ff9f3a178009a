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

from partitioner.api import compile_parallel
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


# ---------------------------------------------------------------------------- norm layers
# The reference here is the unpartitioned fp32 model under torch.autocast("cpu", bf16) with gradient
# accumulation over the same microbatches. train_step's loss is loss_fn of the bf16 output, in bf16
# (autocast runs cross_entropy in fp32), summed over the microbatches in bf16: within a few bf16
# roundings (2**-8 each), so 1e-2.

AUTOCAST_LOSS_RTOL = 1e-2
BUFFER_RTOL = 1e-3  # running statistics: fp32 means of the same bf16 activations


class FunctionalBatchNorm(torch.nn.Module):
    """A batch norm of its own parameters and fp32 running statistics through F.batch_norm."""

    def __init__(self, n: int):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(torch.ones(n)), torch.nn.Parameter(torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x):
        return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                              self.training)


def _cnn(norm):
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def _mlp(norm):
    nn = torch.nn
    return nn.Sequential(nn.Linear(16, 32), norm, nn.ReLU(), nn.Linear(32, 10))


NORMS = {
    "BatchNorm2d": lambda: _cnn(torch.nn.BatchNorm2d(8)),
    "BatchNorm1d": lambda: _mlp(torch.nn.BatchNorm1d(32)),
    "InstanceNorm2d": lambda: _cnn(torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True)),
    "GroupNorm": lambda: _cnn(torch.nn.GroupNorm(2, 8)),
    "LayerNorm": lambda: _mlp(torch.nn.LayerNorm(32)),
    "F.batch_norm": lambda: _mlp(FunctionalBatchNorm(32)),
}


def _norm_model(name: str):
    torch.manual_seed(0)
    model = NORMS[name]()
    x = torch.randn(16, 16) if isinstance(model[0], torch.nn.Linear) else torch.randn(16, 3, 8, 8)
    return model, x, torch.randint(0, 10, (16,))


def _autocast_reference(model, x, y, loss_fn, microbatches: int):
    """`model` copied and trained one step under autocast, accumulating over the microbatches: (loss, model)."""
    ref = copy.deepcopy(model)
    losses = []
    for xi, yi in zip(x.chunk(microbatches), y.chunk(microbatches)):
        with torch.autocast("cpu", torch.bfloat16):
            loss = loss_fn(ref(xi), yi)
        (loss / microbatches).backward()
        losses.append(loss.detach().float())
    return torch.stack(losses).mean(), ref


def _plan_with_norm_in(captured, stage: int, microbatches: int):
    """Two stages cut just before (stage 1) or just after (stage 0) module '1', the norm."""
    from partitioner.passes.split import plan_from_cuts, valid_cuts
    compute = [n for n in captured.graph_module.graph.nodes if n.op in ("call_function", "call_method")]
    in_norm = [i for i, n in enumerate(compute) if "1" in (p for p, _ in n.meta["nn_module_stack"].values())]
    cut = (max(c for c in valid_cuts(captured) if c <= in_norm[0]) if stage == 1
           else min(c for c in valid_cuts(captured) if c > in_norm[-1]))
    return plan_from_cuts(captured, [cut], 2, 1, "1f1b", microbatches)


def _rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def _check_step_as_autocast(pm, model, x, y, loss_fn, microbatches: int):
    """One train_step of `pm` against `model`'s under autocast: loss, fp32 gradients, running statistics.
    Returns the reference model."""
    loss = pm.train_step(x, target=y)
    want_loss, ref = _autocast_reference(model, x, y, loss_fn, microbatches)
    assert abs(loss.item() - want_loss.item()) / want_loss.item() < AUTOCAST_LOSS_RTOL
    assert grad_rel_l2(pm.named_parameters(), {n: p.grad for n, p in ref.named_parameters()}) < GRAD_RTOL
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for _, p in pm.named_parameters())
    buffers = dict(pm.named_buffers())
    for fqn, want in ref.named_buffers():
        if want.is_floating_point():
            assert buffers[fqn].dtype == torch.float32 and _rel_l2(buffers[fqn], want) < BUFFER_RTOL, fqn
        elif not isinstance(model[1], torch.nn.InstanceNorm2d):  # whose num_batches_tracked no op reads
            assert torch.equal(buffers[fqn], want), fqn  # once per microbatch
    return ref


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("norm", list(NORMS))
def test_norm_layers_train_as_the_model_under_autocast(norm, stage):
    """A step, then the eval outputs, equal autocast's with the norm in either stage (CPU's batch norm
    refused the bf16 weight the cast gave it beside its fp32 running statistics)."""
    from partitioner.api import compile_parallel
    model, x, y = _norm_model(norm)
    loss_fn, m = torch.nn.CrossEntropyLoss(), 4
    captured = capture_for_training(model, (x[:len(x) // m],), {}, "bf16")
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), loss_fn, microbatches=m, mixed_precision="bf16",
                          plan=_plan_with_norm_in(captured, stage, m))
    norms = [st.stage for st in pm.stages for n in st.graph_module.graph.nodes
             if n.op == "call_function" and "norm" in str(n.target)]
    assert norms == [stage]
    ref = _check_step_as_autocast(pm, model, x, y, loss_fn, m)
    pm.eval()
    ref.eval()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        want = ref(x)
    assert _rel_l2(pm(x), want) < GRAD_RTOL


def test_a_batch_norm_cnn_trains_under_its_plan():
    """The reported model under compile_parallel's own plan and schedule (1f1b): one step as autocast's."""
    from partitioner.api import compile_parallel
    model, x, y = _norm_model("BatchNorm2d")
    loss_fn = torch.nn.CrossEntropyLoss()
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), loss_fn, microbatches=4, mixed_precision="bf16",
                          time_limit_s=2)
    assert pm.plan.schedule == "1f1b"
    _check_step_as_autocast(pm, model, x, y, loss_fn, 4)


def test_a_batch_norm_keeps_fp32_weights_in_the_graph():
    """Its weight and bias are read uncast, beside its fp32 running statistics; the conv's are cast."""
    model, x, _ = _norm_model("BatchNorm2d")
    graph = capture_for_training(model, (x[:4],), {}, "bf16").graph_module.graph
    norm = next(n for n in graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))
    assert [a.op for a in norm.args[1:5]] == ["get_attr"] * 4
    assert all(a.meta["val"].dtype == torch.float32 for a in norm.args[1:5])
    conv = next(n for n in graph.nodes if n.op == "call_function" and "conv" in str(n.target))
    assert all(a.meta["val"].dtype == torch.bfloat16 for a in conv.args[:3])


def test_the_loss_runs_under_autocast_and_the_step_sums_it_in_float32():
    """mixed_precision='bf16' runs loss_fn under torch.autocast, as the recipe does (a cross-entropy of bf16
    logits in fp32), and train_step's loss is the float32 mean of the microbatches' losses."""
    zm = build("mlp", batch=8)
    seen = []

    def loss_fn(out, target):
        if out.device.type != "meta":  # compile_parallel also runs it on meta tensors (which outputs it reads)
            seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return torch.nn.functional.cross_entropy(out, target)
    pm = compile_parallel(copy.deepcopy(zm.model), ["cpu"] * 2, zm.example_args, loss_fn, microbatches=4,
                          mixed_precision="bf16")
    loss = pm.train_step(*zm.example_args, target=zm.target)
    assert seen and all(s == (True, torch.bfloat16) for s in seen), seen
    assert loss.dtype == torch.float32
    ref = copy.deepcopy(zm.model)
    with torch.autocast("cpu", torch.bfloat16):
        losses = [torch.nn.functional.cross_entropy(ref(x), t).float()
                  for x, t in zip(zm.example_args[0].chunk(4), zm.target.chunk(4))]
    assert abs(loss.item() - torch.stack(losses).mean().item()) <= 1e-6 * abs(loss.item()), (loss, losses)


# ---------------------------------------------------------------------------- fp32 values meeting bf16 weights

class SinusoidalPositions(torch.nn.Module):
    """The classic Transformer's input: a bf16 token embedding plus an fp32 sinusoidal position table
    (a buffer, so it keeps fp32), which promotes the residual stream to fp32 before every Linear."""

    def __init__(self, vocab: int = 64, hidden: int = 32, seq: int = 8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden)
        angle = torch.arange(seq)[:, None] / 10000 ** (torch.arange(0, hidden, 2) / hidden)
        self.register_buffer("pe", torch.cat([angle.sin(), angle.cos()], -1))
        self.layers = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(3))
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids):
        h = self.emb(ids) + self.pe
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        return self.head(h).flatten(0, 1)


class UpcastBeforeLinear(torch.nn.Module):
    """A block run in fp32 on purpose (autocast off, .float()) whose result feeds a Linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(16, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 64)

    def forward(self, x):
        h = torch.relu(self.a(x))
        with torch.autocast("cpu", enabled=False):
            h = torch.nn.functional.normalize(h.float(), dim=-1)
        return self.head(torch.relu(self.b(h)))


@pytest.mark.parametrize("name,compile", [("positions", False), ("positions", True), ("upcast", False)])
def test_an_fp32_activation_meets_bf16_weights_as_under_autocast(name, compile):
    """A matmul of an fp32 activation and a bf16 weight computes in bf16, as autocast runs it (it raised
    'mat1 and mat2 must have the same dtype' in the first stage: capture's FakeTensors do not check)."""
    torch.manual_seed(0)
    if name == "positions":
        model, x = SinusoidalPositions(), torch.randint(0, 64, (4, 8))
        y = torch.randint(0, 64, (32,))
    else:
        model, x, y = UpcastBeforeLinear(), torch.randn(8, 16), torch.randint(0, 64, (8,))
    loss_fn = torch.nn.CrossEntropyLoss()
    if compile:
        torch._dynamo.reset()
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), loss_fn, microbatches=2, mixed_precision="bf16",
                          time_limit_s=1, compile=compile)
    linears = [n for n in pm.captured.graph_module.graph.nodes if "linear" in str(n.target)]
    assert all({a.meta["val"].dtype for a in n.all_input_nodes} == {torch.bfloat16} for n in linears)
    assert all(n.meta["val"].dtype == torch.bfloat16 for n in linears)
    want_loss, ref = _autocast_reference(model, x, y, loss_fn, 2)
    loss = pm.train_step(x, target=y)
    assert abs(loss.item() - want_loss.item()) / want_loss.item() < AUTOCAST_LOSS_RTOL
    assert grad_rel_l2(pm.named_parameters(), {n: p.grad for n, p in ref.named_parameters()}) < GRAD_RTOL
