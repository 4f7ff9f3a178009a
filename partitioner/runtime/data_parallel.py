"""Data parallel x pipeline: dp replicas of one pipeline, laid out on a DeviceMesh.

A mesh with dims ("dp", "pp") (either order; a 1-D ("pp",) mesh is dp = 1) holds
dp pipeline replicas: replica d is the ranks mesh[d, :], and its pp rank r runs
the plan's stages of rank r on its share of the global batch. Point-to-point
traffic stays inside a replica; gradients are reduced across replicas by FSDP2
(data_parallel="fsdp", here) or by an all-reduce per stage group
(data_parallel="replicate", runtime/replicated_gradients.py).

Under FSDP2 each rank's stage graph modules become one module (`RankStages`), wrapped
with `fully_shard` (parameters, gradients and optimizer state sharded over dp). Where a
rank holds several stages (interleaving) that share no parameter, each stage is
its own FSDP2 group, so a stage's gradients are reduced as soon as its last
backward is done, overlapping the rank's other stages' backwards; a tied weight
read by two local stages makes them one group (it is one parameter, sharded
once). They are driven the way torch.distributed.pipelining drives FSDP: during
a step's backwards gradient sync and resharding are off, so gradients
accumulate whole over the microbatches; after a stage's (group's) last backward
one reduce-scatter averages them over the replicas, and the parameters are resharded.
Each replica's loss is the mean over its share of the batch, so the averaged
gradient is that of the mean loss over the global batch.

Buffers are whole on every replica and not synchronised, in both modes (FSDP2 leaves them
alone; DDP's default broadcast_buffers=True would copy rank 0's before every forward): a
BatchNorm's running statistics follow the replica's own microbatches, eval runs on each
replica's, and full_state_dict / save take replica 0's.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from partitioner.data_parallel_costs import DP_MODES as DATA_PARALLEL_MODES
from partitioner.errors import RuntimeConfigError
from partitioner.passes.graph_nodes import get_attr
from partitioner.runtime.peer_waits import PeerWaits


@dataclass(frozen=True)
class MeshLayout:
    """Where this process sits among dp replicas of a pp-rank pipeline.

    replicas[d][r]: the global rank of pipeline rank r in replica d (the same table on every rank).
    """

    dp: int
    pp: int
    dp_rank: int
    pp_rank: int
    replicas: tuple[tuple[int, ...], ...]

    @property
    def pipeline(self) -> tuple[int, ...]:
        """Global ranks of this process's replica, by pipeline rank."""
        return self.replicas[self.dp_rank]

    @staticmethod
    def single(world: int, rank: int) -> "MeshLayout":
        """One pipeline over the whole world (no data parallelism): pipeline rank = global rank."""
        return MeshLayout(1, world, 0, rank, (tuple(range(world)),))


def mesh_layout(mesh: Any, rank: int, world: int) -> MeshLayout:
    """The layout of a DeviceMesh with a "pp" dim and optionally a "dp" dim; RuntimeConfigError
    naming what is wrong otherwise."""
    names = tuple(mesh.mesh_dim_names or ())
    if "pp" not in names:
        raise RuntimeConfigError(f"compile_parallel: the mesh has dims {names or '(unnamed)'} but no 'pp' dim; "
                                 "build it with mesh_dim_names=('dp', 'pp') (or ('pp',) for a pipeline only).")
    other = [n for n in names if n not in ("dp", "pp")]
    if other:
        raise RuntimeConfigError(f"compile_parallel: mesh dim(s) {other} are not supported; the mesh may have "
                                 "only 'dp' and 'pp' dims.")
    if mesh.size() != world:
        raise RuntimeConfigError(f"compile_parallel: the mesh has {mesh.size()} ranks but the world has {world} "
                                 f"processes; start one process per mesh rank (torchrun --nproc_per_node ...).")
    table = mesh.mesh
    table = table.unsqueeze(0) if names == ("pp",) else table.permute(names.index("dp"), names.index("pp"))
    replicas = tuple(tuple(int(r) for r in row) for row in table.tolist())
    where = [(d, r) for d, row in enumerate(replicas) for r, g in enumerate(row) if g == rank]
    if not where:
        raise RuntimeConfigError(f"compile_parallel: rank {rank} is not in the mesh {replicas}.")
    d, r = where[0]
    return MeshLayout(len(replicas), len(replicas[0]), d, r, replicas)


class RankStages(nn.Module):
    """This rank's stage graph modules as one module: `self(stage, *args)` runs stage `stage`
    through its runner (the graph module, or that compiled), so FSDP2's hooks see every call."""

    def __init__(self, graph_modules: dict[int, nn.Module], runners: dict[int, Callable]):
        super().__init__()
        self.stages = nn.ModuleDict({str(k): gm for k, gm in graph_modules.items()})
        self._runners = dict(runners)

    def forward(self, stage: int | str, *args: Any) -> Any:
        return self._runners[stage](*args)

    def add(self, key: str, fn: Callable) -> None:
        """Run `fn` as `self(key, *args)`, through the same hooks as the stages."""
        self._runners[key] = fn

    def runner(self, key: int | str) -> Callable | None:
        """What `self(key, ...)` runs (None if nothing is registered under `key`)."""
        return self._runners.get(key)


class DataParallelStages:
    """This rank's stages under FSDP2's fully_shard over the mesh's dp dim (see module docstring).

    runners: what the executor calls per stage (through the FSDP-managed module).
    """

    needs_accumulate_grad = True  # FSDP2's post-accumulate hooks: no foreach gradient accumulation

    def __init__(self, graph_modules: dict[int, nn.Module], runners: dict[int, Callable], dp_mesh: Any,
                 peer_waits: PeerWaits | None = None, peers: list[int] | None = None):
        from torch.distributed.fsdp import fully_shard  # lazy: FSDP2 loads only for dp > 1
        self.module = RankStages(graph_modules, runners)
        # the reduce names the replicas it waited for (runtime/peer_waits.py; dp_mesh's group has timeout_s)
        self._naming = functools.partial(peer_waits.naming, "the data-parallel gradient reduce-scatter", peers) \
            if peer_waits is not None else contextlib.nullcontext
        # parameters stay gathered through the step: every microbatch's forward and backward reads them
        wrap = functools.partial(fully_shard, mesh=dp_mesh, reshard_after_forward=False)
        self.groups: dict[int, nn.Module] = {}  # stage -> its own FSDP2 module, where it has one
        if len(parameter_sharing_groups(graph_modules)) == len(graph_modules) > 1:  # no two share a parameter
            for k, gm in graph_modules.items():
                wrap(gm)
                self.groups[k] = gm
        wrap(self.module)
        if dp_mesh.device_type == "cpu":  # gloo has no AVG reduction: sum, then divide by dp
            if not hasattr(self.module, "set_force_sum_reduction_for_comms"):
                raise RuntimeConfigError(f"compile_parallel: data parallelism on CPU (gloo) needs a torch whose FSDP2 "
                                         f"can reduce by sum (torch {torch.__version__} cannot); run it on GPUs.")
            self.module.set_force_sum_reduction_for_comms(True)
        self.runners = {k: functools.partial(self.module, k) for k in runners}

    def with_hooks(self, key: str, fn: Callable) -> Callable:
        """`fn` (e.g. the last stage with the loss, compiled.stage_with_loss) called through the
        FSDP2-managed module as the stages are, under `key`."""
        self.module.add(key, fn)
        return functools.partial(self.module, key)

    def before_step(self) -> None:
        """Accumulate whole gradients over the step's backwards: no reduction, no resharding."""
        self.module.set_is_last_backward(False)
        self.module.set_reshard_after_backward(False)
        self.module.set_requires_gradient_sync(False)

    def stage_backward_done(self, stage: int) -> None:
        """The step's last backward of `stage` is done: reduce its gradients now (asynchronously on
        GPUs), while the rank's other stages still run their backwards."""
        group = self.groups.get(stage)
        if group is not None:
            group.set_requires_gradient_sync(True, recurse=False)
            group.set_reshard_after_backward(True, recurse=False)
            with self._naming():
                _post_backward(group, finalize=False)

    def after_step(self) -> None:
        """Reduce the accumulated gradients over the replicas and reshard the parameters.

        The executor runs many partial backwards (torch.autograd.backward per microbatch), so
        FSDP's end-of-backward step is run here, as torch.distributed.pipelining's stage does
        (`perform_reduce_grad`)."""
        module = self.module
        module.set_is_last_backward(True)
        module.set_reshard_after_backward(True)
        module.set_requires_gradient_sync(True)
        with self._naming():
            _post_backward(module, finalize=True)

    def unshard(self) -> None:
        """Gather every parameter of this rank's stages (FSDP2 registers the whole tensors on the modules)."""
        for m in [self.module, *self.groups.values()]:
            m.unshard()

    def reshard(self) -> None:
        """Free the gathered parameters (after inference)."""
        for m in [self.module, *self.groups.values()]:
            m.reshard()


_SPARSE_ARG = {torch.ops.aten.embedding.default: 4, torch.ops.aten.embedding_bag.default: 5,
               torch.ops.aten.embedding_bag.padding_idx: 5, torch.ops.aten._embedding_bag.default: 5}


def check_fsdp_gradients(gm: torch.fx.GraphModule) -> None:
    """FSDP2 reduce-scatters dense gradients only: a table looked up with sparse=True (nn.Embedding /
    nn.EmbeddingBag(sparse=True)) would fail inside its backward on one rank and leave the others
    waiting. Refused before anything runs (on every rank alike: the whole captured graph), naming
    the table and the fix."""
    sparse = sparse_gradient_tables(gm)
    if sparse:
        raise RuntimeConfigError(f"compile_parallel(data_parallel='fsdp'): '{sparse[0]}' is looked up with sparse=True "
                                 "(nn.Embedding / nn.EmbeddingBag(sparse=True)), and FSDP2 cannot reduce-scatter its "
                                 "sparse gradient; pass data_parallel='replicate' (the gradient stays sparse) or "
                                 "build the table with sparse=False.")


def sparse_gradient_tables(gm: torch.fx.GraphModule) -> list[str]:
    """FQNs of the trainable parameters `gm` looks up with sparse=True (their gradients are sparse)."""
    out: list[str] = []
    for n in gm.graph.nodes:
        i = _SPARSE_ARG.get(n.target) if n.op == "call_function" else None
        if i is None or not (n.args[i] if len(n.args) > i else n.kwargs.get("sparse", False)):
            continue
        table = n.args[0]
        while isinstance(table, torch.fx.Node) and table.op != "get_attr" and table.all_input_nodes:
            table = table.all_input_nodes[0]  # through a cast (mixed precision)
        if not (isinstance(table, torch.fx.Node) and table.op == "get_attr"):
            out.append(str(n.args[0]))
        elif get_attr(gm, table.target).requires_grad and table.target not in out:  # frozen: no gradient
            out.append(table.target)
    return out


def parameter_sharing_groups(graph_modules: dict[int, nn.Module]) -> list[list[int]]:
    """The local stages in groups such that no two groups share a parameter (a tied weight read by
    two local stages puts them in one group), each group sorted, the groups by their first stage."""
    params = {k: {id(p) for p in gm.parameters()} for k, gm in graph_modules.items()}
    groups: list[set[int]] = []
    for k in sorted(graph_modules):
        joined = [g for g in groups if any(params[j] & params[k] for j in g)]
        groups = [g for g in groups if g not in joined] + [{k}.union(*joined)]
    return sorted(sorted(g) for g in groups)


def _post_backward(module: nn.Module, finalize: bool) -> None:
    """Run FSDP2's end of backward for `module`'s groups (the root's final callback too when
    `finalize`): the executor's partial backwards (torch.autograd.backward per microbatch) do not
    tell FSDP which one is the last. As torch.distributed.pipelining's perform_reduce_grad."""
    from torch.distributed.fsdp import fully_shard  # it holds the state of the modules it wrapped
    state = fully_shard.state(module)
    if not finalize:
        for group in state._fsdp_param_groups:
            group.post_backward()
        return
    for each in state._state_ctx.all_states:
        for group in each._fsdp_param_groups:
            group.post_backward()
    state._root_post_backward_final_callback()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP-sharded or replicated); a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor split over ranks (not replicated)."""
    placements = getattr(t, "placements", ())
    return any(p.is_shard() for p in placements)


def copy_full_(t: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the whole tensor `full` into `t`: for a DTensor, this rank's part of it (no communication:
    every rank has `full`)."""
    if hasattr(t, "to_local"):
        from torch.distributed.tensor import distribute_tensor  # lazy: only sharded (DTensor) state needs it
        part = distribute_tensor(full.to(t.device, t.dtype), t.device_mesh, t.placements, src_data_rank=None)
        t.to_local().copy_(part.to_local())
    else:
        t.copy_(full)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind `t` (a DTensor is gathered: every rank of its mesh must call this)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
