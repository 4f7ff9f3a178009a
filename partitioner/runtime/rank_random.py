"""Random draws of the stages under torchrun: one stream per rank, the script's own in step on every rank.

Every rank seeds alike (torch.manual_seed before building the model: its weights must agree), so each
rank's default generator starts from the same state. The stages draw from it in their order (dropout
masks), and the first dropout of rank 1's stage drew the very mask of rank 0's first, microbatch by
microbatch: layers on different ranks dropped the same units, where the model draws a fresh mask per
layer (Megatron offsets its pipeline ranks' seeds for the same reason). Data-parallel replicas drew
the same masks for different samples likewise.

Around each step, ranked_random_draws takes one seed from the default generator (the same draw on every
rank, so the script's later draws, a batch sampled on each rank, stay equal across ranks), and the
stages draw from that seed mixed with the global rank, on a forked generator state that is put back
afterwards. Deterministic under torch.manual_seed; the draws differ from the unpartitioned model's, as
they do in one process, where the stages' order is not the model's.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_MIX = 0x9E3779B97F4A7C15  # the golden-ratio increment (splitmix64): seeds of neighbouring ranks far apart


@contextlib.contextmanager
def ranked_random_draws(global_rank: int | None, device: torch.device) -> Iterator[None]:
    """Inside: the default generators (CPU, and `device`'s if CUDA) seeded for this rank from one draw of the
    CPU generator; restored after, one draw on. No-op in one process (global_rank None)."""
    if global_rank is None:
        yield
        return
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64, device="cpu").item())  # the CPU generator's draw
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        ranked = (seed + (global_rank + 1) * _MIX) % 2 ** 64
        torch.random.default_generator.manual_seed(ranked)
        if cuda:  # the stages' device's generator, whichever device is current
            torch.cuda.default_generators[cuda[0]].manual_seed(ranked)
        yield
