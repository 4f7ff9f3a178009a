"""Per-node facts of a captured graph: shapes, dtypes, owning module, parameters, bytes."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from partitioner.passes.capture_io import Captured
from partitioner.passes.graph_nodes import innermost_module
from partitioner.passes.writes import stage_mates
from partitioner.units import dtype_name


@dataclass(frozen=True)
class NodeInfo:
    """What later passes need to know about one fx node.

    name: fx node name (unique in the graph).
    op: fx op ("placeholder", "get_attr", "call_function", "call_module", "output").
    target: str(node.target).
    inputs: names of the nodes it reads (all_input_nodes), in order.
    shapes / dtypes: of each tensor leaf of its value ("" dtype for non-tensors).
    module_path: owning module's FQN ("" = the root), from nn_module_stack; for
        get_attr nodes, the module owning the parameter.
    module_type: qualified class name of that module ("" if unknown).
    params: FQNs of parameters/buffers this node reads directly through a get_attr input.
    output_bytes: bytes of its tensor value(s): what a cut after this node sends.
    is_param: True for get_attr nodes that load a parameter or buffer.
    stage_mates: nodes a split keeps on this node's stage (passes/writes.py: the views an in-place
        write goes through, the writes an after_write follows).
    data_dependent: its value's size is known only at run time (shapes hold the upper bound): it
        never crosses a stage boundary.
    """

    name: str
    op: str
    target: str
    inputs: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    module_path: str
    module_type: str
    params: tuple[str, ...]
    output_bytes: int
    is_param: bool = False
    stage_mates: tuple[str, ...] = ()
    data_dependent: bool = False


@dataclass
class AnnotatedGraph:
    """All NodeInfo of a Captured graph in topological order, plus parameter sizes."""

    nodes: list[NodeInfo]
    param_bytes: dict[str, int]  # FQN (canonical, first of a tied group) -> bytes
    param_numel: dict[str, int]
    tied: list[list[str]]

    def by_name(self) -> dict[str, NodeInfo]:
        return {n.name: n for n in self.nodes}


def size_bound(size: int | torch.SymInt) -> int:
    """A size as an int; a data-dependent one (the rows a mixture of experts routes to one expert,
    a boolean mask's selection: an unbacked symbol) as the upper bound torch proved for it, which is
    what memory must allow for; 1 when torch proved none (the value is then costed as if empty)."""
    if isinstance(size, int) or not isinstance(size, torch.SymInt):
        return int(size)
    node = size.node
    if node.has_hint():
        return int(node.hint)
    upper = node.shape_env.bound_sympy(node.expr).upper
    return int(upper) if upper.is_finite else 1


def has_runtime_size(value: Any) -> bool:
    """Whether `value` (a node's meta["val"]) holds a size or number only known at run time: a
    SymInt, or a tensor shaped by one (a mixture of experts' per-expert rows, x[mask])."""
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.SymInt) or (isinstance(leaf, torch.Tensor) and any(
                isinstance(s, torch.SymInt) for s in (*leaf.shape, *leaf.stride()))):
            return True
    return False


def _leaf_facts(value: Any) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...], int]:
    shapes, dtypes, nbytes = [], [], 0
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            shape = tuple(size_bound(s) for s in leaf.shape)
            shapes.append(shape)
            dtypes.append(dtype_name(leaf.dtype))
            nbytes += math.prod(shape) * leaf.element_size()
        else:
            shapes.append(())
            dtypes.append("")
    return tuple(shapes), tuple(dtypes), nbytes


def annotate(captured: Captured) -> AnnotatedGraph:
    """Read shapes, dtypes, owning modules and parameters of every node."""
    gm = captured.graph_module
    canonical = captured.canonical_fqn()
    types = captured.module_types

    infos: list[NodeInfo] = []
    owner: dict[str, tuple[str, str]] = {}  # node name -> (module_path, module_type)
    param_bytes: dict[str, int] = {}
    param_numel: dict[str, int] = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if node.op == "output":  # the flat output leaves
            value = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in node.args[0]]
        shapes, dtypes, nbytes = _leaf_facts(value)
        inputs = tuple(n.name for n in node.all_input_nodes)
        is_param = node.op == "get_attr"
        params: tuple[str, ...] = ()
        if is_param:
            fqn = canonical.get(str(node.target), str(node.target))
            path = fqn.rpartition(".")[0]
            mtype = types.get(path, "")
            param_bytes[fqn] = nbytes
            param_numel[fqn] = sum(_numel(s) for s in shapes)
        else:
            path, mtype = _owner(node, owner, types)
            params = tuple(canonical.get(str(n.target), str(n.target))
                           for n in node.all_input_nodes if n.op == "get_attr")
        owner[node.name] = (path, mtype)
        infos.append(NodeInfo(
            name=node.name, op=node.op, target=str(node.target), inputs=inputs, shapes=shapes,
            dtypes=dtypes, module_path=path, module_type=mtype, params=params,
            output_bytes=0 if node.op == "output" else nbytes, is_param=is_param,
            stage_mates=stage_mates(node), data_dependent=has_runtime_size(value)))
    return AnnotatedGraph(nodes=infos, param_bytes=param_bytes, param_numel=param_numel,
                          tied=[list(g) for g in captured.tied])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _owner(node: torch.fx.Node, owner: dict[str, tuple[str, str]], types: dict[str, str]) -> tuple[str, str]:
    """Innermost module of node's nn_module_stack, else the producer's (getitem & co), else the root."""
    found = innermost_module(node)
    if found is not None:
        path, mtype = found
        if not isinstance(mtype, str):
            mtype = f"{mtype.__module__}.{mtype.__qualname__}"
        return path, types.get(path) or mtype
    if node.op in ("placeholder", "output"):
        return "", types.get("", "")
    producers = [owner[n.name] for n in node.all_input_nodes if n.op != "get_attr" and n.name in owner]
    if producers:
        return producers[0]
    return "", types.get("", "")
