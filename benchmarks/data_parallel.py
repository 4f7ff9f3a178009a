"""Data parallel x pipeline: tokens/s and peak memory of (dp, pp) mesh shapes of the same world.

    torchrun --nproc_per_node 4 -m benchmarks.data_parallel --shapes 2x2,1x4,4x1

Every shape trains the same global batch (--global-batch sequences of --seq tokens) with
compile_parallel(mesh=init_device_mesh(..., (dp, pp), ("dp", "pp")), data_parallel=MODE):
each replica takes 1/dp of it in microbatches of --mb-size sequences (dp x 1 is FSDP alone with
gradient accumulation; 1 x pp a pipeline alone). The shapes run in alternating rounds inside
the same processes, so host drift hits them alike; ratios are against the first shape.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks import common
from benchmarks.common import add_training_run_arguments, print_table, pyplot, save_figure, write_result
from benchmarks.train_throughput import GiB, PRECISIONS, Runner, build_model, measure
from partitioner.runtime.data_parallel import DATA_PARALLEL_MODES


def parse_shapes(text: str, world: int) -> list[tuple[int, int]]:
    """"2x2,1x4" -> [(2, 2), (1, 4)]; every dp x pp must be the world size."""
    shapes = []
    for part in text.split(","):
        try:
            dp, pp = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {part!r} is not DPxPP (e.g. 2x2)") from None
        if dp * pp != world:
            raise SystemExit(f"--shapes: {dp}x{pp} is {dp * pp} ranks but torchrun started {world}")
        shapes.append((dp, pp))
    return shapes


def shape_runner(zm, args, precision: str, dp: int, pp: int, mode: str, device: torch.device) -> Runner:
    from torch.distributed.device_mesh import init_device_mesh

    from partitioner.api import compile_parallel

    mesh = init_device_mesh(device.type, (dp, pp), mesh_dim_names=("dp", "pp"))
    microbatches = args.global_batch // (dp * args.mb_size)
    pm = compile_parallel(zm.model, mesh=mesh, example_inputs=zm.example_args, loss_fn=zm.loss_fn,
                          example_kwargs=zm.example_kwargs, microbatches=microbatches, data_parallel=mode,
                          mixed_precision="bf16" if precision == "bf16-mixed" else None,
                          time_limit_s=args.time_limit, compile=None if args.compile == "auto" else
                          args.compile == "on")
    rank = pm.layout.pp_rank
    return Runner(f"dp{dp}xpp{pp}" + (f"-{mode}" if dp > 1 else ""), lambda: pm.train_step(*zm.example_args, target=zm.target,
                                                                 **zm.example_kwargs),
                  pm.zero_grad, list(pm.parameters()), pm.plan.step_time_s, pm.plan.rank_mem_bytes[rank],
                  note=f"m={microbatches}")


def rows_for(runners: list[Runner], args, precision: str, world: int) -> list[dict]:
    tokens = args.global_batch * args.seq
    rows = []
    for r in runners:
        step = statistics.median(r.times_s)
        rows.append({"model": args.model, "precision": precision, "gpus": world, "config": r.name,
                     "microbatches": r.note, "tokens_per_s": tokens / step, "step_s": step,
                     "step_spread": (max(r.times_s) - min(r.times_s)) / step,
                     "peak_gib": r.peak_bytes / GiB if r.peak_bytes is not None else None,
                     "pred_train_s": r.predicted_step_s,
                     "pred_peak_gib": r.predicted_peak_bytes / GiB if r.predicted_peak_bytes else None})
    for row in rows:
        row["x_first"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.5))
    ax.barh([r["config"] for r in rows], [r["tokens_per_s"] / 1e3 for r in rows], color="tab:blue")
    ax.set_xlabel("thousand tokens/s")
    ax.invert_yaxis()
    save_figure(fig, path, f"{rows[0]['model']} {rows[0]['precision']}, {rows[0]['gpus']} ranks: (dp x pp)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="gpt2-xl", help="a zoo name")
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS)
    parser.add_argument("--shapes", default=None, help="comma-separated DPxPP (default: 2x(world/2), 1x(world), "
                        "(world)x1)")
    parser.add_argument("--modes", default="fsdp", help=f"comma-separated, of {', '.join(DATA_PARALLEL_MODES)}")
    parser.add_argument("--global-batch", type=int, default=32, help="sequences per step, every shape")
    parser.add_argument("--mb-size", type=int, default=2, help="sequences per microbatch")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the stages (auto: on CUDA)")
    parser.add_argument("--rounds", type=int, default=6)
    add_training_run_arguments(parser, "data_parallel_<world><gpu|cpu>")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("run under torchrun, one process per device, e.g. "
                     "torchrun --nproc_per_node 4 -m benchmarks.data_parallel")
    if args.results_dir:
        common.RESULTS_DIR = Path(args.results_dir)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cpu") if args.device == "cpu" else torch.device(
        "cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    shapes = parse_shapes(args.shapes or f"{max(world // 2, 1)}x{world // max(world // 2, 1)},1x{world},{world}x1",
                          world)
    shapes = list(dict.fromkeys(shapes))
    for dp, _ in shapes:
        if args.global_batch % (dp * args.mb_size):
            parser.error(f"--global-batch {args.global_batch} does not split into {dp} replicas x microbatches of "
                         f"{args.mb_size}")

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, file=sys.stderr, flush=True)

    batch = argparse.Namespace(mb_size=1, microbatches=args.global_batch, seq=args.seq, small=args.small)
    zm = build_model(batch, args.model, args.precision, device)  # the global batch
    runners = []
    for dp, pp in shapes:
        for mode in (args.modes.split(",") if dp > 1 else ["fsdp"]):  # no reduction at dp 1
            t = time.perf_counter()
            runners.append(shape_runner(zm, args, args.precision, dp, pp, mode, device))
            log(f"dp {dp} x pp {pp} ({mode}): set up in {time.perf_counter() - t:.0f} s")
    measure(runners, device, True, args.warmup, args.rounds, log)
    rows = rows_for(runners, args, args.precision, world)
    if rank == 0:
        print_table(f"data parallel x pipeline, {world} ranks, global batch {args.global_batch} x {args.seq} tokens",
                    rows)
        path = write_result(args.name or f"data_parallel_{world}{'gpu' if device.type == 'cuda' else 'cpu'}", rows,
                            {"world_size": world})
        plot(rows, path.with_suffix(".png"))
        print(f"wrote {path}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
