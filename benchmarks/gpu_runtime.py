"""The runtime's own cost on one device: several stages in one process vs the plain model.

The same GPT-2 (partitioner.zoo) trains one step, fwd+bwd of every microbatch,
in three ways on one device:
- plain: the unpartitioned model, gradient accumulation over the microbatches
  (loss / microbatches per microbatch): the floor;
- ours, S stages: compile_parallel(model, [device] * S, ..., schedule="1f1b",
  plan=even_plan(...)): S virtual ranks driven by the in-process executor on the
  same device (S = 1 isolates the executor's bookkeeping from the split).
Nothing runs in parallel, so every millisecond above plain is overhead: the
split graph, the executor's actions and the in-process transport. Plans are
explicit (even_plan), so no ILP and no ortools are needed.

Memory (CUDA only, torch.cuda.max_memory_allocated): the peak of a step above
what was resident before it, plus the model's own weights. Predicted with the
cost model: weights + gradients + the most saved-for-backward activations held
at once (a walk over the executor's action order: F adds the stage's
saved_bytes, B frees them) + the largest single node output.

    python -m benchmarks.gpu_runtime                       # CUDA: gpt2 124M, batch 16 x 512, 4 microbatches
    python -m benchmarks.gpu_runtime --device cpu --quick  # tiny gpt2, runs anywhere

Writes benchmarks/results/gpu_runtime.json (gpu_runtime_cpu.json on CPU) and a PNG with the same name.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks import common
from benchmarks.common import print_table, pyplot, quantile, save_figure, timed, write_result
from partitioner.cost_models.profile import profile
from partitioner.cost_models.measure import synchronize
from partitioner import zoo
from partitioner.api import ParallelModel, compile_parallel
from partitioner.passes.capture import capture
from partitioner.passes.split import even_plan

MiB = 2 ** 20


@dataclass
class Runner:
    """One way of training a step: `step()` runs fwd+bwd of the batch, `zero()` drops the gradients."""

    name: str
    stages: int
    step: Callable[[], Any]
    zero: Callable[[], None]
    param_bytes: int
    pred_peak_bytes: int


def param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())


def predicted_peak_bytes(costs, node_stage: dict[str, int] | None, order, weights: int) -> int:
    """weights + gradients + most saved activations held at once + the largest single output.

    node_stage / order: the plan's node -> stage and the executor's action order; None for the
    plain model, which holds one microbatch's activations at a time.
    """
    largest_output = max(c.output_bytes for c in costs.nodes.values())
    if node_stage is None:
        return 2 * weights + int(costs.total("saved_bytes")) + largest_output
    saved: dict[int, int] = {}
    for name, c in costs.nodes.items():
        if name in node_stage:
            saved[node_stage[name]] = saved.get(node_stage[name], 0) + c.saved_bytes
    held = most = 0
    for a in order:
        held += saved.get(a.stage, 0) if a.kind == "F" else -saved.get(a.stage, 0)
        most = max(most, held)
    return 2 * weights + most + largest_output


def make_runners(zm: zoo.ZooModel, device: torch.device, microbatches: int, stage_counts: list[int]) -> list[Runner]:
    """The plain model and our S-stage pipelines; zm (model and batch) must already be on `device`:
    capture bakes the device of constants (e.g. GPT-2's position ids) into the graph."""
    args, target = zm.example_args, zm.target
    mb_args = tuple(a[: a.shape[0] // microbatches] for a in args)
    captured = capture(zm.model, mb_args)
    costs = profile(captured, progress=False)  # only bytes are used: they do not depend on the device spec

    plain = copy.deepcopy(zm.model)

    def plain_step():
        for mb_x, mb_y in zip(zip(*(a.chunk(microbatches) for a in args)), target.chunk(microbatches)):
            (zm.loss_fn(plain(*mb_x), mb_y) / microbatches).backward()

    weights = param_bytes(plain.parameters())
    runners = [Runner("plain, grad accumulation", 1, plain_step, lambda: plain.zero_grad(set_to_none=True),
                      weights, predicted_peak_bytes(costs, None, None, weights))]
    for s in stage_counts:
        plan = even_plan(captured, s, 1, "1f1b", microbatches)
        pm: ParallelModel = compile_parallel(zm.model, [device] * s, args, zm.loss_fn,
                                             microbatches=microbatches, schedule="1f1b", plan=plan)
        w = param_bytes(pm.parameters())
        runners.append(Runner(f"ours, {s} stage{'s' if s > 1 else ''}", s,
                              lambda pm=pm: pm.train_step(*args, target=target), pm.zero_grad, w,
                              predicted_peak_bytes(costs, plan.node_stage, pm.executor.order, w)))
    return runners


def time_runners(runners: list[Runner], device: torch.device, steps: int, warmup: int) -> dict[str, list[float]]:
    """Round robin over the runners, one step each per round, so drifting clocks or load hit all alike."""
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for i in range(warmup + steps):
        for r in runners:
            r.zero()
            t = timed(r.step, lambda: synchronize(device))
            if i >= warmup:
                times[r.name].append(t)
    return times


def peak_bytes(r: Runner, device: torch.device) -> int | None:
    """The runner's weights + the peak of one step above what was resident before it (CUDA only)."""
    if device.type != "cuda":
        return None
    r.zero()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    r.step()
    torch.cuda.synchronize(device)
    return r.param_bytes + torch.cuda.max_memory_allocated(device) - before


def plot(rows: list[dict], title: str, path) -> None:
    """Left: step time per runner (median, bars p25-p75), overhead labels. Right: peak memory."""
    plt = pyplot()

    has_mem = any(r["meas_peak_mib"] is not None for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax, bx = axes
    xs = list(range(len(rows)))
    names = [r["runner"].replace(", ", "\n") for r in rows]
    med = [r["step_ms"] for r in rows]
    err = [[m - r["p25_ms"] for m, r in zip(med, rows)], [r["p75_ms"] - m for m, r in zip(med, rows)]]
    ax.bar(xs, med, 0.6, yerr=err, capsize=3, color=["0.55"] + ["tab:blue"] * (len(rows) - 1))
    for i, r in enumerate(rows[1:], 1):
        ax.annotate(f"{r['overhead_pct']:+.1f}%", (i, r["p75_ms"]), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=9)
    ax.set_xticks(xs, names, fontsize=9)
    ax.set_ylim(0, 1.15 * max(r["p75_ms"] for r in rows))
    ax.set_ylabel("step time, median (ms)")
    ax.set_title("step time (fwd+bwd of all microbatches); label: overhead vs plain", fontsize=10)

    pred = [r["pred_peak_mib"] for r in rows]
    meas = [r["meas_peak_mib"] for r in rows] if has_mem else None
    unit, scale = ("GiB", 1 / 1024) if max(pred + (meas or [])) >= 1024 else ("MiB", 1)
    w = 0.38 if has_mem else 0.6
    bx.bar([x - w / 2 if has_mem else x for x in xs], [v * scale for v in pred], w,
           label="predicted (cost model)", color="tab:orange")
    if has_mem:
        bx.bar([x + w / 2 for x in xs], [v * scale for v in meas], w, label="measured (max_memory_allocated)",
               color="tab:blue")
    else:
        bx.text(0.5, 0.97, "measured peak: CUDA only", transform=bx.transAxes, ha="center", va="top", fontsize=9)
    bx.set_xticks(xs, names, fontsize=9)
    bx.set_ylabel(f"peak memory of a step ({unit})")
    bx.set_title("peak memory: weights + grads + activations", fontsize=10)
    bx.legend(fontsize=8, loc="lower right")
    save_figure(fig, path, title, fontsize=11)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the zoo's tiny gpt2, batch 8 x 32 (CPU smoke run)")
    parser.add_argument("--model", default="gpt2", help="zoo model (default gpt2, 124M; quick: its small config)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 16, quick 8)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 512, quick 32)")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--stages", default="1,2,4", help="stage counts of our runs")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 10, quick 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    parser.add_argument("--results-dir", default=None, help="write the JSON and PNG here instead of "
                        "benchmarks/results (smoke tests)")
    args = parser.parse_args(argv)
    if args.results_dir:
        common.RESULTS_DIR = Path(args.results_dir)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_runtime: no CUDA device; run with --device cpu --quick", file=sys.stderr)
        return 2
    batch = args.batch or (8 if args.quick else 16)
    seq = args.seq or (32 if args.quick else 512)
    steps = args.steps or (5 if args.quick else 10)
    if device.type == "cpu":  # intra-op threads spin-wait badly on a shared machine: one thread, stable times
        torch.set_num_threads(args.threads)
    zm = zoo.build(args.model, batch=batch, seq=seq, device=device, small=args.quick)
    zm.model.train()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} thread(s))"
    print(f"{args.model}{' (small)' if args.quick else ''}, batch {batch} x {seq}, {args.microbatches} microbatches, "
          f"on {where} ...", flush=True)

    runners = make_runners(zm, device, args.microbatches, [int(s) for s in args.stages.split(",")])
    times = time_runners(runners, device, steps, args.warmup)
    plain_ms = statistics.median(times[runners[0].name]) * 1e3
    rows = []
    for r in runners:
        ts = sorted(times[r.name])
        step_ms = statistics.median(ts) * 1e3
        peak = peak_bytes(r, device)
        rows.append({"runner": r.name, "stages": r.stages, "step_ms": step_ms,
                     "p25_ms": quantile(ts, 0.25) * 1e3, "p75_ms": quantile(ts, 0.75) * 1e3,
                     "overhead_pct": (step_ms / plain_ms - 1) * 100,
                     "pred_peak_mib": r.pred_peak_bytes / MiB, "meas_peak_mib": peak / MiB if peak else None,
                     "mem_rel_err": r.pred_peak_bytes / peak - 1 if peak else None})
    print_table(f"one device, one process: plain model vs our stages ({where}); median of {steps} steps",
                [{k: v for k, v in row.items() if v is not None} for row in rows])
    path = write_result("gpu_runtime" if device.type == "cuda" else "gpu_runtime_cpu", rows, extra={
        "device": where, "model": args.model, "small": args.quick, "batch": batch, "seq": seq,
        "microbatches": args.microbatches, "steps": steps, "warmup": args.warmup,
        "summary": {"max_overhead_pct": max(r["overhead_pct"] for r in rows[1:])}})
    png = path.with_suffix(".png")
    plot(rows, f"{args.model}{' (small)' if args.quick else ''} on {where}: batch {batch} x {seq}, "
               f"{args.microbatches} microbatches, all stages on one device", png)
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
