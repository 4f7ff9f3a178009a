"""Where a pipelined step spends host time: stages in one process against the plain compiled model.

    python -m benchmarks.host_overhead --model gpt2-xl --stages 2,4          # one GPU
    python -m benchmarks.host_overhead --small --device cpu --model gpt2     # smoke test

For each configuration (the plain model with gradient accumulation, then compile_parallel
with every stage on the same device), unprofiled steps alternate in rounds: medians of the host
time until the step returns, the wall time, the host time inside autograd backward calls, and
Python's garbage collections. Then one step is profiled with torch.profiler after warm-up:
the step's wall time, the time the device was busy (the union of its kernels' intervals), and
for ours the host time of every schedule action (the executor labels them `partitioner.<action>`,
e.g. `partitioner.1B3`) split into forwards and backwards, plus the host-side ops that took the
most self time; on CUDA, each stage's kernel time per microbatch against the plan's prediction,
and every kernel by stage and pass in a `.kernels.json` (see benchmarks/kernels_vs_plan.py).
A step the device waits on shows as busy < wall with action host times that add up to the wall.
Chrome traces of every profiled step go next to the JSON, to open in Perfetto.
"""
from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import common
from benchmarks.common import add_training_run_arguments, print_table, write_result
from benchmarks.pipeline_timeline import ACTION, action_parts, kernel_actions
from benchmarks.train_throughput import PRECISIONS, _sync, accumulation_step, build_model
from partitioner.runtime.compiled import uses_cudagraphs


def kernel_spans(events: list, device_type) -> list[tuple[float, float]]:
    """The device's kernel intervals (us) merged where they overlap, in time order."""
    merged: list[tuple[float, float]] = []
    for a, b in sorted((e.time_range.start, e.time_range.end) for e in events  # an action's GPU-time copy is no kernel
                       if e.device_type == device_type and not ACTION.match(e.name)):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def busy_s(spans: list[tuple[float, float]]) -> float:
    """Seconds during which at least one kernel ran (overlapping kernels counted once)."""
    return sum(b - a for a, b in spans) / 1e6


def idle_spans(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The gaps (us) between merged kernel spans, from the first kernel's start to the last one's end."""
    return [(prev[1], nxt[0]) for prev, nxt in zip(spans, spans[1:])]


# A gap between two kernels shorter than this is the device's own latency from one kernel to the next
# (about 1 us inside a CUDA graph or a full stream queue); a longer one is the device waiting for the host.
SHORT_GAP_US = 10.0


def host_waits(gaps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The idle gaps (us) in which the device waited for the host: those of SHORT_GAP_US or more."""
    return [(a, b) for a, b in gaps if b - a >= SHORT_GAP_US]


def gap_split(gaps: list[tuple[float, float]]) -> dict:
    """The idle gaps (us) split into short ones (kernel to kernel, < SHORT_GAP_US) and long ones
    (waiting for the host): count and ms of each."""
    long_ = [b - a for a, b in host_waits(gaps)]
    short = [b - a for a, b in gaps if b - a < SHORT_GAP_US]
    return {"short_gaps": len(short), "short_idle_ms": sum(short) / 1e3,
            "long_gaps": len(long_), "long_idle_ms": sum(long_) / 1e3}


def idle_attribution(events: list, gaps: list[tuple[float, float]], top: int = 12) -> str:
    """The host ops running while the device sat idle: ms of overlap with the gaps, per op name.

    Nested ops each count (a `partitioner.0F3` and the compiled region inside it both show), so
    the list reads from the outermost host work to the innermost.
    """
    starts = [a for a, _ in gaps]
    overlap: dict[str, float] = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        a, b = e.time_range.start, e.time_range.end
        i = max(0, bisect.bisect_right(starts, a) - 1)
        total = 0.0
        while i < len(gaps) and gaps[i][0] < b:
            total += max(0.0, min(b, gaps[i][1]) - max(a, gaps[i][0]))
            i += 1
        if total:
            overlap[e.name] = overlap.get(e.name, 0.0) + total
    best = sorted(overlap.items(), key=lambda kv: kv[1], reverse=True)[:top]
    return ", ".join(f"{k} {v / 1e3:.1f}ms" for k, v in best)


def kernels_by_action(trace_events: list[dict]) -> dict[str, dict]:
    """Every kernel of a chrome trace charged to the stage and pass ("0F", "1B", ...) whose
    executor action (`partitioner.<action>` span) launched it (pipeline_timeline.kernel_actions);
    kernels launched outside any action (the plain model) go to "step".
    Returns {group: {"microbatches": n, "kernels": {name: [count, us]}}}.
    """
    plain = not any(ACTION.match(e.get("name", "")) for e in trace_events if e.get("ph") == "X")
    groups: dict[str, dict] = {}
    microbatches: dict[str, set[str]] = {}
    for e, label in kernel_actions(trace_events):
        if label is not None:
            stage, kind, mb = action_parts(label)
            group = f"{stage}{kind}"
        elif plain:
            group, mb = "step", 0
        else:
            continue
        microbatches.setdefault(group, set()).add(mb)
        entry = groups.setdefault(group, {}).setdefault(e["name"], [0, 0.0])
        entry[0] += 1
        entry[1] += e["dur"]
    order = sorted(groups, key=lambda k: (k == "step", int(k[:-1]) if k != "step" else 0, k[-1] != "F"))
    return {k: {"microbatches": len(microbatches[k]), "kernels": groups[k]} for k in order}


def stage_device_ms(trace_events: list[dict], groups: dict[str, dict] | None = None) -> dict[str, float]:
    """Device ms per microbatch of every stage and pass ("0F", "1B", ...): `kernels_by_action`'s
    totals (`groups`, when already computed) over the microbatches."""
    groups = kernels_by_action(trace_events) if groups is None else groups
    return {k: sum(us for _, us in g["kernels"].values()) / 1e3 / g["microbatches"]
            for k, g in groups.items() if k != "step"}


def stage_comparison(measured: dict[str, float], plan) -> str:
    """'0F 12.1/11.4 ms' per stage and pass: measured device ms per microbatch / the plan's."""
    predicted = {f"{k}F": t for k, t in enumerate(plan.stage_fwd_time_s)}
    predicted.update({f"{k}B": t for k, t in enumerate(plan.stage_bwd_time_s)})
    return ", ".join(f"{k} {v:.2f}/{predicted[k] * 1e3:.2f} ms" for k, v in measured.items() if k in predicted)


def profile_step(step, device: torch.device, trace: Path) -> dict:
    """Wall time of one profiled step, device-busy time, action host times and the top host ops."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = partial(_sync, device, False)  # waits for the device's queued work
    sync()
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - t
    prof.export_chrome_trace(str(trace))
    events = list(prof.events())
    actions = [e for e in events if e.name.startswith("partitioner.")]
    fwd = [e.cpu_time_total / 1e6 for e in actions if "F" in e.name.split(".")[-1]]
    bwd = [e.cpu_time_total / 1e6 for e in actions if "B" in e.name.split(".")[-1]]
    top = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:5]
    cuda = device.type == "cuda"
    spans = kernel_spans(events, torch.autograd.DeviceType.CUDA) if cuda else []
    gaps = idle_spans(spans)
    return {"wall_ms": wall * 1e3,
            "busy_ms": busy_s(spans) * 1e3 if cuda else None,
            "idle_gaps": len(gaps),
            "idle_ms": sum(b - a for a, b in gaps) / 1e3 if cuda else None,
            **(gap_split(gaps) if cuda else {}),
            "actions": len(actions),
            "host_fwd_ms": statistics.mean(fwd) * 1e3 if fwd else None,
            "host_bwd_ms": statistics.mean(bwd) * 1e3 if bwd else None,
            "host_actions_ms": (sum(fwd) + sum(bwd)) * 1e3 if actions else None,
            "top_host_ops": ", ".join(f"{a.key} {a.self_cpu_time_total / 1e3:.1f}ms" for a in top),
            # what the host did while the device waited for it (the long gaps)
            "host_ops_while_idle": idle_attribution(events, host_waits(gaps)) if cuda else ""}


def _serial_backward(step):
    """`step` with every backward on the calling thread (no hand-off to autograd's device thread)."""
    def serial():
        with torch.autograd.set_multithreading_enabled(False):
            step()
    return serial


def _autograd_accumulate(step, pm):
    """`step` with autograd's AccumulateGrad adding each parameter's gradient (the executor's
    foreach add switched off for it)."""
    def per_parameter():
        before, pm.executor.foreach_grads = pm.executor.foreach_grads, False
        try:
            step()
        finally:
            pm.executor.foreach_grads = before
    return per_parameter


def python_profile(step, device: torch.device, out: Path, steps: int) -> float:
    """cProfile `steps` unprofiled-by-torch steps; writes the functions by cumulative and by own
    time to `out` (text), to find host time the torch profiler does not name. Returns the
    profiled wall ms per step (cProfile slows Python code, not kernels)."""
    import cProfile
    import io
    import pstats
    sync = partial(_sync, device, False)  # waits for the device's queued work
    sync()
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    sync()
    wall = (time.perf_counter() - t) / steps * 1e3
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text).strip_dirs()
    text.write(f"{steps} steps, {wall:.1f} ms per step under cProfile\n")
    stats.sort_stats("cumulative").print_stats(70)
    stats.sort_stats("tottime").print_stats(40)
    out.write_text(text.getvalue())
    return wall


class BackwardTimer:
    """Times every autograd backward call (until it returns: its kernels launched) while installed:
    splits a step's host time into backward calls and the rest (forwards, the executor, the loss)
    without the profiler's own cost."""

    def __init__(self):
        self.spent: list[float] = []
        self._original = None

    def __enter__(self) -> "BackwardTimer":
        import torch.autograd as autograd
        self._original = original = autograd.graph._engine_run_backward

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent.append(time.perf_counter() - t)
        autograd.graph._engine_run_backward = autograd._engine_run_backward = timed
        return self

    def __exit__(self, *exc) -> None:
        import torch.autograd as autograd
        autograd.graph._engine_run_backward = autograd._engine_run_backward = self._original


class GcTimer:
    """Times Python's garbage collections while installed (gc.callbacks): a step that allocates many
    Python objects pays collections, whose full (generation 2) passes walk every live object."""

    def __init__(self):
        self.spent: list[float] = []
        self.full = 0
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.spent.append(time.perf_counter() - self._start)
            self.full += info.get("generation") == 2

    def __enter__(self) -> "GcTimer":
        import gc
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        import gc
        gc.callbacks.remove(self._callback)


def host_and_wall(configs: list, device: torch.device, rounds: int) -> dict[str, dict[str, float]]:
    """Per config, medians of: host ms (until the step returns, before synchronising), wall ms, and
    the host ms spent in autograd backward calls and in garbage collections; the configs alternate in `rounds` rounds (order
    reversed every other round). A host-bound step has host close to wall."""
    sync = partial(_sync, device, False)  # waits for the device's queued work
    times: dict[str, dict[str, list[float]]] = {
        c[0]: {"host_ms": [], "unprofiled_wall_ms": [], "host_backward_ms": [], "gc_ms": [], "gc_collections": [],
               "gc_full": []} for c in configs}
    calls: dict[str, int] = {}
    with BackwardTimer() as backward, GcTimer() as collector:
        for r in range(rounds):
            for label, step, _ in (configs if r % 2 == 0 else configs[::-1]):
                sync()
                backward.spent.clear()
                collector.spent.clear()
                collector.full = 0
                t = time.perf_counter()
                step()
                h = time.perf_counter()
                sync()
                times[label]["host_ms"].append((h - t) * 1e3)
                times[label]["unprofiled_wall_ms"].append((time.perf_counter() - t) * 1e3)
                times[label]["host_backward_ms"].append(sum(backward.spent) * 1e3)
                times[label]["gc_ms"].append(sum(collector.spent) * 1e3)
                times[label]["gc_collections"].append(len(collector.spent))
                times[label]["gc_full"].append(collector.full)
                calls[label] = len(backward.spent)
    return {k: {**{name: statistics.median(v) for name, v in t.items()}, "backward_calls": calls[k]}
            for k, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="gpt2-xl", help="a zoo name")
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS)
    parser.add_argument("--stages", default="2,4", help="comma-separated stage counts, all on one device")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--mb-size", type=int, default=2, help="sequences per microbatch")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the plain model and the stages (auto: on CUDA)")
    parser.add_argument("--modes", default="default",
                        help="comma-separated torch.compile modes to run each configuration in "
                             "(e.g. default,reduce-overhead: CUDA graphs)")
    parser.add_argument("--rounds", type=int, default=5, help="unprofiled alternating rounds (host vs wall)")
    parser.add_argument("--no-plain", action="store_true",
                        help="leave the plain model out (its compile takes minutes; ours alone shows the gaps)")
    parser.add_argument("--measure", action="store_true",
                        help="plan with every distinct layer timed on the device (compile_parallel(measure=True))")
    parser.add_argument("--variants", default="",
                        help="comma-separated extra configurations: serial-backward (plain and ours with "
                             "torch.autograd.set_multithreading_enabled(False): backward on the calling thread, no "
                             "hand-off to autograd's device thread), cuda-graph (ours with compile_parallel("
                             "cuda_graph=True)), autograd-accumulate (ours with autograd's per-parameter gradient "
                             "accumulation instead of one foreach add per backward: same compiled stages)")
    parser.add_argument("--python-profile", type=int, default=0, metavar="STEPS",
                        help="also cProfile this many steps of each configuration (Python host time by "
                             "function, written next to the JSON as <name>_<config>.pyprof.txt)")
    parser.add_argument("--stacks-after", type=float, default=0,
                        help="print every thread's stack after this many seconds (find where a run hangs)")
    add_training_run_arguments(parser, "host_overhead_<device>", time_limit_s=5.0)
    args = parser.parse_args(argv)
    if args.stacks_after:
        import faulthandler
        faulthandler.dump_traceback_later(args.stacks_after, exit=False)
    if args.results_dir:
        common.RESULTS_DIR = Path(args.results_dir)
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    zm = build_model(args, args.model, args.precision, device)
    m = args.microbatches
    accumulate = accumulation_step(zm, args.precision, m)
    mixed = args.precision == "bf16-mixed"
    modes = args.modes.split(",") if compiled else ["default"]
    variants = {v for v in args.variants.split(",") if v}
    unknown = variants - {"serial-backward", "cuda-graph", "autograd-accumulate"}
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; known: serial-backward, cuda-graph, autograd-accumulate")
    configs = []
    graph_warmup: dict[str, int] = {}  # label -> steps before a cuda_graph config replays
    for mode in modes:
        tag = "" if mode == "default" else f"-{mode}"
        options = {"dynamic": False, **({} if mode == "default" else {"mode": mode})}
        new_graph_step = device.type == "cuda" and uses_cudagraphs(options)  # tell cudagraph trees a step begins
        plain = torch.compile(zm.model, **options) if compiled else zm.model

        def plain_step(plain=plain, new_graph_step=new_graph_step):
            if new_graph_step:
                torch.compiler.cudagraph_mark_step_begin()
            accumulate(plain)
            zm.model.zero_grad(set_to_none=True)
        if not args.no_plain:
            configs.append((f"plain{tag}", plain_step, None))
            if "serial-backward" in variants:
                configs.append((f"plain{tag}-serial-backward", _serial_backward(plain_step), None))
        from partitioner.api import compile_parallel
        # compile_parallel(cuda_graph=True) captures the whole step itself: only with torch.compile's default mode
        graphs = (False, True) if "cuda-graph" in variants and device.type == "cuda" and mode == "default" else (False,)
        for stages in (int(s) for s in args.stages.split(",")):
            for graph in graphs:
                pm = compile_parallel(zm.model, [device] * stages, zm.example_args, zm.loss_fn, microbatches=m,
                                      example_kwargs=zm.example_kwargs, example_target=zm.target,
                                      time_limit_s=args.time_limit, compile=options if compiled else False,
                                      mixed_precision="bf16" if mixed else None, measure=args.measure,
                                      cuda_graph=graph)

                def ours(pm=pm, new_graph_step=new_graph_step):
                    if new_graph_step:
                        torch.compiler.cudagraph_mark_step_begin()
                    pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
                    pm.zero_grad()
                label = f"ours-{stages}-stages{tag}{'-cuda-graph' if graph else ''}"
                configs.append((label, ours, pm.plan))
                if graph:  # its eager warm-up steps, then the step that captures
                    graph_warmup[label] = pm.step_graph.warmup_steps + 1
                if "serial-backward" in variants and not graph:
                    configs.append((f"{label}-serial-backward", _serial_backward(ours), pm.plan))
                if "autograd-accumulate" in variants and not graph:
                    configs.append((f"{label}-autograd-accumulate", _autograd_accumulate(ours, pm), pm.plan))
    name = args.name or f"host_overhead_{device.type}"
    rows = []
    for label, step, plan in list(configs):
        try:
            for _ in range(max(args.warmup, graph_warmup.get(label, 0))):
                step()
        except Exception as err:  # noqa: BLE001 - a mode that fails is reported and left out, the rest still run
            print(f"{label}: failed, left out: {type(err).__name__}: {str(err)[:500]}", file=sys.stderr, flush=True)
            configs.remove((label, step, plan))
            continue
        print(f"{label}: warm", file=sys.stderr, flush=True)
    timing = host_and_wall(configs, device, args.rounds)
    for label, step, plan in configs:  # each row is printed and written as it comes: a killed run keeps them
        row = {"config": label, "compiled": compiled, **timing[label],
               **profile_step(step, device, common.RESULTS_DIR / f"{name}_{label}.trace.json")}
        if args.python_profile:
            row["cprofile_wall_ms"] = python_profile(step, device, common.RESULTS_DIR / f"{name}_{label}.pyprof.txt",
                                                     args.python_profile)
        if plan is not None:  # the plan's serial work: every stage of every microbatch in turn
            row["pred_serial_ms"] = m * (sum(plan.stage_fwd_time_s) + sum(plan.stage_bwd_time_s)) * 1e3
        if device.type == "cuda":  # every kernel by stage and pass, to compare with the cost model offline
            events = json.loads((common.RESULTS_DIR / f"{name}_{label}.trace.json").read_text())["traceEvents"]
            groups = kernels_by_action(events)
            if plan is not None:  # each stage's kernels against its predicted times
                row["stage_device_vs_plan"] = stage_comparison(stage_device_ms(events, groups), plan)
            kernels = {"groups": groups, "microbatches": m,
                       "node_stage": plan.node_stage if plan is not None else None,
                       "stage_fwd_time_s": plan.stage_fwd_time_s if plan is not None else None,
                       "stage_bwd_time_s": plan.stage_bwd_time_s if plan is not None else None}
            (common.RESULTS_DIR / f"{name}_{label}.kernels.json").write_text(json.dumps(kernels))
        rows.append(row)
        print(f"{label}: {row}", file=sys.stderr, flush=True)
        write_result(name, rows, {"microbatches": m})
    print_table(f"host time of one step, {args.model} {args.precision}, {m} microbatches on {device}",
                [{k: v for k, v in r.items() if k not in ("top_host_ops", "host_ops_while_idle", "stage_device_vs_plan")}
                 for r in rows])
    for r in rows:
        print(f"{r['config']}: top host ops: {r['top_host_ops']}")
        if r.get("stage_device_vs_plan"):
            print(f"{r['config']}: device ms per microbatch, measured/predicted: {r['stage_device_vs_plan']}")
        if r["host_ops_while_idle"]:
            print(f"{r['config']}: host ops while the device idled: {r['host_ops_while_idle']}")
    print(f"wrote {write_result(name, rows, {'microbatches': m})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
