"""partitioner/runtime/transport.py: in-process mailbox; gloo P2P in the channel's order, dead peers named."""
from __future__ import annotations

import os

import pytest
import torch
from dist_utils import run_workers

from partitioner.errors import RuntimeConfigError
from partitioner.runtime.comm_plan import CommPlan, Message
from partitioner.runtime.transport import DistTransport, InProcessTransport


def msg(i: int, src: int, dst: int, shape=(2, 3), dtype=torch.float32, kind="act") -> Message:
    return Message(kind, f"v{i}", src, dst, 0, src, dst, shape, dtype)


def test_in_process_transport_detaches_and_checks_delivery():
    t = InProcessTransport({0: torch.device("cpu"), 1: torch.device("cpu")})
    x = torch.randn(2, 3, requires_grad=True) * 2
    t.send(msg(0, 0, 1), x)
    got = t.recv(msg(0, 0, 1))
    assert got.grad_fn is None and not got.requires_grad and torch.equal(got, x)
    with pytest.raises(RuntimeConfigError, match="not sent"):
        t.recv(msg(1, 0, 1))
    t.send(msg(2, 0, 1), x)
    with pytest.raises(RuntimeConfigError, match="never received"):
        t.finish()


def _channels():
    """Rank 0 -> 1: five tensors of different shapes/dtypes; 1 -> 0: two; and one local message."""
    forward = [msg(i, 0, 1, shape=(i + 1, 2), dtype=torch.float32 if i % 2 else torch.int64) for i in range(5)]
    backward = [msg(10 + i, 1, 0, shape=(3,), kind="grad") for i in range(2)]
    return CommPlan(channels={(0, 1): forward, (1, 0): backward}), forward, backward


def _value(m: Message) -> torch.Tensor:
    return torch.full(m.shape, int(m.value[1:]), dtype=m.dtype)


def _exchange_then_die(rank: int, world: int, post_early) -> tuple[list[bool], str]:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    comm, forward, backward = _channels()
    t = DistTransport(rank, torch.device("cpu"), list(comm.channels), timeout_s=10, post_early=post_early)
    assert t.post_early == (post_early is None or post_early)  # CPU default: post receives early
    t.begin(comm)
    ok = []
    if rank == 0:
        for m in forward:
            t.send(m, _value(m))
        local = msg(99, 0, 0)
        t.send(local, _value(local))
        t.prefetch(backward)
        ok += [torch.equal(t.recv(m), _value(m)) for m in reversed(backward)]
        ok.append(torch.equal(t.recv(local), _value(local)))
    else:
        for m in backward:
            t.send(m, _value(m))
        # wait in another order than the channel's: receives are still posted in its order
        ok += [torch.equal(t.recv(m), _value(m)) for m in [forward[3], forward[0], forward[4], forward[1], forward[2]]]
    t.finish()
    # second round: rank 1 dies without sending; rank 0 must name it instead of hanging
    t.begin(comm)
    if rank == 1:
        dist.barrier()
        os._exit(0 if ok == [True] * 5 else 3)  # a wrong receive fails the run through the exit code
    dist.barrier()
    try:
        t.recv(backward[0])
    except RuntimeConfigError as err:
        return ok, str(err)
    return ok, "no error"


@pytest.mark.parametrize("post_early", [None, False])  # None: CPU default (early); False: NCCL's just-in-time
def test_dist_transport_matches_messages_in_the_channels_order_and_names_dead_peers(post_early):
    results = run_workers(_exchange_then_die, 2, post_early, timeout_s=90)
    ok, error = results[0]
    assert ok == [True] * 3 and results[1] is None
    assert "rank 1" in error and "failed" in error, error


def _send_out_of_order(rank: int, world: int, _=None) -> tuple[list[bool], list[int]]:
    """Rank 0 produces the channel's messages last first; rank 1 receives them in the channel's order."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    comm, forward, backward = _channels()
    t = DistTransport(rank, torch.device("cpu"), list(comm.channels), timeout_s=10, post_early=False)
    t.begin(comm)
    ok, held = [], []
    if rank == 0:
        for m in reversed(forward):
            t.send(m, _value(m))
            held.append(len(t.held))  # nothing goes out before forward[0] does
        try:
            t.send(msg(77, 0, 1), torch.zeros(2, 3))
        except RuntimeConfigError as err:
            ok.append("not in the communication plan" in str(err))
        for m in backward:
            t.recv(m)
    else:
        for m in forward:
            got = t.recv(m)
            ok.append(torch.equal(got, _value(m)) and not t.posted)  # no receive posted ahead
        for m in backward:
            t.send(m, _value(m))
    t.finish()
    return ok, held


def test_dist_transport_holds_a_send_until_the_earlier_messages_of_its_channel_are_sent():
    results = run_workers(_send_out_of_order, 2, timeout_s=90)
    assert results[0] == ([True], [1, 2, 3, 4, 0])  # True: a message outside the plan is refused
    assert results[1] == ([True] * 5, [])


class _DoneWork:
    """A transfer that has completed (what NCCL's work reports once the GPU is past it)."""

    def is_completed(self) -> bool:
        return True

    def wait(self, *args) -> bool:
        return True


@pytest.mark.parametrize("hold", [False, True])
def test_dist_transport_holds_sent_tensors_until_finish_for_cuda_graphs(monkeypatch, hold):
    """hold_sends (stages under CUDA graphs): completed sends are kept until finish, so the tensors
    alive at each point of a step do not depend on how fast the transfers went."""
    monkeypatch.setattr(DistTransport, "_connect", lambda self: None)
    monkeypatch.setattr("torch.distributed.new_group", lambda *args, **kwargs: None)
    monkeypatch.setattr("torch.distributed.isend", lambda *args, **kwargs: _DoneWork())
    comm, forward, _ = _channels()
    t = DistTransport(0, torch.device("cpu"), list(comm.channels), timeout_s=10, post_early=False, hold_sends=hold)
    t.begin(CommPlan(channels={(0, 1): forward}))
    kept = []
    for m in forward:
        t.send(m, _value(m))
        kept.append(len(t.pending_sends))
    t.finish()
    assert kept == ([1, 2, 3, 4, 5] if hold else [0, 0, 0, 0, 0]) and not t.pending_sends
