"""Capture an nn.Module as a flat torch.fx graph (INTERFACE: implementation pending).

torch.export (non-strict) first, torch.fx.symbolic_trace as fallback. Works on
meta tensors, so huge models are traced without allocating weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree


@dataclass
class Captured:
    """A model as one flat graph plus what is needed to call it like the model.

    graph_module: unlifted GraphModule. Parameters and buffers are `get_attr`
        nodes whose target is the original FQN (e.g. "transformer.wte.weight");
        user inputs are `placeholder` nodes in the flattened order of
        (args, kwargs); the single `output` node returns a flat list/tuple of
        values (one per leaf of `out_spec`). Node.meta["val"] holds a
        FakeTensor (or a python value) for every node; call_function nodes carry
        meta["nn_module_stack"] when torch gives it.
    in_spec: pytree spec of (args, kwargs) as the model was called.
    out_spec: pytree spec of the model's output (tuple, dict, HF ModelOutput).
    input_names: names of the placeholder nodes, in flat order.
    tied: groups of FQNs that name one and the same parameter tensor, e.g.
        [["transformer.wte.weight", "lm_head.weight"]]; the first FQN of each
        group is the one get_attr nodes use.
    method: "export" or "symbolic_trace".
    """

    graph_module: torch.fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    input_names: list[str]
    tied: list[list[str]] = field(default_factory=list)
    method: str = "export"

    def flatten_inputs(self, args: tuple, kwargs: dict | None = None) -> list[Any]:
        """Flatten (args, kwargs) the way the placeholders expect them."""
        raise NotImplementedError

    def unflatten_outputs(self, flat: list[Any]) -> Any:
        """Rebuild the model's output structure from the flat output list."""
        raise NotImplementedError


def capture(model: torch.nn.Module, example_args: tuple = (), example_kwargs: dict | None = None) -> Captured:
    """Trace `model` called as model(*example_args, **example_kwargs) into a Captured graph."""
    raise NotImplementedError
