"""Output assembly: the output of a whole batch from the outputs of its microbatches.

A pipeline runs the batch as m microbatches and gets every output leaf m times. A per-sample leaf
(one dim grows with the batch: dim 0, or dim 1 of a sequence-first output) is their concatenation
along that dim; a leaf whose shape does not depend on the batch is one value (0-dim ones, such as a
loss, are stacked: one per microbatch).
Any other leaf, e.g. (batch, batch) similarities between every pair of samples, mixes samples
across the batch: no assembly of the microbatches' values gives it, so it is refused rather than
returned wrong. Which leaf is which comes from running the original model on fake tensors at the
whole batch (fake_run.py), against a microbatch's real output.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils import _pytree as pytree

from partitioner.errors import RuntimeConfigError
from partitioner.fake_run import run_fake
from partitioner.microbatch import Dims, batch_size


def whole_batch_shapes(model: torch.nn.Module | None, training: bool, args: tuple, kwargs: dict,
                       microbatch_leaves: list[Any], replicas: int = 1, dims: Dims = 0
                       ) -> list[torch.Size | None] | None:
    """The shape of each output leaf (None: not a tensor) of `model` called on (args, kwargs) with
    their batched leaves (as split_batch decides, along their batch dims `dims`) cut to one
    data-parallel replica's share, run in `training` mode on fake meta tensors: the model's weights
    and buffers are neither read nor written.

    None, said in a warning, when there is no model, it does not run on fake tensors (e.g.
    data-dependent control flow) or its output leaves are not those of a microbatch's output
    (`microbatch_leaves`): the caller then assembles every leaf as per-sample."""
    if model is None:
        return _cannot_tell("this ParallelModel keeps no reference to its model")
    full = batch_size((args, kwargs), dims)
    try:
        out = run_fake(model, training, args, kwargs, full // replicas if full is not None else None, dims)
    except Exception as err:  # noqa: BLE001 - any failure only means we cannot tell
        first = (str(err).strip().splitlines() or [""])[0]
        return _cannot_tell(f"{type(model).__name__} does not run on fake tensors ({type(err).__name__}: {first})")
    shapes = [x.shape if isinstance(x, torch.Tensor) else None for x in pytree.tree_leaves(out)]
    if any(s is not None and not all(isinstance(d, int) for d in s) for s in shapes):
        return _cannot_tell(f"the size of an output of {type(model).__name__} depends on the data")
    if [s is None for s in shapes] != [not isinstance(x, torch.Tensor) for x in microbatch_leaves]:
        return _cannot_tell(f"run on fake tensors, {type(model).__name__}'s output does not match the captured "
                            f"graph's ({len(shapes)} vs {len(microbatch_leaves)} leaves)")
    return shapes


def _cannot_tell(why: str) -> None:
    warnings.warn(f"ParallelModel.forward cannot tell which outputs are per sample: {why}. Every output tensor "
                  "is concatenated over the microbatches along dim 0, which is right only for per-sample outputs "
                  "(dim 0 is the batch).", RuntimeWarning, stacklevel=4)
    return None


def assemble(per_microbatch: list[list[Any]], whole_shapes: list[torch.Size | None] | None,
             out_spec: pytree.TreeSpec) -> Any:
    """The output structure for the whole batch from each microbatch's flat output leaves.

    whole_shapes: each leaf's shape for the whole batch (whole_batch_shapes); None
    concatenates every tensor leaf along dim 0 (0-dim ones stacked). Raises RuntimeConfigError
    naming a leaf that mixes samples across the batch."""
    first = per_microbatch[0]
    leaves = []
    for i, x in enumerate(first):
        if not isinstance(x, torch.Tensor):
            leaves.append(x)
            continue
        parts = [mb[i] for mb in per_microbatch]
        whole = whole_shapes[i] if whole_shapes is not None else None
        m = len(parts)
        if x.dim() == 0 and whole in (None, x.shape):
            leaves.append(torch.stack(parts))
        elif whole is None:
            leaves.append(torch.cat(parts))
        elif (dim := _batch_dim(x.shape, whole, m)) is not None:
            leaves.append(torch.cat(parts, dim))
        elif whole == x.shape:
            differs = next((k for k in range(1, m) if not torch.equal(parts[k], x)), None)
            if differs is not None:
                raise RuntimeConfigError(
                    f"ParallelModel.forward: {_leaf_name(per_microbatch, out_spec, i)} has shape "
                    f"{tuple(x.shape)} whatever the batch, but microbatches 0 and {differs} give it different "
                    f"values: it reduces over the batch's samples, which a pipeline over microbatches cannot "
                    f"assemble. {_FIX}")
            leaves.append(x)
        else:
            raise RuntimeConfigError(
                f"ParallelModel.forward: {_leaf_name(per_microbatch, out_spec, i)} is {tuple(whole)} for the "
                f"whole batch but {tuple(x.shape)} per microbatch (of {m}): it mixes samples across the batch (e.g. "
                f"a score for every pair of samples), which a pipeline over microbatches cannot assemble; only "
                f"outputs with one batch dim, or that do not depend on the batch, can be. {_FIX}")
    return pytree.tree_unflatten(leaves, out_spec)


def _batch_dim(part: torch.Size, whole: torch.Size, m: int) -> int | None:
    """The one dim along which `whole` is m microbatch outputs of shape `part` side by side (the
    batch: dim 0 mostly, dim 1 for sequence-first outputs such as (seq, batch, hidden)); None if none."""
    if len(part) != len(whole):
        return None
    grown = [d for d, (p, w) in enumerate(zip(part, whole)) if p != w]
    return grown[0] if len(grown) == 1 and whole[grown[0]] == m * part[grown[0]] else None


_FIX = "Compute it outside the model from per-sample outputs, or compile with microbatches=1."


def _leaf_name(per_microbatch: list[list[Any]], out_spec: pytree.TreeSpec, i: int) -> str:
    """Leaf i's path in the output structure: "output['logits_per_image']", "output[1]"."""
    paths, _ = pytree.tree_flatten_with_path(pytree.tree_unflatten(per_microbatch[0], out_spec))
    return "output" + pytree.keystr(paths[i][0])
