"""partitioner/runtime/compiled.py: stages under torch.compile equal the unpartitioned model, see parameter
changes, do not recompile in steady state, and fall back to eager with a warning naming the stage."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from dist_utils import build, grad_errors, max_rel_err, reference
from test_api import compile_zoo, param_errors, train_reference

from partitioner.api import compile_parallel
from partitioner.errors import RuntimeConfigError
from partitioner.runtime.compiled import CompiledStage, compile_options, uses_cudagraphs

pytestmark = pytest.mark.skipif(compile_options(None, [torch.device("cpu")]) is not None or
                                not __import__("shutil").which("g++"), reason="needs g++ for inductor on CPU")


def unique_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("name,chunks", [("mlp", 1), ("gpt2", 1), ("t5-base", 2)])
def test_compiled_stages_equal_the_unpartitioned_model(name, chunks):
    torch._dynamo.reset()
    zm = build(name)
    ref_loss, ref_grads = reference(zm)
    pm = compile_zoo(zm, chunks=chunks, compile=True)
    assert all(isinstance(r, CompiledStage) for r in pm.executor.runners.values())
    assert pm.executor.foreach_grads  # a backward's gradients add with one foreach add
    loss = pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
    assert not any(r.failed for r in pm.executor.runners.values())
    # the last stage trains as one compiled call with the loss; its own runner waits for inference
    last = max(pm.executor.runners)
    assert pm.executor.stage_loss.called and not pm.executor.stage_loss.failed
    assert not pm.executor.runners[last].called
    assert max_rel_err(loss, ref_loss) < 1e-4
    assert max(grad_errors(pm, ref_grads).values()) < 1e-4


def test_optimizer_steps_are_seen_and_nothing_recompiles():
    torch._dynamo.reset()
    zm = build("gpt2")
    pm = compile_zoo(zm, compile=True)
    model, ref_losses = train_reference(zm, steps=3)
    opt = torch.optim.SGD(pm.parameters(), lr=0.1, momentum=0.9)
    losses, graphs = [], []
    for _ in range(3):
        losses.append(pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs))
        opt.step()
        pm.zero_grad()
        graphs.append(unique_graphs())
    assert graphs[0] > 0 and graphs[1:] == [graphs[0]] * 2, f"steady-state steps recompiled: {graphs}"
    for got, want in zip(losses, ref_losses):
        assert max_rel_err(got, want) < 1e-4
    assert max(param_errors(pm, model).values()) < 1e-4


def test_each_parallel_model_compiles_its_own_last_stage_with_the_loss():
    """The last stage and the loss run as one function compiled per ParallelModel; its code object (where
    dynamo keeps its entries, recompile_limit of them) was shared, so the ninth ParallelModel of a process
    ran that stage eagerly (here the second, the limit lowered to 1). The limit is lowered with torch's
    own config.patch: pytest's monkeypatch undoes a config module's attribute by deleting it."""
    from torch._dynamo.utils import counters
    counters.clear()
    zm = build("mlp")
    limit = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=1):
        for _ in range(2):
            pm = compile_zoo(zm, compile=True)
            pm.train_step(*zm.example_args, target=zm.target)
    assert not [k for k in counters["unimplemented"] if "recompile limit" in k]
    assert torch._dynamo.config.recompile_limit == limit


def test_load_state_dict_changes_the_compiled_output():
    torch._dynamo.reset()
    zm = build("mlp")
    pm = compile_zoo(zm, compile=True)
    with torch.no_grad():
        before = pm(*zm.example_args)
        state = {k: v * 0.5 if v.is_floating_point() else v for k, v in pm.full_state_dict().items()}
        pm.load_state_dict(state)
        after = pm(*zm.example_args)
        fresh = copy.deepcopy(zm.model)
        fresh.load_state_dict(state)
        want = fresh(*zm.example_args)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-5)


def test_a_stage_that_fails_to_compile_runs_eagerly_with_a_warning():
    def broken_backend(gm, example_inputs):  # fails on the first aten op, as an inductor lowering error would
        op = next(n.target for n in gm.graph.nodes if n.op == "call_function" and "aten" in str(n.target))
        raise RuntimeError(f"no lowering for {op}")

    torch._dynamo.reset()
    zm = build("mlp")
    ref_loss, ref_grads = reference(zm)
    pm = compile_zoo(zm, compile={"backend": broken_backend})
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed on stage \d at node '\w+' \(aten\.\w+\.\w+\): RuntimeError: no lowering.*runs eagerly"):
        loss = pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
    assert all(r.failed for r in pm.executor.runners.values())
    assert pm.executor.stage_loss.failed  # the last stage with the loss, then on its own, then eagerly
    assert max_rel_err(loss, ref_loss) < 1e-5
    assert max(grad_errors(pm, ref_grads).values()) < 1e-5


def test_a_stage_holding_a_vmap_runs_eagerly_with_a_warning():
    """torch.compile cannot run export's vmap calls in a graph (NYI: querying is_contiguous inside of vmap, raised
    at the first call, where no fallback caught it): such a stage is left eager, said once, the others compiled."""
    from test_capture import _VmappedLookup

    from partitioner.passes.capture import capture
    from partitioner.runtime.compiled import compile_stages
    x, types = torch.randn(2, 4, 8), torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    vmapped = capture(_VmappedLookup(), (x, types)).graph_module
    plain = capture(torch.nn.Linear(8, 8), (x,)).graph_module
    with pytest.warns(RuntimeWarning, match=r"stage\(s\) 1 run eagerly: they hold a torch.vmap"):
        calls = compile_stages({0: plain, 1: vmapped}, lambda out, t: out.sum(), {}, last=1,
                               unflatten=lambda leaves: leaves[0])
    assert isinstance(calls.runners[0], CompiledStage) and calls.runners[1] is vmapped
    assert calls.stage_loss is None  # the last stage and the loss as two calls: the stage eager


def test_compile_defaults_follow_the_device_and_need_a_compiler(monkeypatch):
    assert compile_options(None, [torch.device("cpu")] * 2) is None
    assert compile_options(None, [torch.device("cuda:0")]) == {"dynamic": False}
    assert compile_options({"mode": "max-autotune"}, [torch.device("cuda:0")])["mode"] == "max-autotune"
    monkeypatch.setattr("partitioner.runtime.compiled._cxx_compiler", lambda: None)
    with pytest.raises(RuntimeConfigError, match="C\\+\\+ compiler"):
        compile_options(True, [torch.device("cpu")])


def test_cuda_graph_modes_compile_without_warning_and_exclude_the_whole_step_graph():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for options in ({"mode": "reduce-overhead"}, {"options": {"triton.cudagraphs": True}}):
            assert uses_cudagraphs(compile_options(options, [torch.device("cuda:0")] * 2))
        assert not uses_cudagraphs(compile_options({"mode": "max-autotune-no-cudagraphs"}, [torch.device("cuda:0")]))
    zm = build("mlp")
    with pytest.raises(RuntimeConfigError, match="pick one"):
        compile_zoo(zm, compile={"mode": "reduce-overhead"}, cuda_graph=True, devices=["cuda:0"] * 2)


def test_compiled_stages_are_planned_with_compiled_costs(monkeypatch):
    """Both plans on one calibration of this CPU (each plan calibrates anew, and a loaded host reads
    differently from one call to the next)."""
    from partitioner.cost_models import device as device_module
    spec = device_module.calibrate_cpu()
    monkeypatch.setattr(device_module, "calibrate_cpu", lambda: spec)
    zm = build("gpt2")
    eager = compile_zoo(zm, compile=False, time_limit_s=2)
    compiled = compile_zoo(zm, compile=True, time_limit_s=2)
    assert sum(compiled.plan.stage_fwd_time_s) < sum(eager.plan.stage_fwd_time_s)


def test_measured_compiled_costs_time_each_distinct_layer_once(tmp_path, monkeypatch):
    """measure=True: the plan's costs come from the model's layers timed through torch.compile, gpt2's
    identical layers share one compilation, and the compiled stages still equal the model."""
    monkeypatch.setenv("PARTITIONER_CACHE", str(tmp_path))
    torch._dynamo.reset()
    zm = build("gpt2")
    ref_loss, ref_grads = reference(zm)
    from partitioner.cost_models import measure
    blocks, compiled = [], []
    real_extract, real_compile = measure.extract_block, torch.compile
    monkeypatch.setattr(measure, "extract_block", lambda gm, names: blocks.append(names) or real_extract(gm, names))
    monkeypatch.setattr(torch, "compile", lambda module, **options: compiled.append(module) or
                        real_compile(module, **options))
    pm = compile_zoo(zm, compile=True, measure=True, time_limit_s=2)
    measured = [m for m in compiled if isinstance(m, torch.fx.GraphModule) and "in0" in m.code]
    assert measured and len(measured) < len(blocks), "identical layers were compiled more than once"
    # measured: a tiny stage's time (measured minus the timer's overhead) can floor at 0 on a loaded host
    assert sum(pm.plan.stage_fwd_time_s) > 0 and all(t >= 0 for t in pm.plan.stage_fwd_time_s)
    loss = pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
    assert max_rel_err(loss, ref_loss) < 1e-4
    assert max(grad_errors(pm, ref_grads).values()) < 1e-4


def test_measure_needs_the_weights_on_the_stage_device():
    zm = build("mlp")
    meta = copy.deepcopy(zm.model).to("meta")
    with pytest.raises(RuntimeConfigError, match=r"measure=True.*\['meta'\].*model.to"):
        compile_parallel(meta, ["cpu"] * 2, zm.example_args, zm.loss_fn, microbatches=4, measure=True)


def test_compiled_stages_keep_in_place_writes():
    """The writes pass's after_write nodes and a write into a received tensor compile (passes/writes.py)."""
    from test_writes import ShiftWrite, loss_fn
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x, y = ShiftWrite(True), torch.randn(8, 16), torch.randint(0, 4, (8,))
    reference = copy.deepcopy(model)
    want = loss_fn(reference(x), y)
    want.backward()
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), loss_fn, microbatches=4, time_limit_s=1,
                          compile=True)
    loss = pm.train_step(x, target=y)
    assert not any(r.failed for r in pm.executor.runners.values())
    assert max_rel_err(loss, want.detach()) < 1e-4
    got = dict(pm.named_parameters())
    largest = max(p.grad.abs().max().item() for p in reference.parameters())
    assert max((got[n].grad - p.grad).abs().max().item() for n, p in reference.named_parameters()) < 1e-4 * largest


def test_host_bound_compiled_stages_name_the_cuda_graph_options(capsys):
    """Planned with GPU costs, a small model's compiled stages launch kernels slower than the GPU runs
    them: compile_parallel says so once and names the options that replay CUDA graphs."""
    zm = build("gpt2")
    pm = compile_zoo(zm, compile=True, device_type="h100", time_limit_s=2)
    err = capsys.readouterr().err
    assert "the stages are host-bound" in err and "compile={'mode': 'reduce-overhead'}" in err
    assert pm.compile_options == {"dynamic": False}  # asked for plainly compiled stages: no graphs chosen
    pm = compile_zoo(zm, compile=False, device_type="h100", time_limit_s=2)  # eager stages: no such hint
    assert "host-bound" not in capsys.readouterr().err and pm.compile_options is None
