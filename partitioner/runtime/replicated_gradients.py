"""Replicated data parallelism (data_parallel="replicate"): whole parameters on every replica,
gradients averaged with one all-reduce per stage group.

Each replica accumulates its microbatches' gradients into .grad exactly as a lone pipeline does
(autograd's AccumulateGrad, or the executor's foreach add for compiled stages). When the step's
last backward of a stage is done (of every stage of its group: local stages that share a
parameter are one group, so a tied weight is reduced once), its gradients are packed into one
flat buffer per device and dtype and all-reduced over the dp group without waiting, so the
reduction overlaps the rank's remaining backwards; after the step each buffer is waited for,
divided by dp and copied back into .grad. Which parameters have a gradient (not frozen, reached
by a backward) is read every step; a sparse gradient is reduced dense and handed back sparse.
Each replica's loss is the mean over its share of the batch, so the average is the gradient of
the mean loss over the global batch.

Nothing hooks the stage modules and no parameter moves: stages under CUDA graphs, which replay
on the addresses they recorded, and the foreach gradient accumulation work as without data
parallelism. FSDP2 (runtime/data_parallel.py, data_parallel="fsdp") gathers the parameters into
new memory every step and needs AccumulateGrad's hooks. The flat buffers are the memory
data_parallel_costs counts as replicate's second whole copy of the trainable parameters.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors

from partitioner.runtime.data_parallel import parameter_sharing_groups
from partitioner.runtime.peer_waits import PeerWaits


class ReplicatedStages:
    """This rank's stages, their gradients averaged over the dp group (see module docstring).

    runners: what the executor calls per stage (the stages' own runners: no hooks).
    groups: stage -> its group index, where a stage shares no parameter with another local stage
    (those are reduced as soon as that stage's last backward is done).
    """

    needs_accumulate_grad = False  # the executor may add a backward's gradients with one foreach add

    def __init__(self, graph_modules: dict[int, nn.Module], runners: dict[int, Callable], group: Any, dp: int,
                 peer_waits: PeerWaits | None = None, peers: list[int] | None = None):
        self.runners = dict(runners)
        self.process_group = group
        self.dp = dp
        self._waits, self._peers = peer_waits, peers  # the reduce waits at most timeout_s for the replicas
        members = parameter_sharing_groups(graph_modules)
        self._group_of = {k: i for i, ks in enumerate(members) for k in ks}
        self._stages_in = [len(ks) for ks in members]
        # every parameter, frozen ones too: a parameter unfrozen after compile_parallel is reduced from then on
        self._params = [_unique_parameters([graph_modules[k] for k in ks]) for ks in members]
        self.groups = {k: i for i, ks in enumerate(members) if len(ks) == 1 and len(members) > 1 for k in ks}
        self._left: list[int] = []
        self._pending: list[tuple[Any, torch.Tensor, list[nn.Parameter], list[torch.Size], list[bool]]] = []

    def with_hooks(self, key: str, fn: Callable) -> Callable:
        """`fn` as it is: nothing wraps the stages."""
        return fn

    def before_step(self) -> None:
        self._left = list(self._stages_in)
        self._pending.clear()

    def stage_backward_done(self, stage: int) -> None:
        """The step's last backward of `stage` is done: once its whole group is, start reducing it."""
        i = self._group_of[stage]
        self._left[i] -= 1
        if self._left[i] == 0:
            self._reduce(i)

    def after_step(self) -> None:
        """Wait for every reduction (starting those of groups no backward closed), average, write back."""
        for i, left in enumerate(self._left):
            if left > 0:
                self._left[i] = 0
                self._reduce(i)
        with torch.no_grad():
            for work, flat, params, shapes, sparse in self._pending:
                if self._waits is not None:
                    self._waits.wait(work, "the data-parallel gradient all-reduce", self._peers)
                else:
                    work.wait()
                flat.div_(self.dp)
                parts = iter(c.view(shape) for c, shape in zip(flat.split([s.numel() for s in shapes]), shapes))
                dense, averaged = [], []
                for p, is_sparse in zip(params, sparse):
                    part = next(parts)
                    if is_sparse:  # over the rows any replica touched (the mask packed after it)
                        p.grad = _sparse_rows(part, next(parts))
                    else:  # the executor may have replaced a .grad since it was packed: copy into the current one
                        dense.append(p.grad)
                        averaged.append(part)
                if dense:
                    torch._foreach_copy_(dense, averaged)
        self._pending.clear()

    def unshard(self) -> None:
        """Nothing to gather: every replica holds the whole parameters."""

    def reshard(self) -> None:
        """Nothing to free."""

    def _reduce(self, i: int) -> None:
        """Start the all-reduce of group i's gradients: the parameters that have one (frozen ones and
        those no backward reached have none, the same on every replica: the same graph runs there).
        A sparse gradient (nn.Embedding(sparse=True)) goes in dense, followed by a mask of the rows
        it touches, and comes back sparse over the rows any replica touched, as DDP keeps it."""
        buckets: dict[tuple[torch.device, torch.dtype], tuple[list, list, list]] = {}
        with torch.no_grad():
            for p in self._params[i]:
                if p.grad is None:
                    continue
                params, packed, sparse = buckets.setdefault((p.grad.device, p.grad.dtype), ([], [], []))
                params.append(p)
                sparse.append(p.grad.is_sparse)
                packed.extend(_sparse_parts(p.grad) if p.grad.is_sparse else [p.grad])
            for params, packed, sparse in buckets.values():
                flat = _flatten_dense_tensors(packed)
                work = dist.all_reduce(flat, group=self.process_group, async_op=True)
                self._pending.append((work, flat, params, [t.shape for t in packed], sparse))


def _unique_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def _sparse_parts(grad: torch.Tensor) -> list[torch.Tensor]:
    """A sparse gradient as what is all-reduced: its dense values and a mask of the rows (entries of its
    sparse dims) it holds."""
    grad = grad.coalesce()
    mask = torch.zeros(grad.shape[:grad.sparse_dim()], device=grad.device, dtype=grad.dtype)
    mask[tuple(grad.indices())] = 1
    return [grad.to_dense(), mask]


def _sparse_rows(dense: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The averaged gradient `dense` as a coalesced sparse tensor over the rows `mask` marks (summed
    over replicas: nonzero where any replica touched the row)."""
    rows = mask.nonzero().t()
    return torch.sparse_coo_tensor(rows, dense[tuple(rows)], dense.shape, is_coalesced=True, check_invariants=False)
