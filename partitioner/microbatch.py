"""Microbatches: the global batch size of a call and its split into equal microbatches.

One rule for the planner, the runtime and the CLI: each input leaf has a batch dim (dim 0 unless
compile_parallel(batch_dims=...) says otherwise, e.g. 1 for sequence-first (seq, batch, ...)
tensors); the batch size is the size of the first tensor input along its batch dim; tensors whose
size along their batch dim equals it are split into microbatches along that dim, every other
input goes whole to each microbatch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

from partitioner.errors import RuntimeConfigError

Dims = int | Sequence[int]  # one batch dim for every leaf, or one per flattened leaf


@dataclass(frozen=True)
class BatchDims:
    """Where the batch lies: the batch dim of each flattened input leaf (of (args, kwargs)) and of
    every leaf of the target. The default is dim 0 everywhere."""

    inputs: tuple[int, ...] | int = 0
    target: int = 0


def resolve_batch_dims(batch_dims: int | dict[str, int] | None, names: list[str], leaves: list[Any]) -> BatchDims:
    """compile_parallel's batch_dims as per-leaf dims of the inputs `leaves` (named `names`, as
    passes.capture_io.input_leaf_names names them). An int applies to every tensor input and the
    target; a dict maps leaf names (or an argument's name, for all its nested leaves) and "target"
    to their dim, unnamed ones keep dim 0. Raises RuntimeConfigError for an unknown name or a dim
    an input does not have."""
    if batch_dims is None:
        return BatchDims()
    if isinstance(batch_dims, bool) or not isinstance(batch_dims, (int, dict)):
        raise RuntimeConfigError(f"compile_parallel: batch_dims={batch_dims!r}; pass an int (the batch dim of every "
                                 "input and the target) or a dict {input name: dim}, e.g. {'x': 1, 'target': 1}.")
    if isinstance(batch_dims, int):
        given = {n: batch_dims for n, x in zip(names, leaves) if isinstance(x, torch.Tensor) and x.dim() > 0}
        target = batch_dims
    else:
        unknown = [k for k in batch_dims if k != "target" and not any(_names_leaf(k, n) for n in names)]
        if unknown:
            raise RuntimeConfigError(f"compile_parallel: batch_dims names {unknown[0]!r}, which is no input of the "
                                     f"model; the inputs are {names} (and 'target' for the target).")
        bad = next(((k, d) for k, d in batch_dims.items() if isinstance(d, bool) or not isinstance(d, int)), None)
        if bad is not None:
            raise RuntimeConfigError(f"compile_parallel: batch_dims[{bad[0]!r}] is {bad[1]!r}; give an int dim.")
        given = {n: d for k, d in batch_dims.items() if k != "target" for n in names if _names_leaf(k, n)}
        target = batch_dims.get("target", 0)
    dims = []
    for name, x in zip(names, leaves):
        if name not in given:
            dims.append(0)
            continue
        d = given[name]
        if not isinstance(x, torch.Tensor) or not -x.dim() <= d < x.dim():
            what = (f"has shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else
                    f"is not a tensor ({type(x).__name__})")
            fix = ("pass batch_dims as a dict naming the inputs whose batch is on that dim, e.g. "
                   f"{{{names[0]!r}: {d}}}" if isinstance(batch_dims, int) else f"give {name!r} a dim it has")
            raise RuntimeConfigError(f"compile_parallel: batch_dims puts the batch of input {name!r} on dim {d}, "
                                     f"but it {what}; {fix}.")
        dims.append(d % x.dim())
    return BatchDims(tuple(dims), target)


def _names_leaf(key: str, name: str) -> bool:
    """Whether batch_dims key `key` names leaf `name`: the leaf itself or an argument holding it."""
    return name == key or name.startswith(key + "[")


def leaf_dim(dims: Dims, i: int) -> int:
    """Flattened leaf i's batch dim as `dims` gives it (one int for every leaf, or one per leaf)."""
    return dims if isinstance(dims, int) else dims[i]


def _dim(dims: Dims, i: int, leaf: torch.Tensor) -> int | None:
    """Leaf i's batch dim, non-negative; None when the leaf has no such dim."""
    d = leaf_dim(dims, i)
    d = d + leaf.dim() if d < 0 else d
    return d if 0 <= d < leaf.dim() else None


def batch_size(inputs: Any, dims: Dims = 0) -> int | None:
    """The global batch of `inputs` (any pytree; `dims`: each leaf's batch dim): the size of the first
    tensor that has its batch dim along it, or None when no tensor has."""
    for i, x in enumerate(pytree.tree_leaves(inputs)):
        if isinstance(x, torch.Tensor) and (d := _dim(dims, i, x)) is not None:
            return x.shape[d]
    return None


def is_batched(leaf: Any, batch: int | None, dim: int = 0) -> bool:
    """Whether split_batch cuts input leaf `leaf` (batch dim `dim`) into microbatches (with `batch`
    None: every tensor)."""
    if not isinstance(leaf, torch.Tensor):
        return False
    d = _dim(dim, 0, leaf)
    return batch is None or (d is not None and leaf.shape[d] == batch)


def cut_dim(leaf: Any, batch: int, dim: int = 0) -> int | None:
    """The dim (non-negative) along which split_batch cuts input leaf `leaf` (batch dim `dim`) from a
    batch of `batch`, or None when the leaf goes whole to each microbatch."""
    return _dim(dim, 0, leaf) if is_batched(leaf, batch, dim) else None


def per_sample_lists(args: tuple, kwargs: dict, names: list[str], batch: int | None) -> list[str]:
    """Inputs that look per-sample but are not cut: a list of `batch` Python values (no tensors), e.g.
    sequence lengths (a tuple is more often a size, as image_size=(h, w)). Values that are not tensors
    are constants of the captured graph, so every microbatch would read the whole batch's list.
    `names`: forward's parameter names of `args`, in order. Returns each such input's name and
    length, e.g. "'lengths' (4 values)"."""
    if batch is None or batch < 2:
        return []
    named = [*zip(names, args), *kwargs.items()]
    return [f"'{n}' ({batch} values)" for n, v in named
            if isinstance(v, list) and len(v) == batch and all(isinstance(x, (int, float, bool, str)) for x in v)]


def split_batch(inputs: Any, microbatches: int, what: str, batch: int | None = None, dims: Dims = 0) -> list[Any]:
    """Split the tensor leaves of `inputs` along their batch dims (`dims`) into `microbatches` equal
    parts: every leaf, or with `batch` given only those whose size there is the batch (the others go
    whole to each part). Raises RuntimeConfigError naming `what` when a leaf does not divide."""
    leaves, spec = pytree.tree_flatten(inputs)
    parts = []
    for i, leaf in enumerate(leaves):
        dim = leaf_dim(dims, i)
        if not is_batched(leaf, batch, dim):
            parts.append([leaf] * microbatches)
            continue
        d = _dim(dim, 0, leaf)
        if d is None or leaf.shape[d] % microbatches:
            size = (f"batch size {leaf.shape[d]}" if d is not None else
                    "a 0-dim tensor" if leaf.dim() == 0 else f"shape {tuple(leaf.shape)}, without a dim {dim}")
            name = what if len(leaves) == 1 else f"{what} {i}"
            fix = ("make the batch a multiple of microbatches" if d is not None else
                   "give it a batch dim there, or pass batch_dims= with its batch dim")
            raise RuntimeConfigError(f"{name} has {size}, which cannot be split into {microbatches} equal "
                                     f"microbatches along dim {dim}; {fix}.")
        parts.append(list(leaf.chunk(microbatches, d)))
    return [pytree.tree_unflatten([p[mb] for p in parts], spec) for mb in range(microbatches)]


def split_target(target: Any, parts: int, batch: int | None, dims: BatchDims = BatchDims()) -> list[Any]:
    """Split the target of a batch of `batch` samples (the inputs' batch size) into `parts` as the
    inputs are, along its batch dim (dims.target). A tensor leaf is cut where its size there is the
    batch, or a multiple of it (labels flattened sample-major: (batch x seq,) beside (batch x seq,
    vocab) logits); other leaves (a loss's class weights, a 0-dim margin) go whole to every part.
    Refused, naming the batch_dims to pass: with inputs batched on other dims than the target
    (batch_dims={"x": 1} alone), a leaf whose batch lies on another dim (a sequence-first (seq, batch)
    target would be cut along its sequence, pairing the wrong tokens); and a target none of whose
    leaves holds the batch."""
    dim = dims.target
    if batch is None:
        return split_batch(target, parts, "target", dims=dim)
    same_dim = all(d == dim for d in ([dims.inputs] if isinstance(dims.inputs, int) else dims.inputs))
    leaves, spec = pytree.tree_flatten(target)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    cut = []
    for x in leaves:
        d = _dim(dim, 0, x) if isinstance(x, torch.Tensor) else None
        if d is None or not x.shape[d]:
            cut.append(False)
            continue
        elsewhere = [k for k in range(x.dim()) if k != d and x.shape[k] == batch]
        if x.shape[d] != batch and elsewhere and (x.shape[d] % batch or not same_dim):
            name = "target" if len(tensors) == 1 else "a leaf of the target"
            raise RuntimeConfigError(f"{name} {tuple(x.shape)} has {x.shape[d]} along its batch dim {d} but the "
                                     f"inputs' batch {batch} along dim {elsewhere[0]}; pass "
                                     f"compile_parallel(batch_dims={{..., 'target': {elsewhere[0]}}}) so that it is "
                                     "cut there.")
        cut.append(x.shape[d] % batch == 0)
    if tensors and not any(cut):
        first = tensors[0]
        d = _dim(dim, 0, first)
        if d is None:  # split_batch names a leaf without the dim
            return split_batch(target, parts, "target", dims=dim)
        name = "target" if len(tensors) == 1 else "the target's first tensor"
        raise RuntimeConfigError(f"{name} {tuple(first.shape)} has {first.shape[d]} samples along its batch dim {d}, "
                                 f"but the inputs' batch is {batch}, so it cannot be cut into the inputs' "
                                 "microbatches; pass the target of the same batch as the inputs.")
    pieces = [list(x.chunk(parts, _dim(dim, 0, x))) if c else [x] * parts for x, c in zip(leaves, cut)]
    return [pytree.tree_unflatten([p[i] for p in pieces], spec) for i in range(parts)]
