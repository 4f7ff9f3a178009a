"""Activations saved for backward, eager and compiled: the cost model against what autograd keeps.

    python -m benchmarks.saved_bytes                          # gpt2, t5-base, small llama on the CPU
    python -m benchmarks.saved_bytes --models gpt2 --seq 128

Per zoo model (batch 2, fp32, training mode, on this machine's CPU): the bytes of the distinct
storages autograd saves during one forward (saved_tensors_hooks; parameters left out) of the
captured graph run eagerly and through torch.compile, next to what `profile` predicts for each
(cost_models/memory.py for eager, cost_models/compiled_memory.py for compiled). Writes
benchmarks/results/saved_bytes.json.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import print_table, write_result


def row(name: str, seq: int, small: bool) -> dict:
    from partitioner import zoo
    from partitioner.cost_models.memory import measured_saved_bytes
    from partitioner.cost_models.profile import profile
    from partitioner.passes.capture import capture

    zm = zoo.build(name, batch=2, seq=seq, device="cpu", dtype=torch.float32, small=small, seed=0)
    zm.model.train()
    captured = capture(zm.model, zm.example_args, zm.example_kwargs)
    gm = captured.graph_module
    inputs = captured.flatten_inputs(zm.example_args, zm.example_kwargs)
    state = list(gm.parameters()) + list(gm.buffers())
    t = time.perf_counter()
    eager_pred = profile(captured, progress=False).total("saved_bytes")
    compiled_pred = profile(captured, progress=False, compiled=True).total("saved_bytes")
    profile_s = time.perf_counter() - t
    eager = measured_saved_bytes(gm, inputs, state)
    compiled_gm = torch.compile(gm, dynamic=False)
    measured_saved_bytes(compiled_gm, inputs, state)  # compiles, under the hooks as measured
    compiled = measured_saved_bytes(compiled_gm, inputs, state)
    mib = 2 ** 20
    return {"model": name + (" (small)" if small else ""), "tokens": 2 * seq,
            "eager_mib": eager / mib, "eager_pred_mib": eager_pred / mib, "eager_err": eager_pred / eager - 1,
            "compiled_mib": compiled / mib, "compiled_pred_mib": compiled_pred / mib,
            "compiled_err": compiled_pred / compiled - 1, "profile_s": profile_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2,t5-base,llama-1b:small",
                        help="comma-separated zoo names; ':small' builds the zoo's small configuration")
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args(argv)
    rows = []
    for spec in args.models.split(","):
        name, _, small = spec.partition(":")
        rows.append(row(name, args.seq, small == "small"))
        print(rows[-1], flush=True)
    print_table("saved for backward, eager and compiled (CPU, fp32, batch 2)", rows)
    print(f"wrote {write_result('saved_bytes', rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
