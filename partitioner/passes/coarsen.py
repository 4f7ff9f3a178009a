"""Nodes to blocks at module boundaries.

A block is a group of fx nodes the partitioner never splits. At module depth d
every node is keyed by the first d components of its owning module's path
("transformer.h.3.attn.c_attn" -> "transformer.h.3" at d=3); leaf modules
shallower than d keep their own path. Blocks are the maximal runs of equal keys
in the graph's topological order, so each block is an interval of that order:
edges only go from earlier to later blocks and a block is convex.

Glue (nodes of the root module or of a container whose children are split,
e.g. a residual add in GPT2Model.forward) joins the block before it (or the
first block, when it comes before any). A value that is not a single tensor
(tuples read through getitem, Python scalars) never crosses blocks: the blocks
between producer and consumer are merged. Parameter get_attr nodes go with
their user block; a parameter read by several blocks (a tied embedding /
lm_head) becomes a SharedParam. Placeholders (user inputs, every rank has them)
and the output node belong to no block; values the output node reads are
CrossValues with to_output=True: they must reach the last stage.
"""
from __future__ import annotations

import dataclasses
import json
import operator
from dataclasses import dataclass, field

import networkx as nx

from partitioner.cost_models.flops import COMPUTE_OPS
from partitioner.cost_models.time import NO_TIME, NodeTime, pass_time_s


@dataclass(frozen=True)
class Block:
    """A group of fx nodes that always goes to one stage.

    id: index in BlockGraph.blocks (blocks are listed in a topological order).
    name: the module path it covers (e.g. "transformer.h.3"), or a synthetic name.
    nodes: fx node names it holds (get_attr nodes of parameters used only here included).
    params: canonical FQNs of the parameters it uses (shared ones included).
    Costs are for ONE microbatch; param_state_bytes = params + grads + optimizer state.
    param_bytes / param_state_bytes exclude SharedParams (those are counted per rank
    by the solver, once per rank that holds them).
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
    host_fwd_time_s: float = 0.0  # host dispatch, where measured apart (cost_models.node_costs)
    host_bwd_time_s: float = 0.0
    bwd_working_bytes: int = 0  # largest transient of its nodes' backward (NodeCost.bwd_working_bytes)

    @property
    def time_s(self) -> float:
        """Forward + backward seconds of the block on its own (host and device overlapping per pass)."""
        return pass_time_s(self.fwd_time_s, self.host_fwd_time_s) + pass_time_s(self.bwd_time_s, self.host_bwd_time_s)


@dataclass(frozen=True)
class CrossValue:
    """One value produced in block `producer` and read by other blocks `consumers`.

    to_output: the graph's output node reads it, so it must also reach the last stage.
    saver: the block whose saved_bytes count this value's storage (-1: none). A stage that
        sends the value, or receives it, holds it until the microbatch's backward unless
        the saver is on that stage (partitioner/stage_costs.py, the rule on held values).
    requires_grad: a stage receiving it keeps the received tensor for its backward.
    """

    node: str
    producer: int
    consumers: tuple[int, ...]
    bytes: int
    to_output: bool = False
    saver: int = -1
    requires_grad: bool = True


@dataclass(frozen=True)
class SharedParam:
    """A parameter (tied weight) read by several blocks; co-locate or replicate + all-reduce.

    nodes: the get_attr nodes that load it (in no block: every stage using it loads it).
    trainable: False for buffers/constants, which are replicated without an all-reduce.
    """

    fqn: str
    bytes: int
    state_bytes: int
    blocks: tuple[int, ...]
    nodes: tuple[str, ...] = ()
    trainable: bool = True


@dataclass
class BlockGraph:
    """Blocks, the values flowing between them, and shared parameters.

    graph: networkx DiGraph on block ids, edge attr "bytes" = sum of CrossValue bytes u->v.
    Every edge goes from a lower to a higher id.
    stage_pass: the fixed cost of every stage pass beyond its blocks (NodeCosts.stage_pass), paid
    once per forward and per backward of every non-empty stage (partitioner/stage_costs.py).
    """

    blocks: list[Block]
    values: list[CrossValue]
    shared_params: list[SharedParam] = field(default_factory=list)
    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    depth: int = 0
    stage_pass: NodeTime = NO_TIME

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def is_path(self) -> bool:
        """True when every block feeds the next: every valid plan is then a contiguous split."""
        return all(self.graph.has_edge(b, b + 1) for b in range(len(self.blocks) - 1))

    def is_chain(self) -> bool:
        """True when every value goes to the next block only (and outputs come from the last)."""
        n = len(self.blocks)
        return all(c == v.producer + 1 for v in self.values for c in v.consumers) and \
            all(v.producer == n - 1 for v in self.values if v.to_output)

    def to_json(self) -> str:
        """Blocks, values, shared parameters, the graph's edges (with their attributes, in the graph's
        order, so a reloaded graph is iterated alike), the depth and the stage pass's cost, as JSON."""
        return json.dumps({"blocks": [dataclasses.asdict(b) for b in self.blocks],
                           "values": [dataclasses.asdict(v) for v in self.values],
                           "shared_params": [dataclasses.asdict(s) for s in self.shared_params],
                           "edges": [[u, v, data] for u, v, data in self.graph.edges(data=True)],
                           "depth": self.depth, "stage_pass": dataclasses.asdict(self.stage_pass)})

    @classmethod
    def from_json(cls, text: str) -> BlockGraph:
        """The BlockGraph to_json wrote (one written before stage_pass existed: none)."""
        data = json.loads(text)

        def load(kind, row: dict):  # JSON has lists where the dataclasses hold tuples
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items()})

        blocks = [load(Block, b) for b in data["blocks"]]
        g = nx.DiGraph()
        g.add_nodes_from(range(len(blocks)))
        for u, v, attrs in data["edges"]:
            g.add_edge(u, v, **attrs)
        return cls(blocks, [load(CrossValue, v) for v in data["values"]],
                   [load(SharedParam, s) for s in data["shared_params"]], g, data["depth"],
                   NodeTime(**data["stage_pass"]) if "stage_pass" in data else NO_TIME)


OPS = -1  # the depth of op-level blocks: each compute node its own key (merged where a value cannot cross)


def _single_tensor(info) -> bool:
    """One tensor of a size known before it runs: a value a stage boundary can carry."""
    return len(info.dtypes) == 1 and info.dtypes[0] != "" and not getattr(info, "data_dependent", False)


def _is_getitem(info) -> bool:
    return info.target in ("<built-in function getitem>", str(operator.getitem)) or \
        info.target.endswith("getitem")


def _keys(compute: list, depth: int) -> list[str | None]:
    """Block key of every compute node at `depth`; None marks glue."""
    if depth == OPS:
        return [info.name for info in compute]
    paths = {info.module_path for info in compute}
    containers = set()
    for p in paths:
        parts = p.split(".") if p else []
        for i in range(1, len(parts)):
            containers.add(".".join(parts[:i]))
    if paths == {""}:
        return [""] * len(compute)
    keys: list[str | None] = []
    for info in compute:
        parts = info.module_path.split(".") if info.module_path else []
        if len(parts) >= depth:
            keys.append(".".join(parts[:depth]))
        elif not parts or info.module_path in containers:
            keys.append(None)
        else:
            keys.append(info.module_path)
    return keys


def _runs(compute: list, depth: int) -> list[int]:
    """Run index (future block id) of every compute node at `depth`."""
    keys = _keys(compute, depth)
    first = next((k for k in keys if k is not None), "")
    run_of: list[int] = []
    run, prev = 0, first
    for k in keys:
        if k is None:
            k = prev
        if k != prev:
            run += 1
            prev = k
        run_of.append(run)
    # a value that is not one tensor never crosses, nor a view an in-place write goes through, nor a
    # state from its writes (stage mates): merge the runs in between
    num_runs = run + 1 if compute else 0
    pos = {info.name: i for i, info in enumerate(compute)}
    join = [0] * (num_runs + 1)  # difference array: join run i with i+1
    for i, info in enumerate(compute):
        getitem = _is_getitem(info)
        for src in info.inputs:
            j = pos.get(src)
            if j is None or run_of[j] == run_of[i]:
                continue
            if getitem or not _single_tensor(compute[j]) or src in info.stage_mates:
                lo, hi = sorted((run_of[j], run_of[i]))
                join[lo] += 1
                join[hi] -= 1
        for mate in info.stage_mates:  # mates that are not inputs: a state's reads and writes
            j = pos.get(mate)
            if j is not None and mate not in info.inputs and run_of[j] != run_of[i]:
                lo, hi = sorted((run_of[j], run_of[i]))
                join[lo] += 1
                join[hi] -= 1
    remap, cur, acc = [], 0, 0
    for r in range(num_runs):
        remap.append(cur)
        acc += join[r]
        if acc == 0:
            cur += 1
    return [remap[r] for r in run_of]


def _max_depth(compute: list) -> int:
    return max((len(i.module_path.split(".")) for i in compute if i.module_path), default=0)


def choose_depth(annotated, target_blocks: int, min_blocks: int = 1, costs=None) -> int:
    """Shallowest module depth giving >= target_blocks blocks, none longer than 2/target_blocks
    of the total time when `costs` are given (so an even split exists); else the most blocks, or OPS
    (blocks of single ops) where no module depth gives min_blocks (a model computing in its own
    forward with parameters it holds in a ParameterList)."""
    compute = [i for i in annotated.nodes if i.op in COMPUTE_OPS]
    times = [costs.nodes[i.name].time_s if costs is not None
             and i.name in costs.nodes else 0.0 for i in compute]
    total = sum(times)
    best_d, best_n = 1, -1
    for d in range(1, _max_depth(compute) + 1):
        runs = _runs(compute, d)
        n = runs[-1] + 1 if runs else 0
        per_block = [0.0] * n
        for r, t in zip(runs, times):
            per_block[r] += t
        small = not per_block or max(per_block) <= 2 * total / max(target_blocks, 1) + 1e-15
        if n >= max(target_blocks, min_blocks) and small:
            return d
        if n > best_n:
            best_d, best_n = d, n
    if best_n < min_blocks and compute and _runs(compute, OPS)[-1] + 1 > best_n:
        return OPS  # the module structure holds fewer blocks than stages (a forward of bare ops): cut between ops
    return best_d


def coarsen(annotated, costs, depth: int | None = None, min_blocks: int = 1,
            target_blocks: int | None = None) -> BlockGraph:
    """Group the nodes of `annotated` (AnnotatedGraph) into blocks costed from `costs` (NodeCosts).

    depth None picks the shallowest module depth giving at least
    max(target_blocks, min_blocks) blocks (target_blocks default 16), none
    longer than 2 / target_blocks of the total time: the planner passes 8x the
    number of stages (plan_model.BLOCKS_PER_STAGE), so every block is at most a
    quarter of an ideal stage and stages can balance within a few percent.
    """
    compute = [i for i in annotated.nodes if i.op in COMPUTE_OPS]
    if depth is None:
        depth = choose_depth(annotated, target_blocks or 16, min_blocks, costs)
    run_of = _runs(compute, depth)
    num_blocks = run_of[-1] + 1 if run_of else 0
    block_of: dict[str, int] = {info.name: r for info, r in zip(compute, run_of)}
    canon = {fqn: grp[0] for grp in annotated.tied for fqn in grp}
    users: dict[str, list[str]] = {}
    for info in annotated.nodes:
        for src in info.inputs:
            users.setdefault(src, []).append(info.name)

    # parameters: which blocks read each FQN, through which get_attr nodes
    param_blocks: dict[str, set[int]] = {}
    param_nodes: dict[str, list[str]] = {}
    attr_fqns: dict[str, tuple[str, ...]] = {}
    attr_home: dict[str, int] = {}
    for info in annotated.nodes:
        if info.op != "get_attr":
            continue
        fqns = tuple(dict.fromkeys(canon.get(f, f) for f in (info.params or (info.target,))))
        attr_fqns[info.name] = fqns
        homes = sorted({block_of[u] for u in users.get(info.name, ()) if u in block_of})
        attr_home[info.name] = homes[0] if homes else max(num_blocks - 1, 0)
        for f in fqns:
            param_blocks.setdefault(f, set()).update(homes or [attr_home[info.name]])
            param_nodes.setdefault(f, []).append(info.name)
    shared_fqns = {f for f, bs in param_blocks.items() if len(bs) > 1}

    nodes_of: list[list[str]] = [[] for _ in range(num_blocks)]
    params_of: list[list[str]] = [[] for _ in range(num_blocks)]
    for info in annotated.nodes:
        if info.name in block_of:
            nodes_of[block_of[info.name]].append(info.name)
        elif info.name in attr_home and not any(f in shared_fqns for f in attr_fqns[info.name]):
            nodes_of[attr_home[info.name]].append(info.name)
    for f, bs in param_blocks.items():
        for b in bs:
            params_of[b].append(f)

    def state_bytes(f: str) -> int:
        return int(costs.param_state_bytes.get(f, annotated.param_bytes.get(f, 0)))

    # values crossing blocks
    output_reads = {src for info in annotated.nodes if info.op == "output" for src in info.inputs}
    values: list[CrossValue] = []
    out_bytes = [0] * num_blocks
    for info in compute:
        b = block_of[info.name]
        consumers = sorted({block_of[u] for u in users.get(info.name, ()) if u in block_of} - {b})
        to_output = info.name in output_reads
        if consumers or to_output:
            cost = costs.nodes.get(info.name)
            saver = block_of.get(cost.output_saved_by, -1) if cost is not None else -1
            values.append(CrossValue(info.name, b, tuple(consumers), int(info.output_bytes), to_output, saver,
                                     cost.output_requires_grad if cost is not None else True))
            out_bytes[b] += int(info.output_bytes)

    names = _block_names(compute, run_of, num_blocks, depth)
    blocks: list[Block] = []
    for b in range(num_blocks):
        nc = [costs.nodes[n] for n in nodes_of[b] if n in costs.nodes]
        own = [f for f in params_of[b] if f not in shared_fqns]
        blocks.append(Block(
            id=b, name=names[b], nodes=tuple(nodes_of[b]), params=tuple(params_of[b]),
            fwd_time_s=sum(c.fwd_time_s for c in nc), bwd_time_s=sum(c.bwd_time_s for c in nc),
            host_fwd_time_s=sum(c.host_fwd_time_s for c in nc), host_bwd_time_s=sum(c.host_bwd_time_s for c in nc),
            fwd_flops=sum(c.fwd_flops for c in nc), bwd_flops=sum(c.bwd_flops for c in nc),
            param_bytes=sum(int(annotated.param_bytes.get(f, 0)) for f in own),
            param_state_bytes=sum(state_bytes(f) for f in own),
            saved_bytes=sum(int(c.saved_bytes) for c in nc), output_bytes=out_bytes[b],
            bwd_working_bytes=max((int(c.bwd_working_bytes) for c in nc), default=0)))

    shared = []
    for f in sorted(shared_fqns, key=lambda f: min(param_blocks[f])):
        pb = int(annotated.param_bytes.get(f, 0))
        sb = state_bytes(f)
        shared.append(SharedParam(f, pb, sb, tuple(sorted(param_blocks[f])), tuple(param_nodes[f]),
                                  trainable=sb > pb))

    g = nx.DiGraph()
    g.add_nodes_from(range(num_blocks))
    for v in values:
        for c in v.consumers:
            prev = g.edges[v.producer, c]["bytes"] if g.has_edge(v.producer, c) else 0
            g.add_edge(v.producer, c, bytes=prev + v.bytes)
    return BlockGraph(blocks=blocks, values=values, shared_params=shared, graph=g, depth=depth,
                      stage_pass=getattr(costs, "stage_pass", NO_TIME))


def _block_names(compute: list, run_of: list[int], num_blocks: int, depth: int) -> list[str]:
    """'first..last' module keys of each block (a single key when it covers one module)."""
    keys = _keys(compute, depth)
    firsts: list[str | None] = [None] * num_blocks
    lasts: list[str | None] = [None] * num_blocks
    for k, r in zip(keys, run_of):
        if k is None:
            continue
        if firsts[r] is None:
            firsts[r] = k
        lasts[r] = k
    names = []
    for b in range(num_blocks):
        f, l = firsts[b] or "(glue)", lasts[b] or "(glue)"
        names.append(f if f == l else f"{f}..{l}")
    return names


def attach_loss(bg: BlockGraph, loss) -> BlockGraph:
    """`bg` with the loss's costs (cost_models.loss.profile_loss) added to the block that produces
    the model's output (the last block producing an output value): the loss runs on the last
    stage, which holds that block in every plan where the output is made last."""
    producers = [v.producer for v in bg.values if v.to_output]
    b = max(producers) if producers else len(bg.blocks) - 1
    blk = bg.blocks[b]
    total = loss.total
    blocks = list(bg.blocks)
    blocks[b] = dataclasses.replace(
        blk, fwd_time_s=blk.fwd_time_s + total("fwd_time_s"), bwd_time_s=blk.bwd_time_s + total("bwd_time_s"),
        host_fwd_time_s=blk.host_fwd_time_s + total("host_fwd_time_s"),
        host_bwd_time_s=blk.host_bwd_time_s + total("host_bwd_time_s"),
        fwd_flops=blk.fwd_flops + total("fwd_flops"), bwd_flops=blk.bwd_flops + total("bwd_flops"),
        saved_bytes=blk.saved_bytes + int(total("saved_bytes")),
        bwd_working_bytes=max(blk.bwd_working_bytes, max((c.bwd_working_bytes for c in loss.nodes.values()),
                                                         default=0)))
    return dataclasses.replace(bg, blocks=blocks)


def synthetic_block_graph(times_s: list[float], edges: dict[tuple[int, int], int] | None = None,
                          param_state_bytes: list[int] | None = None, saved_bytes: list[int] | None = None,
                          shared: list[tuple[str, int, tuple[int, ...]]] | None = None,
                          output_bytes: int = 0, stage_pass: NodeTime = NO_TIME) -> BlockGraph:
    """A BlockGraph from numbers (tests, benchmarks): block b takes times_s[b] (1/3 fwd, 2/3 bwd).

    edges: (u, v) -> bytes with u < v (default: a chain of 0-byte edges).
    shared: (fqn, state_bytes, user blocks) for tied parameters (bytes = state_bytes / 4).
    The last block's output (output_bytes) goes to the graph output.
    stage_pass: every stage pass's fixed cost (BlockGraph.stage_pass).
    """
    n = len(times_s)
    if edges is None:
        edges = {(b, b + 1): 0 for b in range(n - 1)}
    ps = param_state_bytes or [0] * n
    sv = saved_bytes or [0] * n
    blocks = [Block(b, f"block{b}", (f"n{b}",), (), t / 3, 2 * t / 3, 0.0, 0.0, ps[b] // 4, ps[b], sv[b], 0)
              for b, t in enumerate(times_s)]
    values = []
    for (u, v), nbytes in sorted(edges.items()):
        if not u < v:
            raise ValueError(f"edge {u}->{v}: blocks must be in topological order (u < v)")
        values.append(CrossValue(f"v{u}_{v}", u, (v,), nbytes))
    if n:
        values.append(CrossValue(f"out{n - 1}", n - 1, (), output_bytes, to_output=True))
    sps = [SharedParam(f, sb // 4, sb, tuple(bs), (f"attr_{f}",)) for f, sb, bs in (shared or [])]
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    for (u, v), nbytes in edges.items():
        g.add_edge(u, v, bytes=nbytes)
    return BlockGraph(blocks, values, sps, g, depth=0, stage_pass=stage_pass)
