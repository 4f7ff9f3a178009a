"""Run the benchmark suite: `python -m benchmarks [--full] [--gpu] [--only NAME ...]`.

quick (default): what runs on a 2-core CPU machine in under 10 minutes; results go to
        benchmarks/results/quick/ (smaller cases than the README quotes).
--full: the CPU benchmarks at the sizes the README quotes; results in benchmarks/results/.
--gpu:  the parts meant for a GPU machine (cost-model accuracy, one-GPU runtime overhead,
        executor on one GPU); results in benchmarks/results/.
Every benchmark prints a table and writes JSON (and a PNG where it has a figure).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

# (name, module, args for quick, args for full, needs_gpu)
SUITE: list[tuple[str, str, list[str], list[str], bool]] = [
    ("capture", "benchmarks.capture", [], [], False),
    ("solve_time", "benchmarks.solve_time", ["--blocks", "100", "1000", "--stages", "4", "16"],
     ["--blocks", "50", "200", "500", "1000", "--stages", "4", "8", "16", "--chunks", "1", "2"], False),
    ("plan_time", "benchmarks.plan_time", ["--only", "gpt2-xl"], ["--repeats", "3"], False),
    ("plan_quality", "benchmarks.plan_quality", ["--models", "gpt2-xl", "cnn", "--ranks", "4"], [], False),
    ("executor_vs_torch", "benchmarks.executor_vs_torch", ["--quick"], ["--quick"], False),
    ("executor_vs_torch_1proc", "benchmarks.executor_vs_torch", ["--quick", "--mode", "one-process"],
     ["--quick", "--mode", "one-process"], False),
    ("load_memory", "benchmarks.load_memory",
     ["--layers", "2", "--hidden", "512", "--intermediate", "1024", "--vocab", "8000"], [], False),
    ("dp_memory", "benchmarks.dp_memory", [], [], False),
    ("cost_model_accuracy", "benchmarks.cost_model_accuracy", [], [], True),
    ("gpu_runtime", "benchmarks.gpu_runtime", [], [], True),
    ("executor_vs_torch_gpu", "benchmarks.executor_vs_torch", ["--device", "cuda"], ["--device", "cuda"], True),
    ("executor_vs_torch_nccl", "benchmarks.executor_vs_torch",  # needs 4 GPUs
     ["--device", "cuda", "--mode", "dist", "--ranks", "2,4"], ["--device", "cuda", "--mode", "dist", "--ranks", "2,4"],
     True),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also run the slow CPU cases")
    parser.add_argument("--gpu", action="store_true", help="run the GPU benchmarks (needs CUDA)")
    parser.add_argument("--only", nargs="*", metavar="NAME", help="run only these: " + ", ".join(s[0] for s in SUITE))
    args = parser.parse_args(argv)
    failed = []
    for name, module, quick_args, full_args, needs_gpu in SUITE:
        if args.only and name not in args.only:
            continue
        if needs_gpu != args.gpu and not args.only:
            continue
        cmd = [sys.executable, "-m", module] + (full_args if args.full else quick_args)
        if "--ranks" in cmd and needs_gpu:  # NCCL: one GPU per rank, use the world sizes this machine has
            import torch
            sizes = [w for w in (2, 4, 8) if w <= torch.cuda.device_count()]
            if not sizes:
                print(f"\n=== {name}: skipped (needs at least 2 GPUs, found {torch.cuda.device_count()})")
                continue
            cmd[cmd.index("--ranks") + 1] = ",".join(map(str, sizes))
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        env = dict(os.environ)
        if not (args.full or args.gpu):
            env.setdefault("PARTITIONER_RESULTS_DIR", str(Path(__file__).resolve().parent / "results" / "quick"))
        rc = subprocess.call(cmd, env=env)
        print(f"=== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.1f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
