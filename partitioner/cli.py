"""`partitioner` command line: list models, profile them, print a partition plan.

Thin: every sub-command parses its flags into a config and calls the library.
Errors of the project (PartitionerError) become one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

from partitioner.errors import PartitionerError

EPILOG = """\
examples:
  partitioner models                                   the built-in model zoo
  partitioner profile gpt2 --batch 8 --seq 1024        per-module FLOPs, memory, time
  partitioner plan gpt2-xl --devices 8                 ILP plan over 8 GPUs
  partitioner plan gpt2-xl --devices 8 --memory 24GiB --microbatches 16 --compare
  partitioner plan llama-8b --devices 4 --chunks 2 --schedule interleaved-1f1b --timeline plan.png
  partitioner plan gpt2-xl --devices 2 --chunks auto --dtype bf16 --compile
                                                       1f1b or interleaving: the faster predicted
  partitioner plan gpt2-xl --devices 8 --data-parallel 4 --batch 64
                                                       8-rank pipeline x 4 FSDP replicas (32 GPUs)
  partitioner plan mypkg.models:build --devices 4      your own model: a function
                                                       returning (model, example_args[, example_kwargs])
"""


_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def _dtype_name(text: str) -> str:
    """--dtype's value: a torch dtype name, or its short form (bf16 -> bfloat16)."""
    return _DTYPE_ALIASES.get(text.lower(), text.lower())


def _chunks(text: str) -> int | str:
    """--chunks: a number of stages per rank, or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of stages per rank nor 'auto'") from None


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a zoo name (see `partitioner models`) or package.module:function "
                   "returning (model, example_args[, example_kwargs])")
    p.add_argument("--batch", type=int, default=None, help="global batch size of the example inputs (default: the model's)")
    p.add_argument("--seq", type=int, default=None, help="sequence length for language models (default: the model's)")
    p.add_argument("--dtype", default="float32", type=_dtype_name, choices=["float32", "bfloat16", "float16"],
                   help="parameter/activation dtype used for costs: float32 (fp32), bfloat16 (bf16) or "
                        "float16 (fp16), gradients and optimizer state in the same dtype as torch.optim keeps "
                        "them; default float32")
    p.add_argument("--mixed-precision", default=None, choices=["bf16"],
                   help="fp32 parameters, gradients and optimizer state with bf16 compute (as compile_parallel's "
                        "mixed_precision='bf16'); default: compute in --dtype")
    p.add_argument("--compile", action="store_true",
                   help="cost the stages as torch.compile runs them (fused elementwise kernels, no per-op "
                        "dispatch, the activations its partitioner saves), as compile_parallel does on GPUs")
    p.add_argument("--cuda-graph", action="store_true",
                   help="cost the stages replayed as CUDA graphs, with no host dispatch time (as "
                        "compile_parallel(cuda_graph=True) runs a whole step in one process on one GPU, "
                        "or compile={'mode': 'reduce-overhead'} each stage call, in any number of processes)")
    p.add_argument("--device-type", default="h100", help="DeviceSpec name used for analytic times and memory "
                   "(h100, h200, a100-40gb, a100-80gb, l4, cpu) or a JSON file with your own spec")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd", "sgd-momentum", "none"],
                   help="optimizer whose state counts towards memory (default adamw)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="partitioner",
        description="Automatic pipeline parallelism for PyTorch: capture a model as a graph, "
                    "profile every node, solve an ILP for the best split into pipeline stages, "
                    "and show the plan before any GPU is rented.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("models", help="list the built-in models with their parameter counts",
                   description="List the model zoo: randomly initialised models built from configs "
                               "(nothing is downloaded), with parameter counts and example input shapes.")

    prof = sub.add_parser("profile", help="per-module FLOPs, parameters, activations and predicted time",
                          description="Capture MODEL on the meta device and print, per module, forward+backward "
                                      "FLOPs, parameter bytes, activation and saved-for-backward bytes and "
                                      "predicted time. --measure runs each block on this machine's device.",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_flags(prof)
    prof.add_argument("--depth", type=int, default=None, help="module depth of the table rows (default: automatic)")
    prof.add_argument("--measure", action="store_true", help="measure times on the real device instead of the roofline model")
    prof.add_argument("--json", metavar="FILE", help="also write the NodeCosts as JSON")

    plan = sub.add_parser("plan", help="solve and print a pipeline partition plan",
                          description="Capture and profile MODEL, then assign its blocks to pipeline stages with "
                                      "an ILP (OR-Tools CP-SAT) that minimises the schedule's predicted step time "
                                      "under the memory cap. Prints per-rank time and memory.",
                          epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_flags(plan)
    plan.add_argument("--devices", type=int, required=True,
                      help="pipeline ranks (GPUs) of one pipeline; with --data-parallel N the job uses N x this many")
    plan.add_argument("--chunks", type=_chunks, default=1,
                      help="virtual stages per rank (interleaving); default 1. 'auto' plans 1, 2 and 4 and keeps "
                           "the fastest predicted (interleaving only where it predicts at least 2%% faster)")
    plan.add_argument("--microbatches", type=int, default=None, help="microbatches per step (default: 2 x devices)")
    plan.add_argument("--schedule", default=None, choices=["gpipe", "1f1b", "interleaved-1f1b"],
                      help="pipeline schedule (default: 1f1b, or interleaved-1f1b when --chunks > 1)")
    plan.add_argument("--memory", default=None, help="per-device memory cap, e.g. 24GiB (default: the device's memory)")
    plan.add_argument("--depth", type=int, default=None, help="module depth of the blocks (default: automatic)")
    dp = plan.add_argument_group("data parallel x pipeline", "Replicate the pipeline N times (a DeviceMesh (dp, pp)), "
                                 "each replica on 1/N of the global --batch: microbatches of batch / (N x "
                                 "microbatches) samples. The plan's memory is then per GPU and its step time "
                                 "includes the gradient reduce over the replicas.")
    dp.add_argument("--data-parallel", type=int, default=1, metavar="N",
                    help="pipeline replicas (default 1: pipeline only)")
    dp.add_argument("--dp-mode", default="fsdp", choices=["fsdp", "replicate"],
                    help="fsdp (default): parameters, gradients and optimizer state sharded over the replicas "
                         "between steps (FSDP2), so each GPU keeps 1/N of the optimizer state; replicate: "
                         "everything whole on every GPU, gradients all-reduced")
    dp.add_argument("--dp-bandwidth", default=None, metavar="BW",
                    help="bandwidth of the replicas' collectives per GPU, e.g. 50GB/s (default: the device's "
                         "intra-node bandwidth when N x devices GPUs fit in one host, else its inter-node one)")
    dp.add_argument("--gpus-per-host", type=int, default=8, metavar="G",
                    help="GPUs per host, for the default --dp-bandwidth (default 8)")
    plan.add_argument("--time-limit", type=float, default=10.0,
                      help="seconds for the whole search (default 10): the ILP, the local search on the simulator "
                           "(55%% of it when interleaving or on branchy graphs), then the exact split search or "
                           "the lower-bound row generation (20%% when interleaving or on branchy graphs)")
    plan.add_argument("--gap", type=float, default=1.0, metavar="PERCENT",
                      help="stop the search once the plan is proven within this many percent of the best "
                           "possible step (a lower bound); --time-limit stays the upper limit (default 1)")
    plan.add_argument("--json", metavar="FILE", help="write the plan as JSON")
    plan.add_argument("--compare", action="store_true", help="also score the baselines (uniform, torchtitan, "
                      "parameters, FLOPs, size, chain DP) with the same simulator")
    plan.add_argument("--timeline", nargs="?", const="-", metavar="PNG",
                      help="show the schedule per rank in the terminal, or draw it to PNG")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "measure", False):  # real tensors: no cycle may hold their memory until the exit
        gc.enable()
    try:  # each sub-command's imports (torch, ortools, transformers) load only when it runs: a quick --help
        if args.command == "models":
            from partitioner.zoo import print_models
            print_models()
        elif args.command == "profile":
            from partitioner.cost_models.profile_command import run_profile
            run_profile(args)
        elif args.command == "plan":
            from partitioner.plan_command import run_plan
            run_plan(args)
    except PartitionerError as e:
        print(f"partitioner {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def run() -> None:
    """The console script: main(), then exit without tearing the interpreter down. Freeing torch's
    thousands of modules and objects one by one takes 0.5-1 s and keeps nothing: output is
    flushed and logs shut down here, and every file the commands write is closed when they return.

    The cyclic garbage collector stays off while models are traced on the meta device: importing
    torch and transformers, capture and profiling allocate millions of long-lived objects, and its
    scans of them were 1.6 s of a cold `plan llama-70b` for 30 MiB of cycles left to the exit
    (reference counting frees the rest). main() turns it back on where real tensors are run."""
    gc.disable()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
