"""Microbatches: the global batch size of a call and its split into equal microbatches.

One rule for the planner, the runtime and the CLI: the batch size is dim 0 of the first
tensor input that has a dimension; tensors whose dim 0 equals it are split into
microbatches along dim 0, every other input goes whole to each microbatch.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from partitioner.errors import RuntimeConfigError


def batch_size(inputs: Any) -> int | None:
    """The global batch of `inputs` (any pytree), or None when no tensor has a dimension."""
    return next((x.shape[0] for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor) and x.dim() > 0),
                None)


def is_batched(leaf: Any, batch: int | None) -> bool:
    """Whether split_batch cuts input leaf `leaf` into microbatches (with `batch` None: every tensor)."""
    return isinstance(leaf, torch.Tensor) and (batch is None or (leaf.dim() > 0 and leaf.shape[0] == batch))


def split_batch(inputs: Any, microbatches: int, what: str, batch: int | None = None) -> list[Any]:
    """Split the tensor leaves of `inputs` along dim 0 into `microbatches` equal parts: every leaf,
    or with `batch` given only those whose dim 0 is the batch (the others go whole to each part).
    Raises RuntimeConfigError naming `what` when a leaf does not divide."""
    leaves, spec = pytree.tree_flatten(inputs)
    parts = []
    for i, leaf in enumerate(leaves):
        if not is_batched(leaf, batch):
            parts.append([leaf] * microbatches)
            continue
        if leaf.dim() == 0 or leaf.shape[0] % microbatches:
            size = "a 0-dim tensor" if leaf.dim() == 0 else f"batch size {leaf.shape[0]}"
            name = what if len(leaves) == 1 else f"{what} {i}"
            raise RuntimeConfigError(f"{name} has {size}, which cannot be split into {microbatches} equal "
                                     "microbatches along dim 0; make the batch a multiple of microbatches.")
        parts.append(list(leaf.chunk(microbatches)))
    return [pytree.tree_unflatten([p[mb] for p in parts], spec) for mb in range(microbatches)]
