"""The calling convention of a captured graph: how it takes the model's inputs and gives its outputs.

capture() normalises every traced graph to it (normalise), so that later passes see one convention:
- placeholders are the tensor leaves of (args, kwargs), in pytree order; non-tensor leaves (flags
  such as use_cache=False) are baked into the graph;
- get_attr nodes load parameters/buffers by their original FQN, a tied weight always through the
  first FQN of its group (find_tied);
- the output node returns a flat tuple (the leaves of `out_spec`).
Captured calls the graph like the model (flatten_inputs, unflatten_outputs); input_leaf_names
names the input leaves (for messages and batch_dims).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from partitioner.errors import CaptureError
from partitioner.passes.graph_nodes import mutates, vmap_level_change


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
    input_leaf_indices: for each placeholder, the index of its leaf in the
        flattened (args, kwargs); leaves not listed were constants at capture.
    const_inputs: flat leaf index -> the non-tensor value baked into the graph.
    module_types: FQN of every submodule of the original model -> qualified class
        name (the graph module's own submodules are plain containers).
    """

    graph_module: torch.fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    input_names: list[str]
    tied: list[list[str]] = field(default_factory=list)
    method: str = "export"
    input_leaf_indices: list[int] = field(default_factory=list)
    const_inputs: dict[int, Any] = field(default_factory=dict)
    module_types: dict[str, str] = field(default_factory=dict)

    def flatten_inputs(self, args: tuple, kwargs: dict | None = None) -> list[Any]:
        """Flatten (args, kwargs) the way the placeholders expect them."""
        kwargs = dict(kwargs or {})
        keys = list(_child_spec(self.in_spec, 1).context)
        if set(kwargs) == set(keys):  # keyword order does not matter to the model
            kwargs = {k: kwargs[k] for k in keys}
        leaves, spec = pytree.tree_flatten((tuple(args), kwargs))
        if spec != self.in_spec:
            n_args = _child_spec(self.in_spec, 0).num_children
            raise CaptureError(
                f"inputs do not match the captured calling convention: captured with {n_args} positional "
                f"and keyword inputs {keys}, got {len(args)} positional and {list(kwargs)} (or a different "
                "nesting). Call with the same structure as the example inputs, or capture again.")
        for i, value in self.const_inputs.items():
            if not isinstance(leaves[i], torch.Tensor) and leaves[i] != value:
                name = input_leaf_names(None, args, kwargs)[i]
                raise CaptureError(
                    f"input '{name}' is {leaves[i]!r} but the graph was captured with {value!r} "
                    "baked in (a Python value, not a tensor, is a constant of the graph): pass the value of the "
                    "example inputs, or capture (compile_parallel) again with this one.")
        return [leaves[i] for i in self.input_leaf_indices]

    def unflatten_outputs(self, flat: list[Any]) -> Any:
        """Rebuild the model's output structure from the flat output list."""
        return pytree.tree_unflatten(list(flat), self.out_spec)

    def output_leaves(self) -> list[Any]:
        """The output node's flat leaves, in out_spec's order: fx nodes (or constants the graph returns)."""
        out = next(n for n in self.graph_module.graph.nodes if n.op == "output").args[0]
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def meta_outputs(self) -> list[Any]:
        """The flat outputs as meta tensors of their shapes and dtypes (constants as they are)."""
        return [meta_like(x.meta.get("val") if isinstance(x, torch.fx.Node) else x) for x in self.output_leaves()]

    def canonical_fqn(self) -> dict[str, str]:
        """Every FQN of a tied parameter -> the first FQN of its group."""
        return {fqn: group[0] for group in self.tied for fqn in group}


def meta_like(value: Any) -> Any:
    """`value` with every tensor leaf replaced by an empty meta tensor of its shape and dtype."""
    return pytree.tree_map_only(torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), value)


def find_tied(model: torch.nn.Module) -> list[list[str]]:
    """Groups of FQNs that name one parameter tensor, in named_parameters order."""
    groups: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(fqn)
    return [g for g in groups.values() if len(g) > 1]


def positional_names(model: torch.nn.Module | None, count: int) -> list[str]:
    """Forward's parameter name of each of `count` positional inputs ("arg0", ... where forward's
    signature is unknown, e.g. model None, or takes *args / **kwargs there)."""
    try:
        names = list(inspect.signature(model.forward).parameters) if model is not None else []
    except (TypeError, ValueError):
        names = []
    return [names[i] if i < len(names) and names[i] not in ("args", "kwargs") else f"arg{i}" for i in range(count)]


def input_leaf_names(model: torch.nn.Module | None, args: tuple, kwargs: dict) -> list[str]:
    """A readable name for each leaf of (args, kwargs): "input_ids", "batch[0]", "x['a']" (positional
    inputs "arg0", ... where forward's signature is unknown, e.g. model None)."""
    names = positional_names(model, len(args))
    path_leaves, _ = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    out = []
    for path, _leaf in path_leaves:
        top, key = path[0], path[1]
        base = names[key.idx] if top.idx == 0 else str(key.key)  # positional, or keyword
        out.append(base + "".join(str(k) for k in path[2:]))
    return out


def normalise(gm: torch.fx.GraphModule, tied: list[list[str]],
               tensor_leaf: list[bool]) -> tuple[list[int], dict[int, Any]]:
    """Rewrite gm in place to the Captured conventions; returns (input_leaf_indices, const_inputs)."""
    graph = gm.graph
    canonical = {fqn: group[0] for group in tied for fqn in group}

    # guards torch.export inserts as a call_module: inputs are checked by flatten_inputs instead
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    # ep.module() also checks inputs against its own in_spec in a pre-hook; our inputs are flat
    for key, hook in list(gm._forward_pre_hooks.items()):
        if "input_constraints" in getattr(hook, "__name__", ""):
            del gm._forward_pre_hooks[key]
            gm._forward_pre_hooks_with_kwargs.pop(key, None)

    # tied weights: one get_attr per group, through the first FQN
    first: dict[str, torch.fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        target = canonical.get(node.target, node.target)
        if target in first:
            node.replace_all_uses_with(first[target])
            graph.erase_node(node)
            continue
        node.target = target
        first[target] = node
    for node in list(first.values()):
        if not node.users:
            graph.erase_node(node)

    # placeholders: keep tensor leaves, bake non-tensor ones in (they are constants of the trace)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(tensor_leaf):
        raise CaptureError(f"internal: {len(placeholders)} placeholders for {len(tensor_leaf)} input leaves")
    keep: list[int] = []
    const: dict[int, Any] = {}
    for i, (ph, is_tensor) in enumerate(zip(placeholders, tensor_leaf)):
        if is_tensor:
            keep.append(i)
            continue
        value = ph.meta.get("val")
        if ph.users and _is_literal(value):
            for user in list(ph.users):
                user.replace_input_with(ph, value)
        if ph.users:
            raise CaptureError(f"input '{ph.name}' is a non-tensor value ({value!r}) used as data by the graph; "
                               "pass it as a tensor or bind it before capture (e.g. functools.partial).")
        graph.erase_node(ph)
        const[i] = value

    # plain calling convention: gm(*flat_tensor_inputs) -> tuple of output leaves
    graph._codegen = torch.fx.graph.CodeGen()
    out = next(n for n in graph.nodes if n.op == "output")
    if not isinstance(out.args[0], (tuple, list)):
        out.args = ((out.args[0],),)
    else:
        out.args = (tuple(out.args[0]),)
    graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output") or mutates(n)
                              or vmap_level_change(n) != 0)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return keep, const


def _is_literal(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device))


def _child_spec(spec: pytree.TreeSpec, i: int) -> pytree.TreeSpec:
    """The i-th child of a TreeSpec (torch renamed children_specs to child() in 2.9+)."""
    return spec.child(i) if hasattr(spec, "child") else spec.children_specs[i]
