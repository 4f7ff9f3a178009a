"""GPU runs: several stages in one process on one GPU, and NCCL across GPUs (one process each).

Skipped without CUDA. Loss and every gradient must equal the unpartitioned model's on the
same device (fp32, relative error < 1e-5), as on CPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
from dist_utils import build, grad_errors, max_rel_err, run_workers
from test_executor import random_plan

from partitioner.api import compile_parallel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _exact_fp32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would make both sides differ by ~1e-3
    torch.backends.cudnn.allow_tf32 = False


def _to(zm, device):
    zm = copy.copy(zm)
    mv = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    zm.model = copy.deepcopy(zm.model).to(device)
    zm.example_args = tuple(mv(x) for x in zm.example_args)
    zm.example_kwargs = {k: mv(v) for k, v in zm.example_kwargs.items()}
    zm.target = mv(zm.target)
    return zm


def _reference(zm):
    model = copy.deepcopy(zm.model)
    loss = zm.loss_fn(model(*zm.example_args, **zm.example_kwargs), zm.target)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _train_and_compare(zm, devices, schedule, chunks, plan_seed) -> dict:
    """plan_seed None: the ILP plans (needs ortools); else a random valid plan."""
    plan = None if plan_seed is None else random_plan(zm, 4, len(devices), chunks, schedule, seed=plan_seed)
    pm = compile_parallel(copy.deepcopy(zm.model), devices, zm.example_args, zm.loss_fn,
                          example_kwargs=zm.example_kwargs, microbatches=4, schedule=schedule, plan=plan,
                          timeout_s=120)
    ref_loss, ref_grads = _reference(zm)
    loss = pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
    errors = grad_errors(pm, {n: g.cpu() for n, g in ref_grads.items()})
    return {"loss": max_rel_err(loss, ref_loss.cpu()), "grads": max(errors.values()),
            "local": sorted(errors)}


@pytest.mark.parametrize("model", ["mlp", "cnn", "gpt2", "t5-base", "llama-1b"])
@pytest.mark.parametrize("schedule,ranks,chunks", [("gpipe", 2, 1), ("1f1b", 4, 1), ("interleaved-1f1b", 2, 2)])
def test_stages_in_one_process_on_one_gpu(model, schedule, ranks, chunks):
    _exact_fp32()
    zm = _to(build(model), "cuda:0")
    r = _train_and_compare(zm, ["cuda:0"] * ranks, schedule, chunks, plan_seed=3)
    assert r["loss"] < 1e-5 and r["grads"] < 1e-5, r


def _nccl_worker(rank: int, world: int, cases: list[tuple]) -> dict:
    _exact_fp32()
    out = {}
    for name, schedule, chunks, seed in cases:
        zm = _to(build(name), f"cuda:{rank}")
        out[(name, schedule, chunks, seed)] = _train_and_compare(zm, [f"cuda:{r}" for r in range(world)],
                                                                 schedule, chunks, plan_seed=seed)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_nccl_one_process_per_gpu(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    cases = [("gpt2", "1f1b", 1, 5), ("t5-base", "interleaved-1f1b", 2, 5), ("cnn", "gpipe", 1, 5)]
    try:
        import ortools  # noqa: F401
        cases.append(("gpt2", "interleaved-1f1b", 2, None))  # the ILP's own plan, made on rank 0
    except ImportError:
        pass
    results = run_workers(_nccl_worker, world, cases, timeout_s=300)
    for case in cases:
        for rank, res in enumerate(results):
            r = res[case]
            assert r["loss"] < 1e-5 and r["grads"] < 1e-5, (case, rank, r)
        ref = dict(build(case[0]).model.named_parameters())
        assert set().union(*(set(res[case]["local"]) for res in results)) == set(ref)


def _data_parallel_worker(rank: int, world: int, cases: list[tuple]) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from partitioner.runtime.data_parallel import full_tensor
    _exact_fp32()
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    out = {}
    for case in cases:
        name, dp, mode, compiled = case
        zm = _to(build(name, batch=8), f"cuda:{rank}")
        mesh = init_device_mesh("cuda", (dp, world // dp), mesh_dim_names=("dp", "pp"))
        chunks = 2 if name == "t5-base" else 1  # interleaved: a stage's gradients reduced at its last backward
        pm = compile_parallel(copy.deepcopy(zm.model), mesh=mesh, example_inputs=zm.example_args, loss_fn=zm.loss_fn,
                              example_kwargs=zm.example_kwargs, microbatches=8 // dp if chunks > 1 else 2,
                              chunks=chunks, data_parallel=mode, timeout_s=120,
                              compile={"mode": compiled} if isinstance(compiled, str) else compiled)
        ref_loss, ref_grads = _reference(zm)
        for _ in range(3 if isinstance(compiled, str) else 1):  # graphs: the third step replays
            pm.zero_grad()
            loss = pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
        grads = {n: full_tensor(p.grad) for n, p in pm.named_parameters()}
        out[case] = {"loss": max_rel_err(loss, ref_loss.cpu()),
                     "grads": max(max_rel_err(g, ref_grads[n].cpu()) for n, g in grads.items())}
    return out


def test_data_parallel_x_pipeline_on_four_gpus():
    """dp 2 x pp 2 over NCCL: FSDP2 and replicate, eager (fp32, < 1e-5) and compiled (< 1e-4), and
    replicate with every stage call under CUDA graphs (compile={"mode": "reduce-overhead"})."""
    if torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs")
    pytest.importorskip("ortools")  # the plan is made on rank 0
    cases = [("gpt2", 2, "fsdp", False), ("t5-base", 2, "replicate", False), ("gpt2", 2, "fsdp", True),
             ("gpt2", 4, "fsdp", False), ("t5-base", 2, "fsdp", True), ("t5-base", 2, "replicate", "reduce-overhead")]
    results = run_workers(_data_parallel_worker, 4, cases, timeout_s=600)
    for case in cases:
        tol = 1e-4 if case[-1] else 1e-5
        for rank, res in enumerate(results):
            assert res[case]["loss"] < tol and res[case]["grads"] < tol, (case, rank, res[case])


def test_measured_times_keep_gpu_and_host_apart():
    """A big matmul is GPU-bound, a chain of tiny ops host-bound; the split times say which."""
    from partitioner.cost_models.measure import time_fwd_bwd

    dev = torch.device("cuda")
    x = torch.randn(4096, 4096, device=dev, requires_grad=True)
    w = torch.randn(4096, 4096, device=dev, requires_grad=True)
    big = time_fwd_bwd(lambda: x @ w, dev, [x, w])
    wall = time_fwd_bwd(lambda: x @ w, dev, [x, w], separate_host=False)
    assert 0 < big.host_fwd_s < big.fwd_s and 0 < big.host_bwd_s < big.bwd_s
    assert big.fwd_s == pytest.approx(wall.fwd_s, rel=0.2) and big.bwd_s == pytest.approx(wall.bwd_s, rel=0.2)
    s = torch.randn(64, device=dev, requires_grad=True)

    def chain():
        y = s
        for _ in range(100):
            y = y * 1.0001
        return y
    tiny = time_fwd_bwd(chain, dev, [s])
    assert tiny.host_fwd_s > 2 * tiny.fwd_s and tiny.host_bwd_s > 2 * tiny.bwd_s


@pytest.mark.parametrize("name, batch, seq", [
    ("gpt2", 4, 256), ("gpt2", 8, 1024), ("t5-base", 8, 512), ("t5-base", 4, 256)])
def test_training_peak_matches_cuda_max_memory_allocated(name, batch, seq):
    """partitioner.cost_models.memory.training_peak_bytes (the backward walk) against the allocator's peak."""
    from partitioner.cost_models.flops import trace_nodes
    from partitioner.cost_models.memory import saved_bytes_per_node, training_peak_bytes
    from partitioner import zoo
    from partitioner.passes.capture import capture

    dev = torch.device("cuda")
    zm = zoo.build(name, batch=batch, seq=seq, device=dev)

    class WithLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = zm.model

        def forward(self, *args, target, **kwargs):
            return zm.loss_fn(self.model(*args, **kwargs), target)

    kwargs = {**zm.example_kwargs, "target": zm.target}
    cap = capture(WithLoss(), zm.example_args, kwargs)
    gm, flat = cap.graph_module, cap.flatten_inputs(zm.example_args, kwargs)
    traces = trace_nodes(gm)
    predicted = training_peak_bytes(gm, traces, saved_bytes_per_node(traces))
    params = [p for p in gm.parameters() if p.requires_grad]
    torch.autograd.grad(gm(*flat), params)  # warm-up: cuBLAS workspaces are allocated once, on first use
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = torch.autograd.grad(gm(*flat), params)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    del grads
    assert predicted == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("name", ["gpt2", "t5-base", "llama-1b"])
def test_compiled_saved_bytes_match_what_the_gpu_keeps(name):
    """cost_models/compiled_memory.py (AOTAutograd's partitioner on fake tensors, fused attention kept
    whole) against what a torch.compile'd graph saves on the GPU, in bf16 (zoo's small llama)."""
    from partitioner import zoo
    from partitioner.cost_models.compiled_memory import compiled_saved_bytes
    from partitioner.cost_models.flops import trace_nodes
    from partitioner.cost_models.memory import measured_saved_bytes
    from partitioner.passes.capture import capture

    zm = zoo.build(name, batch=2, seq=256, device="cuda", dtype=torch.bfloat16, small=name == "llama-1b")
    zm.model.train()
    cap = capture(zm.model, zm.example_args, zm.example_kwargs)
    gm, flat = cap.graph_module, cap.flatten_inputs(zm.example_args, zm.example_kwargs)
    state = list(gm.parameters()) + list(gm.buffers())
    compiled = torch.compile(gm, dynamic=False)
    measured_saved_bytes(compiled, flat, state)  # compiles
    measured = measured_saved_bytes(compiled, flat, state)
    predicted = sum(compiled_saved_bytes(gm, trace_nodes(gm)).values())
    assert predicted == pytest.approx(measured, rel=0.1)


def _graph_run(zm, plan, compiled: bool | dict, graph: bool, steps: int = 4, after_step=lambda: None):
    """Losses of `steps` SGD steps (zero_grad between them), then of two steps accumulating into
    the same gradients and one adding to gradients the user replaced; the final gradients and
    parameters. after_step() runs after each step."""
    pm = compile_parallel(copy.deepcopy(zm.model), ["cuda:0"] * plan.num_ranks, zm.example_args, zm.loss_fn,
                          example_kwargs=zm.example_kwargs, microbatches=plan.microbatches, plan=plan,
                          compile=compiled, cuda_graph=graph)
    return _train_steps(pm, zm, steps, after_step)


def _train_steps(pm, zm, steps: int = 4, after_step=lambda: None):
    """_graph_run's steps on a ParallelModel already built."""
    opt = torch.optim.SGD(pm.parameters(), lr=0.05)

    def run():
        loss = pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
        after_step()
        return loss
    losses = []
    for _ in range(steps):
        losses.append(run())
        opt.step()
        opt.zero_grad()  # .grad set to None: the graph's gradient tensors are re-attached, zeroed
    losses += [run(), run()]  # no zero_grad: the second step adds to the first's gradients
    for p in pm.parameters():  # gradients replaced by new tensors: the next step adds to those
        if p.grad is not None:
            p.grad = p.grad * 0.5
    losses.append(run())
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    params = {n: p.detach().clone() for n, p in pm.named_parameters()}
    return pm, torch.stack(losses), grads, params


@pytest.mark.parametrize("model,compiled", [("gpt2", False), ("t5-base", False), ("llama-1b", False),
                                            ("gpt2", True)])
def test_cuda_graph_steps_train_as_uncaptured_steps(model, compiled):
    """Steps replayed as one CUDA graph (two warm-up steps, the third captured, then replays) give
    the losses, gradients and parameters of uncaptured steps, through optimizer steps, zero_grad
    and gradient accumulation across steps."""
    _exact_fp32()
    zm = _to(build(model), "cuda:0")
    plan = random_plan(zm, 4, 2, 1, "1f1b", seed=0)
    _, ref_losses, ref_grads, ref_params = _graph_run(zm, plan, compiled, graph=False)
    pm, losses, grads, params = _graph_run(zm, plan, compiled, graph=True)
    assert pm.step_graph.captured and pm.step_graph.failed is None
    tol = 1e-4 if compiled else 1e-5
    assert max_rel_err(losses, ref_losses.cpu()) < tol
    assert max(max_rel_err(grads[n], g.cpu()) for n, g in ref_grads.items()) < tol
    assert max(max_rel_err(params[n], p.cpu()) for n, p in ref_params.items()) < tol


def test_cuda_graph_replays_draw_fresh_dropout():
    """Dropout inside a replayed step draws new random numbers every replay, as uncaptured steps do."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Dropout(0.5), torch.nn.Linear(64, 1)).cuda()
    x, y = torch.randn(8, 64, device="cuda"), torch.randn(8, 1, device="cuda")
    pm = compile_parallel(model, ["cuda:0"] * 2, (x,), torch.nn.functional.mse_loss, microbatches=2,
                          compile=False, cuda_graph=True, example_target=y)
    losses = [pm.train_step(x, target=y).item() for _ in range(6)]  # no optimizer: only dropout changes
    assert pm.step_graph.captured
    assert len(set(losses[3:])) == 3  # replays differ from one another



def _cudagraph_trees_nodes() -> int:
    """How many graphs torch.compile's cudagraph trees have recorded on this GPU."""
    from torch._inductor.cudagraph_trees import get_container
    manager = get_container(torch.cuda.current_device()).tree_manager
    nodes = [n for roots in manager.roots.values() for n in roots] if manager is not None else []
    count = 0
    while nodes:
        node = nodes.pop()
        count += 1
        nodes.extend(c for children in node.children.values() for c in children)
    return count


@pytest.mark.parametrize("model,schedule,ranks,chunks", [("gpt2", "1f1b", 2, 1), ("t5-base", "interleaved-1f1b", 2, 2),
                                                         ("llama-1b", "1f1b", 4, 1)])
def test_reduce_overhead_stages_replay_and_train_as_compiled_steps(model, schedule, ranks, chunks):
    """compile={"mode": "reduce-overhead"}: after the warm-up and recording steps every step replays
    the recorded CUDA graphs (none recorded anew), and losses, gradients (accumulated across
    microbatches and steps) and parameters equal compiled steps without CUDA graphs."""
    _exact_fp32()
    zm = _to(build(model), "cuda:0")
    plan = random_plan(zm, 4, ranks, chunks, schedule, seed=0)
    _, ref_losses, ref_grads, ref_params = _graph_run(zm, plan, True, graph=False)
    recorded: list[int] = []
    _, losses, grads, params = _graph_run(zm, plan, {"mode": "reduce-overhead"}, graph=False,
                                          after_step=lambda: recorded.append(_cudagraph_trees_nodes()))
    assert recorded[1] > recorded[0] and recorded[2:] == [recorded[1]] * (len(recorded) - 2), recorded
    assert max_rel_err(losses, ref_losses.cpu()) < 1e-4
    assert max(max_rel_err(grads[n], g.cpu()) for n, g in ref_grads.items()) < 1e-4
    assert max(max_rel_err(params[n], p.cpu()) for n, p in ref_params.items()) < 1e-4


def test_default_compile_replays_host_bound_stages_as_cuda_graphs(capsys):
    """compile=None on CUDA in one process: a small model's stages, host-bound on the GPU's costs,
    compile under CUDA graphs (said in one line), train as compile=True stages without graphs on
    the same plan, and infer as the model does (outputs of earlier calls kept as returned);
    compile=True keeps them without graphs."""
    pytest.importorskip("ortools")  # compile_parallel plans
    _exact_fp32()
    zm = _to(build("gpt2"), "cuda:0")
    auto = compile_parallel(copy.deepcopy(zm.model), ["cuda:0"] * 2, zm.example_args, zm.loss_fn,
                            example_kwargs=zm.example_kwargs, microbatches=4, time_limit_s=2)
    assert "each stage call replays as a CUDA graph" in capsys.readouterr().err
    assert auto.executor.cudagraph_steps is not None and auto.compile_options["mode"] == "reduce-overhead"
    recorded: list[int] = []
    _, losses, grads, params = _train_steps(auto, zm, after_step=lambda: recorded.append(_cudagraph_trees_nodes()))
    assert recorded[2:] == [recorded[1]] * (len(recorded) - 2), recorded  # replays, no recording after step 2
    _, ref_losses, ref_grads, ref_params = _graph_run(zm, auto.plan, True, graph=False)
    assert max_rel_err(losses, ref_losses.cpu()) < 1e-4
    assert max(max_rel_err(grads[n], g.cpu()) for n, g in ref_grads.items()) < 1e-4
    assert max(max_rel_err(params[n], p.cpu()) for n, p in ref_params.items()) < 1e-4
    # inference under the graphs too: every call's output stays as returned, equal to the model's
    reference = copy.deepcopy(zm.model)
    reference.load_state_dict(auto.state_dict())
    reference.eval()
    auto.eval()
    batches = [zm.example_args, tuple(torch.roll(a, 1, -1) if isinstance(a, torch.Tensor) else a
                                      for a in zm.example_args)] * 2  # compiles, records, replays
    outputs = [getattr(y, "logits", y) for y in (auto(*b, **zm.example_kwargs) for b in batches)]
    with torch.no_grad():
        wanted = [getattr(y, "logits", y) for y in (reference(*b, **zm.example_kwargs) for b in batches)]
    assert max(max_rel_err(y, w.cpu()) for y, w in zip(outputs, wanted)) < 1e-4
    auto.train()
    assert torch.isfinite(auto.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs))
    plain = compile_parallel(copy.deepcopy(zm.model), ["cuda:0"] * 2, zm.example_args, zm.loss_fn,
                             example_kwargs=zm.example_kwargs, microbatches=4, time_limit_s=2, compile=True)
    assert plain.executor.cudagraph_steps is None
    assert "compile={'mode': 'reduce-overhead'} replays each stage call" in capsys.readouterr().err  # the hint


def _replicas_on_one_gpu_worker(rank: int, world: int, _arg) -> dict:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    _exact_fp32()
    dist.init_process_group("gloo")  # gloo all-reduces CUDA tensors; NCCL refuses two ranks on one GPU
    os.environ["LOCAL_RANK"] = "0"  # both replicas on the one GPU
    zm = _to(build("gpt2", batch=8), "cuda:0")
    ref_loss, ref_grads = _reference(zm)
    mesh = init_device_mesh("cuda", (2, 1), mesh_dim_names=("dp", "pp"))
    pm = compile_parallel(copy.deepcopy(zm.model), mesh=mesh, example_inputs=zm.example_args, loss_fn=zm.loss_fn,
                          microbatches=2, chunks=2, data_parallel="replicate", compile={"mode": "reduce-overhead"},
                          timeout_s=120)
    errors = []
    for _ in range(4):  # compile, record, replay, replay
        pm.zero_grad()
        loss = pm.train_step(*zm.example_args, target=zm.target)
        errors.append(max([max_rel_err(loss.cpu(), ref_loss.cpu())] +
                          [max_rel_err(p.grad.cpu(), ref_grads[n].cpu()) for n, p in pm.named_parameters()]))
    return {"errors": errors, "graphs": str(pm.compile_options)}


def test_stage_graphs_under_replicated_data_parallelism_on_one_gpu():
    """Two replicas (processes) on one GPU, each both stages of a 2-chunk pipeline under per-stage CUDA
    graphs, gradients all-reduced over gloo: every step equals the plain model on the global batch."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    pytest.importorskip("ortools")
    results = run_workers(_replicas_on_one_gpu_worker, 2, None, timeout_s=400, start_method="spawn")
    for r in results:
        assert "reduce-overhead" in r["graphs"] and max(r["errors"]) < 1e-4, r
