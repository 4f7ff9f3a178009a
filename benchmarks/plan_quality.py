"""Plan quality: simulated step time of the ILP plan vs every baseline vs the lower bound.

    python -m benchmarks.plan_quality                       # gpt2-xl t5-base cnn llama-8b, p=4,8, v=1,2
    python -m benchmarks.plan_quality --models gpt2 --ranks 4

Each model is captured and profiled once for one microbatch of one sample
(analytic H100 costs, fp32, AdamW), then planned with m = 2p microbatches.
A second table caps memory so that it binds (see memory_bound_row) and compares
the ILP with the memory-aware chain DP and the baselines.
Lower bound: every rank busy all the time, m W / p (W = fwd+bwd of one
microbatch through the model). For reference, equal_stages_ms is the textbook
step with p v equal stages and no communication, m W / p + (p - 1) W / (p v);
the simulator can beat it slightly with uneven stages (short first stages fill
the pipeline faster), so it is not a bound.
Writes benchmarks/results/plan_quality.json and plan_quality.png.
"""
from __future__ import annotations

import argparse
import time

from benchmarks.common import RESULTS_DIR, print_table, write_result
from partitioner.planner import BLOCKS_PER_STAGE

MODELS = ("gpt2-xl", "t5-base", "cnn", "llama-8b")


def profile_model(name: str, device: str):
    from cost_models.profile import profile
    from partitioner import zoo
    from passes.annotate import annotate
    from passes.capture import capture

    zm = zoo.build(name, batch=1, device="meta")
    cap = capture(zm.model, zm.example_args, zm.example_kwargs)
    ag = annotate(cap)
    return ag, profile(cap, ag, device=device, progress=False)


def lower_bound_s(bg, p: int, v: int, m: int) -> float:
    return m * sum(b.time_s for b in bg.blocks) / p


def pipeline_bound_s(bg, p: int, v: int, m: int) -> float | None:
    """A true lower bound on the simulated 1F1B step of any plan with one stage per rank.

    Two facts about rank k (stage k, forward f_k, backward b_k, W the whole work of a microbatch):
    - it cannot start before the forwards of stages 0..k-1 of a microbatch ran, then runs
      m (f_k + b_k), and its last backward is followed by the backwards of stages k-1..0:
      step >= sum_{j<k} (f_j + b_j) + m (f_k + b_k);
    - in 1F1B it runs p - k forwards before its first backward, which waits for the forwards of
      all stages and the backwards of stages after k; then come its m backwards and m - p + k
      forwards, then the backwards of stages before k: step >= W + (m - 1) b_k + (m - p + k) f_k.
    The bound is the least over contiguous splits (a DP) of the largest of these over k: it bounds
    every plan when every block feeds the next (every valid plan is then a contiguous split) and
    m >= p; None otherwise, or with interleaving (v > 1), where the argument differs.
    """
    if v != 1 or m < p or not bg.is_path():
        return None
    f_pre, b_pre = [0.0], [0.0]
    for blk in bg.blocks:
        f_pre.append(f_pre[-1] + blk.fwd_time_s)
        b_pre.append(b_pre[-1] + blk.bwd_time_s)
    n, inf, work = len(bg.blocks), float("inf"), f_pre[-1] + b_pre[-1]

    def stage_cost(k: int, a: int, i: int) -> float:  # stage k holds blocks [a, i)
        f, b = f_pre[i] - f_pre[a], b_pre[i] - b_pre[a]
        return max(f_pre[a] + b_pre[a] + m * (f + b), work + (m - 1) * b + (m - p + k) * f)

    best = [stage_cost(0, 0, i) if i > 0 else inf for i in range(n + 1)]  # stage 0 covers [0, i)
    for k in range(1, p):
        best = [min((max(best[a], stage_cost(k, a, i)) for a in range(k, i)), default=inf) for i in range(n + 1)]
    return best[n]


def equal_stages_s(bg, p: int, v: int, m: int) -> float:
    work = sum(b.time_s for b in bg.blocks)
    return m * work / p + (p - 1) * work / (p * v)


def run(models: list[str], ranks: list[int], chunks: list[int], time_limit_s: float, device: str,
        memory_bound: bool = True) -> tuple[list[dict], list[dict]]:
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
                rows.append(row)
                print(f"{name} p={p} v={v}: ilp {row['ilp_ms']:.2f} ms, best baseline {best_name} "
                      f"{base[best_name].step_time_s * 1e3:.2f} ms, bound {lb * 1e3:.2f} ms", flush=True)
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
    a = ap.parse_args()
    rows, capped = run(a.models, a.ranks, a.chunks, a.time_limit, a.device)
    print_table("plan quality (simulated step time, ms)", [{k: v for k, v in r.items() if v is not None} for r in rows])
    print_table("where memory binds (p=4, 1f1b, 8 microbatches)",
                [{k: v for k, v in r.items() if v is not None} for r in capped])
    path = write_result("plan_quality", rows, {"device": a.device, "time_limit_s": a.time_limit,
                                               "memory_bound": capped})
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(rows, RESULTS_DIR / "plan_quality.png")
    print(f"wrote {path} and {RESULTS_DIR / 'plan_quality.png'}")


if __name__ == "__main__":
    main()
