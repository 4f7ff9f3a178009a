"""Mixed precision at capture: fp32 parameters and optimizer state, bf16 compute.

The usual recipe of large-model training (FSDP2's MixedPrecisionPolicy with
param_dtype=bf16 and cast_forward_inputs, torchtitan's default): the model
computes as if its floating parameters and inputs were bf16, while the
optimizer updates fp32 weights (the cast's backward returns fp32 gradients).
Buffers keep their dtype, as under FSDP2.

Models make dtype decisions in Python (an RMSNorm upcasts to fp32 and casts
back to "the input's dtype"), which a trace freezes. So the model is captured
with bf16 stand-ins for its floating parameters and inputs, and the graph then
reads the real fp32 tensors through a cast at every use. The cast sits in the
using node's module, so a stage casts only the weights it reads, and the
planner costs what the stages run: bf16 kernels and activations, fp32
parameters, gradients and optimizer state.

A batch norm (or instance norm: any op with running statistics) reads its weight and
bias uncast, as autocast runs it: its kernels take the affine parameters in the dtype of
the running statistics, fp32 buffers (CPU refuses bf16 weights beside fp32 statistics),
and normalise a bf16 input in fp32 into a bf16 output either way.

Buffers keep their dtype, so an activation can turn fp32 on the way (a bf16 embedding plus an
fp32 sinusoidal position table promotes to fp32) and meet a bf16 weight in a matmul, which no
kernel runs (FakeTensors do not check, so capture does not see it). Such an op computes in bf16,
its fp32 operands cast, as autocast runs it (_matmuls_in_compute_dtype).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch.fx.operator_schemas import normalize_function
from torch.utils import _pytree as pytree

from partitioner.errors import CaptureError
from partitioner.passes.capture import capture
from partitioner.passes.graph_nodes import fake_mode_of, module_named, provenance, set_attr
from partitioner.passes.capture_io import Captured

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def compute_dtype(mixed_precision: str | torch.dtype | None) -> torch.dtype | None:
    """The compute dtype a `mixed_precision` option names (None: off)."""
    if mixed_precision is None or isinstance(mixed_precision, torch.dtype):
        return mixed_precision
    if mixed_precision not in DTYPES:
        raise CaptureError(f"mixed_precision={mixed_precision!r} is not known; use 'bf16' (or 'fp16'), or None "
                           "for the model's own dtype.")
    return DTYPES[mixed_precision]


def loss_under_autocast(loss_fn: Callable[[Any, Any], Any], device_type: str, dtype: torch.dtype
                        ) -> Callable[[Any, Any], Any]:
    """`loss_fn` run under torch.autocast(device_type, dtype), as the recipe runs it around the model and
    its loss: autocast computes a cross-entropy, a log-softmax or an MSE on bf16 outputs in fp32."""
    @functools.wraps(loss_fn)
    def loss(output: Any, target: Any) -> Any:
        with torch.autocast(device_type, dtype):
            return loss_fn(output, target)
    if not hasattr(loss, "__name__"):  # a loss module: name it by its class in messages
        loss.__name__ = type(loss_fn).__name__
    return loss


def capture_mixed(model: torch.nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype) -> Captured:
    """capture() of `model` computing in `dtype` with its parameters and inputs kept as they are."""
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if floats and all(d == dtype for d in floats):
        raise CaptureError(f"mixed_precision keeps the parameters in fp32 and computes in {dtype}, but "
                           f"{type(model).__name__}'s parameters are {dtype} already: build the model in fp32, "
                           "or drop mixed_precision to train it in its own dtype.")
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    cast_leaves = [x.to(dtype) if _castable(x, dtype) else x for x in leaves]
    cast_args, cast_kwargs = pytree.tree_unflatten(cast_leaves, spec)
    with _parameters_in(model, dtype) as originals:
        captured = capture(model, cast_args, cast_kwargs)
    _read_through_casts(captured, originals, leaves, dtype)
    _matmuls_in_compute_dtype(captured.graph_module, dtype)
    return captured


def _castable(x: Any, dtype: torch.dtype) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype


@contextlib.contextmanager
def _parameters_in(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Swap every floating parameter for a `dtype` copy (tied ones stay tied) for the block's duration;
    yields FQN -> the original parameter."""
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    stand_in: dict[int, torch.nn.Parameter] = {}
    originals: dict[str, torch.nn.Parameter] = {}
    try:
        for prefix, module in model.named_modules(remove_duplicate=False):
            for name, p in list(module._parameters.items()):
                if p is None or not _castable(p, dtype):
                    continue
                if id(p) not in stand_in:  # tracing reads shapes and dtypes, never values: no cast copy
                    stand_in[id(p)] = torch.nn.Parameter(torch.empty_like(p, dtype=dtype),
                                                         requires_grad=p.requires_grad)
                module._parameters[name] = stand_in[id(p)]
                swapped.append((module, name, p))
                originals[f"{prefix}.{name}" if prefix else name] = p
        yield originals
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def _read_through_casts(captured: Captured, originals: dict[str, torch.nn.Parameter], leaves: list[Any],
                        dtype: torch.dtype) -> None:
    """Point the graph's parameters and inputs back at the originals, cast to `dtype` at every use."""
    gm = captured.graph_module
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in list(graph.nodes):
        if node.op == "get_attr" and str(node.target) in originals:
            original = originals[str(node.target)]
            set_attr(gm, str(node.target), original)
        elif node.op == "placeholder":
            i = placeholders.index(node)
            original = leaves[captured.input_leaf_indices[i] if captured.input_leaf_indices else i]
            if not _castable(original, dtype):
                continue
        else:
            continue
        val = node.meta["val"]
        with fake_mode_of(val):
            node.meta["val"] = torch.empty_strided(val.shape, val.stride(), dtype=original.dtype, device=val.device)
        for user in list(node.users):
            if user.op == "output":
                raise CaptureError(f"mixed precision: the model returns its input or parameter '{node.target}' "
                                   "unchanged; train it without mixed_precision.")
            if node.op == "get_attr" and _batch_norm_affine(user, node):
                continue
            with graph.inserting_before(user):
                cast = graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": dtype})
            cast.meta = {"val": val, **{k: v for k, v in user.meta.items() if k in ("nn_module_stack", "stack_trace")}}
            user.replace_input_with(node, cast)
    graph.lint()
    gm.recompile()


def _batch_norm_affine(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """`node` is the weight or bias of `user`, a batch norm (or instance norm): an op with running statistics."""
    if user.op != "call_function":
        return False
    try:
        bound = normalize_function(user.target, tuple(user.args), dict(user.kwargs), normalize_to_only_use_kwargs=True)
    except Exception:  # a target without a schema or signature to bind against: not a batch norm
        return False
    kwargs = bound.kwargs if bound is not None else {}
    return "running_mean" in kwargs and node in (kwargs.get("weight"), kwargs.get("bias"))


# the ops autocast runs in the lower precision (its CPU and CUDA lists): matmuls, convolutions, attention.
# Their kernels refuse operands of two dtypes, where elementwise ops promote.
LOWER_PRECISION_OPS = frozenset({
    "linear", "matmul", "mm", "bmm", "addmm", "addbmm", "baddbmm", "addmv", "mv", "dot", "vdot", "addr",
    "chain_matmul", "linalg_multi_dot", "linalg_vecdot", "conv1d", "conv2d", "conv3d", "convolution",
    "_convolution", "conv_tbc", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu",
    "scaled_dot_product_attention", "_native_multi_head_attention"})


def _op_name(target: Any) -> str:
    return getattr(getattr(target, "overloadpacket", target), "__name__", "")


def _matmuls_in_compute_dtype(gm: torch.fx.GraphModule, dtype: torch.dtype) -> None:
    """A matmul-like op (LOWER_PRECISION_OPS) reading `dtype` and fp32 operands (an activation promoted
    by an fp32 buffer) reads them all in `dtype`, as autocast casts them; the values downstream
    are recomputed on FakeTensors with their new dtypes."""
    graph = gm.graph
    retyped: set[torch.fx.Node] = set()
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        stale = any(a in retyped for a in node.all_input_nodes)
        floats = [a for a in node.all_input_nodes if _float_val(a) is not None]
        if _op_name(node.target) in LOWER_PRECISION_OPS and dtype in {_float_val(a) for a in floats}:
            for a in floats:
                if _float_val(a) not in (dtype, torch.float64):
                    with graph.inserting_before(node):
                        cast = graph.call_function(torch.ops.aten._to_copy.default, (a,), {"dtype": dtype})
                    with fake_mode_of(a.meta["val"]):
                        cast.meta = {"val": a.meta["val"].to(dtype), **provenance(node)}
                    node.replace_input_with(a, cast)
                    stale = True
        if stale:
            old = node.meta.get("val")
            node.meta["val"] = _recomputed_val(node)
            if _dtypes(node.meta["val"]) != _dtypes(old):
                retyped.add(node)
    if retyped:
        graph.lint()
        gm.recompile()


def _float_val(node: torch.fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) and val.is_floating_point() else None


def _dtypes(val: Any) -> list[Any]:
    return [x.dtype if isinstance(x, torch.Tensor) else None for x in pytree.tree_leaves(val)]


def _recomputed_val(node: torch.fx.Node) -> Any:
    """node's value on the FakeTensors of its inputs (as capture computed it, now with their new dtypes)."""
    args, kwargs = pytree.tree_map_only(torch.fx.Node, lambda a: a.meta["val"], (node.args, node.kwargs))
    fake = next((x for x in pytree.tree_leaves((args, kwargs)) if getattr(x, "fake_mode", None) is not None), None)
    try:
        with fake_mode_of(fake):
            return node.target(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - named below with the fix
        raise CaptureError(f"mixed precision: node '{node.name}' ({node.target}) in "
                           f"{module_named(node)} reads a value that is float32 (an fp32 buffer or an upcast "
                           f"promoted it) where the model computes in bf16 around it, and its dtype could not be "
                           f"followed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                           "cast that value back to the weights' dtype in the model (x.to(weight.dtype)), or "
                           "train without mixed_precision.") from err
