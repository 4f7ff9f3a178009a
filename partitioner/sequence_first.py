"""Refuse a split that cuts sequences instead of samples.

Microbatches cut the inputs along their batch dims: dim 0 unless compile_parallel(batch_dims=...)
says otherwise (partitioner/microbatch.py). PyTorch's sequence modules default to sequence-first
tensors (nn.MultiheadAttention, nn.LSTM / GRU / RNN and the nn.Transformer layers with
batch_first=False read (seq, batch, ...)), so a model fed (seq, batch, ...) inputs cut along dim 0
would have each microbatch attend over, or recur along, part of every sequence: loss and gradients
silently differ from the model's. The model runs on fake tensors (fake_run.py) at the example
batch and at one microbatch; a sequence module whose sequence dim shrinks with the microbatch
raises RuntimeConfigError naming it and the fix (batch_dims={'x': 1}: cut the batch dim instead).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils import _pytree as pytree

from partitioner.errors import RuntimeConfigError
from partitioner.fake_run import run_fake
from partitioner.microbatch import Dims, batch_size, is_batched, leaf_dim
from partitioner.passes.capture_io import input_leaf_names


SEQUENCE_MODULES = (nn.MultiheadAttention, nn.RNNBase)  # the nn.Transformer layers hold MultiheadAttention


def sequence_dim(module: nn.Module, shape: torch.Size) -> int:
    """The dim of a sequence module's input of `shape` that it mixes along: 1 for a batch-first
    batched input, else 0 (sequence-first, or unbatched (seq, features))."""
    return 1 if module.batch_first and len(shape) == 3 else 0


def check_split_keeps_sequences(model: nn.Module, args: tuple, kwargs: dict, microbatches: int,
                                dims: Dims = 0) -> None:
    """Raise RuntimeConfigError if cutting the example batch into `microbatches` along the inputs'
    batch dims (`dims`, per flattened input leaf) cuts the sequences that one of `model`'s sequence
    modules reads. Silent where the model does not run on fake tensors at the example batch (nothing
    is known then) or has no sequence module."""
    batch = batch_size((args, kwargs), dims)
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, SEQUENCE_MODULES)]
    if not named or microbatches == 1 or batch is None or batch % microbatches:
        return
    seen: dict[int, dict[str, torch.Size]] = {}
    for rows in (batch, batch // microbatches):
        shapes: dict[str, torch.Size] = {}
        hooks = [m.register_forward_pre_hook(_record(name, shapes), with_kwargs=True) for name, m in named]
        try:
            run_fake(model, model.training, args, kwargs, rows, dims)
        except Exception:  # noqa: BLE001 - the shapes are unknown; capture says why if it matters
            if rows == batch:
                return
            # a microbatch that fails (e.g. a (batch, seq) mask against cut sequences) may already have
            # shown a sequence module its shrunk input: the shapes recorded before the failure still tell
        finally:
            for h in hooks:
                h.remove()
        seen[rows] = shapes
    whole, part = seen[batch], seen[batch // microbatches]
    for name, m in named:
        if name not in whole or name not in part or len(whole[name]) != len(part[name]):
            continue
        d = sequence_dim(m, whole[name])
        if whole[name][d] != part[name][d]:
            layout = "(batch, seq, ...)" if getattr(m, "batch_first", False) else "(seq, batch, ...)"
            cut, fix = _cut_inputs(model, args, kwargs, batch, dims)
            raise RuntimeConfigError(
                f"compile_parallel: '{name}' ({type(m).__name__}, batch_first={m.batch_first}) reads "
                f"{tuple(whole[name])} {layout} for the example batch but {tuple(part[name])} per microbatch: "
                f"cutting the batch into {microbatches} microbatches (along {cut}) cuts its sequences "
                f"(dim {d}), so every microbatch would see part of each sequence. {fix}, or feed the model "
                "batch-first inputs (batch on dim 0: nn.MultiheadAttention / nn.LSTM / nn.Transformer*(batch_first="
                "True), or transpose to sequence-first inside forward), or pass microbatches=1.")


def _cut_inputs(model: nn.Module, args: tuple, kwargs: dict, batch: int, dims: Dims) -> tuple[str, str]:
    """Where the inputs were cut ("dim 0 of 'src'") and the first fix: batch_dims naming the first
    cut input with the dim after it (the batch dim of a (seq, batch, ...) tensor)."""
    leaves = pytree.tree_leaves((tuple(args), dict(kwargs)))
    names = input_leaf_names(model, tuple(args), dict(kwargs))
    cut = [(n, leaf_dim(dims, i)) for i, (n, x) in enumerate(zip(names, leaves))
           if is_batched(x, batch, leaf_dim(dims, i))]
    where = ", ".join(f"dim {d} of '{n}'" for n, d in cut[:3]) + (", ..." if len(cut) > 3 else "")
    first, d = cut[0]
    if d != 0:
        return where, f"batch_dims puts the batch of '{first}' on dim {d}: check that it lies there"
    return where, (f"Pass batch_dims={{'{first}': 1}} to compile_parallel (with 'target': 1 for a sequence-first "
                   "target) to cut the batch dim of (seq, batch, ...) inputs instead")


def _record(name: str, shapes: dict[str, torch.Size]):
    """A pre-hook keeping the shape of the module's first call's sequence input (query / input)."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else kwargs.get("query", kwargs.get("input"))
        if isinstance(first, torch.Tensor):
            shapes.setdefault(name, first.shape)
    return hook
