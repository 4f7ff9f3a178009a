"""partitioner/api.py: compile_parallel in one process and under torchrun-style gloo processes.

Loss, gradients, parameters after an optimizer step, state dicts and outputs equal the
unpartitioned model's; wrong set-ups and inputs raise RuntimeConfigError.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from dist_utils import build, grad_errors, max_rel_err, reference, run_workers
from test_executor import random_plan

from partitioner.api import compile_parallel
from partitioner.errors import RuntimeConfigError
from partitioner.passes.capture import capture
from partitioner.passes.split import even_plan


def compile_zoo(zm, ranks=2, devices=None, **kw):
    kw.setdefault("microbatches", 4)
    return compile_parallel(copy.deepcopy(zm.model), devices or ["cpu"] * ranks, zm.example_args, zm.loss_fn,
                            example_kwargs=zm.example_kwargs, **kw)


def train_reference(zm, steps=2):
    """The unpartitioned model after `steps` SGD steps, and the loss of each step. (SGD, not Adam:
    Adam turns gradients that are zero up to rounding, e.g. of attention key biases, into full steps.)"""
    model = copy.deepcopy(zm.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = zm.loss_fn(model(*zm.example_args, **zm.example_kwargs), zm.target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return model, losses


def train_parallel(pm, zm, steps=2):
    params = list(pm.parameters())  # a rank whose stages hold no parameters has nothing to step
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9) if params else None
    losses = []
    for _ in range(steps):
        losses.append(pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs))
        if opt is not None:
            opt.step()
        pm.zero_grad()
    return losses


def param_errors(pm, model) -> dict[str, float]:
    want = dict(model.named_parameters())
    return {n: max_rel_err(p, want[n].detach()) for n, p in pm.named_parameters()}


def test_optimizer_steps_state_dict_and_forward_match_the_model():
    zm = build("gpt2")
    # "cpu:0" and "cpu:1" count as two devices: the tied embedding gets a replica per device
    captured = capture(zm.model, tuple(x[:1] for x in zm.example_args))
    pm = compile_zoo(zm, devices=["cpu:0", "cpu:1"], plan=even_plan(captured, 2, microbatches=4))
    assert pm.plan.num_ranks == 2 and len(pm.stages) == 2
    assert [len(c) for c in pm.store.replicas.values() if len(c) > 1] == [2]
    model, ref_losses = train_reference(zm)
    losses = train_parallel(pm, zm)
    for got, want in zip(losses, ref_losses):
        assert max_rel_err(got, want) < 1e-5
    assert max(param_errors(pm, model).values()) < 1e-5
    # every parameter once, tied weight included, under the original FQNs
    assert sorted(n for n, _ in pm.named_parameters()) == sorted(n for n, _ in model.named_parameters())
    for kwargs in ({"prefix": "module"}, {"recurse": False}):  # as Module's
        assert sorted(n for n, _ in pm.named_parameters(**kwargs)) == sorted(
            n for n, _ in model.named_parameters(**kwargs))
        assert set(dict(pm.named_buffers(**kwargs))) <= set(dict(model.named_buffers(**kwargs)))

    full = pm.full_state_dict()
    assert set(full) == set(zm.model.state_dict())
    fresh = copy.deepcopy(zm.model)
    fresh.load_state_dict(full, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(pm(*zm.example_args).logits, fresh(*zm.example_args).logits)
        torch.testing.assert_close(pm(*zm.example_args).logits, model(*zm.example_args).logits,
                                   rtol=1e-5, atol=1e-5)

    pm.load_state_dict(zm.model.state_dict())  # back to the initial weights
    assert max(param_errors(pm, zm.model).values()) == 0


@pytest.mark.parametrize("chunks,schedule", [(1, "1f1b"), (2, "interleaved-1f1b")])
def test_default_plan_trains_t5_exactly(chunks, schedule):
    zm = build("t5-base")
    ref_loss, ref_grads = reference(zm)
    pm = compile_zoo(zm, chunks=chunks, schedule=schedule)
    loss = pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
    assert max_rel_err(loss, ref_loss) < 1e-5
    assert max(grad_errors(pm, ref_grads).values()) < 1e-5


def test_bad_inputs_raise():
    zm = build("mlp")
    with pytest.raises(RuntimeConfigError, match=r"batch of 4 does not split into 3 microbatches \(requested\)"):
        compile_zoo(zm, microbatches=3)
    pm = compile_zoo(zm)
    x, = zm.example_args
    with pytest.raises(RuntimeConfigError, match=r"input 0 is \(8, .*example inputs had \(4,"):
        pm.train_step(torch.cat([x, x]), target=zm.target)
    with pytest.raises(RuntimeConfigError, match=r"input 0 is \(2, .*last, smaller batch: drop_last=True"):
        pm.train_step(x[:2], target=zm.target[:2])
    with pytest.raises(RuntimeConfigError, match=r"target \(5,\) has 5 samples along its batch dim 0, but the inputs' "
                                                 "batch is 4"):
        pm.train_step(x, target=zm.target[:5].repeat(2)[:5])
    with pytest.raises(RuntimeConfigError, match="2 positional arguments but the example inputs had 1"):
        pm.train_step(x, x, target=zm.target)
    plan = random_plan(zm, 4, 3, 1, "1f1b", seed=0)
    with pytest.raises(RuntimeConfigError, match="plan is for 3 ranks but 2 devices"):
        compile_zoo(zm, plan=plan)


def test_a_missing_or_extra_keyword_input_is_named():
    zm = build("t5-base")
    pm = compile_zoo(zm, microbatches=2)
    with pytest.raises(RuntimeConfigError, match="inputs lack keyword argument 'decoder_input_ids'"):
        pm.train_step(*zm.example_args, target=zm.target)
    with pytest.raises(RuntimeConfigError, match="inputs have keyword argument 'mask' that the example inputs did not"):
        pm(*zm.example_args, mask=None, **zm.example_kwargs)
    with pytest.raises(RuntimeConfigError, match="2 positional arguments but the example inputs had 1"):
        pm(*zm.example_args, zm.example_args[0], **zm.example_kwargs)
    with pytest.raises(RuntimeConfigError, match="keyword argument 'decoder_input_ids' is nested differently"):
        pm(*zm.example_args, decoder_input_ids=(zm.example_kwargs["decoder_input_ids"],))


def test_a_loss_that_needs_the_missing_target_says_pass_target():
    zm = build("mlp")
    pm = compile_zoo(zm)
    with pytest.raises(RuntimeConfigError, match=r"loss_fn\(output, target\) failed with target=None \(TypeError"
                                                 r".*classification_loss needs the target: pass target="):
        pm.train_step(*zm.example_args)
    pm.zero_grad()  # the failed step leaves the model usable
    ref_loss, _ = reference(zm)
    assert max_rel_err(pm.train_step(*zm.example_args, target=zm.target), ref_loss) < 1e-5


def test_a_loss_that_ignores_the_target_needs_none():
    zm = build("mlp")
    pm = compile_parallel(copy.deepcopy(zm.model), ["cpu"] * 2, zm.example_args, lambda out, _: out.square().mean(),
                          microbatches=4)
    want = copy.deepcopy(zm.model)(*zm.example_args).square().mean()
    assert max_rel_err(pm.train_step(*zm.example_args), want) < 1e-5


def test_an_input_that_requires_grad_is_named_with_the_fix():
    """An input computed by a module outside the model: its gradient cannot come back out of the
    stages, so train_step says so (it used to fail deep in autograd, or train that module wrongly)."""
    zm = build("mlp")
    pm = compile_zoo(zm)
    outside = nn.Linear(zm.example_args[0].shape[-1], zm.example_args[0].shape[-1])
    with pytest.raises(RuntimeConfigError, match=r"input 'x' requires grad .* Move what computes it into the model"):
        pm.train_step(outside(zm.example_args[0]), target=zm.target)
    assert pm.train_step(outside(zm.example_args[0]).detach(), target=zm.target).dim() == 0


def test_backward_through_the_output_of_forward_says_to_use_train_step():
    """loss_fn(pm(x), y).backward(), as with a module: the output requires grad as a module's does, and
    its backward names train_step instead of autograd's 'element 0 of tensors does not require grad'."""
    zm = build("mlp")
    pm = compile_zoo(zm)
    out = pm(*zm.example_args)
    assert out.requires_grad
    with pytest.raises(RuntimeConfigError, match=r"backward through the output of pm\(...\).*pm.train_step"):
        zm.loss_fn(out, zm.target).backward()
    with torch.no_grad():
        assert torch.equal(pm(*zm.example_args), out) and not pm(*zm.example_args).requires_grad


def test_load_state_dict_refuses_a_wrong_shape_changing_nothing_and_names_a_wrappers_prefix():
    """A (1,) bias was broadcast into the (n,) one without a word (and a tensor of another shape loaded
    the keys before it, then failed in copy_); DDP's 'module.' keys are named with the fix."""
    zm = build("mlp")
    pm = compile_zoo(zm)
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    bad = {**{k: v + 1 for k, v in zm.model.state_dict().items()}, "head.bias": torch.ones(1)}
    with pytest.raises(RuntimeConfigError, match=r"'head.bias' is \(1,\) but the model's shape is \(8,\).*Nothing "
                                                 "was loaded"):
        pm.load_state_dict(bad)
    assert all(torch.equal(v, before[k]) for k, v in pm.state_dict().items())
    with pytest.raises(RuntimeConfigError, match=r"prefix 'module\.'.*k.removeprefix\('module\.'\)"):
        pm.load_state_dict({"module." + k: v for k, v in zm.model.state_dict().items()})


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_train_step_without_gradients_enabled_is_refused(context):
    """Under no_grad the stages computed the loss and no gradient: the optimizer stepped nothing."""
    zm = build("mlp")
    pm = compile_zoo(zm)
    with context(), pytest.raises(RuntimeConfigError, match=r"train_step under torch.no_grad\(\).*no gradients.*"
                                                            r"loss_fn\(pm\(...\), target\) under torch.no_grad"):
        pm.train_step(*zm.example_args, target=zm.target)
    assert all(p.grad is None for p in pm.parameters())


@pytest.mark.parametrize("loss_fn,got", [(lambda out, t: out.sum(-1), r"a tensor of shape \(1,\)"),
                                          (lambda out, t: 1.0, "float")])
def test_a_loss_that_is_not_a_scalar_is_refused(loss_fn, got):
    zm = build("mlp")
    pm = compile_parallel(copy.deepcopy(zm.model), ["cpu"] * 2, zm.example_args, loss_fn, microbatches=4)
    with pytest.raises(RuntimeConfigError, match=f"returned {got}; it must return a 0-dim tensor"):
        pm.train_step(*zm.example_args, target=zm.target)


def test_a_loss_module_that_sums_over_the_batch_is_refused_naming_mean():
    zm = build("mlp")
    with pytest.raises(RuntimeConfigError, match=r"loss_fn CrossEntropyLoss\(reduction='sum'\) .* pass "
                                                 r"reduction='mean'"):
        compile_parallel(copy.deepcopy(zm.model), ["cpu"] * 2, zm.example_args, nn.CrossEntropyLoss(reduction="sum"))


def test_the_parallel_model_keeps_none_of_the_models_tensors_alive():
    """The stages train their own copies: once the caller drops the model, its memory is freed (a model
    built on the GPU the stages run on would otherwise be held twice)."""
    import gc
    import weakref
    zm = build("gpt2")
    model = copy.deepcopy(zm.model)
    refs = [weakref.ref(t) for t in [*model.parameters(), *model.buffers()]]
    pm = compile_parallel(model, ["cpu"] * 2, zm.example_args, zm.loss_fn, microbatches=2)
    del model
    gc.collect()
    assert not [r for r in refs if r() is not None]
    ref_loss, _ = reference(zm)
    assert max_rel_err(pm.train_step(*zm.example_args, target=zm.target), ref_loss) < 1e-5
    pm.eval()  # the other mode captures the model's structure anew
    with torch.no_grad():
        assert max_rel_err(pm(*zm.example_args).logits, zm.model.eval()(*zm.example_args).logits) < 1e-5


def test_a_model_partly_on_meta_names_one_weight_of_each():
    zm = build("mlp")
    model = copy.deepcopy(zm.model)
    with torch.device("meta"):
        model.layers[1] = nn.Linear(32, 32)
    with pytest.raises(RuntimeConfigError, match="'layers.1.weight' is on meta but 'layers.0.weight' is on cpu"):
        compile_parallel(model, ["cpu"] * 2, zm.example_args, zm.loss_fn)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without CUDA")
def test_cuda_devices_without_cuda_are_refused():
    zm = build("mlp")
    with pytest.raises(RuntimeConfigError, match=r"devices name cuda:0 but torch.cuda.is_available\(\) is False"):
        compile_zoo(zm, devices=["cuda:0", "cuda:1"])


def test_cuda_graph_outside_one_gpu_is_refused_with_the_fix():
    zm = build("mlp")
    with pytest.raises(RuntimeConfigError, match=r"cuda_graph=True\) needs every stage on one CUDA device.*"
                                                  r"devices=\['cuda:0'\] \* 2"):
        compile_zoo(zm, devices=["cpu", "cpu"], cuda_graph=True)


def test_cuda_graph_plans_without_host_time():
    """A step replayed as a CUDA graph launches once: the plan's stage times are its device times.
    graphs_when_host_bound plans so where the costs are host-bound (the small model on an H100)."""
    from partitioner.plan_model import PlanConfig, plan_model
    zm = build("gpt2")
    times = {}
    for graphs, when_host_bound in ((False, False), (True, False), (False, True)):
        config = PlanConfig(num_ranks=2, microbatches=4, device_type="h100", compiled=True, cuda_graphs=graphs,
                            graphs_when_host_bound=when_host_bound, time_limit_s=2, use_cache=False)
        result = plan_model(zm.model, zm.example_args, zm.example_kwargs, config)
        assert result.host_bound and result.cuda_graphs == (graphs or when_host_bound)
        host = result.costs.total("host_fwd_time_s") + result.costs.total("host_bwd_time_s")
        assert (host == 0.0) if result.cuda_graphs else (host > 0.0)
        times[result.cuda_graphs] = sum(result.plan.stage_fwd_time_s) + sum(result.plan.stage_bwd_time_s)
    assert times[True] < times[False]  # the small model is host-bound on an H100


# ---------------------------------------------------------------------- several processes (gloo)


def _worker(rank: int, world: int, cases: list[tuple]) -> dict:
    out: dict = {}
    refs: dict = {}
    for case in cases:
        kind, name = case[0], case[1]
        zm = build(name)
        try:
            if kind == "devices":  # more devices than processes
                compile_zoo(zm, ranks=world + 1)
            elif kind == "args":  # rank 1 asks for other microbatches than rank 0
                compile_zoo(zm, ranks=world, microbatches=4 if rank == 0 else 2)
            elif kind == "destroyed":  # a step after the process group is gone (the last case)
                pm = compile_zoo(zm, ranks=world)
                torch.distributed.destroy_process_group()
                pm.train_step(*zm.example_args, target=zm.target)
            else:
                schedule, chunks, random_cuts = case[2], case[3], case[4]
                plan = random_plan(zm, 4, world, chunks, schedule, seed=7) if random_cuts else None
                pm = compile_zoo(zm, ranks=world, schedule=schedule, chunks=chunks, plan=plan, timeout_s=60)
                if name not in refs:
                    refs[name] = reference(zm), train_reference(zm)
                (ref_loss, ref_grads), (model, ref_losses) = refs[name]
                loss = pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
                result = {"loss": max_rel_err(loss, ref_loss), "grads": max(grad_errors(pm, ref_grads).values(), default=0.0),
                          "local": sorted(n for n, _ in pm.named_parameters())}
                pm.zero_grad()
                losses = train_parallel(pm, zm)
                result["step_losses"] = max(max_rel_err(a, b) for a, b in zip(losses, ref_losses))
                result["params"] = max(param_errors(pm, model).values(), default=0.0)  # a rank may own none
                full = pm.full_state_dict()
                if rank == 0:
                    fresh = copy.deepcopy(zm.model)
                    fresh.load_state_dict(full, strict=True)
                    result["full_state"] = max(max_rel_err(fresh.get_parameter(n), p.detach())
                                               for n, p in model.named_parameters())
                with torch.no_grad():
                    y = pm(*zm.example_args, **zm.example_kwargs)
                    if y is not None:
                        want = model(*zm.example_args, **zm.example_kwargs)
                        result["forward"] = max_rel_err(y if isinstance(y, torch.Tensor) else y.logits,
                                                        want if isinstance(want, torch.Tensor) else want.logits)
                out[case] = result
        except RuntimeConfigError as err:
            out[case] = str(err)
    return out


def _check(results: list[dict], case: tuple, world: int) -> None:
    locals_ = []
    for rank, res in enumerate(results):
        r = res[case]
        assert isinstance(r, dict), (rank, r)
        assert r["loss"] < 1e-5 and r["grads"] < 1e-5 and r["step_losses"] < 1e-5 and r["params"] < 1e-5, r
        locals_.append(set(r["local"]))
    assert results[0][case]["full_state"] < 1e-5
    assert "forward" in results[world - 1][case] and results[world - 1][case]["forward"] < 1e-5
    assert set().union(*locals_) == set(dict(build(case[1]).model.named_parameters()))


def test_two_processes():
    cases = [("devices", "mlp", "before init"), ("train", "gpt2", "1f1b", 1, False),
             ("train", "t5-base", "interleaved-1f1b", 2, True), ("train", "mlp", "gpipe", 1, True),
             ("train", "cnn", "1f1b", 1, True),
             ("args", "mlp"), ("devices", "mlp", "after init"), ("destroyed", "mlp")]
    results = run_workers(_worker, 2, cases, timeout_s=240)
    for case in cases[1:5]:
        _check(results, case, 2)
    for rank in range(2):
        assert "torchrun started 2 processes but 3 devices" in results[rank][cases[0]]
        assert "differ across ranks" in results[rank][cases[5]]
        assert "world has 2 processes but 3 devices" in results[rank][cases[6]]
        assert f"train_step on rank {rank}: the process group is gone" in results[rank][cases[7]]


def test_four_processes():
    cases = [("train", "gpt2", "interleaved-1f1b", 2, True), ("train", "cnn", "gpipe", 1, True),
             ("train", "t5-base", "1f1b", 1, True), ("train", "mlp", "interleaved-1f1b", 2, True)]
    results = run_workers(_worker, 4, cases, timeout_s=240)
    for case in cases:
        _check(results, case, 4)
    holders = [r for r, res in enumerate(results) if "transformer.wte.weight" in res[cases[0]]["local"]]
    assert len(holders) > 1  # the tied embedding is replicated: its gradient was all-reduced


def test_stages_run_on_devices_other_than_the_capture_device():
    """Devices baked into the graph (GPT-2's position arange) follow each stage's device, and the
    target moves to the last stage's device."""
    zm = build("gpt2")
    pm = compile_zoo(zm, devices=["cpu:0", "cpu:1"], schedule="1f1b")
    for st in pm.stages:
        baked = [n.kwargs["device"] for n in st.graph_module.graph.nodes if "device" in n.kwargs]
        assert all(d == torch.device(f"cpu:{st.rank}") for d in baked), baked
    ref_loss, _ = reference(zm)
    assert max_rel_err(pm.train_step(*zm.example_args, target=zm.target), ref_loss) < 1e-5


def test_a_batch_the_microbatches_do_not_divide_names_the_choices():
    zm = build("mlp", batch=6)
    with pytest.raises(RuntimeConfigError, match=r"batch of 6 does not split into 4 microbatches \(the default of "
                                                 r"2 x 2 devices\); pass microbatches= one of \[1, 2, 3, 6\]"):
        compile_parallel(copy.deepcopy(zm.model), ["cpu"] * 2, zm.example_args, zm.loss_fn)


class _ArgmaxSide(nn.Module):
    """A float value read only by argmax (no gradient flows into it) whose int result is used late."""

    def __init__(self, vocab: int = 11, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.route = nn.Linear(dim, vocab)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))
        self.emb2 = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        h = self.emb(tokens)
        idx = self.route(h).argmax(-1)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(h + self.emb2(idx))


def test_a_value_no_gradient_flows_into_leaves_its_producers_gradient_none():
    """Cut between route and argmax: route's output crosses a stage but gets no gradient in the model,
    so route's parameters must keep .grad None (a zero would make weight decay touch them)."""
    from partitioner.passes.split import plan_from_cuts, valid_cuts

    torch.manual_seed(0)
    model, tokens = _ArgmaxSide(), torch.randint(0, 11, (8, 5))
    target = torch.randint(0, 11, (8, 5))
    loss_fn = lambda out, t: nn.functional.cross_entropy(out.flatten(0, 1), t.flatten())  # noqa: E731
    ref = copy.deepcopy(model)
    loss_fn(ref(tokens), target).backward()
    captured = capture(model, (tokens[:2],))
    names = [n.name for n in captured.graph_module.graph.nodes if n.op == "call_function"]
    argmax = next(i for i, name in enumerate(names) if name.startswith("argmax"))
    cut = max(c for c in valid_cuts(captured) if c <= argmax)  # the last cut before argmax
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (tokens,), loss_fn, microbatches=4,
                          plan=plan_from_cuts(captured, [cut], 2, 1, "1f1b", 4))
    pm.train_step(tokens, target=target)
    want = dict(ref.named_parameters())
    for name, p in pm.named_parameters():
        assert (p.grad is None) == (want[name].grad is None), name
        if p.grad is not None:
            assert max_rel_err(p.grad, want[name].grad) < 1e-5, name
    assert dict(pm.named_parameters())["route.weight"].grad is None


def test_an_unbatched_input_whose_dim_0_equals_the_batch_is_named():
    """A (T, T) mask shared by the batch is cut into microbatches when T equals the batch size:
    the capture error then names it and the fix."""
    from partitioner.errors import CaptureError

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x, mask):  # x (B, T, 4), mask (T, T)
            return torch.softmax((self.proj(x) @ x.transpose(1, 2)).masked_fill(mask, -1e9), -1) @ x

    x, mask = torch.randn(6, 6, 4), torch.ones(6, 6, dtype=torch.bool).triu(1)
    with pytest.raises(CaptureError, match=r"'mask' \(6, 6\).*leading dim of 1"):
        compile_parallel(Masked(), ["cpu"] * 2, (x,), lambda out, t: (out - t).pow(2).mean(),
                         example_kwargs={"mask": mask}, microbatches=3)


def test_a_gloo_group_compile_parallel_created_is_destroyed_at_exit(monkeypatch):
    """Left to interpreter teardown, gloo's worker threads can abort the process; the exit hook
    compile_parallel registers destroys the group first."""
    import torch.distributed as dist
    from dist_utils import free_port

    from partitioner import rank_agreement
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    hooks = []
    monkeypatch.setattr(rank_agreement.atexit, "register", hooks.append)
    for key, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    try:
        assert rank_agreement.init_distributed([torch.device("cpu")], timeout_s=30) is None  # one process: all stages
        assert dist.is_initialized() and hooks
        for hook in hooks:
            hook()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x, mask):
        return self.layers(x * mask)


@pytest.mark.parametrize("as_list", [True, False], ids=["list", "dict"])
def test_example_inputs_as_a_list_or_a_batch_dict_names_the_tuple_or_example_kwargs(as_list):
    """A list or dict is one positional argument (torch.export's args are a tuple): where forward cannot
    take it so, say how to pass model(*inputs) or model(**batch) instead of failing inside the capture."""
    x, mask = torch.randn(4, 8), torch.ones(4, 8)
    inputs = [x, mask] if as_list else {"x": x, "mask": mask}
    fix = r"pass a tuple, example_inputs=tuple\(inputs\)" if as_list else r"example_inputs=\(\) and example_kwargs=batch"
    with pytest.raises(RuntimeConfigError, match=rf"example_inputs is a {'list' if as_list else 'dict'}, which is "
                                                 rf"_TwoInputs's ONE positional argument.*'mask'.*{fix}"):
        compile_parallel(_TwoInputs(), ["cpu"] * 2, inputs, nn.functional.cross_entropy, microbatches=2)
