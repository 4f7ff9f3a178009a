"""The processes of a torchrun job: starting the default process group, and checking that every rank
compiles the same model with the same arguments (compile_parallel calls these before it builds anything,
so a rank that differs fails with a named error instead of hanging in a mismatched collective)."""
from __future__ import annotations

import atexit
import hashlib
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from partitioner.errors import RuntimeConfigError
from partitioner.microbatch import BatchDims
from partitioner.plan import Plan


def init_distributed(devices: list[torch.device], timeout_s: float) -> int | None:
    """This process's rank under torchrun (initialising the default group if needed), else None."""
    if not dist.is_available() or (not dist.is_initialized() and not
                                   ("RANK" in os.environ and "WORLD_SIZE" in os.environ)):
        return None
    if not dist.is_initialized():
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        if world != len(devices):
            raise RuntimeConfigError(f"compile_parallel: torchrun started {world} processes but {len(devices)} "
                                     f"devices were given; start one process per device "
                                     f"(torchrun --nproc_per_node {len(devices)}).")
        backend = "nccl" if devices[rank].type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        if backend == "gloo":
            atexit.register(_destroy_gloo_groups)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:  # a world of one process (e.g. torchrun --nproc_per_node 1) drives every stage itself
        return None
    if world != len(devices):
        raise RuntimeConfigError(f"compile_parallel on rank {rank}: the world has {world} processes but "
                                 f"{len(devices)} devices were given; start one process per device "
                                 f"(torchrun --nproc_per_node {len(devices)}).")
    if devices[rank].type == "cuda":
        torch.cuda.set_device(devices[rank])
    return rank


def _destroy_gloo_groups() -> None:
    """Destroy the process groups compile_parallel created, while the interpreter is still whole.

    A gloo process left to interpreter teardown can abort ("terminate called without an active
    exception") as its worker threads are destroyed. NCCL groups are left to the user
    (`dist.destroy_process_group()`): after a failed step NCCL's teardown can wait on the dead peer."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _digest(data: bytes) -> int:
    """A 60-bit digest of `data`, as an int64 tensor holds it."""
    return int(hashlib.sha256(data).hexdigest()[:15], 16)


def _sample_digest(t: torch.Tensor) -> int:
    """The digest of 64 values spread over `t` (its bytes, any dtype): cheap at any size."""
    flat = t.detach().reshape(-1)
    return _digest(flat[::max(1, flat.numel() // 64)][:64].contiguous().cpu().view(torch.uint8).numpy().tobytes())


def _every_rank(digest: int, rank: int, devices: list[torch.device]) -> list[int]:
    """Every rank's `digest`, by rank (one all_gather of an int64)."""
    device = devices[rank] if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor([digest], dtype=torch.int64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [int(t.item()) for t in everyone]


def agree(text: str, what: str, rank: int, devices: list[torch.device]) -> None:
    """All ranks compare a hash of `text`; RuntimeConfigError on every rank if they differ."""
    values = _every_rank(_digest(text.encode()), rank, devices)
    if len(set(values)) > 1:
        groups: dict[int, list[int]] = {}
        for r, v in enumerate(values):
            groups.setdefault(v, []).append(r)
        raise RuntimeConfigError(f"compile_parallel on rank {rank}: {what} differ across ranks (ranks that agree: "
                                 f"{sorted(groups.values())}). Call compile_parallel with the same arguments and "
                                 "the same model on every rank.")


def check_same_weights(model: torch.nn.Module, rank: int, devices: list[torch.device]) -> None:
    """Every rank must start from the same weights: each keeps its own copy of its stages' tensors,
    so a model built unseeded (each rank drawing its own random init) would train tied weights and
    data-parallel replicas from different values, silently. Compared by a sample of each real
    parameter (64 values: cheap at any size); the error names the first that differs."""
    names, digests = [], []
    for name, p in model.named_parameters():
        if p.is_meta:
            continue
        names.append(name)
        digests.append(_sample_digest(p))
    if len(set(_every_rank(_digest(repr(digests).encode()), rank, devices))) == 1:
        return
    lists: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(lists, digests)
    other = next(r for r, d in enumerate(lists) if d != lists[0])
    first = next((n for n, a, b in zip(names, lists[0], lists[other]) if a != b), names[0] if names else "?")
    raise RuntimeConfigError(f"compile_parallel on rank {dist.get_rank()}: the model's weights differ across ranks "
                             f"('{first}' on rank {other} is not rank 0's), so tied weights and data-parallel "
                             "replicas would train from different values. Build the model the same way on every "
                             "rank: call torch.manual_seed(seed) before constructing it, load the same weights, "
                             "or build it on meta and pass init_fn= or checkpoint=.")


def fingerprint(model: torch.nn.Module, devices: list[torch.device], args: tuple, kwargs: dict,
                 microbatches: int, schedule: str, chunks: int, plan: Plan | None,
                 dims: BatchDims = BatchDims()) -> str:
    def describe(x: Any) -> str:
        return f"T{tuple(x.shape)}{x.dtype}" if isinstance(x, torch.Tensor) else repr(x)

    leaves, spec = pytree.tree_flatten((args, kwargs))
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return repr((type(model).__qualname__, [str(d) for d in devices], str(spec), [describe(x) for x in leaves],
                 microbatches, schedule, chunks, params, plan.to_json() if plan is not None else None, dims))


def check_same_batch(batch: Any, rank: int, devices: list[torch.device]) -> None:
    """Every rank must pass the same (global) batch to train_step: rank 0 reads the inputs, the last rank
    the target, and each replica cuts its share from its own copy, so a loader that gives each rank its own
    batch (a DistributedSampler, as under DDP) would train on inputs and labels of different samples,
    silently. Compared once, on the first step, by a sample of each tensor (as check_same_weights)."""
    digests = []
    for leaf in pytree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor):
            digests.append(_sample_digest(leaf))
    values = _every_rank(_digest(repr(digests).encode()), rank, devices)
    if len(set(values)) > 1:
        differ = [r for r, v in enumerate(values) if v != values[0]]
        raise RuntimeConfigError(f"train_step on rank {dist.get_rank()}: ranks {differ} were given another batch than "
                                 "rank 0; every rank passes the same global batch (inputs and target): the pipeline's "
                                 "first rank reads the inputs, its last the target, and each data-parallel replica "
                                 "takes its share. Load the same batch on every rank (a DistributedSampler, as under "
                                 "DDP, gives each rank its own: use one sampler, seeded alike, on every rank).")
