"""`partitioner plan`: load a model, plan it, print the plan (and the baselines, and the timeline)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from partitioner import profile_cache, zoo
from partitioner.cost_models.device import get_device_spec
from partitioner.cost_models.profile_command import load_model_spec
from partitioner.data_parallel_costs import check_data_parallel, dp_bandwidth, microbatch_size
from partitioner.errors import PlanError
from partitioner.microbatch import batch_size
from partitioner.passes.coarsen import OPS
from partitioner.plan import Plan, plan_timeline
from partitioner.plan_model import DTYPES, PlanConfig, PlanResult, plan_model, plan_profiled
from partitioner.problem import check_config, check_gap
from partitioner.runtime.timeline import plot_timeline, render_text
from partitioner.schedule_choice import choice_line, fixed_chunks
from partitioner.units import human_bytes, human_time, parse_bandwidth, parse_bytes
from partitioner.zoo import DEFAULT_BATCH, context_note

def _stage_blocks(plan: Plan) -> list[list[int]]:
    blocks: list[list[int]] = [[] for _ in range(plan.num_stages)]
    for b, k in enumerate(plan.block_stage):
        blocks[k].append(b)
    return blocks


def _span(names: list[str]) -> str:
    """'transformer.h.3' .. 'transformer.h.6' -> 'transformer.h.3..6'."""
    first, last = names[0].split("..")[0], names[-1].split("..")[-1]
    if first == last:
        return first
    head, _, tail = last.rpartition(".")
    if head and first.startswith(head + "."):
        return f"{first}..{tail}"
    return f"{first}..{last}"


def _short_bytes(n: float) -> str:
    """Three significant digits: '117 MiB', '9.85 GiB', '1000 MiB' (the narrow table's width)."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            x = n / size
            return f"{x:.0f} {unit}" if abs(x) >= 100 else f"{x:.3g} {unit}"
    return f"{int(n)} B"


def plan_table(plan: Plan | PlanResult, title: str = "", width: int = 160,
               block_names: list[str] | None = None) -> Table:
    """One row per virtual stage: rank, blocks it holds, parameters, times, memory of its rank.

    A PlanResult names the blocks by module; a bare Plan by index unless block_names are given.
    Below 120 columns the table narrows (no borders, fwd+bwd in one column, no block count or
    receive time, three-digit sizes) so that every number stays whole in an 80-column terminal;
    the blocks column folds."""
    if isinstance(plan, PlanResult):
        block_names = [b.name for b in plan.block_graph.blocks]
        plan = plan.plan
    narrow = width < 120
    size = _short_bytes if narrow else human_bytes
    table = Table(title=title or None, title_justify="left", box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD,
                  pad_edge=not narrow)
    if narrow:
        cols = (["stage"] if plan.chunks > 1 else []) + ["rank", "blocks", "params", "saved/mb", "fwd+bwd", "memory"]
    else:
        cols = ["stage", "rank", "blocks", "#", "params", "saved/mb", "fwd", "bwd", "recv", "rank memory"]
    for col in cols:
        if col == "blocks":  # the one column that gives way on a narrow terminal
            table.add_column(col, overflow="fold", min_width=10, max_width=None if narrow else max(16, width - 100))
        else:
            table.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    for k, blocks in enumerate(_stage_blocks(plan)):
        r = plan.stage_rank[k]
        first_of_rank = plan.stage_rank.index(r) == k
        names = _span([block_names[b] for b in blocks]) if block_names else \
            (f"{blocks[0]}..{blocks[-1]}" if len(blocks) > 1 else str(blocks[0]))
        memory = size(plan.rank_mem_bytes[r]) if first_of_rank else ""
        cells = {"stage": str(k), "rank": str(r), "blocks": names, "#": str(len(blocks)),
                 "params": size(plan.stage_param_bytes[k]), "saved/mb": size(plan.stage_saved_bytes[k]),
                 "fwd": human_time(plan.stage_fwd_time_s[k]), "bwd": human_time(plan.stage_bwd_time_s[k]),
                 "fwd+bwd": human_time(plan.stage_fwd_time_s[k] + plan.stage_bwd_time_s[k]),
                 "recv": human_time(plan.stage_comm_time_s[k]), "rank memory": memory, "memory": memory}
        table.add_row(*(cells[c] for c in cols))
    return table


def print_plan(plan: Plan | PlanResult, block_names: list[str] | None = None, console: Console | None = None) -> None:
    """The full report of a plan: its table (one row per stage) and its summary lines."""
    console = console or Console()
    console.print(plan_table(plan, width=console.width, block_names=block_names))
    for line in summary_lines(plan.plan if isinstance(plan, PlanResult) else plan):
        console.print(line, highlight=False)


def device_line(plan: Plan) -> str:
    """Which device the costs assume, its memory, and the memory cap."""
    cap = human_bytes(plan.memory_cap_bytes) if plan.memory_cap_bytes else ""
    if not plan.device:
        return f"memory cap {cap} per rank" if cap else ""
    if not cap:
        return f"device {plan.device} with {human_bytes(plan.device_mem_bytes)}; no memory cap"
    if plan.memory_cap_bytes == plan.device_mem_bytes:
        return f"device {plan.device} with {cap}: the memory cap (set --memory, --device-type)"
    return f"device {plan.device} with {human_bytes(plan.device_mem_bytes)}; memory cap {cap} per rank"


def search_line(plan: Plan) -> str:
    """How good the plan is known to be, in words (the solver's own numbers are in the JSON)."""
    if not plan.solver_status:  # a plan made by hand or by a baseline
        return ""
    took = f"search {plan.solve_time_s:.1f} s"
    if plan.solver_status.startswith("DP_FALLBACK") and plan.step_gap is None:
        # with a bound, the words below say how good the plan is, whatever it started from
        polished = ", polished" if "+refined" in plan.solver_status else ""
        return f"{took}: no ILP plan in time: chain DP split{polished} (raise --time-limit)"
    if plan.step_gap is None:
        return f"{took}; how close to the best plan is not known (no lower bound)"
    if plan.step_gap < 5e-4:
        return f"{took}: proven best, no valid plan is predicted faster"
    if plan.step_gap <= plan.gap_limit + 1e-12:  # the search stopped there (--gap)
        return f"proven within {plan.step_gap:.1%} of the best possible in {plan.solve_time_s:.1f} s"
    if plan.time_limit_s and plan.solve_time_s >= 0.9 * plan.time_limit_s:
        return f"stopped at the time limit ({plan.time_limit_s:g} s) with a gap of {plan.step_gap:.1%}"
    return f"{took}: the best valid plan is at most {plan.step_gap:.1%} faster (raise --time-limit)"


def summary_lines(plan: Plan) -> list[str]:
    """The plan in a few lines of under 80 characters: schedule, the one predicted step time,
    memory and device, how good the search proved it."""
    per_rank = f"{plan.chunks} stages each" if plan.chunks > 1 else "1 stage each"
    peak = f", peak memory {human_bytes(max(plan.rank_mem_bytes))}" if plan.rank_mem_bytes else ""
    lines = [
        f"{plan.schedule} schedule: {plan.num_ranks} ranks x {per_rank}, {plan.microbatches} microbatches",
        f"predicted step time {human_time(plan.step_time_s)}, idle (bubble) {plan.bubble:.1%}{peak}",
        device_line(plan),
        search_line(plan),
        f"activations sent between ranks: {human_bytes(plan.bytes_crossing)} per microbatch",
    ]
    if plan.replicated_params:
        lines.append(f"tied parameters copied on several ranks: {', '.join(plan.replicated_params)} "
                     f"(gradient all-reduce {human_time(plan.allreduce_time_s)} per step)")
    return [line for line in lines if line] + data_parallel_lines(plan)


def host_bound_lines(result: PlanResult) -> list[str]:
    """A hint where the host takes longer to launch a microbatch's kernels (forward and backward
    of the whole model) than the GPU takes to run them; none where it does not, or where the plan
    already replays CUDA graphs."""
    if result.cuda_graphs or not result.host_bound:
        return []
    host, device = result.launch_and_run_s
    return [f"host-bound: a microbatch's kernels take {human_time(host)} to launch, {human_time(device)} to run;",
            "  CUDA graphs skip the launches: compile_parallel(compile={'mode': 'reduce-overhead'})",
            "  (each stage call; compile_parallel picks it itself in one process) or cuda_graph=True",
            "  (the whole step, one process, one GPU); plan for them with --cuda-graph"]


def data_parallel_lines(plan: Plan) -> list[str]:
    """dp x pp in two lines: replicas and GPUs, and the collectives over the replicas that the step
    time includes (each rank's are in plan.rank_dp_reduce_time_s)."""
    dp = plan.data_parallel
    if dp <= 1:
        return []
    comm = ("gradient reduce-scatter + parameter all-gather" if plan.data_parallel_mode == "fsdp"
            else "gradient all-reduce over the replicas")
    return [f"data parallel: {dp} replicas x {plan.num_ranks} ranks = {dp * plan.num_ranks} GPUs "
            f"({plan.data_parallel_mode}); memory is per GPU",
            f"{comm}: {human_time(plan.dp_reduce_time_s)} per step at {plan.dp_bw_bytes_per_s / 1e9:.3g} GB/s"]


def plan_summary(plan: Plan, max_ranks: int = 8) -> str:
    """str(plan): what it is, its step time and memory, one line per rank (up to max_ranks)."""
    per_rank = f"{plan.chunks} stages each" if plan.chunks > 1 else "1 stage each"
    lines = [f"Plan{' of ' + plan.model if plan.model else ''}: {plan.num_ranks} ranks x {per_rank}, "
             f"{plan.schedule}, {plan.microbatches} microbatches"
             + (f", {plan.data_parallel} replicas ({plan.data_parallel_mode})" if plan.data_parallel > 1 else "")]
    if plan.step_time_s:
        lines.append(f"predicted step time {human_time(plan.step_time_s)}, bubble {plan.bubble:.1%}"
                     + (f", on {plan.device} ({human_bytes(plan.device_mem_bytes)})" if plan.device else ""))
    for r in range(min(plan.num_ranks, max_ranks)):
        stages = [k for k, rank in enumerate(plan.stage_rank) if rank == r]
        blocks = [[b for b, k in enumerate(plan.block_stage) if k == stage] for stage in stages]
        spans = ", ".join(f"{bs[0]}..{bs[-1]}" if len(bs) > 1 else str(bs[0]) for bs in blocks if bs)
        line = f"  rank {r}: stage{'s' if len(stages) > 1 else ''} {', '.join(map(str, stages))}, blocks {spans}"
        if plan.stage_fwd_time_s:
            busy = sum(plan.stage_fwd_time_s[k] + plan.stage_bwd_time_s[k] for k in stages)
            line += f", {human_time(busy)} per microbatch"
        if plan.rank_mem_bytes:
            line += f", memory {human_bytes(plan.rank_mem_bytes[r])}"
        lines.append(line)
    if plan.num_ranks > max_ranks:
        lines.append(f"  ... {plan.num_ranks - max_ranks} more ranks")
    lines.append("full table: partitioner.plan_command.print_plan(plan)")
    return "\n".join(lines)


def compare_table(result: PlanResult) -> Table:
    """ILP vs every baseline, all scored by the simulator."""
    ilp = result.plan
    table = Table(title="ILP vs baselines (same simulator)", title_justify="left")
    for col in ("method", "step time", "vs ILP", "bubble", "peak memory", "fits"):
        table.add_column(col, justify="left" if col == "method" else "right")
    cap = ilp.memory_cap_bytes
    for name, plan in [("ilp", ilp)] + list(result.baselines.items()):
        peak = max(plan.rank_mem_bytes)
        table.add_row(name, human_time(plan.step_time_s), f"{plan.step_time_s / ilp.step_time_s:.3f}x",
                      f"{plan.bubble:.1%}", human_bytes(peak), "yes" if cap is None or peak <= cap else "NO (OOM)")
    return table


def config_from_args(args: argparse.Namespace) -> PlanConfig:
    return PlanConfig(num_ranks=args.devices, chunks=args.chunks, microbatches=args.microbatches,
                      schedule=args.schedule, memory_cap_bytes=parse_bytes(args.memory) if args.memory else None,
                      device_type=args.device_type, dtype=args.dtype, optimizer=args.optimizer, depth=args.depth,
                      time_limit_s=args.time_limit, gap=args.gap / 100, batch=args.batch, seq=args.seq,
                      compare=args.compare,
                      mixed_precision=getattr(args, "mixed_precision", None), compiled=getattr(args, "compile", False),
                      cuda_graphs=getattr(args, "cuda_graph", False),
                      data_parallel=getattr(args, "data_parallel", 1), data_parallel_mode=getattr(args, "dp_mode", "fsdp"),
                      dp_bw_bytes_per_s=parse_bandwidth(args.dp_bandwidth) if getattr(args, "dp_bandwidth", None)
                      else None, gpus_per_host=getattr(args, "gpus_per_host", 8))


TIMELINE_SUFFIXES = (".png", ".pdf", ".svg")


def check_output_paths(json_path: str | None, timeline: str | None) -> None:
    """Fail before the solve, not after it, when --json or --timeline cannot be written."""
    def check(path: Path, flag: str, example: str) -> None:
        if path.is_dir():
            raise PlanError(f"{flag} {path} is a directory: give a file name, e.g. {path / example}")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise PlanError(f"{flag} {path}: the folder {parent} does not exist; create it or write elsewhere")
        if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise PlanError(f"{flag} {path} is not writable; choose a path you can write to")

    if json_path:
        check(Path(json_path), "--json", "plan.json")
    if timeline and timeline != "-":
        path = Path(timeline)
        check(path, "--timeline", "timeline.png")
        if path.suffix.lower() not in TIMELINE_SUFFIXES:
            raise PlanError(f"--timeline {timeline}: draws a .png, .pdf or .svg file (e.g. {path.with_suffix('.png')})"
                            ", or give --timeline alone to print the schedule in the terminal")


def zoo_recipe(name: str, config: PlanConfig, parts: int) -> tuple[str | None, Any]:
    """For a zoo model planned with the profile cache on: the key of its recipe (how the CLI builds
    it) and the CachedProfile the cache holds for it (None on a miss); (None, None) otherwise.
    parts: the global batch's microbatches over every data-parallel replica."""
    batch = config.batch or DEFAULT_BATCH
    if not config.use_cache or name not in zoo.model_names() or batch % parts:
        return None, None
    # the profile is one microbatch's: --batch 16 --microbatches 16 and --batch 8 --microbatches 8 share it
    recipe = ("zoo", name, batch // parts, config.seq, config.dtype, "meta")
    key = profile_cache.recipe_key(recipe, device_spec=get_device_spec(config.device_type),
                                   optimizer=config.optimizer,
                                   options=(config.dtype, config.mixed_precision, config.compiled))
    hit = profile_cache.load_recipe(key)
    return key, hit[1] if hit is not None else None


def run_plan(args: argparse.Namespace) -> None:
    """The `partitioner plan` command."""
    config = config_from_args(args)
    _, m = check_config(1 << 30, config.num_ranks, fixed_chunks(config.chunks, config.schedule), config.microbatches,
                        config.schedule)
    check_data_parallel(config.data_parallel, config.data_parallel_mode)
    dp = config.data_parallel
    parts = dp * m  # the global batch splits into dp replicas x m microbatches
    check_output_paths(args.json, args.timeline)
    # an unknown --device-type or a bad --dp-bandwidth fails here, before the model loads
    dp_bandwidth(get_device_spec(config.device_type), dp, config.num_ranks, config.gpus_per_host,
                 config.dp_bw_bytes_per_s)
    check_gap(config.gap)
    if config.batch and dp > 1:
        microbatch_size(config.batch, dp, m)
    split_into = f"{dp} replicas x {m} microbatches" if dp > 1 else f"{m} microbatches"
    if config.batch is None and ":" not in args.model:  # a zoo model: its default batch, rounded up to dp x m
        if DEFAULT_BATCH % parts:  # known before building it, so the model is built once
            config.batch = parts * -(-DEFAULT_BATCH // parts)
            Console(stderr=True).print(f"using --batch {config.batch}: the default batch {DEFAULT_BATCH} "
                                       f"does not split into {split_into}")
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=max(console.width, 160))  # logs and pipes: room for the whole table
    err = Console(stderr=True)
    note = context_note(args.model, config.seq)
    if note:
        err.print(f"note: {note}", highlight=False)
    with err.status(f"loading {args.model}") as status:
        recipe, cached = zoo_recipe(args.model, config, parts)
        if cached is not None:  # a zoo model profiled before: neither built nor captured
            result = plan_profiled(cached.annotated, cached.costs, cached.loss_costs, config,
                                   on_step=lambda msg: status.update(msg))
        else:
            spec = load_model_spec(args.model, batch=config.batch, seq=config.seq, device="meta",
                                   dtype=DTYPES[config.dtype])
            batch = batch_size((spec.example_args, spec.example_kwargs))
            if config.batch is None and batch and batch % parts:  # the model's default batch: round it up
                config.batch = parts * -(-batch // parts)
                err.print(f"using --batch {config.batch}: the default batch {batch} does not split into {split_into}")
                spec = load_model_spec(args.model, batch=config.batch, seq=config.seq, device="meta",
                                       dtype=DTYPES[config.dtype])
            result = plan_model(spec.model, spec.example_args, spec.example_kwargs, config,
                                on_step=lambda msg: status.update(msg), loss_fn=spec.loss_fn,
                                example_target=spec.target, need_graph=False)
            if recipe is not None and result.profile_key is not None:
                profile_cache.store_recipe(recipe, result.profile_key)
    plan = result.plan = result.plan.replace(model=args.model)
    console.print(plan_table(result, width=console.width, title=f"{args.model}: {len(result.block_graph.blocks)} blocks "
                                     f"({_depth(result.block_graph.depth)}) on {plan.num_stages} stages"))
    chosen = [choice_line(result.chunk_choices, plan.chunks)] if result.chunk_choices else []
    for line in [*summary_lines(plan), *chosen, *host_bound_lines(result)]:
        console.print(line, highlight=False)
    if dp > 1 and batch:
        global_batch = config.batch or batch
        samples = microbatch_size(global_batch, dp, m)
        console.print(f"global batch {global_batch} = {dp} replicas x {m} microbatches x {samples} "
                      f"sample{'s' if samples != 1 else ''}", highlight=False)
    if config.compare:
        console.print(compare_table(result))
    if args.json:
        Path(args.json).write_text(plan.to_json())
        console.print(f"plan written to {args.json}")
    if args.timeline:
        tl = plan_timeline(plan, result.block_graph)
        if args.timeline == "-":
            console.print(render_text(tl, width=min(console.width - 10, 120), markup=True))
        else:
            path = plot_timeline(tl, args.timeline, title=f"{args.model}: {plan.schedule}")
            console.print(f"timeline drawn to {path}")


def _depth(depth: int) -> str:
    return "single ops: no module depth gives enough blocks" if depth == OPS else f"module depth {depth}"


if __name__ == "__main__":
    from partitioner.cli import main  # the CLI imports this module

    sys.exit(main(["plan"] + sys.argv[1:]))
