"""What one rank holds in a training step under data parallelism, against partitioner/data_parallel_costs.py.

    python -m benchmarks.dp_memory                 # 2 gloo ranks on the CPU, 4 x Linear(512, 512)

Each mode runs in fresh processes (2 ranks): "none" (no data parallelism), "fsdp"
(fully_shard(reshard_after_forward=False)) and "replicate" (runtime/replicated_gradients.py's
all-reduce of a flat copy of the gradients), driven as the pipeline drives them: FSDP2's gradient
sync and resharding off for every backward of the step but the last, the replicas' all-reduce
after the last, then AdamW. torch's profiler records every allocation of the CPU allocator from before
the model is built, so its running total is what the rank holds. Per mode: the bytes held after
a backward of the step (steady), the peak of the last backward with its reduce, and what the
planner's model (data_parallel.ParamBytes.static_bytes) predicts for the steady state, in units
of W (the fp32 weights). Prints a table; writes benchmarks/results/dp_memory.json.

Each mark first runs Python's garbage collector: without it fsdp held 1-2 W more at random
(torch 2.13, gloo), FSDP2's flat reduce-scatter buffers left in reference cycles until a
collection. The peak of the last backward includes gloo's own copy of the reduce input.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile

import torch
import torch.multiprocessing as mp

from benchmarks.common import print_table, write_result


def _worker(rank: int, mode: str, args: argparse.Namespace, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.profiler import ProfilerActivity, profile, record_function

    from partitioner.runtime.replicated_gradients import ReplicatedStages

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    torch.set_num_threads(1)
    marks: list[str] = []

    def mark(tag: str) -> None:
        gc.collect()  # see the module docstring
        marks.append(tag)
        with record_function("MARK " + tag):
            pass

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        mark("empty")
        model = torch.nn.Sequential(*[torch.nn.Linear(args.hidden, args.hidden, bias=False)
                                      for _ in range(args.layers)])
        if mode == "fsdp":
            fully_shard(model, mesh=init_device_mesh("cpu", (args.ranks,)), reshard_after_forward=False)
        replicas = ReplicatedStages({0: model}, {0: model}, dist.group.WORLD, args.ranks) \
            if mode == "replicate" else None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        x = torch.randn(1, args.hidden)
        for step in range(2):  # the first creates the optimizer state
            sync = [False] * (args.microbatches - 1) + [True]
            if replicas is not None:
                replicas.before_step()
            for mb, last in enumerate(sync):
                if mode == "fsdp":
                    model.set_requires_gradient_sync(last)
                    model.set_reshard_after_backward(last)
                    model.set_is_last_backward(last)
                model(x).sum().backward()
                if replicas is not None and last:
                    replicas.stage_backward_done(0)
                    replicas.after_step()
                mark(f"step{step} backward{mb}")
            opt.step()
            opt.zero_grad()
            mark(f"step{step} end")
    if rank == 0:
        path = os.path.join(out, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = sorted((e for e in json.load(f)["traceEvents"]
                             if e.get("name") == "[memory]" or str(e.get("name", "")).startswith("MARK ")),
                            key=lambda e: e["ts"])
        total, since_mark, at = 0, 0, {}
        for e in events:
            if e["name"] == "[memory]":
                total = e["args"]["Total Allocated"]
                since_mark = max(since_mark, total)
            else:
                at[e["name"].removeprefix("MARK ")] = (total, since_mark)
                since_mark = total
        with open(os.path.join(out, "marks.json"), "w") as f:
            json.dump(at, f)
    dist.destroy_process_group()


def measure(mode: str, args: argparse.Namespace) -> dict:
    """Bytes held by rank 0 at each mark of `mode`'s run: {mark: (held, peak since the previous mark)}."""
    from tests.dist_utils import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(mode, args, free_port(), out), nprocs=args.ranks, start_method="spawn")
        with open(os.path.join(out, "marks.json")) as f:
            return json.load(f)


def main() -> None:
    from partitioner.data_parallel_costs import DataParallel, ParamBytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--microbatches", type=int, default=3)
    args = parser.parse_args()
    W = args.layers * args.hidden ** 2 * 4
    params = ParamBytes(weight=W, trainable=W, optimizer=2 * W)  # fp32 AdamW: two fp32 moments
    rows = []
    for mode in ("none", "fsdp", "replicate"):
        at = measure(mode, args)
        dp = DataParallel(1) if mode == "none" else DataParallel(args.ranks, mode, 1.0)
        steady = at["step1 backward0"][0] - at["empty"][0]
        last = f"step1 backward{args.microbatches - 1}"
        rows.append({"mode": mode, "held in the step (W)": round(steady / W, 3),
                     "model (W)": round(params.static_bytes(dp) / W, 3),
                     "peak of the last backward + reduce (W)": round((at[last][1] - at["empty"][0]) / W, 3)})
    print_table(f"rank 0 of {args.ranks}, W = {W / 2**20:.0f} MiB of fp32 weights, AdamW", rows)
    write_result("dp_memory", rows, {"weight_bytes": W})


if __name__ == "__main__":
    main()
