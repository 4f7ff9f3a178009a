"""How good is the analytic cost model? Predicted vs measured time and memory.

For each model and dtype: capture it on the device, profile it analytically
(roofline with the DeviceSpec of this GPU), then measure every block (module
runs at layer depth) forward+backward on the device, and a whole step of the
full graph. On CUDA also memory: activations held after the forward
(predicted: saved-for-backward bytes) and the step's peak
(torch.cuda.max_memory_allocated; predicted: weights + gradients + saved
activations + the largest single output).

    python -m benchmarks.cost_model_accuracy                      # GPU: gpt2, llama-1b, t5-base; fp32 + bf16
    python -m benchmarks.cost_model_accuracy --device cpu --quick # tiny configs, runs anywhere

Prints median and p90 relative errors and writes benchmarks/results/cost_model_accuracy.json.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from cost_models.device import spec_for_torch_device
from cost_models.profile import default_measure_groups, layer_key, profile
from cost_models.time import measure_block_times, time_fwd_bwd
from partitioner import zoo
from passes.annotate import annotate
from passes.capture import capture

try:
    from benchmarks.common import print_table, write_result
except ImportError:  # the shared helpers are optional: fall back to plain JSON
    print_table = write_result = None

# model -> (batch, seq) on a GPU; --quick uses the zoo's small configs with batch 2, seq 16
FULL_SHAPES = {"gpt2": (8, 1024), "llama-1b": (4, 1024), "t5-base": (8, 512)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def rel_err(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas > 0 else float("nan")


def percentile(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def _first_tensor(out: Any) -> torch.Tensor:
    for t in (out if isinstance(out, (tuple, list)) else [out]):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    raise RuntimeError("model has no floating output")


def measure_model(name: str, dtype_name: str, device: torch.device, quick: bool, repeats: int) -> tuple[list[dict], dict]:
    """Rows (one per block, one for the step, memory rows on CUDA) and a summary for one model and dtype."""
    dtype = DTYPES[dtype_name]
    batch, seq = (2, 16) if quick else FULL_SHAPES.get(name, (8, 512))
    zm = zoo.build(name, batch=batch, seq=seq, device=device, dtype=dtype, small=quick)
    zm.model.train()
    captured = capture(zm.model, zm.example_args, zm.example_kwargs)
    annotated = annotate(captured)
    spec = spec_for_torch_device(device)
    costs = profile(captured, annotated, device=spec, dtype=dtype)
    gm = captured.graph_module
    flat = captured.flatten_inputs(zm.example_args, zm.example_kwargs)

    paths = {n.name: n.module_path for n in annotated.nodes}
    groups = default_measure_groups(gm, paths)
    measured = measure_block_times(gm, groups, flat, device, repeats=repeats, use_cache=False)
    rows = []
    for group, meas in zip(groups, measured):
        pred = sum(costs.nodes[n].fwd_time_s + costs.nodes[n].bwd_time_s for n in group)
        block = layer_key(paths.get(group[0], "")) or "<root>"
        m = meas.fwd_s + meas.bwd_s
        rows.append({"model": name, "dtype": dtype_name, "kind": "block", "block": block, "nodes": len(group),
                     "pred_ms": pred * 1e3, "meas_ms": m * 1e3, "rel_err": rel_err(pred, m)})

    # a whole step: the full graph, forward + backward of the model's loss w.r.t. every parameter
    params = [p for p in gm.parameters() if p.requires_grad]

    def step():
        out = captured.unflatten_outputs(list(gm(*flat)))
        if zm.loss_fn is not None and zm.target is not None:
            return zm.loss_fn(out, zm.target)
        return _first_tensor(out).float().mean()

    meas = time_fwd_bwd(step, device, params, warmup=2, repeats=repeats)
    pred = costs.total("fwd_time_s") + costs.total("bwd_time_s")
    rows.append({"model": name, "dtype": dtype_name, "kind": "step", "block": "<step>", "nodes": len(costs.nodes),
                 "pred_ms": pred * 1e3, "meas_ms": (meas.fwd_s + meas.bwd_s) * 1e3,
                 "rel_err": rel_err(pred, meas.fwd_s + meas.bwd_s)})

    if device.type == "cuda":
        rows += _memory_rows(name, dtype_name, device, gm, flat, step, params, costs)
    # blocks of views only (predicted 0) measure the interpreter's own overhead: left out of the stats
    block_errs = [abs(r["rel_err"]) for r in rows if r["kind"] == "block" and r["pred_ms"] > 0]
    summary = {"model": name, "dtype": dtype_name, "blocks": len(block_errs),
               "block_median_abs_rel_err": percentile(block_errs, 0.5),
               "block_p90_abs_rel_err": percentile(block_errs, 0.9),
               "step_rel_err": next(r["rel_err"] for r in rows if r["kind"] == "step")}
    for r in rows:
        if r["kind"].startswith("mem"):
            summary[f"{r['kind']}_rel_err"] = r["rel_err"]
    return rows, summary


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
    weights = sum(p.numel() * p.element_size() for p in params)
    saved = costs.total("saved_bytes")
    largest_output = max(c.output_bytes for c in costs.nodes.values())
    pred_peak = base + weights + saved + largest_output  # + a gradient of every weight at the end of backward
    gib = 2 ** 30
    return [
        {"model": name, "dtype": dtype_name, "kind": "mem_activations", "block": "<after forward>",
         "nodes": len(costs.nodes), "pred_ms": None, "meas_ms": None,
         "pred_gib": saved / gib, "meas_gib": held / gib, "rel_err": rel_err(saved, held)},
        {"model": name, "dtype": dtype_name, "kind": "mem_peak", "block": "<step peak>",
         "nodes": len(costs.nodes), "pred_ms": None, "meas_ms": None,
         "pred_gib": pred_peak / gib, "meas_gib": peak / gib, "rel_err": rel_err(pred_peak, peak)},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny configs (batch 2, seq 16): for CPU smoke runs")
    parser.add_argument("--models", default="gpt2,llama-1b,t5-base")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --quick", file=sys.stderr)
        return 2

    rows, summaries = [], []
    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            print(f"{name} {dtype_name} on {device} ...", flush=True)
            r, s = measure_model(name, dtype_name, device, args.quick, args.repeats)
            rows += r
            summaries.append(s)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    printable = [{k: v for k, v in r.items() if v is not None} for r in rows]
    if print_table is not None:
        print_table(f"cost model accuracy on {device_name}: predicted (roofline) vs measured", printable)
        print_table("summary: |relative error| of fwd+bwd time per block, step and memory", summaries)
        path = write_result("cost_model_accuracy", rows,
                            extra={"device": device_name, "quick": args.quick, "summary": summaries})
    else:
        import json
        import platform
        from pathlib import Path
        path = Path(__file__).resolve().parent / "results" / "cost_model_accuracy.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": device_name, "torch_version": torch.__version__,
                                    "command": " ".join(sys.argv), "platform": platform.platform(),
                                    "rows": rows, "summary": summaries}, indent=2, default=str))
        for s in summaries:
            print(s)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
