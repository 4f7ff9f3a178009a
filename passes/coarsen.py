"""Nodes to blocks at module boundaries (INTERFACE: implementation pending)."""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx


@dataclass(frozen=True)
class Block:
    """A group of fx nodes that always goes to one stage.

    id: index in BlockGraph.blocks (blocks are listed in a topological order).
    name: the module path it covers (e.g. "transformer.h.3"), or a synthetic name.
    nodes: fx node names it holds (get_attr nodes of parameters used only here included).
    params: canonical FQNs of the parameters it uses.
    Costs are for ONE microbatch; param_state_bytes = params + grads + optimizer state.
    """

    id: int
    name: str
    nodes: tuple[str, ...]
    params: tuple[str, ...]
    fwd_time_s: float
    bwd_time_s: float
    fwd_flops: float
    bwd_flops: float
    param_bytes: int
    param_state_bytes: int
    saved_bytes: int
    output_bytes: int


@dataclass(frozen=True)
class CrossValue:
    """One value produced in block `producer` and read by other blocks `consumers`."""

    node: str
    producer: int
    consumers: tuple[int, ...]
    bytes: int


@dataclass(frozen=True)
class SharedParam:
    """A parameter (tied weight) read by several blocks; co-locate or replicate + all-reduce."""

    fqn: str
    bytes: int
    state_bytes: int
    blocks: tuple[int, ...]


@dataclass
class BlockGraph:
    """Blocks, the values flowing between them, and shared parameters.

    graph: networkx DiGraph on block ids, edge attr "bytes" = sum of CrossValue bytes u->v.
    Every edge goes from a lower to a higher id.
    """

    blocks: list[Block]
    values: list[CrossValue]
    shared_params: list[SharedParam] = field(default_factory=list)
    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    depth: int = 0


def coarsen(annotated, costs, depth: int | None = None, min_blocks: int = 1) -> BlockGraph:
    """Group nodes into blocks; see module docstring."""
    raise NotImplementedError
