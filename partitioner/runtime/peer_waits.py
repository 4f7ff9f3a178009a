"""Every wait on other ranks ends within compile_parallel's timeout_s, with an error naming them.

A rank that raises mid-step (its loss_fn, a NaN check in its script) or hangs leaves its peers waiting
in whatever they do next with it: a receive (runtime/transport.py names the peer), or a collective
the step runs: the loss's all-reduce, clipping's norm, a tied weight's gradient, the data-parallel
reduce. Those ran on the default group or the user's mesh, whose timeout is torch's default (30
minutes on gloo) unless the script set one, and their errors name no rank. Here each such collective
waits at most timeout_s (gloo: `work.wait(timeout)`; NCCL keeps its watchdog, as the transport does:
a timed wait would block the host on the GPU) and its error names the collective, this rank, the
ranks it waited for, and the setting; the data-parallel groups are this module's own, made with
timeout_s, so that FSDP2's waits inside its hooks end in time too.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from partitioner.errors import RuntimeConfigError


@dataclass(frozen=True)
class PeerWaits:
    """How long this process (global `rank`) waits for its peers, and how it says whom it waited for."""

    rank: int
    timeout_s: float

    def all_reduce(self, t: torch.Tensor, what: str, group: Any = None, peers: Sequence[int] | None = None,
                   op: Any = dist.ReduceOp.SUM, hint: str = "") -> None:
        """dist.all_reduce of `t` over `group` (default: every rank), waited for at most timeout_s."""
        work = dist.all_reduce(t, op=op, group=group, async_op=True)
        self.wait(work, what, self._peers(group) if peers is None else peers, hint)

    def wait(self, work: Any, what: str, peers: Sequence[int], hint: str = "") -> None:
        with self.naming(what, peers, hint):
            wait_within(work, timedelta(seconds=self.timeout_s), nccl=dist.get_backend() == "nccl")

    @contextlib.contextmanager
    def naming(self, what: str, peers: Sequence[int], hint: str = "") -> Iterator[None]:
        """Turn a failed or timed-out collective inside into a RuntimeConfigError naming `peers`."""
        try:
            yield
        except RuntimeConfigError:
            raise
        except RuntimeError as err:
            others = [r for r in peers if r != self.rank]
            who = f"rank {others[0]}" if len(others) == 1 else f"ranks {others}"
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeConfigError(
                f"rank {self.rank}: {what} with {who} did not complete within {self.timeout_s:g} s ({cause}): "
                f"{who} raised, exited or is stuck; check the log of {who}.{hint} compile_parallel(timeout_s=) "
                "sets how long a rank waits for its peers.") from err

    @staticmethod
    def _peers(group: Any) -> list[int]:
        return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))


def wait_within(work: Any, timeout: timedelta, nccl: bool) -> None:
    """work.wait(), at most `timeout` on gloo. NCCL's wait() only orders the compute stream after the
    transfer: a timeout argument would block the CPU until the GPU finishes, stalling the next kernels;
    the process group's own watchdog still catches a dead peer."""
    if nccl:
        work.wait()
    else:
        work.wait(timeout)


def dp_group(replicas: tuple[tuple[int, ...], ...], pp_rank: int, timeout_s: float) -> tuple[Any, list[int]]:
    """This rank's data-parallel group (the global ranks of pipeline rank `pp_rank` in every replica),
    made with timeout_s, and its ranks. Every rank makes every pipeline rank's group, in the same order."""
    mine: tuple[Any, list[int]] | None = None
    for r in range(len(replicas[0])):
        ranks = [row[r] for row in replicas]
        group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s))
        if r == pp_rank:
            mine = (group, ranks)
    assert mine is not None
    return mine


def dp_mesh(group: Any, device_type: str) -> Any:
    """A 1-D DeviceMesh ("dp",) over `group`, for FSDP2."""
    from torch.distributed.device_mesh import DeviceMesh
    return DeviceMesh.from_group(group, device_type, mesh_dim_names=("dp",))
