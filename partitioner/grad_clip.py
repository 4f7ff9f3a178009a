"""Gradient clipping over every rank of a pipeline, as if the model were not split.

The total norm is torch's (`torch.nn.utils.get_total_norm`) of every parameter
gradient of the whole model: each rank takes the norm of the gradients it owns,
the ranks combine them (sum of norm**p, or max for the inf-norm) with one
all-reduce over the default group, and every rank scales its gradients by the
same factor (`torch.nn.utils.clip_grads_with_norm_`). A tied weight replicated on
several ranks carries the same (all-reduced) gradient on each: only its lowest
holding rank counts it. Clipping each rank on its own norm would clip every rank
by a different factor (each sees part of the model) and count tied weights twice.
With data parallelism the sum runs over every replica: FSDP-sharded gradients
(DTensors) add up their disjoint shards; whole (replicated) gradients, the same
on every replica after the reduction, are counted once (divided by dp).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from partitioner.runtime.data_parallel import is_sharded, local_tensor

if TYPE_CHECKING:
    from partitioner.parallel_model import ParallelModel


def clip_grad_norm_(pm: "ParallelModel", max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """Clip the gradients of `pm` (all ranks) to a total norm of `max_norm`, as
    torch.nn.utils.clip_grad_norm_ on the unsplit model; returns the total norm (every rank)."""
    norm_type = float(norm_type)
    params = [p for _, p in pm.store.named_parameters()]
    owned = [p.grad for fqn, p in pm.store.named_parameters()
             if p.grad is not None and (pm.rank is None or pm.rank == min(pm.store.holders.get(fqn, [pm.rank])))]
    sharded = [g for g in owned if is_sharded(g)]
    whole = [local_tensor(g) for g in owned if not is_sharded(g)]
    device = params[0].device if params else torch.device("cpu")

    def norm(grads: list[torch.Tensor]) -> torch.Tensor:
        return get_total_norm(grads, norm_type, False, foreach) if grads else torch.zeros((), device=device)

    local, local_shards = norm(whole), norm([local_tensor(g) for g in sharded])
    total = local
    if pm.rank is not None:
        comm_device = pm.devices[pm.rank] if dist.get_backend() == "nccl" else torch.device("cpu")
        parts = torch.stack([local.detach(), local_shards.detach()]).to(comm_device, torch.float64)
        if math.isinf(norm_type):
            pm.store.peer_waits.all_reduce(parts, "clip_grad_norm_'s all-reduce of the norm", op=dist.ReduceOp.MAX)
            total = parts.max()
        else:
            parts = parts ** norm_type
            pm.store.peer_waits.all_reduce(parts, "clip_grad_norm_'s all-reduce of the norm")
            total = (parts[0] / pm.dp + parts[1]) ** (1.0 / norm_type)
        total = total.to(device, local.dtype)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                           "so it cannot be clipped. To disable this error and scale the gradients by the "
                           "non-finite norm anyway, set `error_if_nonfinite=False`")
    if params and not sharded and pm.dp == 1:
        clip_grads_with_norm_(params, max_norm, total, foreach)
    elif params:  # DTensor gradients: scale this rank's part by torch's coefficient
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        grads = [local_tensor(p.grad) for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total
