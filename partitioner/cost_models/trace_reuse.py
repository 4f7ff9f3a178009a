"""Trace each distinct node once: a node running the same op on alike inputs replays the first one's trace.

The 48 layers of gpt2-xl (80 of llama-70b) run the same aten ops on tensors of the same shapes,
so tracing every node on fake tensors (forward, saved tensors, backward, FLOPs, kernels:
partitioner/cost_models/flops.py) finds the same thing again and again. The first node of a
kind is traced and kept as a NodeTemplate; a later node with the same `node_key` replays it:
same FLOPs, kernels and attention call, and its outputs and saved tensors rebuilt with the
template's shapes, strides, offsets and dtypes on the storages they map to. A storage the
template shared with one of its inputs maps to the replaying node's input in that position; one
the template's op created maps to a new storage of the same size. So the accounting by storage
(saved bytes counted once per storage, cost_models.memory.output_savers) sees exactly what
tracing the node would have shown.

Key: the op (an aten OpOverload that mutates nothing; anything else is always traced) and every
leaf of its args/kwargs: a tensor's shape, stride, storage offset, dtype, device, requires_grad
and storage size, and which earlier leaf it shares its object or its storage with; any other
leaf by type and value.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Hashable

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

if TYPE_CHECKING:  # flops.py imports this module
    from partitioner.cost_models.flops import NodeTrace, SavedTensor


def storage_id(t: torch.Tensor) -> int:
    """The identity of t's storage (StorageWeakRef's cdata: equal for views of one storage)."""
    return t.untyped_storage()._cdata


def node_key(n: torch.fx.Node, leaves: list[Any], spec: pytree.TreeSpec) -> tuple | None:
    """What tracing `n` on the flattened args/kwargs `leaves` depends on; None when it is not replayable."""
    target = n.target
    if n.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return None
    parts: list[Hashable] = [target, spec]
    first_object: dict[int, int] = {}
    first_storage: dict[int, int] = {}
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            if not isinstance(x, FakeTensor):
                return None
            shape = tuple(x.shape)
            if not all(type(s) is int for s in shape):  # symbolic: traced (and refused) as usual
                return None
            storage = x.untyped_storage()
            parts.append((shape, x.stride(), x.storage_offset(), x.dtype, x.device, x.requires_grad, storage.nbytes(),
                          first_object.setdefault(id(x), i), first_storage.setdefault(storage._cdata, i)))
        else:
            try:
                hash(x)
            except TypeError:
                return None
            parts.append((type(x), x))
    return tuple(parts)


@dataclass(frozen=True)
class _OutputLeaf:
    """A tensor the op returned: a view (shape, stride, offset) of storage `origin`."""

    origin: tuple[str, int]  # ("arg", flat leaf index) or ("new", index into NodeTemplate.fresh)
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    requires_grad: bool


@dataclass
class NodeTemplate:
    """The trace of one node and where its outputs' and saved tensors' storages came from."""

    trace: NodeTrace  # without output and saved tensors
    out_spec: pytree.TreeSpec
    out_leaves: list[Any]  # _OutputLeaf for tensors, the value itself otherwise
    fresh: list[tuple[int, torch.dtype]]  # storages the op created: bytes, dtype of their views
    device: torch.device | None  # of every tensor the node reads and writes
    saved: list[tuple[tuple[str, int], SavedTensor]]  # origin of each saved tensor's storage, and it

    @classmethod
    def record(cls, trace: NodeTrace, leaves: list[Any], older: set[int]) -> NodeTemplate | None:
        """The template of a traced node (`leaves`: its flattened args/kwargs), or None when it cannot
        be replayed: an output or saved tensor lives on a storage that is neither an input's nor new
        (one of `older`, the storages of earlier nodes) or is read in another dtype, or its tensors
        are on several devices."""
        out, spec = pytree.tree_flatten(trace.output)
        devices = {x.device for x in leaves + out if isinstance(x, torch.Tensor)}
        if len(devices) > 1:
            return None
        device = devices.pop() if devices else None
        by_storage: dict[int, tuple[int, torch.dtype]] = {}
        for i, x in enumerate(leaves):
            if isinstance(x, torch.Tensor):
                by_storage.setdefault(storage_id(x), (i, x.dtype))
        fresh_index: dict[int, int] = {}
        fresh: list[tuple[int, torch.dtype]] = []

        def origin(sid: int, nbytes: int, dtype: torch.dtype) -> tuple[str, int] | None:
            if sid in by_storage:
                i, arg_dtype = by_storage[sid]
                return ("arg", i) if arg_dtype == dtype else None
            if sid in older or device is None:
                return None
            if sid not in fresh_index:
                if nbytes % dtype.itemsize:
                    return None
                fresh_index[sid] = len(fresh)
                fresh.append((nbytes, dtype))
            k = fresh_index[sid]
            return ("new", k) if fresh[k][1] == dtype else None

        out_leaves: list[Any] = []
        for t in out:
            if not isinstance(t, torch.Tensor):
                out_leaves.append(t)
                continue
            where = origin(storage_id(t), t.untyped_storage().nbytes(), t.dtype)
            if where is None:
                return None
            out_leaves.append(_OutputLeaf(where, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype,
                                          t.requires_grad))
        saved = []
        for s in trace.saved:
            where = origin(s.storage.cdata, s.storage_bytes, s.dtype)
            if where is None:
                return None
            saved.append((where, s))
        return cls(replace(trace, output=None, saved=[]), spec, out_leaves, fresh, device, saved)

    def replay(self, name: str, leaves: list[Any], keep_alive: list[torch.Tensor],
               fake_mode: FakeTensorMode) -> NodeTrace:
        """The trace of node `name`, whose flattened args/kwargs `leaves` have this template's key.

        Its outputs are FakeTensors of `fake_mode` built on meta views of their storages outside
        every dispatch mode (running a view op through the FLOP counter and the fake mode costs
        as much as tracing the node). New storages are appended to keep_alive (their identities
        must stay unique while the graph is traced)."""
        with _disable_current_modes():
            bases = [torch.empty(nbytes // dtype.itemsize, dtype=dtype, device="meta") for nbytes, dtype in self.fresh]

            def storage(origin: tuple[str, int]) -> torch.UntypedStorage:
                kind, i = origin
                return (leaves[i] if kind == "arg" else bases[i]).untyped_storage()

            out = []
            for x in self.out_leaves:
                if isinstance(x, _OutputLeaf):
                    view = torch.empty(0, dtype=x.dtype, device="meta")
                    view.set_(storage(x.origin), x.offset, x.shape, x.stride)
                    x = FakeTensor(fake_mode, view, self.device).requires_grad_(x.requires_grad)
                out.append(x)
            saved = [replace(s, storage=StorageWeakRef(storage(where))) for where, s in self.saved]
        keep_alive.extend(bases)
        t = self.trace
        return replace(t, name=name, output=pytree.tree_unflatten(out, self.out_spec), saved=saved,
                       input_sizes=list(t.input_sizes), fwd_ops=list(t.fwd_ops), bwd_ops=list(t.bwd_ops))
