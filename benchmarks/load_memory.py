"""Peak host memory per rank when loading a Llama-shaped model for 2 pipeline ranks (gloo, CPU).

    python -m benchmarks.load_memory                       # ~2 GB of fp32 weights, 10 layers
    python -m benchmarks.load_memory --layers 4 --hidden 1024 --intermediate 2816   # quick

Writes a random-weight checkpoint once (safetensors shards + index + config.json, in
Hugging Face's layout, one layer per shard so the writer never holds the model), then
loads it with 2 gloo ranks on the CPU, each method in fresh processes:

- meta + lazy (ours): every rank builds the model on the meta device (parameters;
  buffers real, partitioner.materialise.meta_parameters) and calls
  compile_parallel(..., checkpoint=dir): it allocates only its stages' tensors and
  reads them from the shards with safetensors.safe_open.
- whole model (today): every rank loads the whole model (from_pretrained), then
  compile_parallel copies its stages' tensors out of it.

Both use the same even plan. Per rank: peak RSS (VmHWM: the process's high-water
mark, file pages it touched included), the RSS before loading (Python,
torch, transformers), and the loss of one forward on the same tokens (both methods
must agree). Prints a table; writes benchmarks/results/load_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import torch
import torch.multiprocessing as mp

from benchmarks.common import print_table, write_result

GIB = 2 ** 30


def llama_config(args: argparse.Namespace):
    import transformers
    return transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                    num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                    num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                                    max_position_embeddings=256, tie_word_embeddings=True, use_cache=False,
                                    bos_token_id=0, eos_token_id=0, architectures=["LlamaForCausalLM"])


def write_checkpoint(config, path: str) -> int:
    """Random weights in HF's sharded safetensors layout, one layer at a time; returns the bytes written."""
    from safetensors.torch import save_file
    import transformers
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    shards: dict[str, list[str]] = {}
    for key in shapes:
        layer = key.split(".")[2] if key.startswith("model.layers.") else "rest"
        shards.setdefault(f"model-{layer}.safetensors", []).append(key)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for file, keys in shards.items():
        tensors = {k: (torch.ones(shapes[k]) if "norm" in k else torch.randn(shapes[k], generator=gen) * 0.02)
                   for k in keys}
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: file for k in keys})
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config.save_pretrained(path)
    return total


def _rank(rank: int, method: str, path: str, port: int, out: str, batch: int, seq: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import transformers
    from partitioner import compile_parallel, zoo
    from partitioner.materialise import meta_parameters
    from partitioner.passes.capture import capture
    from partitioner.passes.split import even_plan

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = transformers.LlamaConfig.from_pretrained(path)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    with meta_parameters():  # the plan needs no weights: every rank cuts the same way
        meta = transformers.LlamaForCausalLM(config)
    plan = even_plan(capture(meta, (tokens[:1].to("meta"),)), 2, microbatches=batch)
    before = _max_rss()
    t0 = time.perf_counter()
    if method == "meta + lazy (ours)":
        pm = compile_parallel(meta, ["cpu", "cpu"], (tokens,), zoo.lm_loss, microbatches=batch, plan=plan,
                              checkpoint=path)
    else:
        model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
        pm = compile_parallel(model, ["cpu", "cpu"], (tokens,), zoo.lm_loss, microbatches=batch, plan=plan)
    load_s = time.perf_counter() - t0
    peak = _max_rss()
    with torch.no_grad():
        logits = pm(tokens)
    loss = [float(zoo.lm_loss(logits, tokens)) if logits is not None else None]
    torch.distributed.broadcast_object_list(loss, src=1)
    local_bytes = sum(t.numel() * t.element_size() for copies in pm.store.replicas.values() for t in copies)
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump({"rank": rank, "rss_before_gib": before / GIB, "peak_rss_gib": peak / GIB,
                   "loaded_gib": (peak - before) / GIB, "stage_tensors_gib": local_bytes / GIB,
                   "load_s": load_s, "loss": loss[0]}, f)
    torch.distributed.destroy_process_group()


def _max_rss() -> int:
    """This process's peak RSS in bytes: VmHWM (Linux; ru_maxrss would carry the parent's peak
    over fork + exec), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_method(method: str, path: str, batch: int, seq: int) -> list[dict]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_rank, args=(method, path, port, out, batch, seq), nprocs=2, join=False,
                                 start_method="spawn")
        while not ctx.join(timeout=600):
            pass
        return [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(2)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--results-dir", default=None, help="where to write load_memory.json")
    args = parser.parse_args(argv)
    if args.results_dir:
        import benchmarks.common as common
        from pathlib import Path
        common.RESULTS_DIR = Path(args.results_dir)
    config = llama_config(args)
    rows = []
    with tempfile.TemporaryDirectory() as path:
        weights = write_checkpoint(config, path)
        for method in ("meta + lazy (ours)", "whole model (today)"):
            for r in run_method(method, path, args.batch, args.seq):
                rows.append({"method": method, "weights_gib": weights / GIB, **r})
    print_table(f"Peak host RSS per rank, Llama shape ({weights / GIB:.2f} GiB fp32 weights), 2 gloo ranks",
                rows)
    ours = max(r["peak_rss_gib"] for r in rows if r["method"].startswith("meta"))
    today = max(r["peak_rss_gib"] for r in rows if r["method"].startswith("whole"))
    summary = {"max_peak_rss_gib_ours": ours, "max_peak_rss_gib_today": today, "ratio": today / ours,
               "losses_equal": len({r["loss"] for r in rows}) == 1}
    print(summary)
    path = write_result("load_memory", rows, {"config": {k: v for k, v in vars(args).items() if k != "results_dir"},
                                              "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
