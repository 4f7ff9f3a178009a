"""Gradient clipping over every rank of a pipeline, as if the model were not split.

The total norm is torch's (`torch.nn.utils.get_total_norm`) of every parameter
gradient of the whole model: each rank takes the norm of the gradients it owns,
the ranks combine them (sum of norm**p, or max for the inf-norm) with one
all-reduce over the default group, and every rank scales its gradients by the
same factor (`torch.nn.utils.clip_grads_with_norm_`). A tied weight replicated on
several ranks carries the same (all-reduced) gradient on each: only its lowest
holding rank counts it. Clipping each rank on its own norm would clip every rank
by a different factor (each sees part of the model) and count tied weights twice.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

if TYPE_CHECKING:
    from partitioner.api import ParallelModel


def clip_grad_norm_(pm: "ParallelModel", max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """Clip the gradients of `pm` (all ranks) to a total norm of `max_norm`, as
    torch.nn.utils.clip_grad_norm_ on the unsplit model; returns the total norm (every rank)."""
    norm_type = float(norm_type)
    params = [p for _, p in pm.store.named_parameters()]
    owned = [p.grad for fqn, p in pm.store.named_parameters()
             if p.grad is not None and (pm.rank is None or pm.rank == min(pm.store.holders.get(fqn, [pm.rank])))]
    device = params[0].device if params else torch.device("cpu")
    local = get_total_norm(owned, norm_type, False, foreach) if owned else torch.zeros((), device=device)
    total = local
    if pm.rank is not None:
        comm_device = pm.devices[pm.rank] if dist.get_backend() == "nccl" else torch.device("cpu")
        if math.isinf(norm_type):
            part = local.detach().to(comm_device, torch.float64)
            dist.all_reduce(part, op=dist.ReduceOp.MAX)
            total = part
        else:
            part = local.detach().to(comm_device, torch.float64) ** norm_type
            dist.all_reduce(part)
            total = part ** (1.0 / norm_type)
        total = total.to(device, local.dtype)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                           "so it cannot be clipped. To disable this error and scale the gradients by the "
                           "non-finite norm anyway, set `error_if_nonfinite=False`")
    if params:
        clip_grads_with_norm_(params, max_norm, total, foreach)
    return total
