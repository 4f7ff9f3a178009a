"""Per-node facts of a captured graph (INTERFACE: implementation pending)."""
from __future__ import annotations

from dataclasses import dataclass

from passes.capture import Captured


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


@dataclass
class AnnotatedGraph:
    """All NodeInfo of a Captured graph in topological order, plus parameter sizes."""

    nodes: list[NodeInfo]
    param_bytes: dict[str, int]  # FQN (canonical, first of a tied group) -> bytes
    param_numel: dict[str, int]
    tied: list[list[str]]

    def by_name(self) -> dict[str, NodeInfo]:
        return {n.name: n for n in self.nodes}


def annotate(captured: Captured) -> AnnotatedGraph:
    """Read shapes, dtypes, owning modules and parameters of every node."""
    raise NotImplementedError
