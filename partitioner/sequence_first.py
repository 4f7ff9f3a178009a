"""Refuse a split that cuts sequences instead of samples.

Microbatches cut the inputs along dim 0 (partitioner/microbatch.py). PyTorch's sequence modules
default to sequence-first tensors (nn.MultiheadAttention, nn.LSTM / GRU / RNN and the nn.Transformer
layers with batch_first=False read (seq, batch, ...)), so a model fed (seq, batch, ...) inputs
would have each microbatch attend over, or recur along, part of every sequence: loss and gradients
silently differ from the model's. The model runs on fake tensors (fake_run.py) at the example
batch and at one microbatch; a sequence module whose sequence dim shrinks with the microbatch
raises RuntimeConfigError naming it and the fix.
"""
from __future__ import annotations

import torch
from torch import nn

from partitioner.errors import RuntimeConfigError
from partitioner.fake_run import run_fake
from partitioner.microbatch import batch_size


SEQUENCE_MODULES = (nn.MultiheadAttention, nn.RNNBase)  # the nn.Transformer layers hold MultiheadAttention


def sequence_dim(module: nn.Module, shape: torch.Size) -> int:
    """The dim of a sequence module's input of `shape` that it mixes along: 1 for a batch-first
    batched input, else 0 (sequence-first, or unbatched (seq, features))."""
    return 1 if module.batch_first and len(shape) == 3 else 0


def check_split_keeps_sequences(model: nn.Module, args: tuple, kwargs: dict, microbatches: int) -> None:
    """Raise RuntimeConfigError if cutting the example batch into `microbatches` cuts the sequences
    that one of `model`'s sequence modules reads. Silent where the model does not run on fake
    tensors (nothing is known then) or has no sequence module."""
    batch = batch_size((args, kwargs))
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, SEQUENCE_MODULES)]
    if not named or microbatches == 1 or batch is None or batch % microbatches:
        return
    seen: dict[int, dict[str, torch.Size]] = {}
    for rows in (batch, batch // microbatches):
        shapes: dict[str, torch.Size] = {}
        hooks = [m.register_forward_pre_hook(_record(name, shapes), with_kwargs=True) for name, m in named]
        try:
            run_fake(model, model.training, args, kwargs, rows)
        except Exception:  # noqa: BLE001 - the shapes are unknown; capture says why if it matters
            return
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
            raise RuntimeConfigError(
                f"compile_parallel: '{name}' ({type(m).__name__}, batch_first={m.batch_first}) reads "
                f"{tuple(whole[name])} {layout} for the example batch but {tuple(part[name])} per microbatch: "
                f"cutting the batch into {microbatches} microbatches (along dim 0 of the inputs) cuts its "
                f"sequences (dim {d}), so every microbatch would see part of each sequence. Feed the model "
                "batch-first inputs (batch on dim 0: nn.MultiheadAttention / nn.LSTM / nn.Transformer*(batch_first="
                "True), or transpose to sequence-first inside forward), or pass microbatches=1.")


def _record(name: str, shapes: dict[str, torch.Size]):
    """A pre-hook keeping the shape of the module's first call's sequence input (query / input)."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else kwargs.get("query", kwargs.get("input"))
        if isinstance(first, torch.Tensor):
            shapes.setdefault(name, first.shape)
    return hook
