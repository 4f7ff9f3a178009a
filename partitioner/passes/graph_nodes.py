"""What the passes ask of an fx graph's nodes and of the module they run on.

A parameter or buffer by its dotted path (get_attr / set_attr), whether a node writes into its
inputs and which values (mutates / written_values, through views: is_view), the FakeTensorMode to
make a new node's value in (fake_mode_of), and the meta a new node takes over from the one it stands
for (provenance), and the module whose forward ran a node (innermost_module, module_named, for
placement and for messages), and the calls that enter and leave a torch.vmap level (vmap_level_change).
Shared by capture and every pass after it.
"""
from __future__ import annotations

import contextlib
import operator
import re
from typing import Any

import torch
import torch.fx


def vmap_level_change(node: torch.fx.Node) -> int:
    """+1 / -1 where `node` enters / leaves a torch.vmap level, else 0. Export keeps a vmap as these calls
    around the batched ops (Hugging Face's mask functions, vmapped over positions: Gemma3's image-token
    mask); nothing reads what leaving returns, yet every op after it depends on it having run."""
    from torch._functorch import predispatch
    if node.op != "call_function":
        return 0
    if node.target is getattr(predispatch, "_vmap_increment_nesting", None):
        return 1
    return -1 if node.target is getattr(predispatch, "_vmap_decrement_nesting", None) else 0


def fake_mode_of(val: Any):
    """The FakeTensorMode `val` was made in (to make new values for nodes a pass adds), else a no-op."""
    mode = getattr(val, "fake_mode", None)
    return mode if mode is not None else contextlib.nullcontext()


def provenance(node: torch.fx.Node) -> dict[str, Any]:
    """The meta a node a pass adds takes over from the node it stands for: its module path, stack
    trace and source function (what annotate and coarsen read to place it)."""
    return {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}


_SELF_PREFIX = re.compile(r"^(L\['self'\]|L__self__|self)\.?")
_GETATTR = re.compile(r"getattr\((.*?),\s*['\"]([^'\"]+)['\"]\)")
_INDEX = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


def normalise_module_path(path: str) -> str:
    """Turn the path forms torch puts in nn_module_stack into the model's own FQN."""
    prev = None
    while prev != path:  # getattr(getattr(x, 'a'), 'b') nests
        prev, path = path, _GETATTR.sub(r"\1.\2", path)
    path = _SELF_PREFIX.sub("", path)
    path = _INDEX.sub(r".\1", path)
    return path.strip(".")


def innermost_module(node: torch.fx.Node) -> tuple[str, Any] | None:
    """(FQN, type) of the innermost module whose forward ran `node` (its nn_module_stack), None for a
    node of the root's forward or one a pass added without provenance. The type is a class or, in
    some torch versions' stacks, its qualified name."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, typ = list(stack.values())[-1]
    return normalise_module_path(str(path)), typ


def module_named(node: torch.fx.Node) -> str:
    """Where `node` is in the model, for messages: "Linear (blocks.0.proj)", or "the model's forward
    (node 'add_3')" at the top level."""
    owner = innermost_module(node)
    if owner is None or not owner[0]:
        return f"the model's forward (node '{node.name}')"
    path, typ = owner
    name = typ.__name__ if isinstance(typ, type) else str(typ).rsplit(".", 1)[-1].strip("'>")
    return f"{name} ({path})"


def get_attr(root: torch.nn.Module, fqn: str) -> Any:
    """The attribute at dotted path `fqn` of `root` (how get_attr nodes name parameters and buffers)."""
    obj: Any = root
    for part in fqn.split("."):
        obj = getattr(obj, part)
    return obj


def mutates(node: torch.fx.Node) -> bool:
    """Writes into one of its inputs (an in-place or out= op, or `x[i] = y`): it must run even where
    nothing reads its result (HF T5's `_shift_right` builds the decoder inputs by such writes)."""
    t = node.target
    if node.op == "call_method":
        return isinstance(t, str) and t.endswith("_") and not t.endswith("__")
    if node.op != "call_function":
        return False
    return t is operator.setitem or (isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable)


def written_values(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The values a mutating node writes into, each followed by the values it is a view of (a write
    is seen through every alias): `copy_(slice(buf), h)` -> [slice, buf]."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        # positionally or by keyword: an out= tensor comes as a keyword (F.normalize(..., out=u))
        written = [node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                   for i, arg in enumerate(t._schema.arguments)
                   if arg.alias_info is not None and arg.alias_info.is_write]
    else:  # x.add_(y), operator.setitem(x, index, y)
        written = list(node.args[:1])
    out: list[torch.fx.Node] = []
    for a in written:
        while isinstance(a, torch.fx.Node):
            out.append(a)
            a = a.args[0] if is_view(a) else None
    return out


_VIEW_METHODS = {"view", "view_as", "reshape", "transpose", "permute", "expand", "expand_as", "narrow", "select",
                 "unsqueeze", "squeeze", "t", "unflatten", "flatten", "diagonal", "unfold", "as_strided"}


def is_view(n: torch.fx.Node) -> bool:
    """An op whose output may alias its first input (slice, select, view, transpose, x[i]...)."""
    if not n.args or not isinstance(n.args[0], torch.fx.Node):
        return False
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        returns = t._schema.returns
        return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
    if n.op == "call_method":
        return t in _VIEW_METHODS or t == "__getitem__"
    return n.op == "call_function" and t is operator.getitem and isinstance(n.args[0].meta.get("val"), torch.Tensor)


def set_attr(root: torch.nn.Module, fqn: str, value: torch.Tensor) -> None:
    """Put `value` at dotted path `fqn` of `root` (a Parameter registers as one, a tensor as a buffer)."""
    prefix, _, name = fqn.rpartition(".")
    setattr(root.get_submodule(prefix) if prefix else root, name, value)
