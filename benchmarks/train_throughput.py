"""Training throughput of the user's real job: ours vs torch.distributed.pipelining vs the plain model.

Every configuration trains the same model on the same batches (AdamW, one
optimizer step per batch of `--microbatches` microbatches of `--mb-size` x
`--seq` tokens); configurations alternate in rounds inside the same processes
(one step each per round, the order reversed every other round), so the
drift of these hosts hits all of them alike. Reported: tokens/s (median
step), MFU (the model's FLOPs from the cost model over the step and the
device's peak), peak memory per GPU (the step's peak allocation plus the
CUDA graph pools the configuration recorded into), the plan's predicted step
and memory.

Configurations (`--configs` picks):
- plain-eager / plain-compiled: the unpartitioned model with gradient
  accumulation over the microbatches (one process, one GPU): the ceiling.
- ours-{eager,compiled}-{1f1b,interleaved}-{ilp,uniform}: compile_parallel with
  the ILP's plan or the uniform-layers plan on the same runtime, planned as
  compile_parallel plans them (compiled stages with compiled costs). A `-graph`
  suffix (e.g. ours-compiled-1f1b-ilp-graph; one process, one GPU) replays each
  step as one CUDA graph (compile_parallel(cuda_graph=True)), planned without
  host time. A `-cudagraphs` suffix (compiled only; any number of processes)
  compiles the stages with compile={"mode": "reduce-overhead"}: every stage's
  forward and backward replays as its own CUDA graph (runtime/cudagraph_trees.py),
  also planned without host time.
- plain-compiled-cudagraphs: the plain model under mode="reduce-overhead".
- ours-default: compile_parallel called as a user calls it, with no plan, schedule
  or compile argument: it plans itself (1f1b, compiled on CUDA) and, in one process,
  compiles host-bound stages with CUDA graphs.
- ours-auto: the same with chunks="auto": the planner picks 1f1b or interleaving
  (partitioner/schedule_choice.py); beside ours-compiled-1f1b-ilp and
  ours-compiled-interleaved-ilp under torchrun it shows whether its choice is the faster.
- torch-{eager,compiled}-{1f1b,interleaved}: torch.distributed.pipelining with a
  hand-written uniform split (benchmarks/torch_pipeline.py), eager or with each
  layer compiled (torchtitan's way). GPT-2 and Llama only.

Modes:
- one process (plain `python -m`): `--stages` pipeline stages on one device;
  nothing overlaps, so ours is compared with the plain model (the runtime's
  cost), and the prediction is the plan's serial work (m x every stage's
  forward + backward).
- torchrun (one process per GPU, NCCL): stage k on rank k mod world; the
  prediction is the plan's simulated step.

    python -m benchmarks.train_throughput --models gpt2-xl --precision bf16          # one GPU
    torchrun --nproc_per_node 2 -m benchmarks.train_throughput --models gpt2-xl      # 2 GPUs
    python -m benchmarks.train_throughput --small --device cpu --configs all         # smoke test, CPU

Writes benchmarks/results/<name>.json (default train_throughput_<mode>) and a PNG of tokens/s.
`--timeline` adds, for each of our configurations, one profiled step on every rank set beside the
plan's simulated timeline (benchmarks/pipeline_timeline.py): where the measured pipeline idles or
runs its passes slower than planned, e.g. whether interleaving pays on 2 GPUs:

    torchrun --nproc_per_node 2 -m benchmarks.train_throughput --models gpt2-xl --precision bf16 \
        --configs ours-compiled-1f1b-ilp,ours-compiled-interleaved-ilp --timeline
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from benchmarks import common
from benchmarks.common import add_training_run_arguments, print_table, pyplot, save_figure, write_result
from partitioner import zoo
from partitioner.runtime.compiled import uses_cudagraphs
from partitioner.runtime.data_parallel import local_tensor

ALL_CONFIGS = ("plain-eager", "plain-compiled", "plain-compiled-cudagraphs", "ours-default", "ours-auto",
               "ours-eager-1f1b-ilp",
               "ours-compiled-1f1b-ilp", "ours-compiled-1f1b-ilp-graph", "ours-eager-1f1b-ilp-graph",
               "ours-compiled-1f1b-ilp-cudagraphs", "ours-compiled-interleaved-ilp-cudagraphs",
               "ours-compiled-interleaved-ilp", "ours-eager-interleaved-ilp", "ours-compiled-1f1b-uniform",
               "ours-eager-1f1b-uniform", "torch-eager-1f1b", "torch-compiled-1f1b", "torch-eager-interleaved",
               "torch-compiled-interleaved")
DEFAULT_CONFIGS = ("plain-eager", "plain-compiled", "ours-default", "ours-eager-1f1b-ilp", "ours-compiled-1f1b-ilp",
                   "ours-compiled-1f1b-ilp-cudagraphs", "ours-compiled-interleaved-ilp", "ours-compiled-1f1b-uniform",
                   "torch-eager-1f1b", "torch-compiled-1f1b")
PRECISIONS = ("bf16", "bf16-mixed", "fp32")
GiB = 2 ** 30


@dataclass
class Runner:
    """One configuration: step() trains one batch (zero_grad, train, optimizer step)."""

    name: str
    train: Callable[[], Any]
    zero: Callable[[], None]
    params: list[torch.nn.Parameter]
    predicted_step_s: float | None = None
    predicted_peak_bytes: int | None = None
    optimizer: torch.optim.Optimizer | None = None
    times_s: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    graph_pools: frozenset = frozenset()  # CUDA graph memory pools its warm-up recorded into
    note: str = ""
    plan: Any = None  # ours: the plan it runs (its simulated timeline for --timeline)
    timeline: dict | None = None  # --timeline: measured against simulated (benchmarks/pipeline_timeline.py)

    def __post_init__(self):
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5) if self.params else None


# ---------------------------------------------------------------------------- set-up

def _world() -> tuple[int | None, int]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None, 1


def _device(args, rank: int | None) -> torch.device:
    if args.device == "cpu":
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", rank or 0))
    return torch.device("cuda", local)


def build_model(args, name: str, precision: str, device: torch.device) -> zoo.ZooModel:
    batch = args.mb_size * args.microbatches
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    zm = zoo.build(name, batch=batch, seq=args.seq, device=device, dtype=torch.float32, small=args.small, seed=0)
    zm.model.to(dtype).train()
    return zm


def _mixed(precision: str) -> str | None:
    return "bf16" if precision == "bf16-mixed" else None


def make_plans(zm, args, precision: str, device: torch.device, p: int, rank: int | None,
               wanted: list[str]) -> dict:
    """(schedule key, plan kind, compiled) -> Plan for the wanted configurations, planned on rank 0 as
    compile_parallel plans them (compiled stages with compiled costs), plus the model's FLOPs per
    microbatch. The uniform plan is the uniform-layers baseline scored on the same block graph."""
    from partitioner.baselines import baseline_plan
    from partitioner.plan import Plan
    from partitioner.plan_model import PlanConfig, plan_model

    plans: dict = {}
    if rank in (None, 0):
        from partitioner.cost_models.device import spec_for_torch_device

        def spec(host_compiled: bool) -> Any:  # this GPU and host; compiled launches timed when asked
            timed = host_compiled and args.time_compiled_launches
            return spec_for_torch_device(device, compiled=timed) if device.type == "cuda" else "cpu"
        needed = [(key, schedule, chunks, compiled, graph)
                  for key, schedule, chunks in (("1f1b", "1f1b", 1), ("interleaved", "interleaved-1f1b", args.chunks))
                  for compiled in (False, True) for graph in (False, True)
                  if any(f"ours-{'compiled' if compiled else 'eager'}-{key}-{k}{tail}" in wanted
                         for k in ("ilp", "uniform") for tail in (("-graph", "-cudagraphs") if graph else ("",)))]
        for key, schedule, chunks, compiled, graph in needed or [("1f1b", "1f1b", 1, False, False)]:  # for the FLOPs
            config = PlanConfig(num_ranks=p, chunks=chunks, schedule=schedule, microbatches=args.microbatches,
                                device_type=spec(compiled and not graph), dtype=None, mixed_precision=_mixed(precision),
                                time_limit_s=args.time_limit, compiled=compiled, measure=args.measure,
                                cuda_graphs=graph, sends_hold_sms=rank is not None)
            result = plan_model(zm.model, zm.example_args, zm.example_kwargs, config, loss_fn=zm.loss_fn,
                                example_target=zm.target)
            plans[(key, "ilp", compiled, graph)] = result.plan
            plans[(key, "uniform", compiled, graph)] = baseline_plan(
                result.block_graph, "uniform", p, chunks, args.microbatches, schedule,
                result.plan.memory_cap_bytes, result.plan.link_bw_bytes_per_s)
            plans["flops_per_microbatch"] = result.costs.total("fwd_flops") + result.costs.total("bwd_flops")
    if rank is None:
        return plans
    box = [{k: (v.to_json() if hasattr(v, "to_json") else v) for k, v in plans.items()}]
    dist.broadcast_object_list(box, src=0)
    return {k: (Plan.from_json(v) if isinstance(v, str) else v) for k, v in box[0].items()}


def _serial_s(plan) -> float:
    """One device runs every stage of every microbatch in turn."""
    return plan.microbatches * (sum(plan.stage_fwd_time_s) + sum(plan.stage_bwd_time_s))


def ours_runners(zm, args, precision: str, device: torch.device, p: int, rank: int | None, plans: dict,
                 wanted: list[str]) -> list[Runner]:
    """One ParallelModel per wanted configuration, compiled or not as compile_parallel would on GPUs."""
    from partitioner.api import compile_parallel

    devices = [device] * p if rank is None else [torch.device(device.type, i) if device.type == "cuda" else device
                                                  for i in range(p)]
    runners = []
    for name in wanted:
        parts = name.split("-")
        if parts[0] != "ours":
            continue
        if name in ("ours-default", "ours-auto"):
            pm = compile_parallel(zm.model, devices, zm.example_args, zm.loss_fn, example_kwargs=zm.example_kwargs,
                                  microbatches=args.microbatches, mixed_precision=_mixed(precision),
                                  time_limit_s=args.time_limit, example_target=zm.target,
                                  chunks="auto" if name == "ours-auto" else 1)
            runners.append(_ours_runner(name, pm, zm, rank))
            continue
        mode, key, kind, graph, trees = parts[1], parts[2], parts[3], parts[-1] == "graph", parts[-1] == "cudagraphs"
        plan = plans[(key, kind, mode == "compiled", graph or trees)]  # both planned without host dispatch
        compile: bool | dict = {"mode": "reduce-overhead"} if trees else mode == "compiled"
        pm = compile_parallel(zm.model, devices, zm.example_args, zm.loss_fn, plan=plan,
                              example_kwargs=zm.example_kwargs, microbatches=args.microbatches, compile=compile,
                              mixed_precision=_mixed(precision), cuda_graph=graph)
        runners.append(_ours_runner(name, pm, zm, rank))
    return runners


def _ours_runner(name: str, pm, zm, rank: int | None) -> Runner:
    """The Runner of a ParallelModel, with its plan's predicted step and peak."""
    plan = pm.plan
    predicted = _serial_s(plan) if rank is None else plan.step_time_s
    peak = sum(plan.rank_mem_bytes) if rank is None else plan.rank_mem_bytes[rank]
    note = "stages under CUDA graphs" if uses_cudagraphs(pm.compile_options) else ""
    return Runner(name, lambda: pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs),
                  pm.zero_grad, list(pm.parameters()), predicted, peak, note=note, plan=plan)


def accumulation_step(zm, precision: str, microbatches: int) -> Callable[[Callable], None]:
    """step(fn): forward and backward of `fn` (the model, plain or compiled) on every microbatch of
    zm's example batch, losses / microbatches, under bf16 autocast for bf16-mixed: the plain model's
    gradient accumulation, the ceiling our pipelines run against."""
    from partitioner.microbatch import batch_size, split_batch
    inputs = (tuple(zm.example_args), dict(zm.example_kwargs))  # t5: decoder inputs ride in the kwargs
    mbs = list(zip(split_batch(inputs, microbatches, "input", batch_size(inputs)), zm.target.chunk(microbatches)))
    device_type = zm.target.device.type

    def step(fn: Callable) -> None:
        for (x, kw), y in mbs:
            with torch.autocast(device_type, torch.bfloat16, enabled=precision == "bf16-mixed"):
                loss = zm.loss_fn(fn(*x, **kw), y) / microbatches
            loss.backward()
    return step


def plain_runners(zm, precision: str, microbatches: int, wanted: list[str]) -> list[Runner]:
    model = zm.model
    compiled = torch.compile(model, dynamic=False) if "plain-compiled" in wanted else None
    trees = (torch.compile(model, dynamic=False, mode="reduce-overhead") if "plain-compiled-cudagraphs" in wanted
             else None)
    step = accumulation_step(zm, precision, microbatches)

    def graphed_step(fn: Callable) -> None:
        torch.compiler.cudagraph_mark_step_begin()  # a step is one generation of the cudagraph trees
        step(fn)

    runners, opt = [], None
    for name, fn, run in (("plain-eager", model, step), ("plain-compiled", compiled, step),
                          ("plain-compiled-cudagraphs", trees, graphed_step)):
        if name in wanted:
            r = Runner(name, lambda fn=fn, run=run: run(fn), lambda: model.zero_grad(set_to_none=True),
                       list(model.parameters()))
            opt = opt or r.optimizer
            r.optimizer = opt
            runners.append(r)
    return runners


def torch_runners(zm, args, device: torch.device, p: int, rank: int | None, wanted: list[str]) -> list[Runner]:
    from benchmarks.torch_pipeline import TorchPipeline

    runners = []
    for key, chunks in (("1f1b", 1), ("interleaved", args.chunks)):
        for mode in ("eager", "compiled"):
            name = f"torch-{mode}-{key}"
            if name not in wanted:
                continue
            stages = p * chunks
            ids = list(range(stages)) if rank is None else list(range(rank, stages, p))
            try:
                pipe = TorchPipeline(zm.model, stages, ids, device, args.microbatches, zm.loss_fn, mode == "compiled")
            except ValueError as err:  # no hand-written split for this family
                print(f"skipping {name}: {err}", file=sys.stderr)
                continue
            runners.append(Runner(name, lambda pipe=pipe: pipe.train_step(*zm.example_args, zm.target),
                                  pipe.zero_grad, pipe.parameters()))
    return runners


# ---------------------------------------------------------------------------- measuring

def _sync(device: torch.device, distributed: bool) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if distributed:
        dist.barrier()


def _resident_bytes(r: Runner) -> int:
    state = [t for s in (r.optimizer.state.values() if r.optimizer else []) for t in s.values()
             if isinstance(t, torch.Tensor)]
    # this rank's part of FSDP-sharded parameters and optimizer state
    return sum(local_tensor(t).numel() * t.element_size() for t in [*r.params, *state])


def graph_pool_bytes(device: torch.device) -> dict[tuple, int]:
    """Bytes reserved per CUDA graph memory pool (the caching allocator's default pool left out).

    A graph replay writes its intermediates into its pool, allocated once when recording, so
    max_memory_allocated never sees them; a configuration's footprint adds its pools' segments."""
    if device.type != "cuda":
        return {}
    pools: dict[tuple, int] = {}
    for seg in torch.cuda.memory_snapshot():
        pool = tuple(seg.get("segment_pool_id", (0, 0)))
        if seg.get("device", device.index) == device.index and pool != (0, 0):
            pools[pool] = pools.get(pool, 0) + seg["total_size"]
    return pools


def run_step(r: Runner, device: torch.device, distributed: bool, measure_memory: bool = False) -> tuple[float, float]:
    """Seconds of one whole step and of its train part (max over ranks under torchrun)."""
    r.zero()
    if measure_memory and device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device, distributed)
    t0 = time.perf_counter()
    r.train()
    _sync(device, distributed)
    t1 = time.perf_counter()
    if r.optimizer is not None:
        r.optimizer.step()
    _sync(device, distributed)
    t2 = time.perf_counter()
    if measure_memory and device.type == "cuda":
        pools = graph_pool_bytes(device)
        r.peak_bytes = (_resident_bytes(r) + torch.cuda.max_memory_allocated(device) - before
                        + sum(pools.get(pool, 0) for pool in r.graph_pools))
    times = torch.tensor([t2 - t0, t1 - t0], dtype=torch.float64)
    if distributed:
        times = times.to(device) if dist.get_backend() == "nccl" else times
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return float(times[0]), float(times[1])


def measure(runners: list[Runner], device: torch.device, distributed: bool, warmup: int, rounds: int,
            log: Callable[[str], None], host_rounds: bool = False) -> list[dict]:
    """Warm every configuration up, then time them in `rounds` alternating rounds. With host_rounds, a
    round of the host calibration and a pure-Python loop are timed before each round (returned, one
    dict per round): whether the host's speed moves the steps, round by round."""
    for i, r in enumerate(runners):  # warm-up: compile, record graphs, allocate optimizer state
        t = time.perf_counter()
        pools_before = graph_pool_bytes(device)
        for _ in range(warmup):
            run_step(r, device, distributed)
        r.graph_pools = frozenset(graph_pool_bytes(device).keys() - pools_before.keys())
        log(f"  warm-up {r.name}: {time.perf_counter() - t:.1f} s")
    for r in runners:
        run_step(r, device, distributed, measure_memory=True)
    hosts = []
    for k in range(rounds):
        if host_rounds:
            hosts.append(_host_round(device))
            log(f"  round {k}: host {hosts[-1]}")
        for r in (runners if k % 2 == 0 else runners[::-1]):
            total, train = run_step(r, device, distributed)
            r.train_s.append(train)
            r.times_s.append(total)
    return hosts


def _host_round(device: torch.device) -> dict:
    """This host's speed now: one round of the plan's host calibration (us per eager forward node and
    backward kernel) and a fixed pure-Python loop (ms)."""
    from partitioner.cost_models.host_calibration import host_overheads_round
    fwd, bwd = host_overheads_round(device)
    t = time.perf_counter()
    sum(i * i for i in range(300_000))
    return {"fwd_node_us": round(fwd * 1e6, 2), "bwd_kernel_us": round(bwd * 1e6, 2),
            "python_loop_ms": round((time.perf_counter() - t) * 1e3, 2)}


def host_round_correlations(train_s: list[float], hosts: list[dict]) -> dict:
    """Pearson correlation of a configuration's per-round train time with each host measure: near 1
    where the host's drift moves the step, near 0 where the calibration's noise is its own."""
    if len(hosts) < 3 or len(train_s) != len(hosts):
        return {}
    out = {}
    for key in hosts[0]:
        xs = [h[key] for h in hosts]
        if len(set(xs)) > 1 and len(set(train_s)) > 1:
            out[f"corr_{key}"] = round(statistics.correlation(xs, train_s), 3)
    return out


def timelines(runners: list[Runner], device: torch.device, rank: int | None, stem: str) -> None:
    """--timeline: one more step of each of our configurations profiled on every rank, its measured
    timeline against the plan's simulated one (benchmarks/pipeline_timeline.py): the row's columns,
    and Gantt figures of both next to the JSON."""
    from benchmarks.pipeline_timeline import profile_timeline
    from partitioner.runtime.timeline import plot_timeline
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for r in runners:
        if r.plan is None:
            continue
        r.zero()
        out = profile_timeline(r.train, device, r.plan, rank)
        if out is None:
            continue
        summary, measured, simulated = out
        r.timeline = summary
        for which, tl in (("measured", measured), ("simulated", simulated)):
            plot_timeline(tl, common.RESULTS_DIR / f"{stem}_{r.name}_{which}.png", title=f"{r.name}, {which}")


def rows_for(runners: list[Runner], model: str, precision: str, args, world: int, flops_per_step: float,
             peak_flops: float, hosts: list[dict] = ()) -> list[dict]:
    tokens = args.microbatches * args.mb_size * args.seq
    rows = []
    for r in runners:
        step = statistics.median(r.times_s)
        train = statistics.median(r.train_s)
        rows.append({
            "model": model, "precision": precision, "gpus": world, "config": r.name,
            "tokens_per_s": tokens / step, "step_s": step, "train_s": train,
            "step_spread": (max(r.times_s) - min(r.times_s)) / step,
            "mfu": flops_per_step / step / (peak_flops * world) if peak_flops else None,
            "peak_gib": r.peak_bytes / GiB if r.peak_bytes is not None else None,
            "pred_train_s": r.predicted_step_s,
            "pred_err": (r.predicted_step_s / train - 1) if r.predicted_step_s else None,
            "pred_peak_gib": r.predicted_peak_bytes / GiB if r.predicted_peak_bytes else None,
            "note": r.note,
            "chunks": r.plan.chunks if r.plan is not None else None,  # ours-auto: what the planner chose
            **(r.timeline or {}),
            **host_round_correlations(r.train_s, list(hosts)),
        })
    base = {row["config"]: row["tokens_per_s"] for row in rows}
    for row in rows:
        for ref in ("plain-compiled", "torch-eager-1f1b", "torch-compiled-1f1b"):
            if ref in base and row["config"] != ref:
                row[f"x_{ref}"] = row["tokens_per_s"] / base[ref]
    return rows


def plot(rows: list[dict], path) -> None:
    plt = pyplot()
    groups = sorted({(r["model"], r["precision"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, (model, precision) in zip(axes[0], groups):
        sub = [r for r in rows if r["model"] == model and r["precision"] == precision]
        ax.barh([r["config"] for r in sub], [r["tokens_per_s"] / 1e3 for r in sub],
                color=["tab:blue" if r["config"].startswith("ours") else "tab:gray" for r in sub])
        ax.set_xlabel("thousand tokens/s")
        ax.set_title(f"{model} {precision}")
        ax.invert_yaxis()
    save_figure(fig, path, f"training throughput, {rows[0]['gpus']} GPU(s)")


def main(argv: list[str] | None = None) -> int:
    # the plain configurations train the model that compile_parallel was given, on purpose
    warnings.filterwarnings("ignore", message=".* of the model given to compile_parallel", category=RuntimeWarning)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2-xl", help="comma-separated zoo names (gpt2-xl,llama-1b,t5-base)")
    parser.add_argument("--precision", default="bf16", help=f"comma-separated, of {', '.join(PRECISIONS)}")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated configurations, or 'all': {', '.join(ALL_CONFIGS)}")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--mb-size", type=int, default=2, help="sequences per microbatch")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--stages", type=int, default=2, help="pipeline ranks in one process (ignored under torchrun)")
    parser.add_argument("--chunks", type=int, default=2, help="virtual stages per rank of the interleaved configs")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--time-compiled-launches", action="store_true",
                        help="plan compiled stages with this host's compiled launch and call costs timed at plan "
                             "time (cost_models/compiled_host.py) instead of the device table's")
    parser.add_argument("--measure", action="store_true",
                        help="plan with every distinct layer timed on the device (compiled for the compiled "
                             "configurations) instead of the analytic cost model")
    parser.add_argument("--host-rounds", action="store_true",
                        help="before each round, time one round of the host calibration (us per eager node) and "
                             "a pure-Python loop; each configuration's row gets its per-round train times and "
                             "their correlation with both (does the host's drift move the step?)")
    parser.add_argument("--timeline", action="store_true",
                        help="after the rounds, profile one step of each of our configurations on every rank and "
                             "set its measured timeline beside the plan's simulated one (columns measured_/"
                             "simulated_step_ms and _bubble, comm_kernel_ms, fwd/bwd_device_over_plan; a Gantt "
                             "figure of each)")
    add_training_run_arguments(parser, "train_throughput_<mode>")
    args = parser.parse_args(argv)
    if args.results_dir:
        common.RESULTS_DIR = Path(args.results_dir)

    rank, world = _world()
    device = _device(args, rank)
    if rank is not None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    p = world if rank is not None else args.stages
    wanted = list(ALL_CONFIGS) if args.configs == "all" else args.configs.split(",")
    unknown = set(wanted) - set(ALL_CONFIGS)
    if unknown:
        parser.error(f"unknown configurations {sorted(unknown)}; known: {', '.join(ALL_CONFIGS)}")
    if rank is not None:
        wanted = [w for w in wanted if not w.startswith("plain")]  # the ceiling is the one-GPU run's
    if rank is not None or device.type != "cuda":  # a whole-step CUDA graph captures one process's stages on one GPU
        wanted = [w for w in wanted if not w.endswith("-graph")]
    if device.type != "cuda":
        wanted = [w for w in wanted if not w.endswith("-cudagraphs")]
    lead = rank in (None, 0)

    def log(msg: str) -> None:
        if lead:
            print(msg, file=sys.stderr, flush=True)

    peak_flops = 0.0
    if device.type == "cuda":
        from partitioner.cost_models.device import spec_for_torch_device
        peak_flops = spec_for_torch_device(device, calibrate_host=False).flops_per_s(torch.bfloat16)
    mode = f"{world}gpu" if rank is not None else f"1proc_{args.device}"
    name = args.name or f"train_throughput_{mode}"
    rows: list[dict] = []
    host_records: dict[str, dict] = {}  # --host-rounds: per model, the rounds' host speeds and train times
    for model in args.models.split(","):
        for precision in args.precision.split(","):
            t = time.perf_counter()
            zm = build_model(args, model, precision, device)
            log(f"{model} {precision}: planning for {p} ranks")
            plans = make_plans(zm, args, precision, device, p, rank, wanted)
            runners = plain_runners(zm, precision, args.microbatches, wanted) if rank is None else []
            runners += ours_runners(zm, args, precision, device, p, rank, plans, wanted)
            if rank is not None or any(w.startswith("torch") for w in wanted):
                if rank is None and not dist.is_initialized():
                    _init_single_rank_group(device)
                runners += torch_runners(zm, args, device, p, rank, wanted)
            log(f"{model} {precision}: {len(runners)} configurations set up in {time.perf_counter() - t:.0f} s")
            hosts = measure(runners, device, rank is not None, args.warmup, args.rounds, log, args.host_rounds)
            if args.timeline:
                timelines(runners, device, rank, f"{name}_{model}_{precision}")
            flops = plans["flops_per_microbatch"] * args.microbatches
            rows += rows_for(runners, model, precision, args, p if rank is not None else 1, flops, peak_flops,
                             hosts)
            if hosts:
                host_records[f"{model} {precision}"] = {
                    "hosts": hosts, "train_s": {r.name: [round(t, 4) for t in r.train_s] for r in runners}}
            del runners, zm
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if lead:  # after every group, so a run cut short keeps what it measured
                # the process's peak reservation: the allocator's cached blocks as well as what is in use
                reserved = torch.cuda.max_memory_reserved(device) / GiB if device.type == "cuda" else None
                path = write_result(name, rows, {"world_size": world, "stages_per_process": p if rank is None else 1,
                                                 "process_max_reserved_gib": reserved,
                                                 **({"host_rounds": host_records} if host_records else {}),
                                                 **_host_calibration(device, wanted, args.time_compiled_launches)})
    if lead:
        print_table(f"training throughput ({mode}, m = {args.microbatches}, {args.mb_size} x {args.seq} tokens)", rows)
        plot(rows, path.with_suffix(".png"))
        print(f"wrote {path}")
    if rank is not None:
        dist.destroy_process_group()
    return 0


def _host_calibration(device: torch.device, wanted: list[str], time_compiled: bool) -> dict:
    """The host speeds the plans were costed with on this host (us per eager forward node, per eager
    backward kernel; per compiled launch and per compiled call where compiled stages were planned):
    what moves every host-bound prediction."""
    if device.type != "cuda":
        return {}
    from partitioner.cost_models.compiled_host import compiled_host_overheads_s
    from partitioner.cost_models.host_calibration import HOST_CALIBRATION_ROUNDS, host_overheads_s
    fwd, bwd = host_overheads_s(device)
    out = {"fwd_node": round(fwd * 1e6, 2), "bwd_kernel": round(bwd * 1e6, 2),
           "rounds": [[round(f * 1e6, 2), round(b * 1e6, 2)] for f, b in HOST_CALIBRATION_ROUNDS.get(str(device), [])]}
    if time_compiled and any(w.startswith("ours-compiled") and not w.endswith("-graph") for w in wanted):  # cached
        launch, call = compiled_host_overheads_s(device)
        out.update(compiled_launch=round(launch * 1e6, 2), compiled_call=round(call * 1e6, 2))
    return {"host_calibration_us": out}


def _init_single_rank_group(device: torch.device) -> None:
    """torch's pipelining needs a process group even when one process holds every stage."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


if __name__ == "__main__":
    sys.exit(main())
