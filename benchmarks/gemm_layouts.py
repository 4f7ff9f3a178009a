"""What a transformer's GEMMs reach on this GPU by weight layout and bias, against the cost model.

gpt2-xl's forward GEMMs ran ~11% slower than the cost model's single matmul efficiency on both an H100 and
an H200 while its backward GEMMs (same dims, no bias) and llama-1b's forward GEMMs (no bias) came within
2%. GPT-2 differs twice: its Conv1D computes `addmm(bias, x, W)` with W stored (in, out), where an
nn.Linear reads W (out, in) transposed, and the bias rides in the GEMM's epilogue. This times each shape
four ways, `mm` and `addmm` in either layout (the median of CUDA-event timings of 20 calls back to back,
after the clocks are warmed up), and prints the
fraction of the dtype's peak each reaches next to the plan's prediction
(cost_models.time.roofline_time_s).

    python -m benchmarks.gemm_layouts --dtype bfloat16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import print_table, write_result

# (M, K, N): the layers of gpt2-xl (hidden 1600) and llama-1b (hidden 2048, MLP 5632) for 2 x 1024 tokens
SHAPES = {
    "gpt2-xl qkv": (2048, 1600, 4800), "gpt2-xl attn proj": (2048, 1600, 1600),
    "gpt2-xl fc": (2048, 1600, 6400), "gpt2-xl mlp proj": (2048, 6400, 1600),
    "llama-1b q/o": (2048, 2048, 2048), "llama-1b up/gate": (2048, 2048, 5632), "llama-1b down": (2048, 5632, 2048),
}
# widths around gpt2-xl's, to tell tile and wave quantisation (a dim not a multiple of the tile) from layout
SHAPES.update({f"sweep K={k} N={n}": (2048, k, n) for k in (1600, 2048) for n in (1536, 1600, 1664, 2048, 4800, 5120, 6400)})


CALLS_PER_TIMING = 20  # back to back between two events: the host queues them ahead of the GPU


def _time_s(fn, repeats: int) -> float:
    """Median seconds of one fn() call over `repeats` timings of CALLS_PER_TIMING calls each, timed with
    CUDA events. One call between two events would add the host's dispatch gap (~5-20 us against GEMMs
    of 30-100 us): the GPU reaches the second event only once the host has launched the kernel."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS_PER_TIMING):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / CALLS_PER_TIMING)
    return statistics.median(times)


def _warm_up_clocks(dtype: torch.dtype, seconds: float = 1.0) -> None:
    """Run large GEMMs for `seconds` first: an idle GPU's clocks ramp up over the first shapes timed
    (the first run timed gpt2-xl's fc GEMM 25% slower than the same shape timed later)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device-spec", default=None, help="cost model table to compare with (default: this GPU's)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--name", default="gemm_layouts")
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_layouts needs a CUDA GPU", file=sys.stderr)
        return 1
    from benchmarks import common
    from partitioner.cost_models.device import get_device_spec, spec_for_torch_device
    from partitioner.cost_models.time import roofline_time_s
    if args.results_dir:
        common.RESULTS_DIR = Path(args.results_dir)
    dtype = getattr(torch, args.dtype)
    spec = get_device_spec(args.device_spec) if args.device_spec else spec_for_torch_device(torch.device("cuda"), calibrate_host=False)
    peak = spec.flops_per_s(dtype)
    _warm_up_clocks(dtype)
    rows = []
    for name, (m, k, n) in SHAPES.items():
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        w_in_out = torch.randn(k, n, device="cuda", dtype=dtype)  # Conv1D's layout
        w_out_in = torch.randn(n, k, device="cuda", dtype=dtype)  # nn.Linear's
        bias = torch.randn(n, device="cuda", dtype=dtype)
        flops = 2 * m * k * n
        predicted = roofline_time_s(flops, (m * k + k * n + m * n) * x.element_size(), 0, spec, dtype,
                                    reduction=k, width=n)
        row = {"gemm": name, "M,K,N": f"{m},{k},{n}", "predicted_us": round(predicted * 1e6, 1)}
        for label, fn in (("mm x@W(in,out)", lambda: torch.mm(x, w_in_out)),
                          ("addmm x@W(in,out)", lambda: torch.addmm(bias, x, w_in_out)),
                          ("mm x@W(out,in).T", lambda: torch.mm(x, w_out_in.t())),
                          ("addmm x@W(out,in).T", lambda: torch.addmm(bias, x, w_out_in.t()))):
            t = _time_s(fn, args.repeats)
            row[f"{label} us"] = round(t * 1e6, 1)
            row[f"{label} of peak"] = round(flops / t / peak, 3)
        rows.append(row)
    print_table(f"GEMMs on {torch.cuda.get_device_name()} ({args.dtype}), against {spec.name}'s "
                f"matmul efficiency {spec.matmul_efficiency}", rows)
    write_result(args.name, rows, {"device_spec": spec.name})
    return 0


if __name__ == "__main__":
    sys.exit(main())
