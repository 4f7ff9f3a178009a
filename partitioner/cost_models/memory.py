"""Memory costs: parameter, output and saved-for-backward bytes, optimizer state.

Saved bytes come from the tensors saved_tensors_hooks recorded while each node's
forward ran on fake tensors (partitioner/cost_models/flops.py): deduplicated by storage, so
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
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree

from partitioner.cost_models.flops import NodeTrace
from partitioner.errors import CostModelError

# optimizer -> fp32 state tensors per parameter element (moments / momentum buffers)
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0, "none": 0}
# optimizer -> temporaries of its step, in weights' sizes: torch's foreach Adam(W) takes the square root
# of every second moment at once (one weight-sized tensor per parameter), then frees it
OPTIMIZER_STEP_TEMPORARIES = {"adamw": 1, "adam": 1, "sgd-momentum": 0, "sgd": 0, "none": 0}


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


def output_savers(traces: dict[str, NodeTrace]) -> dict[str, str]:
    """Node -> the node whose saved bytes count its output (the first to save its storage).

    Only nodes whose every output tensor is saved, all by that one node, are listed. A
    pipeline stage that sends or receives a value holds it until the microbatch's backward
    unless one of its own nodes saves it (partitioner/stage_costs.py, the rule on held values).
    """
    first: dict = {}
    for name, trace in traces.items():
        for s in trace.saved:
            first.setdefault(s.storage, name)
    out: dict[str, str] = {}
    for name, trace in traces.items():
        leaves = [t for t in pytree.tree_leaves(trace.output) if isinstance(t, torch.Tensor)]
        savers = {first.get(_storage_key(t)) for t in leaves}
        if leaves and len(savers) == 1 and None not in savers:
            out[name] = savers.pop()
    return out


def _storage_key(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


def param_state_bytes(numel: int, dtype: torch.dtype, optimizer: str = "adamw", *,
                      trainable: bool = True) -> int:
    """Bytes one parameter occupies in training: weight + gradient + optimizer state.

    The gradient and every optimizer state take the weight's dtype, as torch.optim keeps
    them: fp32 AdamW 4 + 4 + 8 = 16 bytes per element, a bf16 model's AdamW 2 + 2 + 4 = 8
    (mixed precision keeps fp32 weights, mixed_precision='bf16': 16). Frozen parameters and
    buffers (trainable=False) hold only their weight.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise CostModelError(f"unknown optimizer '{optimizer}': choose one of {sorted(OPTIMIZER_STATES)}")
    weight = numel * dtype.itemsize
    if not trainable or not (dtype.is_floating_point or dtype.is_complex):
        return weight
    return weight * (2 + OPTIMIZER_STATES[optimizer])


def params_state_bytes(params: Iterable[tuple[str, int, torch.dtype, bool]], optimizer: str = "adamw",
                       scale: DtypeScale | None = None) -> dict[str, int]:
    """param_state_bytes for (fqn, numel, dtype, trainable) rows, dtype re-expressed through `scale`."""
    scale = scale or DtypeScale()
    out = {}
    for fqn, numel, dtype, trainable in params:
        dt = scale.to_dtype if dtype == scale.from_dtype else dtype
        out[fqn] = param_state_bytes(numel, dt, optimizer, trainable=trainable)
    return out


@dataclass(frozen=True)
class BackwardStep:
    """What is alive while one node's backward runs (see `backward_walk`)."""

    node: str
    saved_live_bytes: int  # saved tensors of this node and every node before it
    grads_in_flight_bytes: int  # activation gradients written and not yet consumed
    param_grad_bytes: int  # parameter gradients produced so far
    workspace_bytes: int  # gradients of the intermediates this node saved, of weights already holding one


def backward_walk(gm: torch.fx.GraphModule, traces: dict[str, NodeTrace], saved: dict[str, int],
                  scale: DtypeScale | None = None, *, tied_sums: bool = True) -> list[BackwardStep]:
    """The backward, node by node in reverse graph order, with the bytes alive at each step.

    While node n's backward runs, alive are: the saved tensors of every node not yet
    backpropagated (n's included); the gradients of values whose producer has not run its
    backward yet (n's output's, and its inputs', which n now writes; one buffer per value,
    several consumers accumulate into it); every parameter gradient produced so far (kept to
    the end, for the optimizer); and n's workspace, as large as what n saved: its backward
    materialises a gradient for each intermediate it saved (the scores of an unfused
    attention, the log-probabilities of a cross-entropy), plus, for each tied weight it reads
    that already has a gradient, a whole new one and their sum (T5's shared embedding gets
    three; on an H200 two weight-sized buffers appear at its later embedding backward; with
    tied_sums=False they are left out: in a pipeline the users of a tied weight usually sit on
    different ranks, each with its own replica and gradient). Then n's saved tensors and its
    output's gradient are freed. Nodes that need no gradient are skipped.
    """
    scale = scale or DtypeScale()
    order = [n for n in gm.graph.nodes if n.name in traces]
    out_bytes = {n.name: value_bytes(traces[n.name].output, scale) for n in order}
    computing = [n for n in order if n.op not in ("placeholder", "get_attr", "output")]
    saved_live = sum(saved.get(n.name, 0) for n in computing)
    grads: dict[str, int] = {}  # value -> bytes of its gradient, alive until its producer's backward ran
    grads_total, param_grads, seen_params, steps = 0, 0, set(), []
    for n in reversed(computing):
        if traces[n.name].requires_grad:
            accumulated = 0  # gradients of tied weights that already have one: added into it
            for a in n.all_input_nodes:
                if not traces[a.name].requires_grad:
                    continue
                if a.op == "get_attr":
                    key = id(traces[a.name].output)  # a tied weight is one tensor: one gradient
                    if key not in seen_params:
                        seen_params.add(key)
                        param_grads += out_bytes[a.name]
                    elif tied_sums:  # materialised, then summed with the first out of place
                        accumulated += 2 * out_bytes[a.name]
                elif a.name not in grads:
                    grads[a.name] = out_bytes[a.name]
                    grads_total += grads[a.name]
            steps.append(BackwardStep(n.name, saved_live, grads_total, param_grads,
                                      saved.get(n.name, 0) + accumulated))
        saved_live -= saved.get(n.name, 0)
        grads_total -= grads.pop(n.name, 0)
    return steps


def training_peak_bytes(gm: torch.fx.GraphModule, traces: dict[str, NodeTrace], saved: dict[str, int],
                        scale: DtypeScale | None = None) -> int:
    """Peak bytes one forward+backward adds on top of weights and inputs (`backward_walk`'s
    largest step, or the forward's: everything saved plus the largest value produced)."""
    scale = scale or DtypeScale()
    computing = [n.name for n in gm.graph.nodes if n.name in traces and n.op not in ("placeholder", "get_attr", "output")]
    fwd_peak = (sum(saved.get(n, 0) for n in computing)
                + max((value_bytes(traces[n].output, scale) for n in computing), default=0))
    bwd_peak = max((s.saved_live_bytes + s.grads_in_flight_bytes + s.param_grad_bytes + s.workspace_bytes
                    for s in backward_walk(gm, traces, saved, scale)), default=0)
    return max(fwd_peak, bwd_peak)


def measured_saved_bytes(fn: Callable[..., Any], inputs: Sequence[Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn(*inputs)` runs
    (saved_tensors_hooks), storages of `exclude` (parameters, buffers) left out: what the saved
    bytes of this module predict."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())
