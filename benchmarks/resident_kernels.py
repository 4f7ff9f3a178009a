"""How much a few SMs held by resident kernels slow a transformer layer's GEMMs (one GPU).

On 2 GPUs, interleaved-1f1b ran gpt2-xl 4-7% slower than 1f1b where the simulator predicts it ~5%
faster. One hypothesis (benchmarks/RESULTS.md): an NCCL send or receive kernel stays resident on the
SMs it was given until its peer arrives, and compute launched meanwhile runs on the SMs left; where a
GEMM's grid is sized to the SM count (persistent kernels) or to whole waves, one SM fewer can cost far
more than 1/132 of its time. This measures that effect without NCCL: `held` spinning blocks
(torch.cuda._sleep, one block each, on side streams) occupy SMs while gpt2-xl's forward GEMMs
(M = 2 x 1024 tokens) and a chain of them as one layer run on the main stream; CUDA events time them,
in rounds alternating the number held; the sleeps are checked to outlast each timing.

    python -m benchmarks.resident_kernels
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.common import print_table, write_result

GEMMS = {"qkv 2048x1600x4800": (2048, 1600, 4800), "attn proj 2048x1600x1600": (2048, 1600, 1600),
         "fc 2048x1600x6400": (2048, 1600, 6400), "mlp proj 2048x6400x1600": (2048, 6400, 1600)}
# benchmarks/executor_vs_torch's chain block (dim 2048, hidden 8192, 4 x 512 tokens), whose interleaved
# steps on NCCL the simulator predicted within 1.5% without any slowdown (fp32)
CHAIN_GEMMS = {"chain up 2048x2048x8192": (2048, 2048, 8192), "chain down 2048x8192x2048": (2048, 8192, 2048)}


def _cycles_per_s() -> float:
    """torch.cuda._sleep's spin cycles per second on this GPU (its clock under load)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    cycles = 50_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def _timed(work, held: int, streams: list[torch.cuda.Stream], spin_cycles: int) -> tuple[float, bool]:
    """Seconds of `work` on the current stream while `held` sleeps run on side streams; and whether
    every sleep was still running when the work ended."""
    main = torch.cuda.current_stream()
    ready = torch.cuda.Event()
    ready.record(main)
    ends = []
    for s in streams[:held]:
        s.wait_event(ready)
        with torch.cuda.stream(s):
            torch.cuda._sleep(spin_cycles)
            e = torch.cuda.Event(enable_timing=True)
            e.record(s)
            ends.append(e)
    torch.cuda._sleep(20_000)  # let the sleeps take their SMs before the timed work starts
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(main)
    work()
    end.record(main)
    torch.cuda.synchronize()
    covered = all(start.elapsed_time(e) >= start.elapsed_time(end) for e in ends)
    return start.elapsed_time(end) / 1e3, covered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--held", default="0,1,2,4",
                        help="comma-separated numbers of SMs to hold (8 or more side streams did not all run at once)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20, help="back-to-back calls per timing")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--name", default="resident_kernels")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("resident_kernels needs a CUDA GPU", file=sys.stderr)
        return 1
    from benchmarks import common
    if args.results_dir:
        common.RESULTS_DIR = Path(args.results_dir)
    held_counts = [int(h) for h in args.held.split(",")]
    dtype = getattr(torch, args.dtype)
    streams = [torch.cuda.Stream() for _ in range(max(held_counts))]
    shapes = {**GEMMS, **CHAIN_GEMMS}
    x = {k: torch.randn(m, k, device="cuda", dtype=dtype) for m, k, _ in shapes.values()}
    w = {name: torch.randn(k, n, device="cuda", dtype=dtype) for name, (_, k, n) in shapes.items()}
    b = {name: torch.randn(n, device="cuda", dtype=dtype) for name, (_, _, n) in shapes.items()}

    def gemm(name):
        m, k, n = shapes[name]
        return lambda: [torch.addmm(b[name], x[k], w[name]) for _ in range(args.calls)]

    def layer():  # a GPT-2 block's forward GEMMs in order, with the GELU between the MLP's two
        for _ in range(args.calls // 4 or 1):
            h = x[1600]
            torch.addmm(b["qkv 2048x1600x4800"], h, w["qkv 2048x1600x4800"])
            a = torch.addmm(b["attn proj 2048x1600x1600"], h, w["attn proj 2048x1600x1600"])
            f = torch.nn.functional.gelu(torch.addmm(b["fc 2048x1600x6400"], a, w["fc 2048x1600x6400"]))
            torch.addmm(b["mlp proj 2048x6400x1600"], f, w["mlp proj 2048x6400x1600"])

    def chain_block():  # executor_vs_torch's block: x + MLP(LayerNorm(x))
        for _ in range(args.calls // 4 or 1):
            h = torch.nn.functional.layer_norm(x[2048], (2048,))
            u = torch.nn.functional.gelu(torch.addmm(b["chain up 2048x2048x8192"], h, w["chain up 2048x2048x8192"]))
            x[2048] + torch.addmm(b["chain down 2048x8192x2048"], u, w["chain down 2048x8192x2048"])

    works = {**{name: gemm(name) for name in shapes}, "gpt2-xl layer (4 GEMMs + GELU)": layer,
             "chain block (LayerNorm, 2 GEMMs, GELU)": chain_block}
    calls = {name: args.calls if name in shapes else args.calls // 4 or 1 for name in works}  # per timing
    for work in works.values():  # warm up (cuBLAS heuristics, the clocks)
        for _ in range(3):
            work()
    torch.cuda.synchronize()
    rate = _cycles_per_s()
    longest, _ = max((_timed(work, 0, streams, 0) for work in works.values()), key=lambda t: t[0])
    spin_cycles = int(rate * (3 * longest + 2e-3))
    times = {(name, h): [] for name in works for h in held_counts}
    uncovered = 0
    for r in range(args.rounds):
        order = held_counts if r % 2 == 0 else held_counts[::-1]
        for name, work in works.items():
            for h in order:
                t, covered = _timed(work, h, streams, spin_cycles)
                if covered:
                    times[(name, h)].append(t)
                else:
                    uncovered += 1
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name in works:
        base = statistics.median(times[(name, 0)])
        for h in held_counts:
            if not times[(name, h)]:
                continue
            t = statistics.median(times[(name, h)])
            rows.append({"work": name, "held SMs": h, "of SMs": round(h / sms, 3), "us per call":
                         round(t / calls[name] * 1e6, 1), "x unheld": round(t / base, 3),
                         "timings": len(times[(name, h)])})
    print_table(f"{args.dtype} GEMMs on {torch.cuda.get_device_name()} ({sms} SMs) with SMs held by spinning blocks "
                f"({uncovered} timings dropped: a sleep ended first)", rows)
    write_result(args.name, rows, {"dtype": args.dtype, "sms": sms, "spin_cycles": spin_cycles, "cycles_per_s": rate,
                                   "calls_per_timing": args.calls, "dropped_timings": uncovered})
    return 0


if __name__ == "__main__":
    sys.exit(main())
