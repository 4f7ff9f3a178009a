"""Plan quality: simulated step time of the ILP plan vs every baseline vs lower bounds and the exact best split.

    python -m benchmarks.plan_quality                       # gpt2-xl t5-base cnn llama-8b, p=4,8, v=1,2
    python -m benchmarks.plan_quality --models gpt2 --ranks 4 --exact-budget 10

Each model is captured and profiled once for one microbatch of one sample
(analytic H100 costs, fp32, AdamW), then planned with m = 2p microbatches.
A second table caps memory so that it binds (see memory_bound_row) and compares
the ILP with the memory-aware chain DP and the baselines.
Lower bound: every rank busy all the time, m W / p (W = fwd+bwd of one
microbatch through the model as one stage, see PassTimes). pipeline_bound_ms: a tighter bound for 1F1B on
path-shaped graphs (see pipeline_bound_s). For reference, equal_stages_ms is the
textbook step with p v equal stages and no communication, m W / p + (p - 1) W / (p v);
the simulator can beat it slightly with uneven stages (short first stages fill
the pipeline faster), so it is not a bound.
Exact search (v = 1, path-shaped graphs, where every plan is a contiguous split):
best_split_s finds the split the simulator scores fastest by branch and bound,
starting from the ILP plan, within --exact-budget seconds per row. exact_ms is
its step (the optimum when exact_complete), exact_splits the splits it
simulated, exact_s its wall time, exact_lb_ms the bound it proved (= exact_ms
when complete), ilp_vs_exact the ILP's distance from it. layer_count_ceiling = best
of the uniform/torchtitan/parameters steps / the tightest valid lower bound (the
optimum when the search completed, else the larger of pipeline_bound_ms and the
search's own bound exact_lb_ms): the most any plan could gain over the
layer-count baselines. None where a column does not apply.
Writes benchmarks/results/plan_quality.json and plan_quality.png.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from benchmarks.common import RESULTS_DIR, print_table, write_result
from cost_models.time import pass_time_s
from partitioner.planner import BLOCKS_PER_STAGE

MODELS = ("gpt2-xl", "t5-base", "cnn", "llama-8b")
LAYER_COUNT_BASELINES = ("uniform", "torchtitan", "parameters")
EXACT_BUDGET_S = 60.0  # per row


def profile_model(name: str, device: str):
    from cost_models.profile import profile
    from partitioner import zoo
    from passes.annotate import annotate
    from passes.capture import capture

    zm = zoo.build(name, batch=1, device="meta")
    cap = capture(zm.model, zm.example_args, zm.example_kwargs)
    ag = annotate(cap)
    return ag, profile(cap, ag, device=device, progress=False)


class PassTimes:
    """Forward and backward seconds of a run of blocks [a, i) executed as one stage.

    As partitioner.plan.stage_stats: cost_models.time.pass_time_s of the run's device and host
    sums (the host queues kernels ahead of the device). Exact for one stage; a lower bound on the
    total of several stages covering the run (each pays at least its own share of both sums).
    """

    def __init__(self, bg):
        self.num_blocks = len(bg.blocks)
        self._pre = [[0.0] * (self.num_blocks + 1) for _ in range(4)]  # device fwd, host fwd, device bwd, host bwd
        for b, blk in enumerate(bg.blocks):
            times = (blk.fwd_time_s, getattr(blk, "host_fwd_time_s", 0.0),
                     blk.bwd_time_s, getattr(blk, "host_bwd_time_s", 0.0))
            for pre, t in zip(self._pre, times):
                pre[b + 1] = pre[b] + t

    def fwd_s(self, a: int, i: int) -> float:
        dev, host = self._pre[0], self._pre[1]
        return pass_time_s(dev[i] - dev[a], host[i] - host[a])

    def bwd_s(self, a: int, i: int) -> float:
        dev, host = self._pre[2], self._pre[3]
        return pass_time_s(dev[i] - dev[a], host[i] - host[a])

    def work_s(self, a: int, i: int) -> float:
        """Forward + backward of [a, i): of one microbatch through the stages holding it, at least."""
        return self.fwd_s(a, i) + self.bwd_s(a, i)


def lower_bound_s(bg, p: int, v: int, m: int) -> float:
    """Every rank busy all the time: m W / p."""
    return m * PassTimes(bg).work_s(0, len(bg.blocks)) / p


def stage_bound_s(k: int, a: int, i: int, times: PassTimes, p: int, m: int) -> float:
    """Lower bound on the 1F1B step from stage k (on rank k) holding blocks [a, i); see pipeline_bound_s.

    Needs only the stage's block range: the stages before it hold [0, a), those after it [i, n).
    It grows with i.
    """
    f, b = times.fwd_s(a, i), times.bwd_s(a, i)
    work = times.work_s(0, times.num_blocks)
    return max(times.work_s(0, a) + m * (f + b), work + (m - 1) * b + (m - p + k) * f)


def rest_bounds_s(times: PassTimes, p: int, m: int) -> list[list[float]]:
    """rest[k][a]: least over splits of blocks [a, n) into stages k..p-1 of their largest stage_bound_s.

    A lower bound on the step of every split whose stage k starts at block a; rest[0][0] is
    pipeline_bound_s. inf where [a, n) cannot fill p - k non-empty stages.
    """
    n, inf = times.num_blocks, float("inf")
    rest = [[inf] * (n + 1) for _ in range(p + 1)]
    rest[p][n] = 0.0
    for k in range(p - 1, -1, -1):
        for a in range(k, n - (p - k) + 1):
            best = inf
            for i in range(a + 1, n - (p - k - 1) + 1):  # stage k holds [a, i)
                here = stage_bound_s(k, a, i, times, p, m)
                if here >= best:
                    break  # stage_bound_s only grows with i
                best = min(best, max(here, rest[k + 1][i]))
            rest[k][a] = best
    return rest


def pipeline_bound_s(bg, p: int, v: int, m: int) -> float | None:
    """A true lower bound on the simulated 1F1B step of any plan with one stage per rank.

    Two facts about rank k (stage k, forward f_k, backward b_k, W the whole work of a microbatch):
    - it cannot start before the forwards of stages 0..k-1 of a microbatch ran, then runs
      m (f_k + b_k), and its last backward is followed by the backwards of stages k-1..0:
      step >= sum_{j<k} (f_j + b_j) + m (f_k + b_k);
    - in 1F1B it runs p - k forwards before its first backward, which waits for the forwards of
      all stages and the backwards of stages after k; then come its m backwards and m - p + k
      forwards, then the backwards of stages before k: step >= W + (m - 1) b_k + (m - p + k) f_k.
    (stage_bound_s.) The bound is the least over contiguous splits (a DP, rest_bounds_s) of the
    largest of these over k: it bounds every plan when every block feeds the next (every valid
    plan is then a contiguous split) and m >= p; None otherwise, or with interleaving (v > 1),
    where the argument differs. Communication and all-reduce only add to the step. Sums over
    several stages are taken as one pass (PassTimes), which is never more than they take.
    """
    if v != 1 or m < p or not bg.is_path():
        return None
    return rest_bounds_s(PassTimes(bg), p, m)[0][0]


@dataclass(frozen=True)
class ExactResult:
    """Outcome of best_split_s.

    step_time_s: the fastest simulated step found (the incumbent's if nothing beat it);
    cuts: first block of stages 1..p-1 of that split (None: the incumbent's, not given);
    splits_simulated: complete splits scored by the simulator;
    complete: the search finished, so step_time_s is the optimum over all contiguous splits;
    lower_bound_s: no split is faster than this (step_time_s when complete).
    """

    step_time_s: float
    cuts: tuple[int, ...] | None
    splits_simulated: int
    complete: bool
    lower_bound_s: float


class _OutOfTime(Exception):
    """best_split_s ran past its time budget."""


class _RelaxedPipeline:
    """1F1B on ranks 0..k-1 alone, the stages after them replaced by one free-flowing detour.

    A microbatch leaving stage k-1 forward comes back to it backward no sooner than
    the forwards and backwards of blocks [a_k, n) (the later stages) take, whatever their
    split. So the event recurrence on ranks < k (the simulator's, in a fixed topological
    order, communication dropped) with that detour gives times no later than the real
    ones: a lower bound on the step of every split that extends the first k stages.
    With k = p it is the simulator's step without communication.
    """

    def __init__(self, p: int, m: int):
        from runtime.schedules import Action, make_schedule

        sched = make_schedule("1f1b", p, m, 1)
        index = {a: (r, j) for r, row in enumerate(sched.actions) for j, a in enumerate(row)}
        pos, order = [0] * p, []
        done: set = set()
        while len(order) < len(index):  # Kahn's order: rank order plus the chain's data dependencies
            for r, row in enumerate(sched.actions):
                while pos[r] < len(row):
                    a = row[pos[r]]
                    dep = _chain_dep(a, p)
                    if dep is not None and dep not in done:
                        break
                    order.append(a)
                    done.add(a)
                    pos[r] += 1
        ids = {a: i for i, a in enumerate(order)}
        self.num_actions = len(order)
        self.ops = []  # per k: (id, is_fwd, stage, id of the rank's previous action, id of the data dependency)
        for k in range(p + 1):
            ops = []
            for a in order:
                if a.stage >= k:
                    continue
                r, j = index[a]
                prev = ids[sched.actions[r][j - 1]] if j > 0 else -1
                dep = _chain_dep(a, p)
                if a.kind == "B" and a.stage == k - 1 and k < p:
                    dep = Action(a.stage, "F", a.microbatch)  # the detour through stages k..p-1
                ops.append((ids[a], a.kind == "F", a.stage, prev, ids[dep] if dep is not None else -1))
            self.ops.append(ops)

    def step_s(self, fwd_s: list[float], bwd_s: list[float], detour_s: float) -> float:
        """Lower bound on the step: stages 0..len(fwd_s)-1 take fwd_s/bwd_s, the rest detour_s in all."""
        k = len(fwd_s)
        end = [0.0] * self.num_actions
        last = 0.0
        for idx, is_fwd, stage, prev, dep in self.ops[k]:
            t = end[prev] if prev >= 0 else 0.0
            if dep >= 0:
                d = end[dep] + detour_s if (not is_fwd and stage == k - 1) else end[dep]
                if d > t:
                    t = d
            end[idx] = t + (fwd_s[stage] if is_fwd else bwd_s[stage])
            if end[idx] > last:
                last = end[idx]
        return last


def _chain_dep(a, p: int):
    """The action of another stage that `a` waits for in a chain of p stages (None for the ends)."""
    from runtime.schedules import Action

    if a.kind == "F":
        return Action(a.stage - 1, "F", a.microbatch) if a.stage > 0 else None
    return Action(a.stage + 1, "B", a.microbatch) if a.stage + 1 < p else None


def _allreduce_known_s(bg, starts: list[int], bw: float) -> float:
    """All-reduce time of tied parameters whose users already sit on different stages.

    starts: first blocks of the assigned stages and, last, of the unassigned rest (all of it
    on stages after them): a lower bound on the split's all-reduce (partitioner/plan.stage_stats).
    """
    from bisect import bisect_right

    total = 0.0
    for sp in bg.shared_params:
        if sp.trainable and len({bisect_right(starts, b) for b in sp.blocks}) > 1:
            total += 2 * sp.bytes / bw
    return total


def best_split_s(bg, p: int, m: int, link_bw_bytes_per_s: float, incumbent_s: float = float("inf"),
                 time_budget_s: float = EXACT_BUDGET_S, incumbent_cuts: tuple[int, ...] | None = None) -> ExactResult:
    """The contiguous split into p 1F1B stages with the fastest simulated step (v = 1), by branch and bound.

    On a path-shaped graph every valid v = 1 plan is a contiguous split, so this is the best plan.
    Stages are cut left to right; a partial split is dropped once a lower bound on every split
    extending it reaches the incumbent (incumbent_s: the step of some split, e.g. the ILP plan's):
    the stage_bound_s of each assigned stage, rest_bounds_s for the unassigned ones, and the
    relaxed 1F1B of the assigned ranks (_RelaxedPipeline) plus the tied-weight all-reduce already
    forced. Complete splits are scored by partitioner.plan.evaluate_assignment, as the ILP and the
    baselines are. Past time_budget_s it stops with complete=False.
    """
    from partitioner.plan import evaluate_assignment

    if not bg.is_path() or m < p:
        raise ValueError(f"best_split_s needs a path-shaped block graph and m >= p (got m={m}, p={p})")
    deadline = time.perf_counter() + time_budget_s
    n, bw = len(bg.blocks), link_bw_bytes_per_s
    times = PassTimes(bg)
    rest = rest_bounds_s(times, p, m)
    relaxed = _RelaxedPipeline(p, m)
    margin = 1 - 1e-12  # float noise: the relaxation sums in another order than the simulator
    best = {"step": incumbent_s, "cuts": incumbent_cuts, "splits": 0}
    exploring: list[float] = []  # bound of the child being explored at every depth (ascending per depth)

    def child_bound(starts: list[int], fwd: list[float], bwd: list[float]) -> float:
        a = starts[-1]
        return (max(relaxed.step_s(fwd, bwd, times.work_s(a, n)), rest[len(fwd)][a])
                + _allreduce_known_s(bg, starts[1:], bw))

    def search(starts: list[int], fwd: list[float], bwd: list[float]) -> None:
        k, a = len(fwd), starts[-1]  # stages 0..k-1 assigned; stage k starts at block a
        children = []
        for i in range(a + 1, n - (p - k - 1) + 1) if k < p - 1 else (n,):
            if stage_bound_s(k, a, i, times, p, m) * margin >= best["step"]:
                break
            if rest[k + 1][i] * margin >= best["step"]:
                continue
            f, b = fwd + [times.fwd_s(a, i)], bwd + [times.bwd_s(a, i)]
            bound = child_bound(starts + [i], f, b)
            if bound * margin < best["step"]:
                children.append((bound, i, f, b))
        children.sort(key=lambda c: c[0])
        exploring.append(0.0)
        for bound, i, f, b in children:
            if bound * margin >= best["step"]:
                break
            exploring[-1] = bound
            if time.perf_counter() > deadline:
                raise _OutOfTime
            if k + 1 < p:
                search(starts + [i], f, b)
                continue
            cuts = tuple(starts[1:])
            assign = [s for s in range(p) for _ in range((starts + [n])[s], (starts + [n])[s + 1])]
            step = evaluate_assignment(bg, assign, p, 1, m, "1f1b", link_bw_bytes_per_s=bw).step_time_s
            best["splits"] += 1
            if step < best["step"]:
                best["step"], best["cuts"] = step, cuts
        exploring.pop()

    try:
        search([0], [], [])
        complete, lower = True, best["step"]
    except _OutOfTime:
        # unexplored splits extend a child on the stack or a later sibling, whose bound is no lower
        complete, lower = False, min([best["step"]] + exploring)
    return ExactResult(best["step"], best["cuts"], best["splits"], complete, lower)


def equal_stages_s(bg, p: int, v: int, m: int) -> float:
    work = PassTimes(bg).work_s(0, len(bg.blocks))
    return m * work / p + (p - 1) * work / (p * v)


def _cuts(block_stage: list[int]) -> tuple[int, ...]:
    """First block of every stage but the first, of a contiguous split."""
    return tuple(b for b in range(1, len(block_stage)) if block_stage[b] != block_stage[b - 1])


def exact_columns(bg, p: int, v: int, m: int, bw: float, ilp, base: dict, pb: float | None,
                  budget_s: float) -> dict:
    """The exact-search columns of a row (see the module docstring); None where they do not apply."""
    cols = dict.fromkeys(("exact_ms", "exact_complete", "exact_splits", "exact_lb_ms", "exact_s", "ilp_vs_exact",
                          "layer_count_ceiling"))
    if pb is None:
        return cols
    tightest = pb
    if budget_s > 0:
        t0 = time.perf_counter()
        ex = best_split_s(bg, p, m, bw, ilp.step_time_s, budget_s, _cuts(ilp.block_stage))
        cols.update(exact_ms=ex.step_time_s * 1e3, exact_complete=ex.complete, exact_splits=ex.splits_simulated,
                    exact_lb_ms=ex.lower_bound_s * 1e3, exact_s=time.perf_counter() - t0,
                    ilp_vs_exact=ilp.step_time_s / ex.step_time_s)
        tightest = ex.step_time_s if ex.complete else max(pb, ex.lower_bound_s)
    cols["layer_count_ceiling"] = min(base[k].step_time_s for k in LAYER_COUNT_BASELINES) / tightest
    return cols


def run(models: list[str], ranks: list[int], chunks: list[int], time_limit_s: float, device: str,
        memory_bound: bool = True, exact_budget_s: float = EXACT_BUDGET_S) -> tuple[list[dict], list[dict]]:
    from cost_models.device import get_device_spec
    from partitioner.baselines import all_baselines
    from partitioner.solve import solve
    from passes.coarsen import coarsen

    bw = get_device_spec(device).intra_node_bw_bytes_per_s
    rows, capped = [], []
    for name in models:
        ag, costs = profile_model(name, device)
        if memory_bound:
            bg = coarsen(ag, costs, min_blocks=4, target_blocks=4 * BLOCKS_PER_STAGE)
            capped.append(memory_bound_row(name, bg, 4, 1, 8, bw, time_limit_s))
        for p in ranks:
            for v in chunks:
                m = 2 * p
                bg = coarsen(ag, costs, min_blocks=p * v, target_blocks=BLOCKS_PER_STAGE * p * v)  # as the planner
                t0 = time.perf_counter()
                ilp = solve(bg, p, v, m, link_bw_bytes_per_s=bw, time_limit_s=time_limit_s)
                wall = time.perf_counter() - t0
                base = all_baselines(bg, p, v, m, link_bw_bytes_per_s=bw)
                best_name = min(base, key=lambda k: base[k].step_time_s)
                lb = lower_bound_s(bg, p, v, m)
                row = {"model": name, "p": p, "v": v, "m": m, "blocks": len(bg.blocks),
                       "ilp_ms": ilp.step_time_s * 1e3}
                row.update({f"{k}_ms": b.step_time_s * 1e3 for k, b in base.items()})
                pb = pipeline_bound_s(bg, p, v, m)
                row.update({"lower_bound_ms": lb * 1e3, "equal_stages_ms": equal_stages_s(bg, p, v, m) * 1e3,
                            "ilp_vs_lb": ilp.step_time_s / lb,
                            "pipeline_bound_ms": pb * 1e3 if pb is not None else None,
                            "ilp_vs_pipeline_bound": ilp.step_time_s / pb if pb is not None else None,
                            "best_baseline": best_name,
                            "ilp_vs_best_baseline": ilp.step_time_s / base[best_name].step_time_s,
                            "status": ilp.solver_status, "gap": ilp.gap, "solve_s": wall})
                row.update(exact_columns(bg, p, v, m, bw, ilp, base, pb, exact_budget_s))
                rows.append(row)
                exact = "" if row["exact_ms"] is None else \
                    f", exact {row['exact_ms']:.2f} ms ({'optimal' if row['exact_complete'] else 'incomplete'})"
                print(f"{name} p={p} v={v}: ilp {row['ilp_ms']:.2f} ms, best baseline {best_name} "
                      f"{base[best_name].step_time_s * 1e3:.2f} ms, bound {lb * 1e3:.2f} ms{exact}", flush=True)
    return rows, capped


def memory_bound_row(name: str, bg, p: int, v: int, m: int, bw: float, time_limit_s: float) -> dict:
    """Where memory binds: a cap a quarter of the way from the smallest memory any split needs to the
    unconstrained ILP plan's peak. The ILP against the memory-aware chain DP (the best contiguous split
    that fits) and the baselines (which ignore memory: do they fit?)."""
    from partitioner.baselines import all_baselines
    from partitioner.plan import evaluate_assignment
    from partitioner.solve import chain_dp_split, min_memory_bytes, solve

    free = solve(bg, p, v, m, link_bw_bytes_per_s=bw, time_limit_s=time_limit_s)
    need, _ = min_memory_bytes(bg, p, v, m, time_limit_s=time_limit_s)
    peak = max(free.rank_mem_bytes)
    cap = int(need + 0.25 * (peak - need))
    ilp = solve(bg, p, v, m, memory_cap_bytes=cap, link_bw_bytes_per_s=bw, time_limit_s=time_limit_s)
    dp = evaluate_assignment(bg, chain_dp_split(bg, p, v, m, "1f1b" if v == 1 else "interleaved-1f1b", bw, cap),
                             p, v, m, link_bw_bytes_per_s=bw, memory_cap_bytes=cap)
    base = all_baselines(bg, p, v, m, memory_cap_bytes=cap, link_bw_bytes_per_s=bw)
    fitting = [k for k, b in base.items() if max(b.rank_mem_bytes) <= cap]
    row = {"model": name, "p": p, "v": v, "m": m, "blocks": len(bg.blocks), "cap_gib": cap / 2 ** 30,
           "min_memory_gib": need / 2 ** 30, "free_peak_gib": peak / 2 ** 30, "free_ilp_ms": free.step_time_s * 1e3,
           "ilp_ms": ilp.step_time_s * 1e3, "ilp_peak_gib": max(ilp.rank_mem_bytes) / 2 ** 30,
           "dp_capped_ms": dp.step_time_s * 1e3, "dp_fits": max(dp.rank_mem_bytes) <= cap,
           # a DP split over the cap is no plan: no ratio then
           "ilp_vs_dp_capped": ilp.step_time_s / dp.step_time_s if max(dp.rank_mem_bytes) <= cap else None,
           "baselines_fitting": ",".join(fitting) or "none"}
    print(f"{name} memory cap {row['cap_gib']:.2f} GiB: ilp {row['ilp_ms']:.2f} ms, memory-aware chain DP "
          f"{row['dp_capped_ms']:.2f} ms (fits: {row['dp_fits']}), baselines that fit: {row['baselines_fitting']}",
          flush=True)
    return row


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["ilp", "uniform", "torchtitan", "parameters", "flops", "size", "dp"]
    labels = [f"{r['model']}\np={r['p']} v={r['v']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
    width = 0.8 / len(methods)
    for i, meth in enumerate(methods):
        ax.bar([j + i * width for j in range(len(rows))], [r[f"{meth}_ms"] / r["lower_bound_ms"] for r in rows],
               width, label=meth)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="lower bound")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("simulated step time / lower bound")
    ax.set_ylim(0.9, max(1.6, max(r[f"{m}_ms"] / r["lower_bound_ms"] for r in rows for m in methods) * 1.02))
    ax.legend(ncol=4, fontsize=7)
    ax.set_title("Pipeline plans: ILP vs baselines (same simulator)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--ranks", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--chunks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--device", default="h100")
    ap.add_argument("--exact-budget", type=float, default=EXACT_BUDGET_S,
                    help="seconds of exact split search per v=1 path-shaped row (0: skip it)")
    a = ap.parse_args()
    rows, capped = run(a.models, a.ranks, a.chunks, a.time_limit, a.device, exact_budget_s=a.exact_budget)
    print_table("plan quality (simulated step time, ms)", [{k: v for k, v in r.items() if v is not None} for r in rows])
    print_table("where memory binds (p=4, 1f1b, 8 microbatches)",
                [{k: v for k, v in r.items() if v is not None} for r in capped])
    path = write_result("plan_quality", rows, {"device": a.device, "time_limit_s": a.time_limit,
                                               "exact_budget_s": a.exact_budget, "memory_bound": capped})
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(rows, RESULTS_DIR / "plan_quality.png")
    print(f"wrote {path} and {RESULTS_DIR / 'plan_quality.png'}")


if __name__ == "__main__":
    main()
