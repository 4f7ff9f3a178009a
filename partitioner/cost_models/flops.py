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
autograd keeps for backward (see partitioner/cost_models/memory.py for the byte counts).
scaled_dot_product_attention is accounted as the kernel eager PyTorch picks on a
GPU (`attention.sdpa_backend`), not as whatever fake tensors run on meta/CPU. Fused (flash,
memory-efficient, cuDNN): FLOPs by torch's flash formulas (the backward recomputes
Q K^T: 2.5x the forward), saved q, k, v, output, log-sum-exp and the additive mask
(a bool mask is first converted to a float one of q's dtype). Math: the explicit
matmuls (backward 2x the forward), saved scaled q and k, v and the (B, H, L, S)
probabilities, in fp32 for 16-bit inputs (see AttentionCall). Likewise dropout keeps
the bool mask of CUDA's native_dropout, not the float mask of the CPU decomposition.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from partitioner.cost_models.attention import HALF, AttentionCall, attention_call
from partitioner.cost_models.trace_reuse import NodeTemplate, node_key, storage_id
from partitioner.passes.autograd_functions import forward_ops
from partitioner.passes.annotate import has_runtime_size, size_bound
from partitioner.passes.graph_nodes import vmap_level_change
from partitioner.errors import CostModelError


@dataclass
class SavedTensor:
    """One tensor autograd saved for backward: its storage identity, size and dtype.

    accumulates: kept in fp32 whenever the computation runs in a 16-bit dtype (SDPA's
        math path upcasts fp16/bf16 inputs), even where the graph is re-costed in bf16.
    """

    storage: StorageWeakRef
    storage_bytes: int
    dtype: torch.dtype
    accumulates: bool = False


@dataclass(frozen=True)
class OpKernel:
    """One aten op a node dispatched that launches a device kernel, as the time model costs it.

    name: the op's name ("mm", "native_layer_norm_backward", ...); flops: its
    FlopCounterMode count; tensors: (numel, dtype, innermost dim) of every distinct tensor it
    reads (a broadcast input counts its storage, not its expanded size) and writes.
    """

    name: str
    flops: int
    tensors: tuple[tuple[int, torch.dtype, int], ...]
    reduction: int = 0  # a matmul's (or convolution's) reduction length K: FLOPs / (2 x output elements)


COMPUTE_OPS = ("call_function", "call_module", "call_method")  # fx node ops that run (dispatch) work


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
    fwd_ops / bwd_ops: the kernels its forward and its backward launch, one OpKernel per
        aten op other than views, aliases and allocations (cost_models.time costs each).
    attention: for scaled_dot_product_attention nodes, the backend and sizes costed.
    """

    name: str
    op: str = ""
    fwd_flops: int = 0
    bwd_flops: int = 0
    saved: list[SavedTensor] = field(default_factory=list)
    output: Any = None
    requires_grad: bool = False
    input_sizes: list[tuple[int, torch.dtype]] = field(default_factory=list)
    fwd_ops: list[OpKernel] = field(default_factory=list)
    bwd_ops: list[OpKernel] = field(default_factory=list)
    attention: AttentionCall | None = None

    @property
    def fwd_kernels(self) -> int:
        return len(self.fwd_ops)

    @property
    def bwd_kernels(self) -> int:
        return len(self.bwd_ops)


def _is_float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())


def _fake_like(val: Any) -> Any:
    """A fresh fake tensor with the shape/stride/dtype/device of `val` (under the active fake mode)."""
    if not isinstance(val, torch.Tensor):
        return val
    if not has_runtime_size(val):
        shape = tuple(val.shape)
        if any(not isinstance(s, int) for s in shape):
            raise CostModelError(
                f"cannot profile a value of symbolic shape {shape}: capture the model with static "
                "example inputs (no dynamic_shapes)")
        return torch.empty_strided(shape, tuple(val.stride()), dtype=val.dtype, device=val.device)
    return torch.empty(tuple(size_bound(s) for s in val.shape), dtype=val.dtype, device=val.device)


def _bounded(value: Any, requires_grad: bool) -> Any:
    """A stand-in for a data-dependent value: its sizes at their upper bounds (annotate.size_bound)."""
    def one(leaf: Any) -> Any:
        if isinstance(leaf, torch.SymInt):
            return size_bound(leaf)
        if isinstance(leaf, torch.Tensor):
            t = _fake_like(leaf)
            return t.requires_grad_(requires_grad and _is_float_tensor(t))
        return leaf
    return pytree.tree_map(one, value)


def _runtime_sized(n: torch.fx.Node) -> bool:
    """Whether `n` or one of its inputs has a size known only at run time (annotate.has_runtime_size)."""
    return has_runtime_size([n.meta.get("val"), *(i.meta.get("val") for i in n.all_input_nodes)])


def _is_trainable_attr(gm: torch.fx.GraphModule, target: str) -> bool:
    try:
        return bool(gm.get_parameter(target).requires_grad)
    except AttributeError:
        return False


_NO_KERNEL_PREFIXES = ("empty", "detach", "alias", "lift_fresh", "_assert", "sym_", "_local_scalar_dense",
                       "new_empty", "set_", "resize_", "_unsafe_view")


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

_SDPA = (torch.ops.aten.scaled_dot_product_attention.default,)


def _distinct_tensors(tree: Any) -> list[torch.Tensor]:
    """The tensor leaves of `tree`, each object once."""
    seen: set[int] = set()
    out = []
    for t in pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _tensor_sizes(tree: Any) -> list[tuple[int, torch.dtype, int]]:
    """(elements stored, dtype, innermost dim) of each distinct tensor in `tree`: a broadcast
    view counts the storage it reads, not its expanded size; a sparse tensor (an embedding's
    gradient with sparse=True) its values."""
    out = []
    for t in _distinct_tensors(tree):
        if t.layout == torch.sparse_coo:
            stored = t._values().numel()
        elif t.layout != torch.strided:  # other sparse layouts have no storage to measure: at most dense
            stored = t.numel()
        else:
            stored = t.untyped_storage().nbytes() // t.element_size() if t.element_size() else t.numel()
        out.append((min(t.numel(), stored), t.dtype, t.shape[-1] if t.dim() else 1))
    return out


# gathers read only the rows they write: their table (first argument) counts at the output's size
GATHERS = ("embedding", "index_select", "index", "gather")


class _KernelRecorder(TorchDispatchMode):
    """Records every dispatched aten op that launches a device kernel as an OpKernel.

    Active inside the FlopCounterMode, so each op's FLOPs are the counter's increase.
    """

    def __init__(self, counter: FlopCounterMode):
        super().__init__()
        self.counter = counter
        self.ops: list[OpKernel] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.partitioner.autograd_function.default:  # a model's Function: count its forward's ops
            with self:
                return forward_ops(*args, **kwargs)
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        name = func.__name__
        if func.namespace == "aten" and not (func.is_view or name.startswith(_NO_KERNEL_PREFIXES)):
            written = _tensor_sizes(out)
            read = _tensor_sizes((args, kwargs))
            op = func._overloadpacket.__name__
            if op in GATHERS and read and written:
                read[0] = (min(read[0][0], written[0][0]), *read[0][1:])
            flops = self.counter.get_total_flops() - before
            reduction = flops // (2 * written[0][0]) if flops and written and written[0][0] else 0
            self.ops.append(OpKernel(op, flops, tuple(read + written), reduction))
        return out


def _unbatched(t: torch.Tensor) -> torch.Tensor:
    """The tensor a torch.vmap level batches (its storage, the sizes it allocates), or t."""
    while torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


class _NodeTracer(torch.fx.Interpreter):
    """Interpreter that runs every node on fake leaves and records a NodeTrace."""

    def __init__(self, gm: torch.fx.GraphModule, inputs_require_grad: bool, reuse: bool = True):
        super().__init__(gm, garbage_collect_values=False)
        self.inputs_require_grad = inputs_require_grad
        self.traces: dict[str, NodeTrace] = {}
        self.counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
        self.kernels = _KernelRecorder(self.counter)
        self._keep_alive: list[torch.Tensor] = []  # saved tensors must outlive the run: storage ids stay unique
        self.reuse = reuse
        self._templates: dict[tuple, NodeTemplate | None] = {}  # node_key -> the first such node's trace
        self._storages: set[int] = set()  # of every output and saved tensor so far
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._vmap_depth = 0

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
        if self._vmap_depth or vmap_level_change(n):
            # inside a torch.vmap level (a mask function's): run plainly, uncosted; a value batched by
            # vmap has no storage to count and cannot be made a leaf
            out = super().run_node(n)
            self._vmap_depth += vmap_level_change(n)
            self.traces[n.name] = NodeTrace(n.name, op=n.op, output=pytree.tree_map_only(torch.Tensor, _unbatched, out))
            return out
        if n.op in ("placeholder", "get_attr", "output"):
            trace = NodeTrace(n.name, op=n.op)
            out = super().run_node(n)
            trace.output = out
            trace.requires_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in pytree.tree_leaves(out))
        else:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            flat, spec = pytree.tree_flatten((args, kwargs))
            key = node_key(n, flat, spec) if self.reuse else None
            template = self._templates.get(key) if key is not None else None
            if template is not None:
                trace = template.replay(n.name, flat, self._keep_alive, self.fake_mode)
            else:
                trace = self._trace(n, args, kwargs)
                if key is not None and key not in self._templates:
                    self._templates[key] = NodeTemplate.record(trace, flat, self._storages)
        self.traces[n.name] = trace
        self._storages.update(storage_id(t) for t in pytree.tree_leaves(trace.output) if isinstance(t, torch.Tensor))
        self._storages.update(s.storage.cdata for s in trace.saved)
        return trace.output

    def _trace(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> NodeTrace:
        """Run node n's forward on leaves of its inputs, then its backward, recording what it does."""
        trace = NodeTrace(n.name, op=n.op)
        args, kwargs, leaves = self._leaf_args(args, kwargs, n)
        trace.input_sizes = _distinct_sizes((args, kwargs))
        before, first_op = self._total_flops(), len(self.kernels.ops)
        try:
            if leaves:
                with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(trace, t), lambda h: h):
                    out = getattr(self, n.op)(n.target, args, kwargs)
            else:
                with torch.no_grad():
                    out = getattr(self, n.op)(n.target, args, kwargs)
        except Exception:
            # a data-dependent value (nonzero, .item(), a split by routed counts) cannot run on fake
            # tensors without its sizes: it stands in at their upper bounds, uncosted, and the nodes
            # after it run on that stand-in (those that cannot, e.g. an index_add of the stand-ins
            # into a static tensor, are replaced by their own value: sizes known, uncosted)
            if not _runtime_sized(n):
                raise
            out = _bounded(n.meta["val"], bool(leaves))
        trace.fwd_flops = self._total_flops() - before
        trace.fwd_ops = self.kernels.ops[first_op:]
        if n.target in _SDPA:
            trace.attention = attention_call(args, kwargs)
            if trace.saved:
                trace.saved = self._attention_saved(trace.attention, args, kwargs, out)
        if n.target is torch.ops.aten.dropout.default and trace.saved:
            # CUDA runs native_dropout and keeps a bool mask; CPU/meta keep a scaled float mask
            trace.saved = self._record_saved([torch.empty(tuple(out.shape), dtype=torch.bool, device=out.device)])
            trace.fwd_ops = [_native_dropout(out)]  # CPU/meta decompose it into bernoulli, mul, div
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        trace.requires_grad = bool(outs)
        if outs and leaves:
            grads = [torch.empty_like(t) for t in outs]
            before, first_op = self._total_flops(), len(self.kernels.ops)
            try:
                torch.autograd.grad(outs, leaves, grads, allow_unused=True)
            except Exception:  # a backward that needs a data-dependent size (x[mask] = y): uncosted
                if not _runtime_sized(n):
                    raise
            trace.bwd_flops = self._total_flops() - before
            trace.bwd_ops = self.kernels.ops[first_op:]
            if n.target is torch.ops.aten.dropout.default and trace.saved:
                trace.bwd_ops = [_native_dropout(out)]  # CUDA: grad * mask * scale, one kernel
        if trace.attention is not None:
            trace.fwd_flops = trace.attention.fwd_flops()
            trace.bwd_flops = trace.attention.bwd_flops() if trace.bwd_flops else 0
        # the next nodes read this value detached: this node's autograd graph is dropped here (requires_grad_
        # only where it does: inside a torch.vmap level, a mask function's, functorch refuses the call)
        trace.output = pytree.tree_map_only(
            torch.Tensor, lambda t: t.detach().requires_grad_() if t.requires_grad else t.detach(), out)
        return trace

    def _leaf_args(self, args: tuple, kwargs: dict, n: torch.fx.Node) -> tuple[tuple, dict, list[torch.Tensor]]:
        """Args of `n` with every grad-requiring tensor replaced by a fresh leaf."""
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

    def _attention_saved(self, call: AttentionCall, args: tuple, kwargs: dict, out: torch.Tensor) -> list[SavedTensor]:
        """What the chosen SDPA backend saves for backward (fake tensors on meta/CPU run
        another kernel, whose saved tensors would be wrong for a GPU).

        Fused: q, k, v, the output, the fp32 log-sum-exp (B, H, L) and the mask (a bool mask
        is converted to a new float mask of q's dtype first). Math: q and k scaled (new
        tensors), v (expanded to q's heads under GQA), the softmax output P (B, H, L, S) and,
        with dropout, its bool mask and the dropped P: all in fp32 for 16-bit inputs
        (torch's default allow_fp16_bf16_reduction_math_sdp=False), else in q's dtype.
        """
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        mask = mask if isinstance(mask, torch.Tensor) else None
        if call.backend != "math":
            lse = torch.empty(tuple(q.shape[:-1]), dtype=torch.float32, device=q.device)
            saved = [q, k, v, out, lse]
            if mask is not None:
                saved.append(torch.empty(tuple(mask.shape), dtype=q.dtype, device=q.device)
                             if mask.dtype == torch.bool else mask)
            return self._record_saved(saved)
        acc = torch.float32 if call.dtype in HALF else call.dtype
        bh, dev = call.batch_heads, q.device
        new = [torch.empty(bh * call.q_len * call.qk_dim, dtype=acc, device=dev),  # q * sqrt(scale)
               torch.empty(bh * call.kv_len * call.qk_dim, dtype=acc, device=dev),  # k^T * sqrt(scale)
               torch.empty(call.scores, dtype=acc, device=dev)]  # softmax output P
        if call.dtype in HALF or k.numel() // k.shape[-1] != bh * call.kv_len:  # v upcast / GQA-expanded
            new.append(torch.empty(bh * call.kv_len * call.v_dim, dtype=acc, device=dev))
            kept_v = []
        else:
            kept_v = [v]
        if call.dropout_p > 0:
            new.append(torch.empty(call.scores, dtype=acc, device=dev))  # dropped P, read by P @ V
        saved = self._record_saved(new, accumulates=True) + self._record_saved(kept_v)
        if call.dropout_p > 0:
            saved += self._record_saved([torch.empty(call.scores, dtype=torch.bool, device=dev)])
        return saved

    def _record_saved(self, tensors: list[torch.Tensor], accumulates: bool = False) -> list[SavedTensor]:
        saved = []
        for t in tensors:
            storage = t.untyped_storage()
            saved.append(SavedTensor(StorageWeakRef(storage), int(storage.nbytes()), t.dtype, accumulates))
            self._keep_alive.append(t)
        return saved

    def _pack(self, trace: NodeTrace, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        trace.saved.append(SavedTensor(StorageWeakRef(storage), int(storage.nbytes()), t.dtype))
        self._keep_alive.append(t)
        return t


def _native_dropout(out: torch.Tensor) -> OpKernel:
    """CUDA's fused dropout kernel: reads a tensor like `out`, writes it and a bool mask (the
    backward reads the gradient and the mask and writes the input gradient: the same bytes)."""
    numel, last = out.numel(), out.shape[-1] if out.dim() else 1
    return OpKernel("native_dropout", 0, ((numel, out.dtype, last), (numel, out.dtype, last), (numel, torch.bool, last)))


def _distinct_sizes(tree: Any) -> list[tuple[int, torch.dtype]]:
    return [(t.numel(), t.dtype) for t in _distinct_tensors(tree)]


def trace_nodes(gm: torch.fx.GraphModule, *, inputs_require_grad: bool = False,
                reuse: bool = True) -> dict[str, NodeTrace]:
    """Run `gm` node by node on fake tensors; return a NodeTrace per node name.

    Placeholders and get_attr values are rebuilt from node.meta["val"], so the
    module's own parameters may live on the meta device. A value requires grad
    when it depends on a trainable parameter (or on a float input, if
    `inputs_require_grad`), exactly as in training, so nodes that only
    compute masks or positions record no backward and save nothing.
    reuse: a node running the same op on alike inputs as an earlier one replays that one's
    trace instead of running (partitioner/cost_models/trace_reuse.py; the same traces, faster).
    """
    missing = [n.name for n in gm.graph.nodes if n.op == "placeholder" and "val" not in n.meta]
    if missing:
        raise CostModelError(
            f"cannot profile: placeholder(s) {missing[:5]} have no meta['val'] (shape unknown). "
            "Capture the model with passes.capture.capture so every node carries a FakeTensor.")
    tracer = _NodeTracer(gm, inputs_require_grad, reuse)
    fake_mode = tracer.fake_mode
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")  # a failing op's traceback: we name it
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
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
        finally:
            fake_log.setLevel(level)
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

