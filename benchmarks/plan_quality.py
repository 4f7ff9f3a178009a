"""Plan quality: simulated step time of the ILP plan vs every baseline vs lower bounds and the exact best split.

    python -m benchmarks.plan_quality                       # gpt2-xl t5-base cnn llama-8b, p=4,8, v=1,2
    python -m benchmarks.plan_quality --models gpt2 --ranks 4 --exact-budget 10 --paths-budget 10

Each model is captured and profiled once for one microbatch of one sample
(analytic H100 costs, fp32, AdamW), then planned with m = 2p microbatches.
A second table caps memory so that it binds (see memory_bound_row) and compares
the ILP with the memory-aware chain DP and the baselines.
Lower bound: every rank busy all the time, m W / p (W = fwd+bwd of one
microbatch through the model as one stage, see PassTimes). pipeline_bound_ms: a tighter bound for 1F1B on
path-shaped graphs (see partitioner.exact.pipeline_bound_s). For reference, equal_stages_ms is the
textbook step with p v equal stages and no communication, m W / p + (p - 1) W / (p v);
the simulator can beat it slightly with uneven stages (short first stages fill
the pipeline faster), so it is not a bound.
Exact search (v = 1, path-shaped graphs, where every plan is a contiguous split):
partitioner.exact.best_split_s finds the split the simulator scores fastest by branch and bound,
starting from the ILP plan, within --exact-budget seconds per row. exact_ms is
its step (the optimum when exact_complete), exact_splits the splits it
simulated, exact_s its wall time, exact_lb_ms the bound it proved (= exact_ms
when complete), ilp_vs_exact the ILP's distance from it. layer_count_ceiling = best
of the uniform/torchtitan/parameters steps / the tightest valid lower bound (the
optimum when the search completed, else the larger of pipeline_bound_ms and the
search's own bound exact_lb_ms): the most any plan could gain over the
layer-count baselines. None where a column does not apply.
Critical-path row generation (every row, partitioner.critical_path.path_bound_solve from the ILP
plan, --paths-budget seconds; a row whose plan is then over 3% above the bound gets --paths-extra
seconds more, a second run from the best plan found, polished for --paths-extra / 8 s first): paths_lb_ms is the lower bound it proves on
the simulated step of every valid plan, ilp_vs_paths_lb the ILP plan's distance from it (proven_3pct: at most 3%),
paths_ms the best plan it found, paths_status how it stopped. ilp_lb_ms is the bound solve()
itself reported within its time limit (Plan.step_lower_bound_s). The tightest bound of a row
(tightest_lb_ms) is the largest of all of them (the exact optimum where the search completed);
layer_count_ceiling is taken against it on every row.
Writes benchmarks/results/plan_quality.json and plan_quality.png.
"""
from __future__ import annotations

import argparse
import time

from benchmarks.common import RESULTS_DIR, print_table, pyplot, save_figure, write_result
from partitioner.critical_path import path_bound_solve
from partitioner.exact import EXACT_BUDGET_S, PassTimes, best_split_s, pipeline_bound_s, split_cuts
from partitioner.plan_model import BLOCKS_PER_STAGE
from partitioner.problem import PlanProblem

MODELS = ("gpt2-xl", "t5-base", "cnn", "llama-8b")
LAYER_COUNT_BASELINES = ("uniform", "torchtitan", "parameters")
PATHS_BUDGET_S = 60.0  # default seconds of critical-path row generation per row
PATHS_EXTRA_S = 240.0  # default seconds more for a row whose plan is then still over 3% above the bound


def profile_model(name: str, device: str):
    from partitioner.cost_models.profile import profile
    from partitioner import zoo
    from partitioner.passes.annotate import annotate
    from partitioner.passes.capture import capture

    zm = zoo.build(name, batch=1, device="meta")
    cap = capture(zm.model, zm.example_args, zm.example_kwargs)
    ag = annotate(cap)
    return ag, profile(cap, ag, device=device, progress=False)


def lower_bound_s(bg, p: int, v: int, m: int) -> float:
    """Every rank busy all the time: m W / p."""
    return m * PassTimes(bg).work_s(0, len(bg.blocks)) / p


def equal_stages_s(bg, p: int, v: int, m: int) -> float:
    work = PassTimes(bg).work_s(0, len(bg.blocks))
    return m * work / p + (p - 1) * work / (p * v)


def exact_columns(bg, p: int, v: int, m: int, bw: float, ilp, pb: float | None, budget_s: float) -> dict:
    """The exact-search columns of a row (see the module docstring); None where they do not apply."""
    cols = dict.fromkeys(("exact_ms", "exact_complete", "exact_splits", "exact_lb_ms", "exact_s", "ilp_vs_exact"))
    if pb is None or budget_s <= 0:
        return cols
    t0 = time.perf_counter()
    problem = PlanProblem.checked(bg, p, v, m, link_bw_bytes_per_s=bw)
    ex = best_split_s(problem, ilp.step_time_s, budget_s, split_cuts(ilp.block_stage))
    cols.update(exact_ms=ex.step_time_s * 1e3, exact_complete=ex.complete, exact_splits=ex.splits_simulated,
                exact_lb_ms=ex.lower_bound_s * 1e3, exact_s=time.perf_counter() - t0,
                ilp_vs_exact=ilp.step_time_s / ex.step_time_s)
    return cols


def paths_columns(bg, p: int, v: int, m: int, bw: float, ilp, budget_s: float, cap: int | None = None,
                  extra_s: float = 0.0) -> dict:
    """The critical-path row generation columns of a row (see the module docstring). A row whose plan
    is still over 3% above the bound after budget_s gets a second run of extra_s seconds from the best
    plan found so far, polished (refine with kicks) for extra_s / 8 more: a faster incumbent prunes
    more of the relaxation. The larger bound of the two holds."""
    from partitioner.refine import refine

    cols = dict.fromkeys(("paths_lb_ms", "ilp_vs_paths_lb", "proven_3pct", "paths_ms", "paths_status", "paths_s"))
    if budget_s <= 0:
        return cols
    t0 = time.perf_counter()
    problem = PlanProblem(bg, p, v, m, ilp.schedule, bw, cap)
    found = path_bound_solve(problem, budget_s, incumbent=ilp.block_stage)
    lower, best = found.lower_bound_s, found
    if ilp.step_time_s > 1.03 * lower and found.status == "time_limit" and extra_s > 0:
        incumbent = found.assignment if found.step_time_s < ilp.step_time_s else ilp.block_stage
        incumbent = refine(problem, incumbent, extra_s / 8, kicks=True)[0]
        again = path_bound_solve(problem, extra_s, incumbent=incumbent)
        lower = max(lower, again.lower_bound_s)
        best = min(found, again, key=lambda f: f.step_time_s)
    if lower <= 0:  # no bound within the budget
        return cols
    cols.update(paths_lb_ms=lower * 1e3, ilp_vs_paths_lb=ilp.step_time_s / lower,
                proven_3pct=ilp.step_time_s <= 1.03 * lower, paths_ms=best.step_time_s * 1e3,
                paths_status=best.status, paths_s=time.perf_counter() - t0)
    return cols


def tightest_columns(row: dict, ilp, base: dict) -> dict:
    """The tightest valid lower bound of a row and the layer-count ceiling against it."""
    bounds = [row[k] for k in ("lower_bound_ms", "pipeline_bound_ms", "exact_lb_ms", "paths_lb_ms", "ilp_lb_ms")
              if row.get(k)]
    tightest = row["exact_ms"] if row.get("exact_complete") else max(bounds)
    return {"tightest_lb_ms": tightest, "ilp_vs_tightest_lb": ilp.step_time_s * 1e3 / tightest,
            "layer_count_ceiling": min(base[k].step_time_s for k in LAYER_COUNT_BASELINES) * 1e3 / tightest}


def run(models: list[str], ranks: list[int], chunks: list[int], time_limit_s: float, device: str,
        memory_bound: bool = True, exact_budget_s: float = EXACT_BUDGET_S,
        microbatches_per_rank: tuple[int, ...] = (2,),
        paths_budget_s: float = PATHS_BUDGET_S, paths_extra_s: float = PATHS_EXTRA_S) -> tuple[list[dict], list[dict]]:
    from partitioner.cost_models.device import get_device_spec
    from partitioner.baselines import all_baselines
    from partitioner.solve import solve
    from partitioner.passes.coarsen import coarsen

    bw = get_device_spec(device).intra_node_bw_bytes_per_s
    rows, capped = [], []
    for name in models:
        ag, costs = profile_model(name, device)
        if memory_bound:
            bg = coarsen(ag, costs, min_blocks=4, target_blocks=4 * BLOCKS_PER_STAGE)
            capped.append(memory_bound_row(name, bg, 4, 1, 8, bw, time_limit_s, paths_budget_s))
        for p in ranks:
            for v, f in [(v, f) for v in chunks for f in microbatches_per_rank]:
                m = f * p
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
                pb = pipeline_bound_s(PlanProblem.checked(bg, p, v, m, link_bw_bytes_per_s=bw))
                row.update({"lower_bound_ms": lb * 1e3, "equal_stages_ms": equal_stages_s(bg, p, v, m) * 1e3,
                            "ilp_vs_lb": ilp.step_time_s / lb,
                            "pipeline_bound_ms": pb * 1e3 if pb is not None else None,
                            "ilp_vs_pipeline_bound": ilp.step_time_s / pb if pb is not None else None,
                            "best_baseline": best_name,
                            "ilp_vs_best_baseline": ilp.step_time_s / base[best_name].step_time_s,
                            "status": ilp.solver_status, "gap": ilp.gap, "solve_s": wall,
                            "ilp_lb_ms": ilp.step_lower_bound_s * 1e3 or None})
                row.update(exact_columns(bg, p, v, m, bw, ilp, pb, exact_budget_s))
                row.update(paths_columns(bg, p, v, m, bw, ilp, paths_budget_s, extra_s=paths_extra_s))
                row.update(tightest_columns(row, ilp, base))
                rows.append(row)
                exact = "" if row["exact_ms"] is None else \
                    f", exact {row['exact_ms']:.2f} ms ({'optimal' if row['exact_complete'] else 'incomplete'})"
                paths = "" if row["paths_lb_ms"] is None else \
                    f", proven bound {row['paths_lb_ms']:.2f} ms (ilp within {row['ilp_vs_paths_lb'] - 1:.2%}, " \
                    f"{row['paths_status']})"
                print(f"{name} p={p} v={v} m={m}: ilp {row['ilp_ms']:.2f} ms, best baseline {best_name} "
                      f"{base[best_name].step_time_s * 1e3:.2f} ms, bound {lb * 1e3:.2f} ms{exact}{paths}", flush=True)
    return rows, capped


def memory_bound_row(name: str, bg, p: int, v: int, m: int, bw: float, time_limit_s: float,
                     paths_budget_s: float = PATHS_BUDGET_S) -> dict:
    """Where memory binds: a cap a quarter of the way from the smallest memory any split needs to the
    unconstrained ILP plan's peak. The ILP against the memory-aware chain DP (the best contiguous split
    that fits) and the baselines (which ignore memory: do they fit?)."""
    from partitioner.baselines import all_baselines
    from partitioner.plan import evaluate_assignment
    from partitioner.seeds import chain_dp_split
    from partitioner.solve import min_memory_bytes, solve

    free = solve(bg, p, v, m, link_bw_bytes_per_s=bw, time_limit_s=time_limit_s)
    need, _ = min_memory_bytes(bg, p, v, m, time_limit_s=time_limit_s)
    peak = max(free.rank_mem_bytes)
    cap = int(need + 0.25 * (peak - need))
    ilp = solve(bg, p, v, m, memory_cap_bytes=cap, link_bw_bytes_per_s=bw, time_limit_s=time_limit_s)
    dp_split = chain_dp_split(PlanProblem.checked(bg, p, v, m, memory_cap_bytes=cap, link_bw_bytes_per_s=bw))
    dp = evaluate_assignment(bg, dp_split, p, v, m, link_bw_bytes_per_s=bw, memory_cap_bytes=cap)
    base = all_baselines(bg, p, v, m, memory_cap_bytes=cap, link_bw_bytes_per_s=bw)
    fitting = [k for k, b in base.items() if max(b.rank_mem_bytes) <= cap]
    row = {"model": name, "p": p, "v": v, "m": m, "blocks": len(bg.blocks), "cap_gib": cap / 2 ** 30,
           "min_memory_gib": need / 2 ** 30, "free_peak_gib": peak / 2 ** 30, "free_ilp_ms": free.step_time_s * 1e3,
           "ilp_ms": ilp.step_time_s * 1e3, "ilp_peak_gib": max(ilp.rank_mem_bytes) / 2 ** 30,
           "dp_capped_ms": dp.step_time_s * 1e3, "dp_fits": max(dp.rank_mem_bytes) <= cap,
           # a DP split over the cap is no plan: no ratio then
           "ilp_vs_dp_capped": ilp.step_time_s / dp.step_time_s if max(dp.rank_mem_bytes) <= cap else None,
           "baselines_fitting": ",".join(fitting) or "none"}
    paths = paths_columns(bg, p, v, m, bw, ilp, paths_budget_s, cap)
    row.update({k: paths[k] for k in ("paths_lb_ms", "ilp_vs_paths_lb", "proven_3pct", "paths_status")})
    print(f"{name} memory cap {row['cap_gib']:.2f} GiB: ilp {row['ilp_ms']:.2f} ms, memory-aware chain DP "
          f"{row['dp_capped_ms']:.2f} ms (fits: {row['dp_fits']}), baselines that fit: {row['baselines_fitting']}",
          flush=True)
    return row


def plot(rows: list[dict], path, top: float = 1.8) -> None:
    """Every method's step over the row's tightest proven lower bound; bars above `top` are cut and labelled."""
    plt = pyplot()

    methods = ["ilp", "paths", "uniform", "torchtitan", "parameters", "flops", "size", "dp"]
    names = {"paths": "row generation (--paths-budget)"}
    labels = [f"{r['model']}\np={r['p']} v={r['v']} m={r['m']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
    width = 0.8 / len(methods)
    for i, meth in enumerate(methods):
        xs = [j + i * width for j in range(len(rows))]
        ys = [(r[f"{meth}_ms"] or float("nan")) / r["tightest_lb_ms"] for r in rows]
        ax.bar(xs, [min(y, top) for y in ys], width, label=names.get(meth, meth))
        for x, y in zip(xs, ys):
            if y > top:
                ax.text(x, top, f"{y:.1f}", rotation=90, ha="center", va="top", fontsize=5, color="white")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="proven lower bound")
    ax.axhline(1.03, color="grey", linewidth=0.6, linestyle=":", label="bound + 3%")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("simulated step time / tightest proven lower bound")
    ax.set_ylim(0.95, top)
    ax.legend(ncol=5, fontsize=7)
    ax.set_title("Pipeline plans: ILP vs baselines (same simulator) against a proven lower bound")
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--ranks", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--chunks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--device", default="h100")
    ap.add_argument("--exact-budget", type=float, default=EXACT_BUDGET_S,
                    help="seconds of exact split search per v=1 path-shaped row (0: skip it)")
    ap.add_argument("--paths-budget", type=float, default=PATHS_BUDGET_S,
                    help="seconds of critical-path row generation per row (0: skip it)")
    ap.add_argument("--paths-extra", type=float, default=PATHS_EXTRA_S,
                    help="seconds of a second row generation, from the best plan found, for a row whose plan "
                         "is still over 3%% above the bound (0: none)")
    ap.add_argument("--microbatches-per-rank", nargs="+", type=int, default=[2],
                    help="m = this x p for every row (more microbatches: less bubble, balance matters more)")
    ap.add_argument("--name", default="plan_quality", help="result name under benchmarks/results")
    ap.add_argument("--no-memory-bound", action="store_true", help="skip the table where memory binds")
    a = ap.parse_args()
    rows, capped = run(a.models, a.ranks, a.chunks, a.time_limit, a.device, memory_bound=not a.no_memory_bound,
                       exact_budget_s=a.exact_budget, microbatches_per_rank=tuple(a.microbatches_per_rank),
                       paths_budget_s=a.paths_budget, paths_extra_s=a.paths_extra)
    print_table("plan quality (simulated step time, ms)", [{k: v for k, v in r.items() if v is not None} for r in rows])
    print_table("ILP plan vs the proven lower bound (critical-path row generation)",
                [{"model": r["model"], "p": r["p"], "v": r["v"], "ilp_ms": r["ilp_ms"], "paths_lb_ms": r["paths_lb_ms"],
                  "gap": r["ilp_vs_paths_lb"] - 1, "proven_3pct": r["proven_3pct"], "paths_ms": r["paths_ms"],
                  "paths_status": r["paths_status"], "tightest_gap": r["ilp_vs_tightest_lb"] - 1}
                 for r in rows if r["paths_lb_ms"] is not None])
    print_table("where memory binds (p=4, 1f1b, 8 microbatches)",
                [{k: v for k, v in r.items() if v is not None} for r in capped])
    path = write_result(a.name, rows, {"device": a.device, "time_limit_s": a.time_limit,
                                       "exact_budget_s": a.exact_budget, "paths_budget_s": a.paths_budget,
                                       "paths_extra_s": a.paths_extra,
                                       "memory_bound": capped})
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(rows, RESULTS_DIR / f"{a.name}.png")
    print(f"wrote {path} and {RESULTS_DIR / f'{a.name}.png'}")


if __name__ == "__main__":
    main()
