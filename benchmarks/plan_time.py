"""Wall time of `partitioner plan` end to end, as a user runs it (a subprocess: imports included).

    python -m benchmarks.plan_time                 # every row once
    python -m benchmarks.plan_time --repeats 3     # best of 3 per row
    python -m benchmarks.plan_time --only gpt2-xl  # the rows whose name holds gpt2-xl

Rows: `partitioner plan gpt2-xl --devices 8` with an empty cache directory (PARTITIONER_CACHE:
the model is built, captured and profiled), then again with the cache that run left (warm: the
profile is read back through the zoo recipe, the model not even built), then with --devices 4
(warm: another pipeline of the same microbatch shape). `partitioner plan llama-70b --devices 8
--chunks 2` cold: in fp32 with AdamW its parameters' training state alone (131 GiB a rank) does
not fit 80 GiB, so the row times the refusal; with --dtype bfloat16 and no cap in effect (--memory
1TiB) it times a whole plan, cold and warm. Each row keeps the best of --repeats runs (a shared
machine adds noise, never removes it), the search's line ("proven within ...") or the error, and
the machine's load average before the row (other jobs on a shared machine inflate every time).
Writes benchmarks/results/plan_time.json.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.common import print_table, write_result

LLAMA_FITS = ["llama-70b", "--devices", "8", "--chunks", "2", "--dtype", "bfloat16", "--memory", "1TiB"]
ROWS = [  # (name, argv after `partitioner plan`, cache: "cold" empties it before every run, "warm" keeps it)
    ("gpt2-xl p=8 cold", ["gpt2-xl", "--devices", "8"], "cold"),
    ("gpt2-xl p=8 warm", ["gpt2-xl", "--devices", "8"], "warm"),
    ("gpt2-xl p=4 warm", ["gpt2-xl", "--devices", "4"], "warm"),
    ("llama-70b p=8 v=2 cold (refused: fp32 does not fit)", ["llama-70b", "--devices", "8", "--chunks", "2"], "cold"),
    ("llama-70b p=8 v=2 bf16 no cap cold", LLAMA_FITS, "cold"),
    ("llama-70b p=8 v=2 bf16 no cap warm", LLAMA_FITS, "warm"),
]


SEARCH_LINES = ("search ", "proven within", "stopped at the time limit")  # report.search_line's openings


def plan_once(argv: list[str], cache: str) -> tuple[float, float, int, str]:
    """(wall seconds, CPU seconds, exit code, the search's line or the error) of one `partitioner plan`
    subprocess. CPU time (user + system, all its threads) is what other jobs on the machine inflate least."""
    env = dict(os.environ, PARTITIONER_CACHE=cache)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "partitioner.cli", "plan", *argv], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    lines = [line for line in done.stdout.splitlines() if line.startswith(SEARCH_LINES)]
    lines = lines or [line for line in done.stderr.splitlines() if line.strip()] or [""]
    return wall, cpu, done.returncode, lines[-1]


def run(repeats: int, only: list[str] | None = None) -> list[dict]:
    rows = []
    cache = tempfile.mkdtemp(prefix="plan_time_")
    try:
        for name, argv, mode in ROWS:
            if only and not any(o in name for o in only):
                continue
            walls, cpus, load = [], [], os.getloadavg()[0]
            for _ in range(repeats):
                if mode == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                    os.makedirs(cache)
                wall, cpu, code, search = plan_once(argv, cache)
                walls.append(wall)
                cpus.append(cpu)
                print(f"{name}: {wall:.1f} s, {cpu:.1f} s CPU (exit {code}) {search}", flush=True)
            rows.append({"run": name, "command": "partitioner plan " + " ".join(argv), "cache": mode,
                         "best_s": min(walls), "runs_s": [round(w, 2) for w in walls],
                         "cpu_s": [round(c, 2) for c in cpus], "exit": code, "search": search,
                         "load_avg_1min": round(load, 2)})
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per row; the best is kept (default 1)")
    parser.add_argument("--only", nargs="*", help="rows whose name contains one of these (e.g. gpt2-xl)")
    args = parser.parse_args()
    rows = run(args.repeats, args.only)
    print_table("partitioner plan, end to end (subprocess, imports included)", rows)
    path = write_result("plan_time", rows, {"cpu_threads": os.cpu_count()})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
