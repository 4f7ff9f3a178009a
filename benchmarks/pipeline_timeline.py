"""The measured pipeline's timeline next to the plan's simulated one (`train_throughput --timeline`).

One step of a ParallelModel is profiled on every rank: each schedule action's span on the device
(its kernels, matched to the action that launched them by the profiler's correlation ids; on a CPU
its host span) and the compute kernel time inside it, and each rank's communication kernels
(NCCL's send and receive kernels stay resident from their launch until the peer's matching call,
holding SMs the compute kernels then lack). Rank 0 gathers them into a measured
runtime.simulator.Timeline and sets it beside the simulator's timeline of the plan: the step, the
bubble, the time communication kernels were resident, and each pass's measured device time over the
plan's (above 1 where resident communication slows the compute, or where the plan's costs are low).
Built to find out where interleaving loses on 2 GPUs although the simulator says it wins.
"""
from __future__ import annotations

import bisect
import json
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

from partitioner.runtime.schedules import Action, Schedule, make_schedule
from partitioner.runtime.simulator import StageCosts, Timeline, held_by_waiting_sends, simulate

# the executor labels each action `partitioner.<stage><F|B><microbatch>` (runtime/executor.py)
ACTION = re.compile(r"^partitioner\.((\d+)([A-Z])(\d+))$")
_ORIGIN = "partitioner.timeline_origin"


def action_parts(label: str) -> tuple[int, str, int]:
    """(1, "B", 3) of the action label "1B3"."""
    _, stage, kind, mb = ACTION.match(f"partitioner.{label}").groups()
    return int(stage), kind, int(mb)


def _is_comm(name: str) -> bool:
    return "nccl" in name.lower()


def _action_ranges(trace_events: list[dict]) -> list[tuple[float, float, str]]:
    """The executor's action spans on the host (`partitioner.<action>`), in time order: (start, end, "1B3")."""
    return sorted((e["ts"], e["ts"] + e["dur"], ACTION.match(e["name"]).group(1)) for e in trace_events
                  if e.get("ph") == "X" and e.get("cat") != "gpu_user_annotation"  # not its GPU-time copy
                  and ACTION.match(e.get("name", "")))


def kernel_actions(trace_events: list[dict]) -> Iterator[tuple[dict, str | None]]:
    """Every kernel of a chrome trace with the label ("1B3") of the executor action that launched it,
    matched by the profiler's correlation ids (None: launched outside every action). Kernels run after
    their launch, often during later actions, so only the launch tells which action they belong to;
    a backward launched from autograd's device thread still falls inside its action's host span."""
    ranges = _action_ranges(trace_events)
    starts = [a for a, _, _ in ranges]
    launched = {e["args"]["correlation"]: e["ts"] for e in trace_events  # triton launches through the driver API
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    for e in trace_events:
        if e.get("cat") != "kernel":
            continue
        t = launched.get(e.get("args", {}).get("correlation"))
        i = bisect.bisect_right(starts, t) - 1 if t is not None else -1
        yield e, ranges[i][2] if i >= 0 and t <= ranges[i][1] else None


def action_spans(trace_events: list[dict], on_device: bool) -> dict[str, Any]:
    """One rank's profiled step as {"actions": {"1B3": [start_us, end_us, busy_us]}, "comm_us": ...}, times
    from the step's origin mark. on_device: an action's span runs from its first compute kernel's start to
    its last one's end (busy: their time; communication kernels count in comm_us); else its host span."""
    origin = min((e["ts"] for e in trace_events if e.get("name") == _ORIGIN and e.get("ph") == "X"), default=0.0)
    actions: dict[str, list[float]] = {}
    if not on_device:
        for a, b, label in _action_ranges(trace_events):
            actions[label] = [a - origin, b - origin, b - a]
        return {"actions": actions, "comm_us": 0.0}
    comm_us = 0.0
    for e, label in kernel_actions(trace_events):
        if _is_comm(e.get("name", "")):
            comm_us += e["dur"]
        elif label is not None:
            span = actions.setdefault(label, [float("inf"), float("-inf"), 0.0])
            span[0] = min(span[0], e["ts"] - origin)
            span[1] = max(span[1], e["ts"] + e["dur"] - origin)
            span[2] += e["dur"]
    return {"actions": actions, "comm_us": comm_us}


def measured_timeline(schedule: Schedule, ranks: list[dict[str, Any]], devices: int | None = None) -> Timeline:
    """A Timeline of the measured spans (every rank's `action_spans`); an action without a span (no
    kernel: an empty stage) takes zero time where the previous action of its rank ended. devices: how
    many devices the ranks ran on (1: every stage in one process on one GPU; default one per rank),
    what the bubble is the idle fraction of."""
    start, end = {}, {}
    busy = 0.0
    for r, row in enumerate(schedule.actions):
        spans = ranks[r]["actions"]
        last = 0.0
        for a in row:
            a0, a1, b = spans.get(str(a), (last, last, 0.0))
            start[a], end[a] = a0 / 1e6, a1 / 1e6
            busy += b / 1e6
            last = a1
    t0, t1 = min(start.values()), max(end.values())
    step = t1 - t0
    start = {a: t - t0 for a, t in start.items()}
    end = {a: t - t0 for a, t in end.items()}
    bubble = 1.0 - busy / ((devices or schedule.num_ranks) * step) if step > 0 else 0.0
    return Timeline(schedule, start, end, step, bubble, peak_inflight=[])


def simulated_timeline(plan, schedule: Schedule, one_device: bool = False) -> Timeline:
    """The simulator's timeline of `plan` (run as `schedule`) from its per-stage times (a chain: stage k
    sends to k + 1). one_device: every stage runs on one device in one process, so the actions run one
    after another in the executor's order (Timeline.order), without sends."""
    sends = list(plan.stage_comm_time_s[1:]) if plan.stage_comm_time_s and not one_device else 0.0
    timeline = simulate(schedule, StageCosts.chain(plan.stage_fwd_time_s, plan.stage_bwd_time_s, sends))
    if not one_device:
        return timeline
    start, end, t = {}, {}, 0.0
    for a in timeline.order():
        start[a], t = t, t + timeline.end_s[a] - timeline.start_s[a]
        end[a] = t
    return Timeline(schedule, start, end, t, 0.0, peak_inflight=timeline.peak_inflight)


def profile_timeline(step: Callable[[], None], device: torch.device, plan, rank: int | None
                     ) -> tuple[dict[str, Any], Timeline, Timeline] | None:
    """Run `step` once under the profiler on every rank (torchrun) or in this one process; on rank 0 (or
    alone): (summary, measured timeline, simulated timeline); None on the other ranks."""
    distributed = rank is not None
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    if on_device:
        torch.cuda.synchronize(device)
    if distributed:
        dist.barrier()
    with profile(activities=activities) as prof:
        with record_function(_ORIGIN):
            pass
        step()
        if on_device:
            torch.cuda.synchronize(device)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    mine = action_spans(events, on_device)
    ranks = [mine] * plan.num_ranks  # one process: every rank's actions in its one trace
    if distributed:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        if rank != 0:
            return None
    schedule = make_schedule(plan.schedule, plan.num_ranks, plan.microbatches, plan.chunks)
    one_device = not distributed  # one process runs every stage on its one device (train_throughput)
    measured = measured_timeline(schedule, ranks, devices=1 if one_device else None)
    simulated = simulated_timeline(plan, schedule, one_device)
    spans = {label: span for r in ranks for label, span in r["actions"].items()}
    # the measured wall time each action ran beside a send of its rank waiting for a busy receiver
    held = held_by_waiting_sends(measured) if not one_device else {}
    over_plan: dict[str, float | None] = {}
    for kind, planned in (("F", plan.stage_fwd_time_s), ("B", plan.stage_bwd_time_s)):
        ratios, beside, alone = [], [], []
        for label, span in spans.items():
            stage, k, mb = action_parts(label)
            if k != kind or planned[stage] <= 0:
                continue
            ratio = span[2] / 1e6 / planned[stage]
            ratios.append(ratio)
            a = Action(stage, k, mb)
            wall = measured.end_s.get(a, 0.0) - measured.start_s.get(a, 0.0)
            share = held.get(a, 0.0) / wall if wall > 0 else 0.0
            (beside if share >= 0.5 else alone if share == 0.0 else []).append(ratio)
        over_plan[kind] = statistics.median(ratios) if ratios else None
        over_plan[kind + "beside"] = statistics.median(beside) if beside else None
        over_plan[kind + "alone"] = statistics.median(alone) if alone else None
    summary = {"measured_step_ms": measured.step_time_s * 1e3, "simulated_step_ms": simulated.step_time_s * 1e3,
               "measured_bubble": measured.bubble, "simulated_bubble": simulated.bubble,
               "comm_kernel_ms": [r["comm_us"] / 1e3 for r in ranks] if distributed else [mine["comm_us"] / 1e3],
               "fwd_device_over_plan": over_plan["F"], "bwd_device_over_plan": over_plan["B"],
               # the waiting-send hypothesis: passes that ran mostly beside a waiting send of their rank against
               # passes beside none (None where no pass is either; one process sends nothing)
               "fwd_over_plan_beside_waiting_sends": over_plan["Fbeside"], "fwd_over_plan_alone": over_plan["Falone"],
               "bwd_over_plan_beside_waiting_sends": over_plan["Bbeside"], "bwd_over_plan_alone": over_plan["Balone"]}
    return summary, measured, simulated
