"""Moving activations and gradients between stages.

A Transport delivers the Messages of a CommPlan. Sends never block compute;
receives can be posted before they are needed (`prefetch`) and are waited for
in `recv`. Shapes and dtypes come from the captured graph, so no shape
handshake is needed.

- InProcessTransport: one process drives every stage; a message is the
  sender's tensor, detached and moved to the receiving stage's device.
- DistTransport: torch.distributed P2P (isend/irecv; NCCL on GPUs, gloo on
  CPU). One process group per ordered pair of ranks (src -> dst), created in
  the same order on every rank. Both ends issue a channel's messages in the
  CommPlan's order for it, the order the receiver needs them in: that is what
  NCCL's in-order matching needs and what keeps gloo's tag-free matching
  correct. A message produced before an earlier one of its channel waits on
  the sender (`held`) until that one is sent. So a receive is never posted
  before it is needed only to reach a later message, which would hold a
  buffer the plan's memory does not count. Holding back never deadlocks:
  the receiver takes the channel's messages in that order, so every message
  before the one it waits for has been sent already. Every group has a
  timeout: a dead or stuck peer raises a RuntimeConfigError naming it
  instead of hanging.

When receives are posted: on gloo, `prefetch` posts them early, so the
transfer runs in gloo's threads while this rank computes. On NCCL it does not
(`post_early=False`): an irecv launches an NCCL kernel once the compute queued
before it ends, and that kernel spins on SMs until the peer's send arrives,
i.e. through the whole next computation. Measured on 2 H200s (1F1B, fp32
GEMMs): forwards 22 -> 34 ms, backwards 45 -> 61 ms, step 604 -> 708 ms.
Posted when needed (as torch.distributed.pipelining does), the kernel starts
after the previous computation and only waits for the peer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from partitioner.errors import RuntimeConfigError
from partitioner.runtime.comm_plan import CommPlan, Message
from partitioner.runtime.peer_waits import wait_within


class Transport(ABC):
    """Delivers the messages of one CommPlan at a time (set with `begin`)."""

    def begin(self, comm: CommPlan) -> None:
        """Start a step (or an inference pass) that runs the actions of `comm`."""

    @abstractmethod
    def send(self, msg: Message, tensor: torch.Tensor) -> None:
        """Send `tensor` as `msg`; returns at once."""

    def prefetch(self, msgs: list[Message]) -> None:
        """`msgs` will be received soon: a transport may post their receives now (waited for in `recv`)."""

    @abstractmethod
    def recv(self, msg: Message) -> torch.Tensor:
        """The tensor of `msg` (a fresh tensor the caller owns, not part of any autograd graph)."""

    def finish(self) -> None:
        """Wait for every send of the step and check that every message was received."""


class InProcessTransport(Transport):
    """Every stage in this process: a mailbox of tensors, moved to `stage_device[dst_stage]`."""

    def __init__(self, stage_device: dict[int, torch.device]):
        self.stage_device = stage_device
        self.mailbox: dict[Message, torch.Tensor] = {}

    def send(self, msg: Message, tensor: torch.Tensor) -> None:
        self.mailbox[msg] = tensor.detach().to(self.stage_device[msg.dst_stage])

    def recv(self, msg: Message) -> torch.Tensor:
        if msg not in self.mailbox:
            raise RuntimeConfigError(f"in-process pipeline: {msg} was not sent before it was needed; the action "
                                     "order does not respect the data flow between stages.")
        return self.mailbox.pop(msg)

    def finish(self) -> None:
        if self.mailbox:
            left = next(iter(self.mailbox))
            self.mailbox.clear()
            raise RuntimeConfigError(f"in-process pipeline: {left} (and maybe others) was sent but never received.")


class DistTransport(Transport):
    """torch.distributed P2P between this rank and its peers (see module docstring).

    channels: every (src_rank, dst_rank) pair that will ever carry a message, the
    same list on every rank (groups are created in its sorted order).
    replicas: with data parallelism, replicas[d][r] is the global rank of pipeline rank r in
    replica d (runtime/data_parallel.py), the same table on every rank; `rank` and the messages'
    ranks are pipeline ranks, and this process is in replica `replica`. None: one pipeline whose
    ranks are the global ranks.
    post_early: whether `prefetch` posts receives before they are needed; default
    True on CPU (gloo), False on CUDA (NCCL), see the module docstring.
    hold_sends: keep every sent tensor until `finish` instead of letting go of it once its
    transfer completes. Stages under CUDA graphs need it: whether a transfer has completed
    depends on timing, and the graphs replay only where the same tensors are alive at the same
    points of every step (runtime/cudagraph_trees.py).
    """

    def __init__(self, rank: int, device: torch.device, channels: list[tuple[int, int]],
                 timeout_s: float = 300.0, backend: str | None = None, post_early: bool | None = None,
                 replicas: tuple[tuple[int, ...], ...] | None = None, replica: int = 0, hold_sends: bool = False):
        self.rank = rank
        self.hold_sends = hold_sends
        self.device = torch.device(device)
        self.post_early = self.device.type != "cuda" if post_early is None else post_early
        self.timeout = timedelta(seconds=timeout_s)
        self.groups: dict[tuple[int, int], dist.ProcessGroup] = {}
        pairs = sorted(set(channels))
        if replicas is None:
            replicas = (tuple(range(1 + max([rank, *(r for pair in pairs for r in pair)]))),)
        self.global_rank = replicas[replica]  # pipeline rank -> global rank, in this process's replica
        for d, row in enumerate(replicas):  # every rank creates every replica's groups, in the same order
            for src, dst in pairs:
                group = dist.new_group([row[src], row[dst]], timeout=self.timeout, backend=backend)
                if d == replica and self.rank in (src, dst):
                    self.groups[(src, dst)] = group
        self._connect()
        self.local: dict[Message, torch.Tensor] = {}
        self.pending_sends: deque[tuple[dist.Work, torch.Tensor, Message]] = deque()
        self.incoming: dict[int, list[Message]] = {}  # src rank -> messages in channel order
        self.outgoing: dict[int, list[Message]] = {}  # dst rank -> messages in channel order
        self.position: dict[Message, int] = {}  # a message's place on its channel (either way)
        self.next_post: dict[int, int] = {}
        self.next_send: dict[int, int] = {}
        self.posted: dict[Message, tuple[dist.Work, torch.Tensor]] = {}
        self.held: dict[Message, torch.Tensor] = {}  # produced, waiting for earlier messages of the channel

    def _check_planned(self, msg: Message) -> None:
        if msg not in self.position:
            raise RuntimeConfigError(f"rank {self.rank}: {msg} is not in the communication plan of this step.")

    def _connect(self) -> None:
        """One blocking send/recv per channel, in the same global order on every rank: NCCL creates a
        P2P communicator lazily and blocks until both ranks join, so a receive posted early on a fresh
        channel could otherwise wait for a peer that waits for us. Also checks every peer is there."""
        for (src, dst), group in sorted(self.groups.items()):
            probe = torch.zeros(1, device=self.device)
            try:
                if self.rank == src:
                    dist.send(probe, dst=self.global_rank[dst], group=group)
                else:
                    dist.recv(probe, src=self.global_rank[src], group=group)
            except Exception as err:
                peer = dst if self.rank == src else src
                raise RuntimeConfigError(f"rank {self.rank}: could not connect to rank {peer} within "
                                         f"{self.timeout.total_seconds():.0f} s ({str(err).splitlines()[0]}); "
                                         f"check that rank {peer} is running the same program.") from err

    def begin(self, comm: CommPlan) -> None:
        self.incoming = {src: msgs for (src, dst), msgs in comm.channels.items() if dst == self.rank}
        for (src, dst) in comm.channels:
            if self.rank in (src, dst) and (src, dst) not in self.groups:
                raise RuntimeConfigError(f"rank {self.rank}: no process group for messages from rank {src} to rank "
                                         f"{dst}; build the DistTransport with every channel of every CommPlan.")
        self.outgoing = {dst: msgs for (src, dst), msgs in comm.channels.items() if src == self.rank}
        self.position = {m: i for msgs in [*self.incoming.values(), *self.outgoing.values()]
                         for i, m in enumerate(msgs)}
        self.next_post = {src: 0 for src in self.incoming}
        self.next_send = {dst: 0 for dst in self.outgoing}

    def send(self, msg: Message, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if msg.dst_rank == self.rank:
            self.local[msg] = tensor
            return
        self._check_planned(msg)
        dst, queue = msg.dst_rank, self.outgoing[msg.dst_rank]
        self.held[msg] = tensor.contiguous()
        group = self.groups[(self.rank, dst)]
        while self.next_send[dst] < len(queue) and queue[self.next_send[dst]] in self.held:
            m = queue[self.next_send[dst]]
            t = self.held.pop(m)
            self.pending_sends.append((dist.isend(t, dst=self.global_rank[dst], group=group), t, m))
            self.next_send[dst] += 1
        while not self.hold_sends and self.pending_sends and self.pending_sends[0][0].is_completed():
            self._wait(*self.pending_sends.popleft())

    def prefetch(self, msgs: list[Message]) -> None:
        if self.post_early:
            self._post(msgs)

    def _post(self, msgs: list[Message]) -> None:
        """Post the receives of `msgs`, and of every message before them on their channels."""
        for msg in msgs:
            if msg.src_rank == self.rank:
                continue
            self._check_planned(msg)
            src, queue = msg.src_rank, self.incoming[msg.src_rank]
            group = self.groups[(src, self.rank)]
            while self.next_post[src] <= self.position[msg]:
                m = queue[self.next_post[src]]
                buf = torch.empty(m.shape, dtype=m.dtype, device=self.device)
                self.posted[m] = (dist.irecv(buf, src=self.global_rank[src], group=group), buf)
                self.next_post[src] += 1

    def recv(self, msg: Message) -> torch.Tensor:
        if msg.src_rank == self.rank:
            if msg not in self.local:
                raise RuntimeConfigError(f"rank {self.rank}: {msg} was not produced before it was needed; "
                                         "the schedule runs a consumer before its producer.")
            return self.local.pop(msg)
        self._post([msg])
        work, buf = self.posted.pop(msg)
        self._wait(work, buf, msg)
        return buf

    def finish(self) -> None:
        while self.pending_sends:
            self._wait(*self.pending_sends.popleft())
        left = [m for m in self.posted] + list(self.local)
        left += [q[i] for src, q in self.incoming.items() for i in range(self.next_post[src], len(q))]
        unsent = [q[i] for dst, q in self.outgoing.items() for i in range(self.next_send[dst], len(q))]
        self.posted.clear()
        self.local.clear()
        self.held.clear()
        if left:
            raise RuntimeConfigError(f"rank {self.rank}: {len(left)} message(s) were never received, e.g. {left[0]}.")
        if unsent:
            raise RuntimeConfigError(f"rank {self.rank}: {len(unsent)} message(s) were never sent, e.g. {unsent[0]}.")

    def _wait(self, work: dist.Work, tensor: torch.Tensor, msg: Message) -> None:
        def name(r: int) -> str:  # under data parallelism the process to look at is the global rank
            return f"rank {r}" if self.global_rank[r] == r else f"rank {self.global_rank[r]} (pipeline rank {r})"
        peer = name(msg.dst_rank if msg.src_rank == self.rank else msg.src_rank)
        verb = "sending" if msg.src_rank == self.rank else "receiving"
        try:
            wait_within(work, self.timeout, nccl=self.device.type == "cuda")
        except Exception as err:
            raise RuntimeConfigError(
                f"{name(self.rank)}: {verb} {msg} failed: {peer} did not answer within "
                f"{self.timeout.total_seconds():g} s or has died ({str(err).splitlines()[0] if str(err) else err!r}). "
                f"Check the log of {peer}.") from err
