"""Parameter gradients of a pipelined step: where they live and how microbatches add into them.

Autograd's AccumulateGrad adds each microbatch's gradient into `.grad` one parameter at a
time: a dispatch and a kernel launch per parameter per backward, host time that a step whose
kernels are short (small stages, or stages under CUDA graphs) waits for. `accumulate` adds a
backward's gradients with one `torch._foreach_add_` (a few launches for all of them); the
executor uses it for compiled stages, whose backward hands out all gradients at once anyway.
`zero_gradients` places gradients as views into one zeroed buffer (one allocation and one
fill, not one per parameter), where CUDA graphs need them allocated before a step.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from partitioner.runtime.parameter_hooks import has_hooks

_GRAD_ALIGN_BYTES = 256  # each gradient view starts where a vectorised kernel would want it
# a CUDA foreach kernel over two lists takes at most 64 tensors and 320 chunks of 65,536 elements
# (ATen's multi_tensor_apply with 4 KB of kernel arguments; newer builds take more per launch)
FOREACH_TENSORS_PER_LAUNCH = 64
FOREACH_CHUNKS_PER_LAUNCH = 320
FOREACH_CHUNK_NUMEL = 65536


def foreach_launches(numel: int) -> float:
    """A tensor of `numel` elements' share of the launches of a foreach add over many tensors."""
    return max(1 / FOREACH_TENSORS_PER_LAUNCH, -(-numel // FOREACH_CHUNK_NUMEL) / FOREACH_CHUNKS_PER_LAUNCH)


def zero_gradients(params: list[torch.Tensor]) -> None:
    """Give each of `params` a zeroed .grad: views into one zeroed buffer per device and dtype."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    for (device, dtype), group in groups.items():
        align = max(1, _GRAD_ALIGN_BYTES // dtype.itemsize)
        offsets, total = [], 0
        for p in group:
            offsets.append(total)
            total += -(-p.numel() // align) * align
        flat = torch.zeros(total, device=device, dtype=dtype)
        for p, start in zip(group, offsets):
            p.grad = flat[start:start + p.numel()].view(p.shape)


def accumulate(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
               others: Sequence[torch.Tensor | None] = ()) -> None:
    """Add `grads` (None: the parameter got none) into the parameters' .grad, as AccumulateGrad would.

    A parameter without .grad takes its gradient tensor itself where nothing else holds that
    memory, as AccumulateGrad does (no copy); autograd may hand one tensor out as the gradient of
    several inputs (of `a + b`), or of a parameter and an input whose gradient is sent on
    (`others`): such a gradient is copied, so that adding into one .grad changes nothing else."""
    into, new, fresh = [], [], []
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None or g.layout != torch.strided or p.grad.layout != torch.strided:
            fresh.append((p, g))
        else:
            into.append(p.grad)
            new.append(g)
    if fresh:
        _take_first(fresh, [*grads, *others])
    if into:
        torch._foreach_add_(into, new)


def _take_first(pairs: list[tuple[torch.Tensor, torch.Tensor]], every: Sequence[torch.Tensor | None]) -> None:
    """(parameter, gradient) pairs where the parameter has no .grad yet, or either is sparse."""
    storages: dict[int, int] = {}
    for g in every:
        if g is not None and g.layout == torch.strided:
            key = g.untyped_storage().data_ptr()
            storages[key] = storages.get(key, 0) + 1
    for p, g in pairs:
        if g.layout != torch.strided or (p.grad is not None and p.grad.layout != torch.strided):
            p.grad = g.clone() if p.grad is None else p.grad + g  # sparse embedding gradients
            continue
        alone = g._base is None and storages[g.untyped_storage().data_ptr()] == 1 and g.stride() == p.stride()
        p.grad = g.detach() if alone else torch.empty_like(p).copy_(g)


def plain_leaves(params: Iterable[torch.Tensor]) -> list[torch.Tensor] | None:
    """`params` that require grad, or None where any carries a hook that needs AccumulateGrad
    (a tensor hook or a post-accumulate-grad hook): those parameters keep autograd's own accumulation."""
    out = []
    for p in params:
        if not p.requires_grad:
            continue
        if has_hooks(p):
            return None
        out.append(p)
    return out
