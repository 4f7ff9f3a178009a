"""What the CUDA graph pools of compile_parallel's per-stage graphs hold, against the plan (one GPU).

    python -m benchmarks.graph_pools --model t5-base          # 2 stages in one process, bf16, AdamW

Trains `--model` (bf16, 8 microbatches of 2 x 1024 tokens) under compile_parallel's defaults on
`--stages` stages of one GPU, which replay each stage call as a CUDA graph where the host binds.
torch's memory history is recorded from the step that records the graphs (the second) through one
replayed step; then per memory pool: what it reserved (segments), what is allocated in it, and its
peak of live tensors while the graphs recorded, with the call sites live at that peak. The
default pool holds the parameters, gradients, optimizer state and the optimizer step's
temporaries; a graph pool the stages' activations and workspaces. Compared with the plan's
per-rank memory (NodeCosts.under_cuda_graphs counts the pool's slack over its peak and the
optimizer's temporaries). Writes benchmarks/results/graph_pools_<model>.json.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import os
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import print_table, write_result

GiB = 2 ** 30


def _site(frames: list[dict]) -> str:
    """A call site: the first frames in torch's and our Python (the generated code's frames are noise)."""
    keep = [f for f in frames if f["filename"].endswith(".py") and ("partitioner" in f["filename"] or
            "torch/" in f["filename"])] or frames
    return " <- ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in keep[:3])


def pool_peaks(snapshot: dict) -> tuple[dict, dict]:
    """(pool -> peak live bytes over the recorded trace, pool -> {call site: bytes live at that peak}).
    One pass finds each pool's peak; a second replays the trace to those events for their call sites
    (collecting the sites at every new peak would rescan the live tensors at each of the thousands of
    allocations that grow a pool while graphs record)."""
    segments = sorted((s["address"], s["address"] + s["total_size"], str(tuple(s.get("segment_pool_id", (0, 0)))))
                      for s in snapshot["segments"])
    starts = [a for a, _, _ in segments]
    trace = snapshot["device_traces"][0] if snapshot["device_traces"] else []

    def pool_of(addr: int) -> str:
        i = bisect.bisect_right(starts, addr) - 1
        return segments[i][2] if i >= 0 and addr < segments[i][1] else "freed segment"

    def replay():
        """(event index, pool, bytes it adds, the live allocations: address -> (pool, size, event)) per event."""
        live: dict[int, tuple[str, int, dict]] = {}
        for i, e in enumerate(trace):
            if e["action"] == "alloc":
                live[e["addr"]] = (pool_of(e["addr"]), e["size"], e)
                yield i, live[e["addr"]][0], e["size"], live
            elif e["action"] == "free_requested" and e["addr"] in live:
                pool, size, _ = live.pop(e["addr"])
                yield i, pool, -size, live
    current, peak, peak_event = collections.Counter(), collections.Counter(), {}
    for i, pool, added, _ in replay():
        current[pool] += added
        if current[pool] > peak[pool]:
            peak[pool], peak_event[pool] = current[pool], i
    pool_at = {i: pool for pool, i in peak_event.items()}  # an event changes one pool: one pool peaks at it
    at_peak = {}
    for i, pool, _, live in replay():
        if i in pool_at:
            at_peak[pool] = collections.Counter()
            for p, size, e in live.values():
                if p == pool:
                    at_peak[pool][_site(e.get("frames", []))] += size
    return dict(peak), at_peak


def main() -> None:
    from partitioner import zoo
    from partitioner.api import compile_parallel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="t5-base")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--results-dir", default=None, help="write the JSON here instead of benchmarks/results")
    args = parser.parse_args()
    if args.results_dir:
        common.RESULTS_DIR = Path(args.results_dir)
    device = torch.device("cuda", 0)
    zm = zoo.build(args.model, batch=2 * args.microbatches, seq=1024, device=device, dtype=torch.float32, seed=0)
    zm.model.to(torch.bfloat16).train()
    pm = compile_parallel(zm.model, [device] * args.stages, zm.example_args, zm.loss_fn,
                          example_kwargs=zm.example_kwargs, microbatches=args.microbatches, example_target=zm.target)
    optimizer = torch.optim.AdamW(list(pm.parameters()), lr=1e-5)
    for step in range(3):  # compile; record the graphs (with the memory history); replay
        if step == 1:
            torch.cuda.memory._record_memory_history(max_entries=100000)
        pm.zero_grad()
        pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
        optimizer.step()
        torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, at_peak = pool_peaks(snapshot)
    pools: dict[str, dict] = collections.defaultdict(lambda: {"reserved": 0, "allocated": 0, "segments": 0})
    for seg in snapshot["segments"]:
        pool = pools[str(tuple(seg.get("segment_pool_id", (0, 0))))]
        pool["reserved"] += seg["total_size"]
        pool["allocated"] += seg["allocated_size"]
        pool["segments"] += 1
    rows = [{"pool": name, "segments": p["segments"], "reserved GiB": round(p["reserved"] / GiB, 3),
             "allocated GiB": round(p["allocated"] / GiB, 3), "peak live GiB": round(peak.get(name, 0) / GiB, 3),
             "reserved / peak": round(p["reserved"] / peak[name], 2) if peak.get(name) else None}
            for name, p in sorted(pools.items())]
    reserved = sum(p["reserved"] for p in pools.values())
    predicted = sum(pm.plan.rank_mem_bytes)
    print_table(f"{args.model}: {args.stages} stages on one GPU, per-stage graphs "
                f"({pm.compile_options}); reserved {reserved / GiB:.2f} GiB, planned {predicted / GiB:.2f} GiB", rows)
    for name, sites in at_peak.items():
        print(f"pool {name} at its peak:")
        for site, size in sites.most_common(5):
            print(f"  {size / GiB:7.3f} GiB  {site}")
    write_result(f"graph_pools_{args.model.replace('-', '')}", rows,
                 {"reserved_bytes": reserved, "planned_bytes": predicted, "plan_rank_mem_bytes": pm.plan.rank_mem_bytes,
                  "sites_at_peak": {k: v.most_common(10) for k, v in at_peak.items()},
                  "compile_options": str(pm.compile_options)})


if __name__ == "__main__":
    main()
