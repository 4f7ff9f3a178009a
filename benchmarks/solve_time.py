"""CP-SAT solve time vs number of blocks and stages, on synthetic block graphs.

    python -m benchmarks.solve_time                   # 50..1000 blocks x 4, 8, 16 stages
    python -m benchmarks.solve_time --blocks 1000 --stages 16
    python -m benchmarks.solve_time --chunks 1 2      # also interleaved-1f1b, 2 stages per rank

Graphs: a chain of blocks with random fwd+bwd times (0.5-2 ms), activation
bytes and parameter/activation memory, plus short skip edges (5% of blocks,
like residual shortcuts). 1F1B (interleaved-1f1b with --chunks > 1; stages
counts virtual stages, ranks = stages / chunks), m = 2 x ranks, no memory
cap, 10 s time limit covering the whole solve() call, simulator refinement
off (pure solver time). Target: 1,000 blocks x 16 stages under 10 s. Writes
benchmarks/results/solve_time.json and .png.
"""
from __future__ import annotations

import argparse
import random
import time

from benchmarks.common import RESULTS_DIR, print_table, pyplot, save_figure, write_result


def synthetic(n: int, seed: int = 0):
    from partitioner.passes.coarsen import synthetic_block_graph

    rng = random.Random(seed)
    times = [rng.uniform(0.5e-3, 2e-3) for _ in range(n)]
    edges = {(b, b + 1): rng.randint(1 << 20, 1 << 25) for b in range(n - 1)}
    for u in range(n - 3):
        if rng.random() < 0.05:
            edges[u, u + rng.randint(2, 3)] = rng.randint(1 << 20, 1 << 25)
    return synthetic_block_graph(times, edges, [rng.randint(1 << 24, 1 << 28) for _ in range(n)],
                                 [rng.randint(1 << 22, 1 << 26) for _ in range(n)])


def run(blocks: list[int], stages: list[int], time_limit_s: float, chunks: list[int] = (1,)) -> list[dict]:
    from partitioner.chain_dp import split_chain
    from partitioner.solve import solve

    rows = []
    for n in blocks:
        bg = synthetic(n)
        for v in chunks:
            for K in stages:
                if K > n or K % v:
                    continue
                p = K // v
                t0 = time.perf_counter()
                plan = solve(bg, p, v, 2 * p, link_bw_bytes_per_s=50e9, time_limit_s=time_limit_s, refine_time_s=0)
                wall = time.perf_counter() - t0
                t1 = time.perf_counter()
                split_chain([b.time_s for b in bg.blocks], K)
                dp_s = time.perf_counter() - t1
                rows.append({"blocks": n, "stages": K, "chunks": v, "status": plan.solver_status, "gap": plan.gap,
                             "solve_s": wall, "dp_s": dp_s, "step_ms": plan.step_time_s * 1e3})
                print(f"{n} blocks x {K} stages ({v} per rank): {plan.solver_status} in {wall:.2f} s "
                      f"(gap {plan.gap:.2%})", flush=True)
    return rows


def plot(rows: list[dict], path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    stage_counts = sorted({r["stages"] for r in rows})
    for K, v in sorted({(r["stages"], r.get("chunks", 1)) for r in rows}):
        pts = [(r["blocks"], r["solve_s"]) for r in rows if r["stages"] == K and r.get("chunks", 1) == v]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{stage_counts.index(K)}",
                marker="o" if v == 1 else "s", linestyle="-" if v == 1 else ":",
                label=f"{K} stages" + (f" ({v} per rank)" if v > 1 else ""))
    ax.axhline(10, color="grey", linestyle="--", linewidth=0.8, label="10 s target")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("blocks")
    ax.set_ylabel("solve time (s, incl. model build)")
    ax.set_title("CP-SAT partition ILP: solve time")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", nargs="+", type=int, default=[50, 100, 250, 500, 1000])
    ap.add_argument("--stages", nargs="+", type=int, default=[4, 8, 16])
    ap.add_argument("--chunks", nargs="+", type=int, default=[1], help="virtual stages per rank")
    ap.add_argument("--time-limit", type=float, default=10.0)
    a = ap.parse_args()
    rows = run(a.blocks, a.stages, a.time_limit, a.chunks)
    print_table("CP-SAT solve time", rows)
    path = write_result("solve_time", rows, {"time_limit_s": a.time_limit})
    plot(rows, RESULTS_DIR / "solve_time.png")
    print(f"wrote {path} and {RESULTS_DIR / 'solve_time.png'}")


if __name__ == "__main__":
    main()
