"""How good is the analytic cost model? Predicted vs measured time and memory.

For each model and dtype: capture it on the device, profile it analytically
(roofline with the DeviceSpec of this GPU), then measure every block (module
runs at layer depth) forward+backward on the device, and a whole step of the
full graph (steps back to back for about 8 s: the median loop, and each loop's time in the
step row's meas_loops_ms, as a host-bound step's speed moves with the host's). On CUDA also
memory: activations held after the forward (predicted: saved-for-backward bytes) and the step's peak
(torch.cuda.max_memory_allocated; predicted: weights and inputs as allocated, plus
cost_models.memory.training_peak_bytes: a walk of the backward counting saved
activations, gradients in flight, parameter gradients and the running node's workspace).

    python -m benchmarks.cost_model_accuracy                      # GPU: gpt2, llama-1b, t5-base; fp32 + bf16
    python -m benchmarks.cost_model_accuracy --device cpu --quick # tiny configs, runs anywhere

Prints median and p90 relative errors and writes benchmarks/results/cost_model_accuracy.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path
import time
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from partitioner.cost_models.device import spec_for_gpu_name, spec_for_torch_device
from partitioner.cost_models.flops import COMPUTE_OPS, trace_nodes
from partitioner.cost_models.memory import DtypeScale, saved_bytes_per_node, training_peak_bytes, value_bytes
from partitioner.cost_models.profile import default_measure_groups, layer_key, profile
from partitioner.cost_models.host_calibration import host_overheads_s
from partitioner.cost_models.measure import measure_block_times, step_walls_s
from partitioner.cost_models.time import NodeTime
from partitioner import zoo
from partitioner.passes.annotate import annotate
from partitioner.passes.capture import capture

from benchmarks.common import RESULTS_DIR, command_line, print_table, pyplot, save_figure, write_result

# model -> (batch, seq) on a GPU; --quick uses the zoo's small configs with batch 2, seq 16
FULL_SHAPES = {"gpt2": (8, 1024), "llama-1b": (4, 1024), "t5-base": (8, 512)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rel_err(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas > 0 else float("nan")


def percentile(values: list[float], q: float) -> float:
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def _first_tensor(out: Any) -> torch.Tensor:
    for t in (out if isinstance(out, (tuple, list)) else [out]):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    raise RuntimeError("model has no floating output")


class WithLoss(nn.Module):
    """model + loss_fn as one module, so the captured graph holds what the last stage runs."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *args, target, **kwargs):
        return self.loss_fn(self.model(*args, **kwargs), target)


def analytic_costs(name: str, dtype_name: str, device: torch.device | str, quick: bool, spec):
    """Build zoo model `name` (with its loss) on `device`, capture it and cost it analytically with
    `spec`: (zoo model with the target among its kwargs, Captured, AnnotatedGraph, NodeCosts, blocks)."""
    dtype = DTYPES[dtype_name]
    batch, seq = (2, 16) if quick else FULL_SHAPES.get(name, (8, 512))
    zm = zoo.build(name, batch=batch, seq=seq, device=device, dtype=dtype, small=quick)
    zm.model.train()
    if zm.loss_fn is not None and zm.target is not None:
        zm = dataclasses.replace(zm, model=WithLoss(zm.model, zm.loss_fn),
                                 example_kwargs={**zm.example_kwargs, "target": zm.target})
    captured = capture(zm.model, zm.example_args, zm.example_kwargs)
    annotated = annotate(captured)
    costs = profile(captured, annotated, device=spec, dtype=dtype, progress=False)
    groups = default_measure_groups(captured.graph_module, {n.name: n.module_path for n in annotated.nodes})
    return zm, captured, annotated, costs, groups


def block_prediction(costs, group: list[str]) -> dict:
    """The analytic model's time of one block: max(sum GPU, sum host) per pass, and its GPU part."""
    gpu_s = costs.total("fwd_time_s", group) + costs.total("bwd_time_s", group)
    return {"pred_ms": costs.step_time_s(group) * 1e3, "pred_gpu_ms": gpu_s * 1e3}


def measure_model(name: str, dtype_name: str, device: torch.device, quick: bool, repeats: int,
                  per_node: bool = False, profile_step: bool = False) -> tuple[list[dict], dict]:
    """Rows (one per block, one for the step, memory rows on CUDA) and a summary for one model and dtype."""
    zm, captured, annotated, costs, groups = analytic_costs(name, dtype_name, device, quick, spec_for_torch_device(device))
    gm = captured.graph_module
    flat = captured.flatten_inputs(zm.example_args, zm.example_kwargs)
    measured = measure_block_times(gm, groups, flat, device, repeats=repeats, use_cache=False)
    paths = {n.name: n.module_path for n in annotated.nodes}
    rows = []
    for group, meas in zip(groups, measured):
        block = layer_key(paths.get(group[0], "")) or "<root>"
        pred = block_prediction(costs, group)
        m = meas.time_s  # the block alone: max(GPU, host) per pass
        rows.append({"model": name, "dtype": dtype_name, "kind": "block", "block": block, "nodes": len(group),
                     **pred, "meas_ms": m * 1e3, "rel_err": rel_err(pred["pred_ms"], m * 1e3),
                     "meas_gpu_fwd_ms": meas.fwd_s * 1e3, "meas_gpu_bwd_ms": meas.bwd_s * 1e3,
                     "meas_host_fwd_ms": meas.host_fwd_s * 1e3, "meas_host_bwd_ms": meas.host_bwd_s * 1e3})
    # measured mode's prediction of the step: per pass, max(sum of GPU times, sum of host times)
    measured_mode_s = NodeTime.summed(measured).time_s
    blocks_wall_sum_s = sum(r["meas_ms"] for r in rows) / 1e3

    # a whole step: the full graph, forward + backward of the model's loss w.r.t. every parameter
    params = [p for p in gm.parameters() if p.requires_grad]

    def step():
        out = gm(*flat)
        return _first_tensor(out).float().mean()

    walls = step_walls_s(step, device, params, repeats)  # wall time, steps back to back, per loop
    meas_s = statistics.median(walls)
    pred = costs.step_time_s()
    rows.append({"model": name, "dtype": dtype_name, "kind": "step", "block": "<step>", "nodes": len(costs.nodes),
                 "pred_ms": pred * 1e3, "meas_ms": meas_s * 1e3, "rel_err": rel_err(pred, meas_s),
                 "meas_loops_ms": [w * 1e3 for w in walls]})

    if device.type == "cuda":
        rows += _memory_rows(name, dtype_name, device, gm, flat, step, params, costs)
    if per_node:
        rows += _node_rows(name, dtype_name, device, gm, flat, costs, repeats)
    if profile_step and device.type == "cuda":
        rows += _profile_rows(name, dtype_name, step, params)
    summary = {"model": name, "dtype": dtype_name, **analytic_summary(rows)}
    step_s = next(r["meas_ms"] for r in rows if r["kind"] == "step") / 1e3
    summary["measured_mode_vs_step_rel_err"] = rel_err(measured_mode_s, step_s)
    summary["blocks_wall_sum_vs_step_rel_err"] = rel_err(blocks_wall_sum_s, step_s)
    # how far the step's loops strayed from their median (the host's speed varies over seconds)
    summary["step_loops_min_rel"] = rel_err(min(walls), meas_s)
    summary["step_loops_max_rel"] = rel_err(max(walls), meas_s)
    for r in rows:
        if r["kind"].startswith("mem"):
            summary[f"{r['kind']}_rel_err"] = r["rel_err"]
    return rows, summary


def analytic_summary(rows: list[dict]) -> dict:
    """Median and p90 |relative error| of the analytic block times (max of GPU and host sums per
    pass, against the measured blocks), median of their GPU part alone, and the step's error."""
    # blocks of views only (predicted 0) measure the interpreter's own overhead: left out of the stats
    blocks = [r for r in rows if r["kind"] == "block" and r["pred_ms"] > 0]
    errs = [abs(r["rel_err"]) for r in blocks]
    gpu_errs = [abs(rel_err(r["pred_gpu_ms"], r["meas_gpu_fwd_ms"] + r["meas_gpu_bwd_ms"])) for r in blocks
                if "pred_gpu_ms" in r]
    return {"blocks": len(errs), "block_median_abs_rel_err": percentile(errs, 0.5),
            "block_p90_abs_rel_err": percentile(errs, 0.9),
            "block_gpu_median_abs_rel_err": percentile(gpu_errs, 0.5),
            "step_rel_err": next(r["rel_err"] for r in rows if r["kind"] == "step")}


def rescore(name: str, table_host: bool = False) -> Path:
    """Re-predict a stored run's blocks and steps with the current analytic model (no device needed:
    the models are rebuilt on the meta device with the run's shapes and costed with its GPU's
    DeviceSpec, with the host constants the run calibrated, or the table's with table_host);
    measured values and memory rows stay as stored. Rewrites NAME.json and .png."""
    path = RESULTS_DIR / f"{name}.json"
    record = json.loads(path.read_text())
    spec = spec_for_gpu_name(record["device"])
    if record.get("host_overheads_s") and not table_host:  # the run's own host calibration
        fwd, bwd = record["host_overheads_s"]
        spec = dataclasses.replace(spec, cpu_fwd_overhead_s=fwd, cpu_bwd_overhead_s=bwd)
    rows = record["rows"]
    for summary in record["summary"]:
        model, dtype_name = summary["model"], summary["dtype"]
        _, _, _, costs, groups = analytic_costs(model, dtype_name, "meta", record.get("quick", False), spec)
        mine = [r for r in rows if r.get("model") == model and r["dtype"] == dtype_name]
        blocks = [r for r in mine if r["kind"] == "block"]
        if len(blocks) != len(groups):
            raise SystemExit(f"{name}: {model} {dtype_name} has {len(blocks)} stored blocks, the graph {len(groups)}")
        for r, group in zip(blocks, groups):
            r.update(block_prediction(costs, group))
            r["rel_err"] = rel_err(r["pred_ms"], r["meas_ms"])
        step = next(r for r in mine if r["kind"] == "step")
        step["pred_ms"] = costs.step_time_s() * 1e3
        step["rel_err"] = rel_err(step["pred_ms"], step["meas_ms"])
        summary.update(analytic_summary(mine))
    record["rescored"] = f"{command_line()} ({time.strftime('%Y-%m-%d')})"
    record["rescored_host_overheads_s"] = [spec.cpu_fwd_overhead_s, spec.cpu_bwd_overhead_s]
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print_table("summary after rescoring", record["summary"])
    plot(rows, record["device"], path.with_suffix(".png"))
    return path


def _memory_rows(name: str, dtype_name: str, device: torch.device, gm: torch.fx.GraphModule, flat: list,
                 step, params: list[torch.Tensor], costs) -> list[dict]:
    """Activations held after the forward and the step's peak, predicted vs torch.cuda counters."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)  # weights and inputs
    torch.cuda.reset_peak_memory_stats(device)
    loss = step()
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device) - base
    torch.autograd.grad(loss, params)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del loss
    saved = costs.total("saved_bytes")
    traces = trace_nodes(gm)
    pred_peak = base + training_peak_bytes(gm, traces, saved_bytes_per_node(traces))
    gib = 2 ** 30
    return [
        {"model": name, "dtype": dtype_name, "kind": "mem_activations", "block": "<after forward>",
         "nodes": len(costs.nodes), "pred_ms": None, "meas_ms": None,
         "pred_gib": saved / gib, "meas_gib": held / gib, "rel_err": rel_err(saved, held)},
        {"model": name, "dtype": dtype_name, "kind": "mem_peak", "block": "<step peak>",
         "nodes": len(costs.nodes), "pred_ms": None, "meas_ms": None,
         "pred_gib": pred_peak / gib, "meas_gib": peak / gib, "rel_err": rel_err(pred_peak, peak)},
    ]


def _node_rows(name: str, dtype_name: str, device: torch.device, gm: torch.fx.GraphModule, flat: list,
               costs, repeats: int) -> list[dict]:
    """Every computing node measured on its own, with the features the roofline uses (for calibration)."""
    traces = trace_nodes(gm)
    scale = DtypeScale()
    by_name = {n.name: n for n in gm.graph.nodes}
    names = [n.name for n in gm.graph.nodes if n.op in COMPUTE_OPS]
    measured = measure_block_times(gm, [[n] for n in names], flat, device, repeats=repeats, use_cache=False)
    rows, seen = [], set()
    for n, meas in zip(names, measured):
        t = traces[n]
        moved = sum(scale.nbytes(k, dt) for k, dt in t.input_sizes) + value_bytes(t.output, scale)
        target = str(by_name[n].target)
        out_dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in pytree.tree_leaves(t.output)
                             if isinstance(v, torch.Tensor)})
        key = (target, moved, t.fwd_flops, meas.fwd_s)
        if key in seen:
            continue
        seen.add(key)
        c = costs.nodes[n]
        rows.append({"model": name, "dtype": dtype_name, "kind": "node", "block": n, "target": target,
                     "out_dtype": ",".join(out_dtypes), "fwd_flops": t.fwd_flops, "bwd_flops": t.bwd_flops,
                     "bytes": moved, "fwd_kernels": t.fwd_kernels, "bwd_kernels": t.bwd_kernels,
                     "requires_grad": t.requires_grad, "saved_bytes": c.saved_bytes,
                     "pred_fwd_ms": c.fwd_time_s * 1e3, "pred_bwd_ms": c.bwd_time_s * 1e3,
                     "meas_fwd_ms": meas.fwd_s * 1e3, "meas_bwd_ms": meas.bwd_s * 1e3,
                     "meas_host_fwd_ms": meas.host_fwd_s * 1e3, "meas_host_bwd_ms": meas.host_bwd_s * 1e3})
    return rows


def _profile_rows(name: str, dtype_name: str, step, params: list[torch.Tensor]) -> list[dict]:
    """GPU kernel time of one step by kernel name (torch.profiler), plus the step's wall time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    for _ in range(2):
        torch.autograd.grad(step(), params)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        torch.autograd.grad(step(), params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        acc = by_name.setdefault(e.name[:90], [0, 0.0])
        acc[0] += 1
        acc[1] += e.device_time
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:30]
    rows = [{"model": name, "dtype": dtype_name, "kind": "profile", "block": "<kernels>", "kernels": len(kernels),
             "kernel_ms": total / 1e3, "wall_ms": wall * 1e3}]
    rows += [{"model": name, "dtype": dtype_name, "kind": "profile", "block": k, "kernels": v[0], "kernel_ms": v[1] / 1e3}
             for k, v in top]
    return rows


def calibration_rows(device: torch.device) -> list[dict]:
    """Microbenchmarks behind DeviceSpec's efficiency constants: matmul FLOP/s by shape and dtype,
    copy bandwidth, and the eager cost of a tiny op forward and forward+backward."""
    rows = []

    def timed(fn, n=20):
        fn(); torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / n

    rows.append({"kind": "calib", "what": "allow_tf32", "value": torch.backends.cuda.matmul.allow_tf32,
                 "precision": torch.get_float32_matmul_precision()})
    shapes = [(8192, 768, 768), (8192, 768, 3072), (8192, 3072, 768), (8192, 768, 2304), (8192, 768, 50257),
              (8192, 768, 50304), (4096, 768, 32128), (4096, 2048, 2048), (4096, 2048, 8192), (4096, 8192, 2048),
              (4096, 2048, 128256), (4096, 2048, 512), (1024, 768, 768), (8192, 1024, 1024), (16384, 4096, 4096)]
    for dt in (torch.float32, torch.bfloat16):
        for m, k, n in shapes:
            x = torch.randn(m, k, device=device, dtype=dt, requires_grad=True)
            w = torch.randn(n, k, device=device, dtype=dt, requires_grad=True)
            fwd = timed(lambda: torch.nn.functional.linear(x, w))
            y = torch.nn.functional.linear(x, w)
            g = torch.randn_like(y)
            bwd = timed(lambda: torch.autograd.grad(y, (x, w), g, retain_graph=True))
            fl = 2 * m * k * n
            rows.append({"kind": "calib", "what": "linear", "dtype": str(dt), "shape": [m, k, n],
                         "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "fwd_tflops": fl / fwd / 1e12,
                         "bwd_tflops": 2 * fl / bwd / 1e12})
            del x, w, y, g
        for b, h, s, d in ((8, 12, 1024, 64), (8, 12, 512, 64), (4, 32, 1024, 64)):
            q = torch.randn(b, h, s, d, device=device, dtype=dt, requires_grad=True)
            kk = torch.randn(b, h, d, s, device=device, dtype=dt, requires_grad=True)
            fwd = timed(lambda: torch.matmul(q, kk))
            fl = 2 * b * h * s * s * d
            rows.append({"kind": "calib", "what": "bmm_qk", "dtype": str(dt), "shape": [b, h, s, d],
                         "fwd_ms": fwd * 1e3, "fwd_tflops": fl / fwd / 1e12})
            qq = q.detach().requires_grad_(True)
            kv = torch.randn(b, h, s, d, device=device, dtype=dt, requires_grad=True)
            for causal in (False, True):
                fwd = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qq, kv, kv, is_causal=causal))
                o = torch.nn.functional.scaled_dot_product_attention(qq, kv, kv, is_causal=causal)
                g = torch.randn_like(o)
                bwd = timed(lambda: torch.autograd.grad(o, (qq, kv), g, retain_graph=True))
                rows.append({"kind": "calib", "what": f"sdpa_causal{causal}", "dtype": str(dt), "shape": [b, h, s, d],
                             "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "fwd_tflops": 2 * fl / fwd / 1e12,
                             "bwd_tflops": 5 * fl / bwd / 1e12})
            mask = torch.zeros(b, 1, s, s, device=device, dtype=dt)
            fwd = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qq, kv, kv, attn_mask=mask))
            o = torch.nn.functional.scaled_dot_product_attention(qq, kv, kv, attn_mask=mask)
            g = torch.randn_like(o)
            bwd = timed(lambda: torch.autograd.grad(o, (qq, kv), g, retain_graph=True))
            rows.append({"kind": "calib", "what": "sdpa_mask", "dtype": str(dt), "shape": [b, h, s, d],
                         "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, "fwd_tflops": 2 * fl / fwd / 1e12,
                         "bwd_tflops": 5 * fl / bwd / 1e12})
    for mib in (1, 16, 256, 1024):
        x = torch.empty(mib * 2 ** 20 // 4, device=device)
        y = torch.empty_like(x)
        t = timed(lambda: y.copy_(x))
        t_add = timed(lambda: torch.add(x, x, out=y))
        rows.append({"kind": "calib", "what": "copy", "mib": mib, "copy_gbps": 2 * x.nbytes / t / 1e9,
                     "add_gbps": 2 * x.nbytes / t_add / 1e9, "copy_us": t * 1e6})
    small = torch.randn(8, device=device, requires_grad=True)
    rows.append({"kind": "calib", "what": "tiny_op_fwd_nograd_us",
                 "value": timed(lambda: torch.add(small.detach(), 1), 2000) * 1e6})
    rows.append({"kind": "calib", "what": "tiny_op_fwd_grad_us", "value": timed(lambda: torch.add(small, 1), 2000) * 1e6})

    def chain():
        y = small
        for _ in range(50):
            y = y * 1.0001
        torch.autograd.grad(y.sum(), small)
    rows.append({"kind": "calib", "what": "tiny_op_chain50_fwd_bwd_us_per_op", "value": timed(chain, 50) * 1e6 / 50})
    return rows


def plot(rows: list[dict], device_name: str, path: Path) -> Path:
    """Predicted vs measured scatter: fwd+bwd time per block and per step (log-log), and memory."""
    plt = pyplot()
    rows = [r for r in rows if "model" in r]  # calibration rows are not per model
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [1.4, 1]})
    keys = sorted({(r["model"], r["dtype"]) for r in rows})
    colours = dict(zip(keys, plt.cm.tab10.colors))
    for key in keys:
        mine = [r for r in rows if (r["model"], r["dtype"]) == key]
        blocks = [r for r in mine if r["kind"] == "block" and r["meas_ms"] and r["pred_ms"]]
        steps = [r for r in mine if r["kind"] == "step"]
        label = f"{key[0]} {key[1]}"
        ax_t.scatter([r["meas_ms"] for r in blocks], [r["pred_ms"] for r in blocks], s=14, alpha=0.6,
                     color=colours[key], label=label)
        ax_t.scatter([r["meas_ms"] for r in steps], [r["pred_ms"] for r in steps], s=90, marker="*",
                     color=colours[key], edgecolor="black", linewidth=0.5)
        for kind, marker in (("mem_activations", "o"), ("mem_peak", "s")):
            mem = [r for r in mine if r["kind"] == kind]
            ax_m.scatter([r["meas_gib"] for r in mem], [r["pred_gib"] for r in mem], marker=marker, s=40,
                         color=colours[key])
    for ax, unit in ((ax_t, "ms"), (ax_m, "GiB")):
        lo, hi = ax.get_xlim()[0], max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], "k--", linewidth=0.8, label="predicted = measured")
        ax.set_xlabel(f"measured ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
    ax_t.set_xscale("log")
    ax_t.set_yscale("log")
    ax_t.set_title("forward+backward time: blocks (dots), whole step (stars)")
    ax_m.set_title("memory: activations after forward (o), step peak (s)")
    ax_t.legend(fontsize=8, loc="upper left")
    save_figure(fig, path, f"analytic cost model vs measurement on {device_name}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny configs (batch 2, seq 16): for CPU smoke runs")
    parser.add_argument("--models", default="gpt2,llama-1b,t5-base")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-node", action="store_true", help="also measure every node alone (calibration data)")
    parser.add_argument("--profile", action="store_true", help="also break each step down by GPU kernel")
    parser.add_argument("--calibrate", action="store_true", help="also run matmul/bandwidth/overhead microbenchmarks")
    parser.add_argument("--name", default="cost_model_accuracy", help="result name under benchmarks/results")
    parser.add_argument("--rescore", action="store_true",
                        help="re-predict the stored NAME.json's blocks and steps with the current analytic model "
                             "(no device needed; measurements kept)")
    parser.add_argument("--table-host", action="store_true",
                        help="with --rescore: the DeviceSpec table's host constants, not the run's calibration")
    parser.add_argument("--plot-only", action="store_true",
                        help="only redraw benchmarks/results/NAME.png from NAME.json (no measuring)")
    args = parser.parse_args(argv)
    if args.rescore:
        print(f"wrote {rescore(args.name, args.table_host)}")
        return 0
    if args.plot_only:
        record = json.loads((RESULTS_DIR / f"{args.name}.json").read_text())
        print(f"wrote {plot(record['rows'], record['device'], RESULTS_DIR / f'{args.name}.png')}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --quick", file=sys.stderr)
        return 2

    rows, summaries = [], []
    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            print(f"{name} {dtype_name} on {device} ...", flush=True)
            r, s = measure_model(name, dtype_name, device, args.quick, args.repeats, args.per_node, args.profile)
            rows += r
            summaries.append(s)
    if args.calibrate and device.type == "cuda":
        rows += calibration_rows(device)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    printable = [{k: v for k, v in r.items() if v is not None and not isinstance(v, list)} for r in rows
                 if r["kind"] in ("block", "step") or r["kind"].startswith("mem")]
    print_table(f"cost model accuracy on {device_name}: predicted (roofline) vs measured", printable)
    print_table("summary: |relative error| of fwd+bwd time per block, step and memory", summaries)
    extra = {"device": device_name, "quick": args.quick, "summary": summaries}
    if device.type == "cuda":  # the analytic predictions used this host's calibration
        extra["host_overheads_s"] = list(host_overheads_s(device))
    path = write_result(args.name, rows, extra=extra)
    plot(rows, device_name, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
