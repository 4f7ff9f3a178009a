"""Memory costs: parameter, output and saved-for-backward bytes, optimizer state.

Saved bytes come from the tensors saved_tensors_hooks recorded while each node's
forward ran on fake tensors (cost_models/flops.py): deduplicated by storage, so
views and aliases count once, a storage saved by an earlier node is not counted
again, and parameters/buffers (get_attr storages) are not activations.

Bytes may be re-expressed in another dtype than the graph was captured in: a
floating tensor of the graph's float dtype (`from_dtype`) counts at the size of
`to_dtype`; other dtypes (int indices, bool masks, explicit fp32 upcasts in a
bf16 graph such as T5LayerNorm's `.to(float32).pow(2)`) keep their size: a graph
captured in the dtype it trains in is counted by each node's actual dtype. Saved
tensors marked `accumulates` (SDPA's math path) stay fp32 whenever the computation
is 16-bit, even when an fp32 graph is re-costed as bf16.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from cost_models.flops import NodeTrace
from partitioner.errors import CostModelError

# optimizer -> fp32 state tensors per parameter element (moments / momentum buffers)
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0, "none": 0}


@dataclass(frozen=True)
class DtypeScale:
    """Counts bytes of `from_dtype` floating tensors as `to_dtype` (identity when equal)."""

    from_dtype: torch.dtype = torch.float32
    to_dtype: torch.dtype = torch.float32

    def itemsize(self, dtype: torch.dtype) -> int:
        if dtype == self.from_dtype:
            return self.to_dtype.itemsize
        return dtype.itemsize

    def nbytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel * self.itemsize(dtype)

    def storage_bytes(self, storage_bytes: int, dtype: torch.dtype) -> int:
        return storage_bytes * self.itemsize(dtype) // dtype.itemsize


def value_bytes(value: Any, scale: DtypeScale | None = None) -> int:
    """Bytes of every tensor leaf of `value` (numel x itemsize; views count in full)."""
    scale = scale or DtypeScale()
    return sum(scale.nbytes(t.numel(), t.dtype) for t in pytree.tree_leaves(value)
               if isinstance(t, torch.Tensor))


def saved_bytes_per_node(traces: dict[str, NodeTrace], scale: DtypeScale | None = None) -> dict[str, int]:
    """Activation bytes saved for backward by each node, in graph order.

    A storage counts once, at the first node that saves it; storages of
    get_attr values (parameters, buffers, constants) never count.
    """
    scale = scale or DtypeScale()
    excluded = set()
    for trace in traces.values():
        if trace.op == "get_attr":
            for t in pytree.tree_leaves(trace.output):
                if isinstance(t, torch.Tensor):
                    excluded.add(_storage_key(t))
    seen: set = set()
    out: dict[str, int] = {}
    for name, trace in traces.items():
        total = 0
        for s in trace.saved:
            if s.storage in excluded or s.storage in seen:
                continue
            seen.add(s.storage)
            nbytes = scale.storage_bytes(s.storage_bytes, s.dtype)
            if s.accumulates:  # fp32 accumulation of a 16-bit computation
                nbytes = max(nbytes, s.storage_bytes // s.dtype.itemsize * torch.float32.itemsize)
            total += nbytes
        out[name] = total
    return out


def _storage_key(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


def param_state_bytes(numel: int, dtype: torch.dtype, optimizer: str = "adamw", *,
                      trainable: bool = True) -> int:
    """Bytes one parameter occupies in training: weight + gradient + optimizer state.

    fp32 weights: weight (4) + grad (4) + 4 per optimizer state.
    16-bit weights (mixed precision): weight + grad in 16 bit, plus an fp32 master
    copy and fp32 optimizer states whenever an optimizer updates it
    (AdamW: 2 + 2 + 4 + 8 = 16 bytes per element). Frozen parameters and
    buffers (trainable=False) hold only their weight.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise CostModelError(f"unknown optimizer '{optimizer}': choose one of {sorted(OPTIMIZER_STATES)}")
    weight = numel * dtype.itemsize
    if not trainable or not (dtype.is_floating_point or dtype.is_complex):
        return weight
    grad = weight
    states = OPTIMIZER_STATES[optimizer]
    fp32 = torch.float32.itemsize
    master = numel * fp32 if dtype.itemsize < fp32 and optimizer != "none" else 0
    return weight + grad + master + states * numel * fp32


def params_state_bytes(params: Iterable[tuple[str, int, torch.dtype, bool]], optimizer: str = "adamw",
                       scale: DtypeScale | None = None) -> dict[str, int]:
    """param_state_bytes for (fqn, numel, dtype, trainable) rows, dtype re-expressed through `scale`."""
    scale = scale or DtypeScale()
    out = {}
    for fqn, numel, dtype, trainable in params:
        dt = scale.to_dtype if dtype == scale.from_dtype else dtype
        out[fqn] = param_state_bytes(numel, dt, optimizer, trainable=trainable)
    return out
