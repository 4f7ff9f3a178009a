"""Gradient hooks registered on the model's parameters, carried to the stages' copies.

The stages train copies of the weights (ParameterStore), so a hook the user put on a parameter
before compile_parallel (`p.register_hook(lambda g: g.clamp(-1, 1))`, a post-accumulate-grad hook)
would be left on a tensor no backward reaches: gradients silently unhooked. Each copy gets the
hooks of its source, in order. Where a copy's gradient is not the parameter's whole gradient of a
microbatch the hook would see part of it: a tied weight whose copies sit on several ranks (each
rank's share, summed after the step) and FSDP2's shards over dp; both are refused, naming the
parameter. Under data_parallel='replicate' the copies see their replica's own microbatches' gradients,
before the average over dp (runtime/replicated_gradients.py reduces after the stage's last backward): what a
hook on a parameter under DDP sees, with no_sync over the accumulated microbatches.
"""
from __future__ import annotations

import torch

from partitioner.errors import RuntimeConfigError


def has_hooks(t: torch.Tensor) -> bool:
    """Whether `t` carries a gradient hook or a post-accumulate-grad hook."""
    return bool(t._backward_hooks or getattr(t, "_post_accumulate_grad_hooks", None))


def copy_hooks(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Register `src`'s gradient and post-accumulate-grad hooks on `dst` (a parameter's copy)."""
    for hook in (src._backward_hooks or {}).values():
        dst.register_hook(hook)
    for hook in (getattr(src, "_post_accumulate_grad_hooks", None) or {}).values():
        dst.register_post_accumulate_grad_hook(hook)


def check_hooks_whole(model: torch.nn.Module, holders: dict[str, list[int]], sharded: bool) -> None:
    """Raise RuntimeConfigError for a hooked parameter whose copies see part of its gradient: held on
    several ranks (`holders`: FQN -> ranks) or `sharded` over data-parallel replicas (FSDP2)."""
    for fqn, p in model.named_parameters():
        if not has_hooks(p):
            continue
        if sharded:
            raise RuntimeConfigError(
                f"compile_parallel: parameter '{fqn}' has a gradient hook, but data_parallel='fsdp' shards it into "
                "new tensors that would not run it; pass data_parallel='replicate', or register the hook on the "
                "ParallelModel's parameter after compile_parallel.")
        if len(holders.get(fqn, ())) > 1:
            raise RuntimeConfigError(
                f"compile_parallel: parameter '{fqn}' has a gradient hook and is read on ranks {holders[fqn]} (a tied "
                "weight); each rank's copy gets only its share of the gradient, so the hook would not see the "
                "gradient the model's does. Remove the hook, or apply it to the gradient after train_step.")
