"""Roofline times and measured block times (CPU) with the disk cache."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import partitioner.cost_models.host_calibration as host_calibration
import partitioner.cost_models.measure as measure
import partitioner.cost_models.time as time_model
from partitioner.cost_models.device import get_device_spec
from partitioner.cost_models.measure import measure_block_times
from partitioner.cost_models.time import analytic_node_time, is_compute_bound, roofline_time_s


def test_roofline_picks_compute_or_memory_bound():
    h100 = get_device_spec("h100")
    n = 8192  # big square matmul: 2n^3 FLOPs over 3n^2 values -> compute bound
    mm_flops, mm_bytes = 2 * n ** 3, 3 * n * n * 2
    assert is_compute_bound(mm_flops, mm_bytes, h100, torch.bfloat16)
    t = roofline_time_s(mm_flops, mm_bytes, 1, h100, torch.bfloat16)
    achieved = h100.flops_per_s(torch.bfloat16) * h100.matmul_efficiency
    bw = h100.mem_bw_bytes_per_s * h100.mem_bw_efficiency
    assert t == pytest.approx(mm_flops / achieved + mm_bytes / bw + h100.per_kernel_s)
    assert t < 1.1 * mm_flops / achieved  # compute bound: streaming the operands adds little
    assert roofline_time_s(mm_flops, mm_bytes, 1, h100, torch.bfloat16, flops_efficiency=0.5) > t
    # elementwise add of two 1 GiB tensors: no FLOPs counted, pure (achievable) bandwidth
    add_bytes = 3 * 2 ** 30
    assert not is_compute_bound(0, add_bytes, h100)
    assert roofline_time_s(0, add_bytes, 1, h100) == pytest.approx(add_bytes / bw + h100.per_kernel_s)
    # fp32 runs at the fp32 peak, so the same matmul takes longer than in bf16
    assert roofline_time_s(mm_flops, 2 * mm_bytes, 1, h100, torch.float32) > t


def test_every_kernel_pays_its_fixed_time_and_the_gap_before_the_next():
    """On a GPU a kernel costs its fixed part and the idle gap to the next queued kernel (in no kernel's
    duration, in every step's wall time); the CPU's kernels have no such gap."""
    import dataclasses
    h100 = get_device_spec("h100")
    assert h100.kernel_gap_s > 0 and h100.per_kernel_s == h100.kernel_overhead_s + h100.kernel_gap_s
    assert roofline_time_s(0, 0, 10, h100) == pytest.approx(10 * h100.per_kernel_s)
    no_gap = dataclasses.replace(h100, kernel_gap_s=0.0)
    assert roofline_time_s(0, 0, 10, h100) - roofline_time_s(0, 0, 10, no_gap) == pytest.approx(10 * h100.kernel_gap_s)
    assert get_device_spec("cpu").kernel_gap_s == 0.0


def test_views_launch_nothing_but_pay_their_dispatch():
    """A node's device time is its kernels'; its host time (kept apart) its eager dispatch:
    per node forward, per kernel backward."""
    spec = get_device_spec("h100")
    assert analytic_node_time([], [], spec) == time_model.NodeTime(0.0, 0.0)
    view = analytic_node_time([], [], spec, dispatched=True)
    assert view == time_model.NodeTime(0.0, 0.0, spec.cpu_fwd_overhead_s, 0.0)
    add = time_model.Kernel(0.0, 10 ** 9)
    two = analytic_node_time([add, add], [add, add, add], spec, dispatched=True)
    assert two.fwd_s == pytest.approx(2 * roofline_time_s(0, 10 ** 9, 1, spec))
    assert two.bwd_s == pytest.approx(3 * roofline_time_s(0, 10 ** 9, 1, spec))
    assert two.host_fwd_s == pytest.approx(spec.cpu_fwd_overhead_s)
    assert two.host_bwd_s == pytest.approx(3 * spec.cpu_bwd_overhead_s)
    # a big elementwise op is device-bound: its pass takes its kernels' time
    assert two.time_s == pytest.approx(two.fwd_s + two.bwd_s)


def test_a_run_of_nodes_takes_the_larger_of_its_summed_host_and_device_times():
    """Host and device times add up apart and meet per pass: max(sum device, sum host)."""
    from partitioner.cost_models.node_costs import NodeCost, NodeCosts

    gpu_bound = NodeCost("mm", fwd_time_s=10.0, bwd_time_s=20.0, host_fwd_time_s=1.0, host_bwd_time_s=2.0)
    host_bound = NodeCost("view", host_fwd_time_s=3.0, host_bwd_time_s=4.0)
    assert gpu_bound.time_s == 30.0 and host_bound.time_s == 7.0
    costs = NodeCosts({"mm": gpu_bound, "view": host_bound})
    assert costs.step_time_s() == 30.0  # the views' dispatch hides behind the matmul
    assert not costs.host_bound() and costs.launch_and_run_s() == (10.0, 30.0)
    costs = NodeCosts({"mm": gpu_bound, "views": NodeCost("views", host_fwd_time_s=12.0, host_bwd_time_s=4.0)})
    assert costs.step_time_s() == 13.0 + 20.0
    assert NodeCosts({"view": host_bound}).host_bound()  # 7 s to launch, nothing to run


class _Stack(nn.Module):
    """Two identical layers and a head: identical blocks are measured once."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(2))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _groups(gm: torch.fx.GraphModule) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.meta.get("nn_module_stack"):
            path = list(n.meta["nn_module_stack"].values())[-1][0]
            key = ".".join(path.split(".")[:2])
            groups.setdefault(key, []).append(n.name)
    return list(groups.values())


def test_measured_on_cpu_is_positive_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PARTITIONER_CACHE", str(tmp_path))
    x = torch.randn(16, 32)
    gm = torch.export.export(_Stack(), (x,), strict=False).module()
    groups = _groups(gm)
    assert len(groups) == 3
    calls = []
    real_timer = measure.time_fwd_bwd
    monkeypatch.setattr(measure, "time_fwd_bwd", lambda *a, **k: calls.append(1) or real_timer(*a, **k))

    first = measure_block_times(gm, groups, [x], "cpu", repeats=3)
    # a backward of tiny layers can time at 0 (fwd+bwd minus fwd, clipped) on a fast host
    assert all(t.fwd_s > 0 and t.bwd_s >= 0 for t in first)
    assert len(calls) == 2  # layers.0 and layers.1 are the same code on the same shapes
    assert first[0] == first[1]
    assert len(json.loads((tmp_path / "block_times.json").read_text())) == 2

    second = measure_block_times(gm, groups, [x], "cpu", repeats=3)
    assert second == first and len(calls) == 2  # all from the disk cache

    random_inputs = measure_block_times(gm, groups, None, "cpu", repeats=3, use_cache=False)
    assert all(t.fwd_s > 0 for t in random_inputs) and len(calls) == 4


def test_measuring_a_meta_graph_is_a_clear_error():
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    gm = torch.export.export(model, (torch.randn(2, 4, device="meta"),), strict=False).module()
    from partitioner.errors import CostModelError
    with pytest.raises(CostModelError, match="meta device"):
        measure_block_times(gm, [[n.name for n in gm.graph.nodes if n.op == "call_function"]])


def _t5_like_call(dtype: torch.dtype):
    from partitioner.cost_models.attention import AttentionCall
    return AttentionCall("math", batch_heads=8 * 12, q_len=512, kv_len=512, qk_dim=64, v_dim=64, dtype=dtype,
                         mask_numel=8 * 12 * 512 * 512, mask_dtype=dtype, mask_requires_grad=True)


@pytest.mark.parametrize("dtype, n_fwd, n_bwd", [(torch.float32, 6, 7), (torch.bfloat16, 10, 12)])
def test_math_attention_kernels_closed_form(dtype, n_fwd, n_bwd):
    call = _t5_like_call(dtype)
    fwd, bwd = time_model.math_attention_kernels(call)
    assert (len(fwd), len(bwd)) == (n_fwd, n_bwd)
    n = call.scores
    assert sum(k.flops for k in fwd) == 2 * n * (64 + 64) == call.fwd_flops()
    assert sum(k.flops for k in bwd) == 4 * n * (64 + 64) == call.bwd_flops()
    # every (B, H, L, S) pass moves fp32 elements, even for bf16 inputs (upcast)
    assert all(k.dtype == torch.float32 for k in fwd + bwd)
    softmax = [k for k in fwd if not k.matmul and k.bytes_moved == 2 * n * 4]
    assert softmax, "softmax reads and writes the fp32 scores once"


def test_kernel_sequence_time_is_sum_of_rooflines():
    spec = get_device_spec("h100")
    call = _t5_like_call(torch.bfloat16)
    fwd, _ = time_model.math_attention_kernels(call)
    gpu = sum(roofline_time_s(k.flops, k.bytes_moved, 1, spec, k.dtype,
                              flops_efficiency=None if k.matmul else 1.0, reduction=k.reduction,
                                  width=k.width) for k in fwd)
    assert time_model.kernels_time_s(fwd, spec) == pytest.approx(gpu)
    # the matmuls of the upcast math path run at the fp32 rate: far slower than fused bf16
    fused = roofline_time_s(call.fwd_flops(), 0, 1, spec, torch.bfloat16, flops_efficiency=spec.attention_efficiency)
    assert gpu > 3 * fused


def test_host_times_in_context_are_read_per_block_and_never_raised():
    """Inside whole steps every block with work reads a positive host time in each pass, about the
    passes' own time in all (the CPU runs them: host time is all of it); a block's own smaller
    reading is kept, and the GPU times stay as given."""
    x = torch.randn(64, 32)
    gm = torch.export.export(_Stack(), (x,), strict=False).module()
    groups = _groups(gm)
    slow = [time_model.NodeTime(1.0, 2.0, 10.0, 10.0) for _ in groups]
    got = measure._host_in_context(gm, [x], torch.device("cpu"), groups, slow, repeats=5, budget_s=0.5)
    assert [(t.fwd_s, t.bwd_s) for t in got] == [(1.0, 2.0)] * len(groups)
    assert all(0 < t.host_fwd_s < 0.1 and 0 < t.host_bwd_s < 0.1 for t in got)
    fast = [time_model.NodeTime(1.0, 2.0, 1e-9, 1e-9) for _ in groups]
    assert measure._host_in_context(gm, [x], torch.device("cpu"), groups, fast, repeats=2, budget_s=0) == fast


def test_host_overheads_are_measured_once_per_device():
    """The host calibration times a small captured graph: per forward node and per backward kernel,
    positive and in microseconds, not seconds (a bound loose enough for a loaded 2-core host: it read
    over a millisecond there once); a second call reuses the first."""
    fwd, bwd = host_calibration.host_overheads_s("cpu", repeats=3)
    assert 0 < fwd < 1e-2 and 0 < bwd < 1e-2
    assert host_calibration.host_overheads_s("cpu") == (fwd, bwd)


@pytest.mark.gpu
def test_the_gpu_spec_carries_this_hosts_dispatch_speed():
    from partitioner.cost_models.device import spec_for_gpu_name, spec_for_torch_device
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    spec = spec_for_torch_device("cuda:0")
    table = spec_for_gpu_name(torch.cuda.get_device_name(0))
    assert (spec.cpu_fwd_overhead_s, spec.cpu_bwd_overhead_s) == host_calibration.host_overheads_s(torch.device("cuda:0"))
    assert spec.peak_flops == table.peak_flops and 1e-6 < spec.cpu_fwd_overhead_s < 1e-3
    assert spec.compiled_launch_overhead_s == table.compiled_launch_overhead_s


def test_a_slower_eager_host_keeps_the_compiled_launch_cost(monkeypatch):
    """Eager dispatch calibrated 1.5x slower did not predict compiled launches (an H100 host took
    25.6 us a launch, the table's 28 us): only the eager constants follow the calibration."""
    from types import SimpleNamespace

    from partitioner.cost_models import device as device_module
    table = device_module.spec_for_gpu_name("NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(device_module, "host_overheads_s", lambda d: (table.cpu_fwd_overhead_s * 2, table.cpu_bwd_overhead_s * 2))
    spec = device_module.spec_for_torch_device("cuda:0")
    assert spec.cpu_bwd_overhead_s == pytest.approx(2 * table.cpu_bwd_overhead_s)
    assert spec.compiled_launch_overhead_s == table.compiled_launch_overhead_s


def test_a_gemm_overlaps_its_loads_with_its_compute_over_its_main_loop():
    spec = get_device_spec("h200")
    flops, nbytes = 1e12, 1e9
    compute = flops / (spec.flops_per_s(torch.bfloat16) * spec.matmul_efficiency)
    memory = nbytes / (spec.mem_bw_bytes_per_s * spec.mem_bw_efficiency)
    t = lambda k: roofline_time_s(flops, nbytes, 0, spec, torch.bfloat16, reduction=k)  # noqa: E731
    assert t(0) == pytest.approx(compute + memory)  # not a GEMM: the sum
    assert t(64) == pytest.approx(compute + memory)  # one stage of the main loop: nothing overlaps
    assert t(4096) == pytest.approx(max(compute, memory) + min(compute, memory) / 64)
    assert t(0) > t(256) > t(4096) > max(compute, memory)


def test_a_narrow_fp32_gemm_runs_the_cuda_cores_simt_rate_and_k_tile():
    """fp32 GEMMs (TF32 off) with K or N one head wide ran 0.40-0.58 of the fp32 peak on an H100 and an
    H200 alike (T5's math attention): the table's narrow efficiency, over SIMT's 8-deep k-steps."""
    spec = get_device_spec("h100")
    assert spec.narrow_fp32_matmul_efficiency < spec.matmul_efficiency and spec.fp32_gemm_k_tile == 8
    flops, nbytes = 3.22e9, 113e6  # t5-base's encoder scores: 24 x 1024 x 1024 x 64
    memory = nbytes / (spec.mem_bw_bytes_per_s * spec.mem_bw_efficiency)
    narrow = flops / (spec.flops_per_s(torch.float32) * spec.narrow_fp32_matmul_efficiency)
    wide = flops / (spec.flops_per_s(torch.float32) * spec.matmul_efficiency)
    t = lambda k, n, dtype=torch.float32: roofline_time_s(flops, nbytes, 0, spec, dtype, reduction=k, width=n)  # noqa: E731
    assert t(64, 1024) == pytest.approx(narrow + memory / 8)  # scores: K = 64, 8 k-steps of 8
    assert t(1024, 64) == pytest.approx(narrow + memory / 128)  # probabilities x values: N = 64
    assert t(1024, 1024) == pytest.approx(wide + memory / 128)  # wide: the linear layers' rate
    assert 90e-6 < t(64, 1024) < 110e-6  # measured 104 us (H100), 98 us (H200)
    bf16 = spec.flops_per_s(torch.bfloat16) * spec.matmul_efficiency
    assert t(64, 1024, torch.bfloat16) == pytest.approx(flops / bf16 + memory)  # tensor cores: unchanged
    cpu_like = time_model.gemm_efficiency(get_device_spec("h100").__class__(
        "x", {"float32": 1e12}, 1e11, 1, 1, 1, matmul_efficiency=0.9), torch.float32, 64, 64)
    assert cpu_like == 0.9  # no narrow entry in the spec (the CPU's): matmul_efficiency
