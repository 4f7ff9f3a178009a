"""Dataclasses in a model's inputs, target and output, as pytree nodes.

Inputs and targets are cut into microbatches, flattened into the stages' placeholders and outputs
assembled back through torch's pytrees. An unregistered dataclass is one opaque leaf there: as an
input torch.export refuses it (and symbolic_trace bakes its tensors into the graph), as a target its
tensors are not cut, as an output the graph cannot return it. Registered the way torch.export asks
(torch.export.register_dataclass) each field is a leaf, so a batch given as a dataclass of tensors
trains as it would as a dict. An object of another class that holds tensors cannot be taken apart
and rebuilt without being told how: refused, naming it and the registration that fixes it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
from torch.utils import _pytree as pytree

from partitioner.errors import RuntimeConfigError


def register_dataclasses(value: Any) -> None:
    """Register every dataclass type in pytree `value` (nested ones too) as a pytree node. One that
    cannot be (torch refuses it) stays a leaf: torch.export then says why."""
    tried: set[type] = set()
    while found := {type(leaf) for leaf in pytree.tree_leaves(value) if _opaque_dataclass(leaf)} - tried:
        for cls in found:
            tried.add(cls)
            try:
                torch.export.register_dataclass(cls)
            except (ValueError, TypeError, RuntimeError):
                continue


def check_flattens(value: Any, what: str, names: list[str] | None = None) -> None:
    """Raise RuntimeConfigError where a leaf of `value` (named `names[i]`, default `what` and its
    path) is an object holding tensors: pytrees would pass it whole, as one constant."""
    paths, _ = pytree.tree_flatten_with_path(value)
    for i, (path, leaf) in enumerate(paths):
        if isinstance(leaf, torch.Tensor) or not any(isinstance(v, torch.Tensor)
                                                     for v in getattr(leaf, "__dict__", {}).values()):
            continue
        name, cls = names[i] if names else what + pytree.keystr(path), type(leaf).__qualname__
        raise RuntimeConfigError(
            f"{what} '{name}' is a {cls}, an object holding tensors that torch's pytrees cannot take apart: its "
            "tensors could not be cut into microbatches nor passed to the stages. Make it a dataclass, register "
            f"it first (torch.utils._pytree.register_pytree_node({cls}, flatten_fn, unflatten_fn)), or pass its "
            "tensors as separate inputs.")


def _opaque_dataclass(leaf: Any) -> bool:
    return dataclasses.is_dataclass(leaf) and not isinstance(leaf, type)


@contextlib.contextmanager
def outputs_registered(model: torch.nn.Module) -> Iterator[None]:
    """While the model is traced, dataclasses in what its forward returns are registered before the
    tracer flattens the output (a forward hook on the root module, removed after)."""
    handle = model.register_forward_hook(lambda module, args, out: register_dataclasses(out))
    try:
        yield
    finally:
        handle.remove()
