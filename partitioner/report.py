"""`partitioner plan`: load a model, plan it, print the plan (and the baselines, and the timeline)."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cost_models.report import human_bytes
from partitioner.errors import PlanError
from partitioner.microbatch import batch_size
from partitioner.plan import Plan
from partitioner.planner import DTYPES, PlanConfig, PlanResult, plan_model

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'24GiB', '80 GB', '1.5e10' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise PlanError(f"cannot read memory size {text!r}: write e.g. 24GiB, 80GB or 1.5e10")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human_time(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 10 else f"{s:.2f} s"


def _stage_blocks(result: PlanResult) -> list[list[int]]:
    blocks: list[list[int]] = [[] for _ in range(result.plan.num_stages)]
    for b, k in enumerate(result.plan.block_stage):
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


def plan_table(result: PlanResult, title: str = "", width: int = 160) -> Table:
    """One row per virtual stage: rank, blocks it holds, parameters, times, memory of its rank.
    The blocks column gives way (ellipsis) so that the table fits `width` characters."""
    plan, bg = result.plan, result.block_graph
    table = Table(title=title or None, title_justify="left")
    for col, just in (("stage", "right"), ("rank", "right"), ("blocks", "left"), ("#", "right"),
                      ("params", "right"), ("saved/mb", "right"), ("fwd", "right"), ("bwd", "right"),
                      ("recv", "right"), ("rank memory", "right")):
        if col == "blocks":  # the one column that gives way on a narrow terminal (the others need ~100)
            table.add_column(col, justify=just, no_wrap=True, overflow="ellipsis", max_width=max(16, width - 100))
        else:
            table.add_column(col, justify=just, no_wrap=True, min_width=len(col))
    for k, blocks in enumerate(_stage_blocks(result)):
        r = plan.stage_rank[k]
        first_of_rank = plan.stage_rank.index(r) == k
        table.add_row(str(k), str(r), _span([bg.blocks[b].name for b in blocks]), str(len(blocks)),
                      human_bytes(plan.stage_param_bytes[k]), human_bytes(plan.stage_saved_bytes[k]),
                      human_time(plan.stage_fwd_time_s[k]), human_time(plan.stage_bwd_time_s[k]),
                      human_time(plan.stage_comm_time_s[k]),
                      human_bytes(plan.rank_mem_bytes[r]) if first_of_rank else "")
    return table


def summary_lines(plan: Plan) -> list[str]:
    cap = f" (cap {human_bytes(plan.memory_cap_bytes)})" if plan.memory_cap_bytes else ""
    lines = [
        f"schedule {plan.schedule}: {plan.num_ranks} ranks x {plan.chunks} chunk(s), {plan.microbatches} microbatches",
        f"predicted step time {human_time(plan.step_time_s)} ({'simulated' if plan.simulated else 'closed form'}), "
        f"bubble {plan.bubble:.1%}, peak memory {human_bytes(max(plan.rank_mem_bytes))}{cap}",
        f"solver {plan.solver_status}: objective {human_time(plan.objective)}, bound {human_time(plan.bound)}, "
        f"gap {plan.gap:.1%}, {plan.solve_time_s:.2f} s",
        f"activations crossing ranks {human_bytes(plan.bytes_crossing)} per microbatch",
    ]
    if plan.step_gap is not None:
        lines.insert(3, f"lower bound on any valid plan's step {human_time(plan.step_lower_bound_s)}: "
                        f"this plan is within {plan.step_gap:.1%} of it")
    if plan.replicated_params:
        lines.append(f"tied parameters replicated: {', '.join(plan.replicated_params)} "
                     f"(gradient all-reduce {human_time(plan.allreduce_time_s)} per step)")
    return lines


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
                      time_limit_s=args.time_limit, batch=args.batch, seq=args.seq, compare=args.compare,
                      mixed_precision=getattr(args, "mixed_precision", None), compiled=getattr(args, "compile", False))


def run_plan(args: argparse.Namespace) -> None:
    """The `partitioner plan` command."""
    from cost_models.report import load_model_spec
    from partitioner.plan import check_config

    config = config_from_args(args)
    _, m = check_config(1 << 30, config.num_ranks, config.chunks, config.microbatches, config.schedule)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))  # logs and pipes: room for the whole table
    err = Console(stderr=True)
    with err.status(f"loading {args.model}") as status:
        spec = load_model_spec(args.model, batch=config.batch, seq=config.seq, device="meta",
                               dtype=DTYPES[config.dtype])
        batch = batch_size((spec.example_args, spec.example_kwargs))
        if config.batch is None and batch and batch % m:  # the model's default batch: round it up
            config.batch = m * -(-batch // m)
            err.print(f"using --batch {config.batch}: the default batch {batch} does not split into {m} microbatches")
            spec = load_model_spec(args.model, batch=config.batch, seq=config.seq, device="meta",
                                   dtype=DTYPES[config.dtype])
        result = plan_model(spec.model, spec.example_args, spec.example_kwargs, config,
                            on_step=lambda msg: status.update(msg), loss_fn=spec.loss_fn, example_target=spec.target)
    plan = result.plan
    console.print(plan_table(result, width=console.width, title=f"{args.model}: {len(result.block_graph.blocks)} blocks "
                                     f"(module depth {result.block_graph.depth}) on {plan.num_stages} stages"))
    for line in summary_lines(plan):
        console.print(line)
    if config.compare:
        console.print(compare_table(result))
    if args.json:
        Path(args.json).write_text(plan.to_json())
        console.print(f"plan written to {args.json}")
    if args.timeline:
        from partitioner.plan import plan_timeline
        from runtime.timeline import plot_timeline, render_text

        tl = plan_timeline(plan, result.block_graph)
        if args.timeline == "-":
            console.print(render_text(tl, width=min(console.width - 10, 120), markup=True))
        else:
            path = plot_timeline(tl, args.timeline, title=f"{args.model}: {plan.schedule}")
            console.print(f"timeline drawn to {path}")


if __name__ == "__main__":
    from partitioner.cli import main

    sys.exit(main(["plan"] + sys.argv[1:]))
