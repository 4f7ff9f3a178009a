"""profile(): NodeCosts of captured graphs; meta models allocate nothing; measured mode on CPU."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn as nn

from partitioner.cost_models.node_costs import NodeCost, NodeCosts
from partitioner.cost_models.time import NodeTime
from partitioner.cost_models.profile import module_costs, profile
from partitioner import zoo
from partitioner.passes.annotate import annotate
from partitioner.passes.capture import capture


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not hasattr(__import__("os"), "sysconf"), reason="needs /proc")
def test_gpt2_on_meta_allocates_no_weights():
    zm = zoo.build("gpt2", batch=2, seq=64, device="meta")
    weight_bytes = sum(p.numel() * p.element_size() for p in zm.model.parameters())
    before = _rss_bytes()
    captured = capture(zm.model, zm.example_args, zm.example_kwargs)
    annotated = annotate(captured)
    costs = profile(captured, annotated, device="h100")
    grown = _rss_bytes() - before
    assert grown < weight_bytes / 3, f"RSS grew {grown / 2**20:.0f} MiB for {weight_bytes / 2**20:.0f} MiB of weights"
    assert all(p.device.type == "meta" for p in zm.model.parameters())

    tokens = 2 * 64
    n_params = sum(annotated.param_numel.values())
    # fwd+bwd ~ 6 FLOPs per token and parameter (plus attention), bwd = 2x fwd
    per_token_param = (costs.total("fwd_flops") + costs.total("bwd_flops")) / tokens / n_params
    assert 5.5 < per_token_param < 7.0
    assert costs.total("bwd_flops") == pytest.approx(2 * costs.total("fwd_flops"), rel=0.02)
    assert sum(costs.param_state_bytes.values()) == 16 * n_params  # fp32 AdamW; tied wte/lm_head once
    assert costs.total("fwd_time_s") > 0 and costs.total("bwd_time_s") > costs.total("fwd_time_s")

    paths = {n.name: n.module_path for n in annotated.nodes}
    per_module = module_costs(costs, captured.graph_module, paths, depth=3, tied=captured.tied)
    blocks = [per_module[f"transformer.h.{i}"] for i in range(12)]
    assert len({b.fwd_flops for b in blocks}) == 1  # identical layers cost the same
    assert per_module[""].fwd_flops == costs.total("fwd_flops")
    assert per_module[""].param_bytes == sum(annotated.param_bytes.values())
    assert blocks[0].output_bytes == 2 * 64 * 768 * 4  # the residual stream leaving the block
    assert NodeCosts.from_json(costs.to_json()) == costs


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(16, 64), nn.ReLU())
        self.b = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def test_measured_mode_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PARTITIONER_CACHE", str(tmp_path))
    x = torch.randn(8, 16)
    captured = capture(_Net(), (x,))
    annotated = annotate(captured)
    analytic = profile(captured, annotated, device="cpu")
    measured = profile(captured, annotated, device="cpu", measure=True, example_inputs=[x], progress=False)
    assert measured.time_source == "measured" and analytic.time_source == "analytic"
    assert measured.total("fwd_time_s") > 0 and measured.total("bwd_time_s") > 0
    # FLOPs and bytes do not depend on how time is obtained
    for name, c in analytic.nodes.items():
        m = measured.nodes[name]
        assert (c.fwd_flops, c.saved_bytes, c.output_bytes) == (m.fwd_flops, m.saved_bytes, m.output_bytes)
        if c.fwd_time_s == 0:  # views and parameters stay free
            assert m.fwd_time_s == 0


def test_unknown_device_and_optimizer_are_errors():
    from partitioner.errors import CostModelError
    captured = capture(_Net(), (torch.randn(2, 16),))
    with pytest.raises(CostModelError, match="unknown device type 'v100'"):
        profile(captured, device="v100")
    with pytest.raises(CostModelError, match="unknown optimizer"):
        profile(captured, optimizer="lion")


def tiny_model(batch: int = 4, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A `package.module:function` model for the CLI: returns (model, example_args)."""
    with torch.device(device):
        model = _Net().to(dtype)
        return model, (torch.randn(batch, 16, dtype=dtype),)


def meta_only_model():
    with torch.device("meta"):
        return _Net(), (torch.randn(2, 16),)


def test_cli_profile_prints_modules_and_writes_json(tmp_path, capsys, monkeypatch):
    from partitioner.cli import main
    monkeypatch.setenv("PARTITIONER_CACHE", str(tmp_path))
    out_json = tmp_path / "costs.json"
    assert main(["profile", "test_profile:tiny_model", "--batch", "3", "--depth", "1", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    for row in ("a", "b", "head", "total"):
        assert row in printed
    costs = NodeCosts.from_json(out_json.read_text())
    assert costs.device == "h100" and costs.time_source == "analytic"
    assert costs.total("fwd_flops") == 2 * 3 * (16 * 64 + 64 * 64 + 64 * 3)

    assert main(["profile", "test_profile:tiny_model", "--measure", "--json", str(out_json)]) == 0
    assert NodeCosts.from_json(out_json.read_text()).time_source == "measured"

    assert main(["profile", "test_profile:meta_only_model", "--measure"]) == 2
    assert "needs real weights" in capsys.readouterr().err

    # short dtype names as in `--dtype bf16`
    assert main(["profile", "test_profile:tiny_model", "--dtype", "bf16", "--json", str(out_json)]) == 0
    assert NodeCosts.from_json(out_json.read_text()).dtype == "bfloat16"


def test_cli_profile_edges_are_one_line(tmp_path, capsys):
    from partitioner.cli import main
    for argv, match in ((["--json", str(tmp_path)], "is a directory"), (["--batch", "0"], "--batch is 0"),
                        (["--seq", "-1"], "--seq is -1")):
        assert main(["profile", "test_profile:tiny_model", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err


def test_misaligned_16bit_matmul_is_slower_than_aligned():
    """A bf16 linear whose output width is not a multiple of 8 runs on slow unaligned kernels."""
    from partitioner.cost_models.device import get_device_spec
    from partitioner.cost_models.flops import trace_nodes
    from partitioner.cost_models.memory import DtypeScale
    from partitioner.cost_models.profile import op_kernel

    spec = get_device_spec("h100")
    for width, expected in ((64, spec.matmul_efficiency), (63, spec.misaligned_matmul_efficiency)):
        model = torch.nn.Linear(32, width).to(torch.bfloat16)
        gm = torch.export.export(model, (torch.randn(4, 32, dtype=torch.bfloat16),), strict=False).module()
        trace = next(t for t in trace_nodes(gm).values() if t.fwd_flops)
        bf16 = DtypeScale(torch.bfloat16, torch.bfloat16)
        (mm,) = [op_kernel(k, spec, bf16) for k in trace.fwd_ops if k.flops]
        assert mm.flops_efficiency == expected
        # the same graph costed in fp32: no tensor cores, no alignment rule; K = 32 is one head narrow,
        # the CUDA cores' narrow SIMT rate
        (mm32,) = [op_kernel(k, spec, DtypeScale(torch.bfloat16, torch.float32)) for k in trace.fwd_ops if k.flops]
        assert mm32.flops_efficiency == spec.narrow_fp32_matmul_efficiency and mm32.dtype == torch.float32
        assert mm32.width == width and mm32.reduction == 32


def test_a_node_is_costed_kernel_by_kernel():
    """Cross-entropy runs log_softmax then nll_loss forward, and two kernels backward: each is
    costed; its host time, kept apart, is one dispatch forward and one per kernel backward."""
    from partitioner.cost_models.device import get_device_spec
    from partitioner.cost_models.flops import trace_nodes

    class Loss(nn.Module):
        def forward(self, logits, target):
            return nn.functional.cross_entropy(logits, target)

    logits, target = torch.randn(64, 1000, requires_grad=True), torch.randint(0, 1000, (64,))
    gm = torch.export.export(Loss(), (logits, target), strict=False).module()
    traces = trace_nodes(gm, inputs_require_grad=True)
    spec = get_device_spec("h100")
    costs = profile(gm, device=spec, inputs_require_grad=True, progress=False)
    (name,) = [n for n, t in traces.items() if t.fwd_ops and t.bwd_ops]
    ops = traces[name]
    assert [k.name for k in ops.fwd_ops][-1].startswith("nll_loss") and len(ops.fwd_ops) >= 2
    assert len(ops.bwd_ops) >= 2
    c = costs.nodes[name]
    assert c.fwd_time_s >= len(ops.fwd_ops) * spec.per_kernel_s
    assert c.host_fwd_time_s == pytest.approx(spec.cpu_fwd_overhead_s)
    assert c.host_bwd_time_s == pytest.approx(len(ops.bwd_ops) * spec.cpu_bwd_overhead_s)


def test_math_attention_node_costs_its_kernels():
    """A T5-like trainable bias looked up as (L, S, H) and permuted (its last dim strided) makes SDPA
    run unfused: its time is the math path's kernels. Contiguous, the same bias runs fused."""
    from partitioner.cost_models.device import get_device_spec
    from partitioner.cost_models.flops import trace_nodes
    from partitioner.cost_models.time import kernels_time_s, math_attention_kernels

    B, H, L, E = 4, 4, 128, 64

    class Biased(nn.Module):
        def __init__(self, heads_last: bool):
            super().__init__()
            self.heads_last = heads_last
            self.bias = nn.Parameter(torch.zeros(L, L, H) if heads_last else torch.zeros(1, H, L, L))

        def forward(self, q, k, v):
            bias = self.bias.permute(2, 0, 1)[None] if self.heads_last else self.bias
            return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    q = torch.randn(B, H, L, E, dtype=torch.bfloat16)
    spec = get_device_spec("h200")
    times = {}
    for heads_last in (True, False):
        gm = torch.export.export(Biased(heads_last).to(torch.bfloat16), (q, q.clone(), q.clone()),
                                 strict=False).module()
        costs = profile(gm, device=spec, dtype=torch.bfloat16, inputs_require_grad=True, progress=False)
        name = next(n for n in costs.nodes if n.startswith("scaled_dot_product_attention"))
        times[heads_last] = costs.nodes[name]
        if heads_last:
            call = trace_nodes(gm, inputs_require_grad=True)[name].attention
            fwd, bwd = math_attention_kernels(call)
            assert costs.nodes[name].fwd_time_s == pytest.approx(kernels_time_s(fwd, spec))
            assert costs.nodes[name].bwd_time_s == pytest.approx(kernels_time_s(bwd, spec))
            assert costs.nodes[name].host_bwd_time_s == pytest.approx(len(bwd) * spec.cpu_bwd_overhead_s)
    assert times[True].saved_bytes > times[False].saved_bytes + B * H * L * L * 4  # fp32 probabilities
    assert times[True].fwd_time_s > times[False].fwd_time_s


def test_measured_mode_compiled_times_each_distinct_block_through_torch_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("PARTITIONER_CACHE", str(tmp_path))
    x = torch.randn(8, 16)
    captured = capture(_Net(), (x,))
    annotated = annotate(captured)
    calls = []
    real_compile = torch.compile

    def counting_compile(module, **options):
        calls.append(options)
        return real_compile(module, **options)

    monkeypatch.setattr(torch, "compile", counting_compile)
    # what a compiled call costs beyond its kernels is subtracted from each block; timed on a busy
    # host it can exceed these tiny blocks' times: zero here, so every block keeps a measured time
    from partitioner.cost_models import measure
    monkeypatch.setattr(measure, "compiled_call_overhead", lambda *a, **k: NodeTime(0.0, 0.0))
    eager = profile(captured, annotated, device="cpu", measure=True, example_inputs=[x], progress=False)
    assert calls == []
    compiled = profile(captured, annotated, device="cpu", measure=True, compiled=True, example_inputs=[x],
                       progress=False)
    assert calls and all(c == {"dynamic": False} for c in calls)
    assert compiled.time_source == "measured"
    assert compiled.total("fwd_time_s") > 0 and compiled.total("bwd_time_s") > 0
    analytic = profile(captured, annotated, device="cpu", compiled=True, progress=False)
    for name, c in eager.nodes.items():  # FLOPs and bytes do not depend on how time is obtained
        assert c.fwd_flops == compiled.nodes[name].fwd_flops
        assert compiled.nodes[name].saved_bytes == analytic.nodes[name].saved_bytes  # what the compiled graph saves
    # the compiled times are cached apart from the eager ones: a second profile compiles nothing
    calls.clear()
    profile(captured, annotated, device="cpu", measure=True, compiled=True, example_inputs=[x], progress=False)
    assert calls == []


def test_measured_plans_are_in_the_models_own_dtype(tmp_path, monkeypatch):
    from partitioner.errors import PlanError
    from partitioner.plan_model import PlanConfig, plan_model
    monkeypatch.setenv("PARTITIONER_CACHE", str(tmp_path))
    x = torch.randn(8, 16)
    with pytest.raises(PlanError, match=r"own dtype \(torch.float32\), not torch.bfloat16"):
        plan_model(_Net(), (x,), {}, PlanConfig(num_ranks=2, microbatches=2, device_type="cpu", measure=True,
                                                dtype="bfloat16"))
    result = plan_model(_Net(), (x,), {}, PlanConfig(num_ranks=2, microbatches=2, device_type="cpu", measure=True,
                                                     dtype=None, time_limit_s=1))
    assert result.costs.time_source == "measured"


def test_measured_compiled_blocks_leave_out_the_compiled_call_overhead(tmp_path, monkeypatch):
    """Each block is its own compiled call; a stage makes one: the call's fixed cost comes off each
    block (never below zero)."""
    from partitioner.cost_models import measure
    monkeypatch.setenv("PARTITIONER_CACHE", str(tmp_path))
    overhead = measure.compiled_call_overhead(torch.device("cpu"), {"dynamic": False})
    assert overhead.fwd_s > 0 and overhead.bwd_s > 0
    x = torch.randn(8, 16)
    captured = capture(_Net(), (x,))
    annotated = annotate(captured)
    huge = NodeTime(1.0, 1.0, 1.0, 1.0)
    monkeypatch.setattr(measure, "compiled_call_overhead", lambda *args: huge)
    costs = profile(captured, annotated, device="cpu", measure=True, compiled=True, example_inputs=[x],
                    progress=False)
    assert costs.total("fwd_time_s") == 0 and costs.total("bwd_time_s") == 0


def test_the_stage_pass_survives_json_and_cuda_graphs_drop_its_host_part():
    costs = NodeCosts({"a": NodeCost("a", fwd_time_s=1.0, bwd_time_s=2.0, host_fwd_time_s=0.5)},
                      stage_pass=NodeTime(0.1, 0.2, 0.3, 0.4))
    assert NodeCosts.from_json(costs.to_json()) == costs
    old = json.loads(costs.to_json())
    del old["stage_pass"]  # written before the field existed
    assert NodeCosts.from_json(json.dumps(old)).stage_pass == NodeTime(0.0, 0.0)
    assert costs.step_time_s() == pytest.approx(max(1.1, 0.8) + max(2.2, 0.4))  # the whole graph: one stage
    graphed = costs.without_host()
    assert graphed.stage_pass == NodeTime(0.1, 0.2, 0.0, 0.0)
    assert graphed.step_time_s() == pytest.approx(1.1 + 2.2)


def test_under_cuda_graphs_the_pool_keeps_its_slack_and_the_optimizer_step_its_temporaries():
    """Stages replayed as CUDA graphs: no host time; activations (saved and working bytes) count
    1 + GRAPH_POOL_SLACK times (the pool keeps every segment it reserved); each parameter's state (weight,
    gradient and AdamW's two moments: 4 weights) adds the step's temporary (one weight)."""
    from partitioner.cost_models.node_costs import GRAPH_POOL_SLACK
    costs = NodeCosts({"a": NodeCost("a", fwd_time_s=1.0, host_fwd_time_s=2.0, saved_bytes=1000, bwd_working_bytes=100)},
                      param_state_bytes={"w": 16}, optimizer="adamw")
    graphed = costs.under_cuda_graphs()
    a = graphed.nodes["a"]
    assert a.host_fwd_time_s == 0.0 and a.fwd_time_s == 1.0
    assert a.saved_bytes == round(1000 * (1 + GRAPH_POOL_SLACK)) and a.bwd_working_bytes == round(100 * (1 + GRAPH_POOL_SLACK))
    assert graphed.param_state_bytes["w"] == 16 + 4
    sgd = NodeCosts(dict(costs.nodes), param_state_bytes={"w": 8}, optimizer="sgd").under_cuda_graphs()
    assert sgd.param_state_bytes == {"w": 8}  # SGD's step makes no weight-sized temporaries


def test_compiled_stages_on_the_cpu_pay_the_compiled_call_per_pass(monkeypatch):
    """On the CPU device (host time 0) the stage pass is device time: the executor's constant, plus for
    compiled stages the compiled call's machinery (compiled_call_overhead, patched: no compiling here);
    where torch.compile fails the rest stands, with a warning. GPU specs hold it as host time."""
    from partitioner.cost_models import profile as profile_module
    from partitioner.cost_models.device import DEVICE_SPECS, calibrate_cpu
    x = torch.randn(8, 16)
    captured = capture(_Net(), (x,))
    monkeypatch.setattr(profile_module, "compiled_call_overhead", lambda device, options: NodeTime(1e-4, 2e-4))
    executor = calibrate_cpu().stage_pass_s
    assert executor > 0
    compiled = profile(captured, device="cpu", compiled=True, progress=False).stage_pass
    assert compiled == NodeTime(executor + 1e-4, executor + 2e-4)
    assert profile(captured, device="cpu", progress=False).stage_pass == NodeTime(executor, executor)

    def fail(device, options):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(profile_module, "compiled_call_overhead", fail)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        assert profile(captured, device="cpu", compiled=True, progress=False).stage_pass == NodeTime(executor, executor)
    spec = dataclasses.replace(DEVICE_SPECS["h100"], stage_pass_s=2e-5, compiled_stage_pass_s=1e-4)
    on_gpu = profile(captured, device=spec, compiled=True, progress=False).stage_pass
    assert on_gpu == NodeTime(0.0, 0.0, 1.2e-4, 1.2e-4)
