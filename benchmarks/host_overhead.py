"""Where a pipelined step spends host time: stages in one process against the plain compiled model.

    python -m benchmarks.host_overhead --model gpt2-xl --stages 2,4          # one GPU
    python -m benchmarks.host_overhead --small --device cpu --model gpt2     # smoke test

For each configuration (the plain model with gradient accumulation, then compile_parallel
with every stage on the same device) one step is profiled with torch.profiler after warm-up:
the step's wall time, the time the device was busy (the union of its kernels' intervals), and
for ours the host time of every schedule action (the executor labels them `partitioner.<action>`,
e.g. `partitioner.1B3`) split into forwards and backwards, plus the host-side ops that took the
most self time. A step the device waits on shows as busy < wall with action host times that add
up to the wall. Chrome traces of every profiled step go next to the JSON, to open in Perfetto.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import common
from benchmarks.common import add_training_run_arguments, print_table, write_result
from benchmarks.train_throughput import PRECISIONS, build_model


def busy_s(events: list, device_type) -> float:
    """Seconds during which at least one kernel ran (overlapping kernels counted once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == device_type)
    total, end = 0, None
    for a, b in spans:
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e6


def profile_step(step, device: torch.device, trace: Path) -> dict:
    """Wall time of one profiled step, device-busy time, action host times and the top host ops."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - t
    prof.export_chrome_trace(str(trace))
    events = list(prof.events())
    actions = [e for e in events if e.name.startswith("partitioner.")]
    fwd = [e.cpu_time_total / 1e6 for e in actions if "F" in e.name.split(".")[-1]]
    bwd = [e.cpu_time_total / 1e6 for e in actions if "B" in e.name.split(".")[-1]]
    top = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:5]
    return {"wall_ms": wall * 1e3,
            "busy_ms": busy_s(events, torch.autograd.DeviceType.CUDA) * 1e3 if device.type == "cuda" else None,
            "actions": len(actions),
            "host_fwd_ms": statistics.mean(fwd) * 1e3 if fwd else None,
            "host_bwd_ms": statistics.mean(bwd) * 1e3 if bwd else None,
            "host_actions_ms": (sum(fwd) + sum(bwd)) * 1e3 if actions else None,
            "top_host_ops": ", ".join(f"{a.key} {a.self_cpu_time_total / 1e3:.1f}ms" for a in top)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="gpt2-xl", help="a zoo name")
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS)
    parser.add_argument("--stages", default="2,4", help="comma-separated stage counts, all on one device")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--mb-size", type=int, default=2, help="sequences per microbatch")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the plain model and the stages (auto: on CUDA)")
    add_training_run_arguments(parser, "host_overhead_<device>", time_limit_s=5.0)
    args = parser.parse_args(argv)
    if args.results_dir:
        common.RESULTS_DIR = Path(args.results_dir)
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    zm = build_model(args, args.model, args.precision, device)
    m = args.microbatches
    x, y = zm.example_args[0], zm.target
    plain = torch.compile(zm.model, dynamic=False) if compiled else zm.model

    def plain_step():
        for xb, yb in zip(x.chunk(m), y.chunk(m)):
            (zm.loss_fn(plain(xb), yb) / m).backward()
        zm.model.zero_grad(set_to_none=True)

    configs = [("plain", plain_step, None)]
    from partitioner.api import compile_parallel
    for stages in (int(s) for s in args.stages.split(",")):
        pm = compile_parallel(zm.model, [device] * stages, (x,), zm.loss_fn, microbatches=m, example_target=y,
                              time_limit_s=args.time_limit, compile=compiled,
                              mixed_precision="bf16" if args.precision == "bf16-mixed" else None)

        def ours(pm=pm):
            pm.train_step(x, target=y)
            pm.zero_grad()
        configs.append((f"ours-{stages}-stages", ours, pm.plan))
    name = args.name or f"host_overhead_{device.type}"
    rows = []
    for label, step, plan in configs:
        for _ in range(args.warmup):
            step()
        row = {"config": label, "compiled": compiled,
               **profile_step(step, device, common.RESULTS_DIR / f"{name}_{label}.trace.json")}
        if plan is not None:  # the plan's serial work: every stage of every microbatch in turn
            row["pred_serial_ms"] = m * (sum(plan.stage_fwd_time_s) + sum(plan.stage_bwd_time_s)) * 1e3
        rows.append(row)
        print(f"{label}: wall {row['wall_ms']:.1f} ms", file=sys.stderr, flush=True)
    print_table(f"host time of one step, {args.model} {args.precision}, {m} microbatches on {device}",
                [{k: v for k, v in r.items() if k != "top_host_ops"} for r in rows])
    for r in rows:
        print(f"{r['config']}: {r['top_host_ops']}")
    print(f"wrote {write_result(name, rows, {'microbatches': m})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
