"""Refuse a split that cuts sequences instead of samples.

Microbatches cut the inputs along their batch dims: dim 0 unless compile_parallel(batch_dims=...)
says otherwise (partitioner/microbatch.py). PyTorch's sequence modules default to sequence-first
tensors (nn.MultiheadAttention, nn.LSTM / GRU / RNN and the nn.Transformer layers with
batch_first=False read (seq, batch, ...)), so a model fed (seq, batch, ...) inputs cut along dim 0
would have each microbatch attend over, or recur along, part of every sequence: loss and gradients
silently differ from the model's. The model runs on fake tensors (fake_run.py) at the example
batch and at one microbatch; a sequence module whose sequence dim shrinks with the microbatch
raises RuntimeConfigError naming it and the fix (batch_dims={'x': 1}: cut the batch dim instead).
Likewise an RNN's initial state hx, (num_layers x directions, batch, hidden) in either layout, given
as inputs left whole by a cut along dim 0: refused, naming the inputs and batch_dims={'h0': 1}.
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
    states: dict[str, torch.Size] = {}  # each RNN's initial state, per microbatch
    for rows in (batch, batch // microbatches):
        shapes: dict[str, torch.Size] = {}
        states.clear()
        hooks = [m.register_forward_pre_hook(_record(name, shapes, states), with_kwargs=True) for name, m in named]
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
    for name, m in named:
        _check_state_cut(model, args, kwargs, batch, dims, name, m, part.get(name), states.get(name))


def _check_state_cut(model: nn.Module, args: tuple, kwargs: dict, batch: int, dims: Dims, name: str, m: nn.Module,
                     seq: torch.Size | None, state: torch.Size | None) -> None:
    """Refuse an RNN whose initial state keeps the whole batch per microbatch: hx is (layers x
    directions, batch, hidden), its batch on dim 1 where the inputs' default cut is dim 0."""
    if seq is None or state is None or len(seq) != 3 or len(state) != 3:
        return
    rows = seq[0 if m.batch_first else 1]
    if state[1] == rows:
        return
    leaves = pytree.tree_leaves((tuple(args), dict(kwargs)))
    names = input_leaf_names(model, tuple(args), dict(kwargs))
    whole = [n for i, (n, x) in enumerate(zip(names, leaves)) if isinstance(x, torch.Tensor) and x.dim() == 3
             and x.shape[1] == batch and not is_batched(x, batch, leaf_dim(dims, i))]
    held = f" ({', '.join(repr(n) for n in whole)})" if whole else ""
    fix = (f"give them batch dim 1 in compile_parallel's batch_dims: {{{', '.join(f'{n!r}: 1' for n in whole)}}} "
           "(beside the inputs it names already)" if whole else
           "pass batch_dims= naming the inputs it is computed from, with their batch dim")
    raise RuntimeConfigError(
        f"compile_parallel: '{name}' ({type(m).__name__}) gets an initial state hx of {tuple(state)} per microbatch "
        f"of {rows} samples: hx holds the batch on dim 1 ((num_layers x directions, batch, hidden), whatever "
        f"batch_first says), which the microbatches did not cut{held}; {fix}.")


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


def _record(name: str, shapes: dict[str, torch.Size], states: dict[str, torch.Size]):
    """A pre-hook keeping the shape of the module's first call's sequence input (query / input) and,
    for an RNN given one, of its initial state hx (h_0 of an LSTM's (h_0, c_0))."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else kwargs.get("query", kwargs.get("input"))
        if isinstance(first, torch.Tensor) and _concrete(first.shape):
            shapes.setdefault(name, first.shape)
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        hx = hx[0] if isinstance(hx, (tuple, list)) else hx
        if isinstance(module, nn.RNNBase) and isinstance(hx, torch.Tensor) and _concrete(hx.shape):
            states.setdefault(name, hx.shape)
    return hook


def _concrete(shape: torch.Size) -> bool:
    """A size known without the data (not one that a nonzero before it made symbolic)."""
    return all(isinstance(d, int) for d in shape)
