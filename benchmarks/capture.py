"""Capture (+ annotate) time and peak memory of the largest zoo models, built on meta.

Each model runs in its own process, so its peak RSS is its own:

    python -m benchmarks.capture                     # gpt2-xl and llama-70b
    python -m benchmarks.capture --models gpt2 t5-base

Target: gpt2-xl and llama-70b under 60 s together, each under 2 GiB peak RSS.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from benchmarks.common import print_table, write_result

TARGET_TOTAL_S = 60.0
TARGET_RSS_BYTES = 2 * 1024**3


def measure(name: str, batch: int, seq: int | None) -> dict:
    """Build `name` on meta, capture and annotate it; times and this process's peak RSS."""
    t0 = time.perf_counter()
    from partitioner import zoo  # import time counted under build
    from partitioner.passes.annotate import annotate
    from partitioner.passes.capture import capture

    zm = zoo.build(name, batch=batch, seq=seq, device="meta")
    t1 = time.perf_counter()
    captured = capture(zm.model, zm.example_args, zm.example_kwargs)
    t2 = time.perf_counter()
    graph = annotate(captured)
    t3 = time.perf_counter()
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return {
        "model": name,
        "params": sum(graph.param_numel.values()),
        "nodes": len(graph.nodes),
        "method": captured.method,
        "build_s": round(t1 - t0, 3),
        "capture_s": round(t2 - t1, 3),
        "annotate_s": round(t3 - t2, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2-xl", "llama-70b"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: measure one model, print JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.seq)))
        return 0

    rows = []
    for name in args.models:
        cmd = [sys.executable, "-m", "benchmarks.capture", "--one", name, "--batch", str(args.batch)]
        if args.seq:
            cmd += ["--seq", str(args.seq)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            raise SystemExit(f"benchmark of {name} failed (exit {done.returncode})")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["total_s"] = round(row["build_s"] + row["capture_s"] + row["annotate_s"], 3)
        rows.append(row)

    total_s = sum(r["total_s"] for r in rows)
    peak = max(r["peak_rss_mib"] for r in rows)
    verdict = {"total_s": round(total_s, 2), "max_peak_rss_mib": peak,
               "target_total_s": TARGET_TOTAL_S, "target_peak_rss_mib": TARGET_RSS_BYTES / 2**20,
               "meets_targets": total_s < TARGET_TOTAL_S and peak * 2**20 < TARGET_RSS_BYTES}
    print_table(f"capture + annotate on meta (batch {args.batch})", rows)
    print(f"total {total_s:.1f} s (target < {TARGET_TOTAL_S:.0f} s), max peak RSS {peak:.0f} MiB "
          f"(target < {TARGET_RSS_BYTES / 2**20:.0f} MiB): "
          f"{'OK' if verdict['meets_targets'] else 'MISSED'}")
    path = write_result("capture", rows, extra=verdict)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
