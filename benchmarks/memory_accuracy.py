"""Does the plan's memory hold on the GPUs? Predicted per-rank peak vs torch.cuda.max_memory_allocated.

Run under torchrun, one process per GPU (NCCL):

    torchrun --nproc-per-node 4 -m benchmarks.memory_accuracy                 # gpt2-medium, 1f1b + interleaved
    torchrun --nproc-per-node 2 -m benchmarks.memory_accuracy --models gpt2 --batch 8

For each model and schedule every rank builds the zoo model (fp32, random weights),
compile_parallel plans and splits it over the GPUs, and AdamW trains it for three steps;
the third step's peak (torch.cuda.max_memory_allocated, after reset, less what was allocated
before the configuration started: fx GraphModules sit in reference cycles, so an earlier
configuration's tensors are freed only once gc runs, which is done first) is compared with the
plan's rank_mem_bytes: parameters, gradients and AdamW state of the rank's stages, the
activations of the microbatches the schedule keeps in flight, and the largest backward
transient (cost_models.memory.backward_walk), the loss's included (example_target given).
Rank 0 prints the table and writes benchmarks/results/memory_accuracy.json.
"""
from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist

from benchmarks.common import print_table, write_result

GIB = 2 ** 30


def measure(name: str, schedule: str, chunks: int, batch: int, seq: int, microbatches: int,
            steps: int = 3) -> dict:
    """This rank's predicted and measured peak for one configuration."""
    from partitioner import compile_parallel, zoo

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank}")
    gc.collect()  # the previous configuration's stage GraphModules sit in reference cycles (fx)
    torch.cuda.empty_cache()
    floor = torch.cuda.memory_allocated(device)  # anything left over is not this plan's
    torch.manual_seed(0)
    zm = zoo.build(name, batch=batch, seq=seq, device="cpu")
    devices = [f"cuda:{r}" for r in range(world)]
    pm = compile_parallel(zm.model, devices, zm.example_args, zm.loss_fn, example_kwargs=zm.example_kwargs,
                          microbatches=microbatches, schedule=schedule, chunks=chunks, example_target=zm.target)
    del zm.model
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-4)
    for step in range(steps):
        if step == steps - 1:  # the first steps create the optimizer state; measure a steady one
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - floor
    pred = pm.plan.rank_mem_bytes[rank]
    row = {"model": name, "schedule": schedule, "ranks": world, "chunks": chunks, "microbatches": microbatches,
           "batch": batch, "seq": seq, "rank": rank, "pred_gib": pred / GIB, "meas_gib": peak / GIB,
           "rel_err": (pred - peak) / peak, "floor_gib": floor / GIB}
    del pm, opt
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-medium")
    parser.add_argument("--schedules", default="1f1b,interleaved-1f1b")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--microbatches", type=int, default=0, help="default: 2 x ranks")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ or not torch.cuda.is_available():
        print("run under torchrun on GPUs: torchrun --nproc-per-node N -m benchmarks.memory_accuracy")
        return 2
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    rows = []
    for name in args.models.split(","):
        for schedule in args.schedules.split(","):
            chunks = 2 if schedule == "interleaved-1f1b" else 1
            mine = measure(name, schedule, chunks, args.batch, args.seq, args.microbatches or 2 * world)
            gathered: list = [None] * world
            dist.all_gather_object(gathered, mine)
            rows += gathered
    if rank == 0:
        print_table(f"plan memory vs measured peak, {torch.cuda.get_device_name(0)} x {world}", rows)
        errs = sorted(abs(r["rel_err"]) for r in rows)
        print(f"|relative error|: median {errs[len(errs) // 2]:.3f}, max {errs[-1]:.3f}")
        path = write_result("memory_accuracy", rows, {"device": torch.cuda.get_device_name(0), "ranks": world})
        print(f"wrote {path}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
