"""benchmarks/executor_vs_torch.py and benchmarks/gpu_runtime.py still run end to end (tiny configs, in a
subprocess with a timeout), write their JSON and PNG, and find our executor's loss and gradients equal to
torch.distributed.pipelining's on the same stages."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps", "2", "--warmup", "1", "--blocks", "4", "--dim", "64", "--microbatches", "2"]


def run_benchmark(module: str, args: list[str], out: Path, timeout_s: float = 50.0) -> dict:
    cmd = [sys.executable, "-W", "ignore", "-m", module, *args, "--results-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    (path,) = out.glob("*.json")
    assert path.with_suffix(".png").stat().st_size > 10_000
    return json.loads(path.read_text())


@pytest.mark.parametrize("mode", ["dist", "one-process"])
def test_executor_vs_torch_runs_and_matches_torch(mode, tmp_path):
    args = ["--quick", "--mode", mode, "--ranks", "2", "--stages", "2", *TINY]
    result = run_benchmark("benchmarks.executor_vs_torch", args, tmp_path)
    pairs = [r for r in result["rows"] if r.get("torch_ms") is not None]
    want = [("1f1b", 2, 1), ("interleaved-1f1b", 2, 2)] if mode == "dist" else [("interleaved-1f1b", 1, 2)]
    assert [(r["schedule"], r["ranks"], r["chunks"]) for r in pairs] == want
    for r in pairs:
        assert r["grad_rel_err"] < 1e-5 and r["loss_abs_err"] < 1e-5, r
        assert r["ours_ms"] > 0 and r["torch_ms"] > 0 and r["pred_ms"] > 0
        assert r["ratio"] == pytest.approx(r["ours_ms"] / r["torch_ms"])
    assert result["summary"]["max_ratio"] == pytest.approx(max(r["ratio"] for r in pairs))


def test_gpu_runtime_runs_on_cpu(tmp_path):
    args = ["--device", "cpu", "--quick", "--steps", "2", "--warmup", "1", "--stages", "1,2"]
    result = run_benchmark("benchmarks.gpu_runtime", args, tmp_path)
    rows = result["rows"]
    assert [r["stages"] for r in rows] == [1, 1, 2]
    assert rows[0]["overhead_pct"] == 0
    # more stages keep at least as many activations in flight under 1F1B
    assert rows[2]["pred_peak_mib"] >= rows[1]["pred_peak_mib"] > 0
    assert all(r["meas_peak_mib"] is None for r in rows)  # measured only on CUDA


def test_train_throughput_runs_on_cpu(tmp_path):
    """Eager configurations only (compiling on 2 CPU cores takes minutes): ours with both plans and
    schedules and as compile_parallel defaults (eager on the CPU), torch.distributed.pipelining in one
    process, and the plain model; the host's speed timed before every round."""
    configs = ("plain-eager,ours-default,ours-eager-1f1b-ilp,ours-eager-1f1b-uniform,ours-eager-interleaved-ilp,"
               "torch-eager-1f1b")
    args = ["--small", "--device", "cpu", "--models", "gpt2", "--precision", "bf16-mixed", "--seq", "16",
            "--rounds", "3", "--warmup", "1", "--time-limit", "1", "--chunks", "2", "--configs", configs,
            "--host-rounds"]
    result = run_benchmark("benchmarks.train_throughput", args, tmp_path, timeout_s=240)
    rows = result["rows"]
    record = result["host_rounds"]["gpt2 bf16-mixed"]
    assert len(record["hosts"]) == 3 and all(h["fwd_node_us"] > 0 for h in record["hosts"])
    assert set(record["train_s"]) == set(configs.split(",")) and all(len(t) == 3 for t in record["train_s"].values())
    assert all(-1 <= r.get("corr_python_loop_ms", 0) <= 1 for r in rows)
    assert {(r["precision"], r["config"]) for r in rows} == {(p, c) for p in ("bf16-mixed",)
                                                             for c in configs.split(",")}
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["step_s"] >= r["train_s"] > 0
        assert (r["pred_train_s"] is not None) == r["config"].startswith("ours")


def test_data_parallel_runs_under_torchrun_on_cpu(tmp_path):
    """2 gloo ranks: the pipeline alone (1x2) and FSDP / replicate alone (2x1) on the same global batch."""
    cmd = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
           "benchmarks.data_parallel", "--device", "cpu", "--small", "--model", "gpt2", "--seq", "16",
           "--global-batch", "8", "--rounds", "2", "--warmup", "1", "--time-limit", "1",
           "--modes", "fsdp,replicate", "--results-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "data_parallel_2cpu.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["dp1xpp2", "dp2xpp1-fsdp", "dp2xpp1-replicate"]
    assert all(r["tokens_per_s"] > 0 for r in rows) and rows[0]["x_first"] == 1.0


def test_host_overhead_labels_every_action_on_cpu(tmp_path):
    args = ["--small", "--device", "cpu", "--model", "gpt2", "--seq", "16", "--stages", "2", "--microbatches", "4",
            "--warmup", "1", "--time-limit", "1", "--precision", "fp32", "--variants",
            "serial-backward,autograd-accumulate", "--python-profile", "1"]
    cmd = [sys.executable, "-W", "ignore", "-m", "benchmarks.host_overhead", *args, "--results-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["config"]: r for r in json.loads((tmp_path / "host_overhead_cpu.json").read_text())["rows"]}
    assert sorted(rows) == ["ours-2-stages", "ours-2-stages-autograd-accumulate", "ours-2-stages-serial-backward",
                            "plain", "plain-serial-backward"]
    plain, ours = rows["plain"], rows["ours-2-stages"]
    assert plain["actions"] == 0 and ours["actions"] == 2 * 2 * 4  # F and B of 2 stages x 4 microbatches
    assert rows["ours-2-stages-serial-backward"]["actions"] == ours["actions"]
    assert rows["ours-2-stages-autograd-accumulate"]["actions"] == ours["actions"]
    assert "executor.py" in (tmp_path / "host_overhead_cpu_ours-2-stages.pyprof.txt").read_text()
    assert 0 < ours["host_actions_ms"] <= ours["wall_ms"] * 1.01 and ours["pred_serial_ms"] > 0
    assert (tmp_path / "host_overhead_cpu_ours-2-stages.trace.json").stat().st_size > 1000


def test_idle_attribution_charges_host_ops_with_the_device_gaps_they_overlap():
    from types import SimpleNamespace as NS

    import torch

    from benchmarks.host_overhead import busy_s, gap_split, idle_attribution, idle_spans, kernel_spans
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, a, b, dev):
        return NS(name=name, time_range=NS(start=a, end=b), device_type=dev)
    kernels = [ev("k", 0, 10, cuda), ev("k", 5, 20, cuda), ev("k", 30, 40, cuda), ev("k", 45, 50, cuda)]
    spans = kernel_spans(kernels, cuda)
    assert spans == [(0, 20), (30, 40), (45, 50)] and busy_s(spans) == pytest.approx(35e-6)
    gaps = idle_spans(spans)
    assert gaps == [(20, 30), (40, 45)]
    host = [ev("slow_op", 15, 32, cpu), ev("outer", 0, 50, cpu), ev("busy_only", 0, 10, cpu)]
    text = idle_attribution(kernels + host, gaps)
    assert text.startswith("outer 0.0ms") and "slow_op" in text and "busy_only" not in text
    assert idle_attribution(kernels + [ev("x", 21, 44, cpu)], gaps) == "x 0.0ms"  # 9 + 4 us
    # the 10 us gap waits for the host; the 5 us one is the device's own kernel-to-kernel latency
    assert gap_split(gaps) == {"short_gaps": 1, "short_idle_ms": 0.005, "long_gaps": 1, "long_idle_ms": 0.01}


def _span(name: str, ts: float, dur: float, **extra) -> dict:
    """A host span of a chrome trace (an executor action's when `name` is `partitioner.<action>`)."""
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, **extra}


def _launch(ts: float, correlation: int, cat: str = "cuda_runtime") -> dict:
    """The host's kernel launch with the correlation id its kernel carries."""
    name = "cudaLaunchKernel" if cat == "cuda_runtime" else "cuLaunchKernel"
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": 1, "args": {"correlation": correlation}}


def _kernel(name: str, ts: float, dur: float, correlation: int) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def test_stage_device_ms_charges_kernels_to_the_action_that_launched_them():
    from benchmarks.host_overhead import kernels_by_action, stage_comparison, stage_device_ms
    from types import SimpleNamespace
    events = [
        _span("partitioner.0F0", 0, 10), _span("partitioner.0F1", 10, 10), _span("partitioner.0B0", 20, 10),
        _span("partitioner.0B0", 24, 0, cat="gpu_user_annotation"),  # on the GPU's time
        _launch(2, 1), _launch(12, 2, cat="cuda_driver"), _launch(25, 3), _launch(40, 4),
        # kernels run after their launch, in later actions' time: charged by correlation, not by time
        _kernel("gemm", 15, 3000, 1), _kernel("gemm", 25, 5000, 2), _kernel("gemm", 35, 8000, 3),
        _kernel("outside", 45, 999, 4),
    ]
    assert stage_device_ms(events) == {"0F": 4.0, "0B": 8.0}
    assert kernels_by_action(events) == {"0F": {"microbatches": 2, "kernels": {"gemm": [2, 8000]}},
                                         "0B": {"microbatches": 1, "kernels": {"gemm": [1, 8000]}}}
    plain = [e for e in events if not e["name"].startswith("partitioner.")]  # no actions: the whole step
    assert kernels_by_action(plain) == {"step": {"microbatches": 1, "kernels": {"gemm": [3, 16000],
                                                                                "outside": [1, 999]}}}
    plan = SimpleNamespace(stage_fwd_time_s=[0.004], stage_bwd_time_s=[0.010])
    assert stage_comparison(stage_device_ms(events), plan) == "0F 4.00/4.00 ms, 0B 8.00/10.00 ms"


def test_kernels_vs_plan_prints_measured_kernels_next_to_the_prediction(tmp_path, capsys):
    from benchmarks.kernels_vs_plan import kernel_kind, main
    assert [kernel_kind(k) for k in ("triton_poi_fused_add_0", "nvjet_sm90_tst_128x256", "cudnn_sdpa_flash_fprop",
                                     "void at::native::vectorized_elementwise_kernel")] == \
        ["triton", "gemm", "attention", "other"]
    kernels = {"microbatches": 4, "node_stage": None,
               "groups": {"step": {"microbatches": 1, "kernels": {"nvjet_sm90_tst_128x256": [8, 4000.0],
                                                                  "triton_poi_fused_add_0": [40, 400.0]}}}}
    path = tmp_path / "plain.kernels.json"
    path.write_text(json.dumps(kernels))
    assert main([str(path), "--model", "gpt2", "--seq", "32", "--device", "h100"]) == 0
    out = capsys.readouterr().out
    assert "step" in out and "1.1" in out  # 4.4 ms of kernels over 4 microbatches


def test_graph_pools_peak_counts_live_bytes_per_pool():
    """benchmarks.graph_pools reads a pool's peak of live tensors from torch's memory trace."""
    from benchmarks.graph_pools import pool_peaks
    frames = [{"filename": "torch/x.py", "line": 1, "name": "f"}]
    snapshot = {"segments": [{"address": 0, "total_size": 100, "segment_pool_id": (0, 1)},
                             {"address": 1000, "total_size": 100, "segment_pool_id": (0, 0)}],
                "device_traces": [[{"action": "alloc", "addr": 0, "size": 40, "frames": frames},
                                   {"action": "alloc", "addr": 40, "size": 30, "frames": frames},
                                   {"action": "free_requested", "addr": 0, "size": 40},
                                   {"action": "alloc", "addr": 1000, "size": 10, "frames": []},
                                   {"action": "alloc", "addr": 70, "size": 20, "frames": frames}]]}
    peak, at_peak = pool_peaks(snapshot)
    assert peak == {"(0, 1)": 70, "(0, 0)": 10}
    assert at_peak["(0, 1)"] == {"x.py:1:f": 70}


def test_action_spans_take_each_action_s_compute_kernels_and_count_communication_apart():
    from benchmarks.pipeline_timeline import action_spans, measured_timeline
    from partitioner.runtime.schedules import make_schedule
    events = [
        _span("partitioner.timeline_origin", 100, 0), _span("partitioner.0F0", 110, 10), _span("partitioner.0B0", 120, 10),
        _launch(111, 1), _launch(112, 2), _launch(113, 3), _launch(121, 4),
        _kernel("gemm", 150, 40, 1), _kernel("ncclDevKernel_SendRecv", 190, 500, 2), _kernel("triton_poi", 200, 10, 3),
        _kernel("gemm", 210, 90, 4),
    ]
    spans = action_spans(events, on_device=True)
    assert spans == {"actions": {"0F0": [50, 110, 50], "0B0": [110, 200, 90]}, "comm_us": 500}
    assert action_spans(events, on_device=False)["actions"] == {"0F0": [10, 20, 10], "0B0": [20, 30, 10]}
    tl = measured_timeline(make_schedule("1f1b", 1, 1), [spans])
    (f, b), = make_schedule("1f1b", 1, 1).actions
    assert [tl.start_s[f], tl.end_s[f], tl.start_s[b], tl.end_s[b]] == pytest.approx([0.0, 60e-6, 60e-6, 150e-6])
    assert tl.step_time_s == pytest.approx(150e-6) and tl.bubble == pytest.approx(1 - 140 / 150)


def test_one_process_timelines_run_every_stage_on_one_device():
    """Several stages in one process share its one GPU: the simulated step is their serial work (not the
    pipeline's overlap across ranks) and the bubble is the idle fraction of that one device."""
    from types import SimpleNamespace

    from benchmarks.pipeline_timeline import measured_timeline, simulated_timeline
    from partitioner.runtime.schedules import make_schedule
    plan = SimpleNamespace(stage_fwd_time_s=[1.0, 2.0], stage_bwd_time_s=[3.0, 4.0], stage_comm_time_s=[0.0, 0.5])
    schedule = make_schedule("1f1b", 2, 4)
    assert simulated_timeline(plan, schedule).step_time_s < 4 * 10.0
    serial = simulated_timeline(plan, schedule, one_device=True)
    assert serial.step_time_s == pytest.approx(4 * 10.0) and serial.bubble == 0.0
    spans = {"actions": {str(a): [serial.start_s[a] * 1e6, serial.end_s[a] * 1e6,
                                  (serial.end_s[a] - serial.start_s[a]) * 1e6] for row in schedule.actions for a in row}}
    assert measured_timeline(schedule, [spans, spans], devices=1).bubble == pytest.approx(0.0)
    assert measured_timeline(schedule, [spans, spans]).bubble == pytest.approx(0.5)


def test_train_throughput_timeline_under_torchrun_on_cpu(tmp_path):
    """2 gloo ranks: each configuration's profiled step as a measured timeline beside the plan's simulated one;
    ours-auto runs what the planner chose on every rank."""
    configs = "ours-eager-1f1b-ilp,ours-eager-interleaved-ilp,ours-auto"
    cmd = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
           "benchmarks.train_throughput", "--small", "--device", "cpu", "--models", "gpt2", "--precision", "fp32",
           "--seq", "16", "--rounds", "1", "--warmup", "1", "--time-limit", "1", "--chunks", "2", "--configs", configs,
           "--timeline", "--name", "tl", "--results-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "tl.json").read_text())["rows"]
    assert [r["config"] for r in rows] == configs.split(",")
    assert [r["chunks"] for r in rows[:2]] == [1, 2] and rows[2]["chunks"] in (1, 2, 4)
    for r in rows:
        assert r["measured_step_ms"] > 0 and r["simulated_step_ms"] > 0 and 0 <= r["measured_bubble"] < 1
        assert r["fwd_device_over_plan"] > 0 and r["bwd_device_over_plan"] > 0 and len(r["comm_kernel_ms"]) == 2
        # passes beside a waiting send against passes beside none: the split the interleaving question needs
        assert all(k in r for k in ("fwd_over_plan_beside_waiting_sends", "fwd_over_plan_alone",
                                    "bwd_over_plan_beside_waiting_sends", "bwd_over_plan_alone"))
        assert r["fwd_over_plan_alone"] is not None and r["fwd_over_plan_alone"] > 0
        for which in ("measured", "simulated"):
            assert (tmp_path / f"tl_gpt2_fp32_{r['config']}_{which}.png").stat().st_size > 10_000


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_gemm_layouts_says_it_needs_a_gpu(capsys):
    from benchmarks.gemm_layouts import SHAPES, main
    assert main([]) == 1 and "needs a CUDA GPU" in capsys.readouterr().err
    assert SHAPES["gpt2-xl qkv"] == (2048, 1600, 4800) and len(SHAPES) == 21


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_resident_kernels_says_it_needs_a_gpu(capsys):
    from benchmarks.resident_kernels import GEMMS, main
    assert main([]) == 1 and "needs a CUDA GPU" in capsys.readouterr().err
    assert GEMMS["fc 2048x1600x6400"] == (2048, 1600, 6400)
