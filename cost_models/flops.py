"""Forward and backward FLOPs of every node, counted on fake tensors.

The graph is run node by node with a torch.fx.Interpreter under FakeTensorMode,
so nothing is computed or allocated (meta models work). Every node runs on
fresh *leaf* copies of its inputs (`detach().requires_grad_()` where the value
depends on a trainable parameter), which makes its backward independent of the
rest of the graph: `torch.autograd.grad(outputs, leaves)` then runs exactly the
kernels this node's backward launches (input and weight gradients). One
FlopCounterMode stays active for the whole run; the count of a node is the
difference of the running total before and after it.

While the forward of a node runs, saved_tensors_hooks record the tensors
autograd keeps for backward (see cost_models/memory.py for the byte counts).
scaled_dot_product_attention is accounted as the fused (flash / memory-efficient)
kernel eager PyTorch runs on GPUs, not as the math decomposition fake tensors run
on meta: FLOPs by torch's flash formulas (the backward recomputes Q K^T: 2.5x the
forward), saved bytes q, k, v, output and log-sum-exp. Likewise dropout keeps the
bool mask of CUDA's native_dropout, not the float mask of the CPU decomposition.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from partitioner.errors import CostModelError


@dataclass
class SavedTensor:
    """One tensor autograd saved for backward: its storage identity, size and dtype."""

    storage: StorageWeakRef
    storage_bytes: int
    dtype: torch.dtype


@dataclass
class NodeTrace:
    """What running one node on fake tensors showed.

    fwd_flops / bwd_flops: FlopCounterMode counts of its forward and of its backward
        (gradients of every input that requires grad, parameters included).
    op: the fx op ("placeholder", "get_attr", "call_function", ...).
    saved: tensors autograd saved while its forward ran (views included; dedupe later).
    output: its (fake) output value, kept so sizes can be read.
    requires_grad: whether its output depends on a trainable parameter.
    input_sizes: (numel, dtype) of every distinct tensor it reads (for bytes moved).
    fwd_kernels / bwd_kernels: kernels it launches (what per-kernel overhead is paid
        for): forward 1 when it dispatches any aten op other than views, aliases and
        allocations, else 0; backward ~one per input gradient.
    """

    name: str
    op: str = ""
    fwd_flops: int = 0
    bwd_flops: int = 0
    saved: list[SavedTensor] = field(default_factory=list)
    output: Any = None
    requires_grad: bool = False
    input_sizes: list[tuple[int, torch.dtype]] = field(default_factory=list)
    fwd_kernels: int = 0
    bwd_kernels: int = 0


def _is_float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _fake_like(val: Any) -> Any:
    """A fresh fake tensor with the shape/stride/dtype/device of `val` (under the active fake mode)."""
    if not isinstance(val, torch.Tensor):
        return val
    shape = tuple(val.shape)
    if any(not isinstance(s, int) for s in shape):
        raise CostModelError(
            f"cannot profile a value of symbolic shape {shape}: capture the model with static "
            "example inputs (no dynamic_shapes)")
    return torch.empty_strided(shape, tuple(val.stride()), dtype=val.dtype, device=val.device)


def _is_trainable_attr(gm: torch.fx.GraphModule, target: str) -> bool:
    try:
        return bool(gm.get_parameter(target).requires_grad)
    except AttributeError:
        return False


_NO_KERNEL_PREFIXES = ("empty", "detach", "alias", "lift_fresh", "_assert", "sym_", "_local_scalar_dense",
                       "new_empty", "set_", "resize_")


def _cpu_flash_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that
# fake tensors on "cpu" dispatch SDPA to; count it with the same formulas
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_fwd,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_bwd,
}

_FUSED_ATTENTION = (torch.ops.aten.scaled_dot_product_attention.default,)


class _KernelCounter(TorchDispatchMode):
    """Counts dispatched aten ops that launch a device kernel."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if func.namespace == "aten" and not (func.is_view or name.startswith(_NO_KERNEL_PREFIXES)):
            self.count += 1
        return func(*args, **(kwargs or {}))


class _NodeTracer(torch.fx.Interpreter):
    """Interpreter that runs every node on fake leaves and records a NodeTrace."""

    def __init__(self, gm: torch.fx.GraphModule, inputs_require_grad: bool):
        super().__init__(gm, garbage_collect_values=False)
        self.inputs_require_grad = inputs_require_grad
        self.traces: dict[str, NodeTrace] = {}
        self.counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
        self.kernels = _KernelCounter()
        self._keep_alive: list[torch.Tensor] = []  # saved tensors must outlive the run: storage ids stay unique

    def _total_flops(self) -> int:
        return self.counter.get_total_flops()

    def placeholder(self, target, args, kwargs):  # noqa: D102
        node = self._current
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            t = _fake_like(val)
            return t.requires_grad_(self.inputs_require_grad and _is_float_tensor(t))
        return super().placeholder(target, args, kwargs) if val is None else val

    def get_attr(self, target, args, kwargs):  # noqa: D102
        node = self._current
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            val = super().get_attr(target, args, kwargs)
            if not isinstance(val, torch.Tensor):
                return val
        t = _fake_like(val)
        return t.requires_grad_(_is_float_tensor(t) and _is_trainable_attr(self.module, str(target)))

    def run_node(self, n: torch.fx.Node) -> Any:
        self._current = n
        trace = NodeTrace(n.name, op=n.op)
        self.traces[n.name] = trace
        if n.op in ("placeholder", "get_attr", "output"):
            out = super().run_node(n)
            trace.output = out
            trace.requires_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in pytree.tree_leaves(out))
            return out
        args, kwargs, leaves = self._leaf_args(n)
        trace.input_sizes = _distinct_sizes((args, kwargs))
        before, kernels = self._total_flops(), self.kernels.count
        if leaves:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(trace, t), lambda h: h):
                out = getattr(self, n.op)(n.target, args, kwargs)
        else:
            with torch.no_grad():
                out = getattr(self, n.op)(n.target, args, kwargs)
        trace.fwd_flops = self._total_flops() - before
        # one fx node is one aten op, which eager runs as one kernel even where fake
        # tensors decompose it (SDPA on meta runs its math decomposition)
        trace.fwd_kernels = min(1, self.kernels.count - kernels)
        fused_attention = n.target in _FUSED_ATTENTION
        if fused_attention and trace.saved:
            trace.saved = self._fused_attention_saved(args, out)
        if n.target is torch.ops.aten.dropout.default and trace.saved:
            # CUDA runs native_dropout and keeps a bool mask; CPU/meta keep a scaled float mask
            trace.saved = self._record_saved([torch.empty(tuple(out.shape), dtype=torch.bool, device=out.device)])
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        trace.requires_grad = bool(outs)
        if outs and leaves:
            grads = [torch.empty_like(t) for t in outs]
            before, kernels = self._total_flops(), self.kernels.count
            torch.autograd.grad(outs, leaves, grads, allow_unused=True)
            trace.bwd_flops = self._total_flops() - before
            trace.bwd_kernels = min(len(leaves), self.kernels.count - kernels)  # ~one kernel per input gradient
        if fused_attention:
            q, k, v = (tuple(t.shape) for t in args[:3])
            trace.fwd_flops = sdpa_flop_count(q, k, v)
            trace.bwd_flops = sdpa_backward_flop_count(tuple(out.shape), q, k, v) if trace.bwd_flops else 0
        # the next nodes read this value detached: this node's autograd graph is dropped here
        trace.output = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().requires_grad_(t.requires_grad), out)
        return trace.output

    def _leaf_args(self, n: torch.fx.Node) -> tuple[tuple, dict, list[torch.Tensor]]:
        """Args of `n` with every grad-requiring tensor replaced by a fresh leaf."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        leaves: list[torch.Tensor] = []
        mutates = isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable

        def as_leaf(t: torch.Tensor) -> torch.Tensor:
            if not t.requires_grad:
                return t
            leaf = t.detach().requires_grad_(True)
            leaves.append(leaf)
            # an in-place op may not write into a leaf that requires grad: give it a copy
            return leaf.clone() if mutates else leaf

        args, kwargs = pytree.tree_map_only(torch.Tensor, as_leaf, (args, kwargs))
        return args, kwargs, leaves

    def _fused_attention_saved(self, args: tuple, out: torch.Tensor) -> list[SavedTensor]:
        """What flash/memory-efficient attention saves: q, k, v, the output and the fp32
        log-sum-exp (B, H, L). Fake tensors on meta run SDPA's math decomposition, which
        would save the (B, H, L, S) attention matrix that GPUs never store."""
        q, k, v = args[:3]
        lse = torch.empty(tuple(q.shape[:-1]), dtype=torch.float32, device=q.device)
        return self._record_saved([q, k, v, out, lse])

    def _record_saved(self, tensors: list[torch.Tensor]) -> list[SavedTensor]:
        saved = []
        for t in tensors:
            storage = t.untyped_storage()
            saved.append(SavedTensor(StorageWeakRef(storage), int(storage.nbytes()), t.dtype))
            self._keep_alive.append(t)
        return saved

    def _pack(self, trace: NodeTrace, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        trace.saved.append(SavedTensor(StorageWeakRef(storage), int(storage.nbytes()), t.dtype))
        self._keep_alive.append(t)
        return t


def _distinct_sizes(tree: Any) -> list[tuple[int, torch.dtype]]:
    seen, out = set(), []
    for t in pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out.append((t.numel(), t.dtype))
    return out


def trace_nodes(gm: torch.fx.GraphModule, *, inputs_require_grad: bool = False) -> dict[str, NodeTrace]:
    """Run `gm` node by node on fake tensors; return a NodeTrace per node name.

    Placeholders and get_attr values are rebuilt from node.meta["val"], so the
    module's own parameters may live on the meta device. A value requires grad
    when it depends on a trainable parameter (or on a float input, if
    `inputs_require_grad`), exactly as in training, so nodes that only
    compute masks or positions record no backward and save nothing.
    """
    missing = [n.name for n in gm.graph.nodes if n.op == "placeholder" and "val" not in n.meta]
    if missing:
        raise CostModelError(
            f"cannot profile: placeholder(s) {missing[:5]} have no meta['val'] (shape unknown). "
            "Capture the model with passes.capture.capture so every node carries a FakeTensor.")
    tracer = _NodeTracer(gm, inputs_require_grad)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with fake_mode, tracer.counter, tracer.kernels, torch.enable_grad():
        try:
            tracer.run(*[None] * len(placeholders))
        except CostModelError:
            raise
        except Exception as e:  # name the node that failed
            node = getattr(tracer, "_current", None)
            where = f"node '{node.name}' ({node.target})" if node is not None else "the graph"
            raise CostModelError(f"cannot run {where} on fake tensors to count its costs: "
                                 f"{type(e).__name__}: {e}") from e
    return tracer.traces


@dataclass(frozen=True)
class NodeFlops:
    """Forward and backward FLOPs of one node."""

    fwd: int
    bwd: int


def node_flops(gm: torch.fx.GraphModule, *, inputs_require_grad: bool = False) -> dict[str, NodeFlops]:
    """Forward/backward FLOPs of every node of `gm` (FlopCounterMode on fake tensors)."""
    return {name: NodeFlops(t.fwd_flops, t.bwd_flops)
            for name, t in trace_nodes(gm, inputs_require_grad=inputs_require_grad).items()}


def module_flops(flops: dict[str, NodeFlops], module_paths: dict[str, str], depth: int | None = None) -> dict[str, NodeFlops]:
    """Roll node FLOPs up to modules: every prefix of a node's module path gets its FLOPs.

    module_paths: node name -> owning module FQN ("" = root), e.g. NodeInfo.module_path.
    depth: keep only modules with at most `depth` dotted components (None = all).
    The root "" holds the whole graph's total.
    """
    out: dict[str, list[int]] = {}
    for name, f in flops.items():
        path = module_paths.get(name, "")
        parts = path.split(".") if path else []
        for i in range(0, len(parts) + 1):
            if depth is not None and i > depth:
                break
            key = ".".join(parts[:i])
            acc = out.setdefault(key, [0, 0])
            acc[0] += f.fwd
            acc[1] += f.bwd
    return {k: NodeFlops(v[0], v[1]) for k, v in out.items()}

