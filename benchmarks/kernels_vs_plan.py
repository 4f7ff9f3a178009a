"""The cost model against a GPU's kernels, offline: per stage and pass, measured kernel time by kind
next to the predicted device time (without the gaps between kernels) and host time by node kind.

    python -m benchmarks.kernels_vs_plan benchmarks/results/host_overhead_llama1b_h200_ours-2-stages.kernels.json \
        --model llama-1b --device h200

The kernels file is what `benchmarks.host_overhead` writes next to its JSON on CUDA: every kernel of one
profiled step, charged to the stage and pass whose action launched it, with the plan's node -> stage map.
This re-profiles the same zoo model on the meta device (no GPU needed), so a cost model change can be
checked against kernels measured earlier. For the plain model's file (one "step" group) the whole
model's prediction is printed against the whole step.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict

import torch

from benchmarks.common import print_table

_GEMM = ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "sm80_", "cublas", "splitk")


def kernel_kind(name: str) -> str:
    """gemm, attention, triton (inductor's generated kernels) or other (eager ATen kernels)."""
    low = name.lower()
    if low.startswith("triton_"):
        return "triton"
    if any(s in low for s in ("flash", "fmha", "attention", "attn", "sdpa")):
        return "attention"
    return "gemm" if any(s in low for s in _GEMM) else "other"


def stages_by_graph_order(gm: torch.fx.GraphModule, node_stage: dict[str, int]) -> dict[str, int]:
    """`node_stage` for every node of `gm`: a node the file does not name (captured under another torch
    or transformers version, whose export names some nodes otherwise) takes the stage of the node before
    it in graph order (stages are contiguous runs of it), said on stderr."""
    out, stage, missing = {}, None, 0
    for node in gm.graph.nodes:
        if node.name in node_stage:
            stage = node_stage[node.name]
        elif node.op not in ("placeholder", "output"):
            missing += 1
        if stage is not None:
            out[node.name] = stage
    if missing:
        print(f"{missing} of {len(gm.graph.nodes)} nodes are not in the file's node -> stage map (another torch "
              "or transformers version named them otherwise): each is charged to the stage of the node before it",
              file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("kernels", help="a *.kernels.json written by benchmarks.host_overhead")
    parser.add_argument("--model", required=True, help="the zoo model it profiled")
    parser.add_argument("--device", default="h100", help="device spec of the prediction (h100, h200, ...)")
    parser.add_argument("--mb-size", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--eager", action="store_true", help="predict eager stages (default: compiled)")
    args = parser.parse_args(argv)

    from partitioner import zoo
    from partitioner.cost_models.device import get_device_spec
    from partitioner.cost_models.flops import COMPUTE_OPS, trace_nodes
    from partitioner.cost_models.fusion import is_heavy
    from partitioner.cost_models.profile import profile
    from partitioner.passes.capture import capture

    data = json.loads(open(args.kernels).read())
    zm = zoo.build(args.model, batch=args.mb_size, seq=args.seq, device="meta", dtype=torch.bfloat16)
    captured = capture(zm.model, zm.example_args, zm.example_kwargs)
    # kernel durations against kernel durations: without the gaps between kernels, which no kernel's duration holds
    spec = dataclasses.replace(get_device_spec(args.device), kernel_gap_s=0.0)
    costs = profile(captured, device=spec, dtype=torch.bfloat16, compiled=not args.eager, progress=False)
    traces = trace_nodes(captured.graph_module)
    whole = list(data["groups"]) == ["step"]
    node_stage = data.get("node_stage") or {}
    if not whole:
        node_stage = stages_by_graph_order(captured.graph_module, node_stage)
    predicted: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for name, c in costs.nodes.items():
        t = traces[name]
        kind = ("attention" if t.attention is not None else "matmul" if t.op in COMPUTE_OPS and is_heavy(t)
                else "light" if t.op in COMPUTE_OPS else "grad accumulation")
        stage = "step" if whole else node_stage.get(name)
        if stage is None:
            continue
        for p, dev, host in (("F", c.fwd_time_s, c.host_fwd_time_s), ("B", c.bwd_time_s, c.host_bwd_time_s)):
            group = predicted["step" if whole else f"{stage}{p}"]
            group[kind] += dev * 1e3
            group["host"] += host * 1e3
    rows = []
    for group, entry in data["groups"].items():
        per = data["microbatches"] if group == "step" else entry["microbatches"]
        measured: dict[str, float] = defaultdict(float)
        launches = 0.0
        for kname, (count, us) in entry["kernels"].items():
            measured[kernel_kind(kname)] += us / 1e3 / per
            launches += count / per
        pred = predicted.get(group, {})
        device_ms = sum(v for k, v in pred.items() if k != "host")
        rows.append({"group": group, "kernels_ms": round(sum(measured.values()), 2), "launches": round(launches),
                     **{f"{k}_ms": round(v, 2) for k, v in sorted(measured.items())},
                     "pred_device_ms": round(device_ms, 2), "pred_host_ms": round(pred.get("host", 0.0), 2),
                     "pred_by_kind": ", ".join(f"{k} {v:.2f}" for k, v in sorted(pred.items()) if k != "host")})
    print_table(f"{args.kernels}: ms per microbatch, measured kernels vs predicted ({args.device})", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
