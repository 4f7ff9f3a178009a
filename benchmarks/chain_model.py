"""The model both runtimes run in benchmarks/executor_vs_torch.py: a chain of blocks.

Each block is x + MLP(LayerNorm(x)), one tensor in and out, so torch's pipeline
stages are plain nn.Sequential slices; `chain_plan` cuts our captured graph at
exactly those block boundaries, and `torch_schedule` builds torch's stages and
schedule over the same slices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from partitioner.errors import PartitionerError
from partitioner.passes.annotate import annotate
from partitioner.passes.capture import capture
from partitioner.passes.split import plan_from_cuts, valid_cuts



class Block(nn.Module):
    """x + fc2(gelu(fc1(norm(x)))): (B, T, dim) -> (B, T, dim); the residual stays inside the block."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


@dataclass(frozen=True)
class ChainConfig:
    """The chain model and its batch: `microbatches` microbatches of (microbatch_size, seq, dim)."""

    blocks: int = 8
    dim: int = 256
    hidden: int = 1024
    seq: int = 32
    microbatch_size: int = 4
    microbatches: int = 8


def build_chain(cfg: ChainConfig, seed: int = 0) -> nn.Sequential:
    """The same weights on every rank for the same seed."""
    torch.manual_seed(seed)
    return nn.Sequential(*[Block(cfg.dim, cfg.hidden) for _ in range(cfg.blocks)])


def make_batch(cfg: ChainConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.microbatch_size * cfg.microbatches, cfg.seq, cfg.dim)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def stage_bounds(num_blocks: int, num_stages: int) -> list[int]:
    """Block index where each stage begins, plus num_blocks at the end (stages as even as possible)."""
    if num_stages > num_blocks:
        raise PartitionerError(f"executor_vs_torch: {num_stages} stages need at least {num_stages} blocks, the "
                               f"model has {num_blocks}; pass --blocks {num_stages} or more.")
    return [round(k * num_blocks / num_stages) for k in range(num_stages + 1)]


def chain_plan(model: nn.Sequential, cfg: ChainConfig, ranks: int, chunks: int, schedule: str):
    """Our Plan cutting the captured microbatch graph where torch's nn.Sequential slices begin."""
    x, _ = make_batch(cfg)  # on the model's device: capture bakes devices into the graph
    captured = capture(model, (x[: cfg.microbatch_size].to(next(model.parameters()).device),))
    block_of = []  # block index of every compute node, in graph order
    for info in annotate(captured).nodes:
        if info.op in ("call_function", "call_method", "call_module"):
            head = info.module_path.split(".")[0]
            if not head.isdigit():
                raise PartitionerError(f"executor_vs_torch: node '{info.name}' belongs to no block "
                                       f"(module path '{info.module_path}'); the chain model must be blocks only.")
            block_of.append(int(head))
    if block_of != sorted(block_of):
        raise PartitionerError("executor_vs_torch: the captured graph interleaves blocks; cannot cut at blocks.")
    bounds = stage_bounds(cfg.blocks, ranks * chunks)
    cuts = [block_of.index(b) for b in bounds[1:-1]]
    bad = set(cuts) - set(valid_cuts(captured))
    if bad:
        raise PartitionerError(f"executor_vs_torch: cut positions {sorted(bad)} send non-tensors; cannot cut there.")
    return plan_from_cuts(captured, cuts, ranks, chunks, schedule, cfg.microbatches), bounds


def torch_schedule(model: nn.Sequential, cfg: ChainConfig, bounds: list[int], rank: int, ranks: int, chunks: int,
                   device: torch.device):
    """torch.distributed.pipelining stages of `rank` (stage k on rank k % ranks) and its schedule
    (shapes are inferred by torch on the first step, a warm-up step)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    num_stages = ranks * chunks
    stages = [PipelineStage(model[bounds[k]:bounds[k + 1]].to(device), k, num_stages, device)
              for k in range(rank, num_stages, ranks)]
    microbatches = cfg.microbatches
    if chunks == 1 and ranks > 1:
        return Schedule1F1B(stages[0], microbatches, loss_fn=mse_loss)
    return ScheduleInterleaved1F1B(stages, microbatches, loss_fn=mse_loss)


QUICK = ChainConfig(blocks=8, dim=512, hidden=2048, seq=16, microbatch_size=4, microbatches=4)
CPU_FULL = ChainConfig(blocks=8, dim=512, hidden=2048, seq=64, microbatch_size=4, microbatches=8)
GPU_QUICK = ChainConfig(blocks=8, dim=1024, hidden=4096, seq=256, microbatch_size=4, microbatches=8)
GPU_FULL = ChainConfig(blocks=16, dim=2048, hidden=8192, seq=512, microbatch_size=4, microbatches=8)
