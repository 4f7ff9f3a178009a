"""Which tensors every action sends and receives, derived from the split and the schedule.

F(k, mb) receives each value stage k reads from an earlier stage and sends each
of its outputs to every consumer stage. B(k, mb) receives the gradient of each
output from every consumer and sends the gradient of each received input back
to its producer (values that carry no gradient send none).

Every rank computes the same CommPlan, so both ends of a channel (src rank ->
dst rank) agree on the order of its messages: the order the receiver needs
them in (its actions in schedule order, each action's receives in a fixed
order). Sends and receives issued in that order match one to one, for NCCL
(which matches P2P ops in issue order and ignores tags) and gloo alike. The
sender, whose own order can differ (on rank 1 of an interleaved p = 2 plan,
activations for stage 2 and gradients for stage 0 mix), holds a message back
until the ones before it on its channel are sent; the receiver then never has
to post a receive before it needs it just to reach a later one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from partitioner.passes.split import StageModule
from partitioner.runtime.schedules import Action, Schedule


@dataclass(frozen=True)
class Message:
    """One tensor from stage src_stage to stage dst_stage: an activation ("act") or a gradient ("grad")."""

    kind: str
    value: str
    src_stage: int
    dst_stage: int
    microbatch: int
    src_rank: int
    dst_rank: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return (f"{self.kind} '{self.value}' of microbatch {self.microbatch} from stage {self.src_stage} "
                f"(rank {self.src_rank}) to stage {self.dst_stage} (rank {self.dst_rank})")


@dataclass
class CommPlan:
    """sends/recvs per action; channels[(src_rank, dst_rank)] = cross-rank messages in the receiver's order."""

    sends: dict[Action, list[Message]] = field(default_factory=dict)
    recvs: dict[Action, list[Message]] = field(default_factory=dict)
    channels: dict[tuple[int, int], list[Message]] = field(default_factory=dict)


def build_comm_plan(stages: list[StageModule], schedule: Schedule) -> CommPlan:
    """Messages of every action of `schedule` (which may hold forwards only, for inference)."""
    plan = CommPlan()
    for row in schedule.actions:
        for a in row:
            plan.sends[a], plan.recvs[a] = _messages(stages, a)
    for r, row in enumerate(schedule.actions):
        for a in row:
            for msg in plan.recvs[a]:
                if msg.src_rank != r:
                    plan.channels.setdefault((msg.src_rank, r), []).append(msg)
    return plan


def _messages(stages: list[StageModule], a: Action) -> tuple[list[Message], list[Message]]:
    st = stages[a.stage]
    sends: list[Message] = []
    recvs: list[Message] = []

    def msg(kind: str, value: str, src: int, dst: int) -> Message:
        m = st.value_meta[value]
        return Message(kind, value, src, dst, a.microbatch, stages[src].rank, stages[dst].rank, m.shape, m.dtype)

    if a.kind == "F":
        for v in st.received():
            recvs.append(msg("act", v, st.input_sources[v], a.stage))
        for v in st.outputs:
            for j in st.output_consumers[v]:
                sends.append(msg("act", v, a.stage, j))
    else:
        for v in st.outputs:
            if st.value_meta[v].requires_grad:
                for j in st.output_consumers[v]:
                    recvs.append(msg("grad", v, j, a.stage))
        for v in st.received():
            if st.value_meta[v].requires_grad:
                sends.append(msg("grad", v, a.stage, st.input_sources[v]))
    return sends, recvs


def forward_only(schedule: Schedule) -> Schedule:
    """The forwards of `schedule`, microbatch by microbatch (inference): rank r runs
    F(k, mb) for mb in order and, within a microbatch, its stages in order."""
    rows = []
    for r in range(schedule.num_ranks):
        local = [k for k in range(schedule.num_stages) if schedule.stage_rank[k] == r]
        rows.append(tuple(Action(k, "F", mb) for mb in range(schedule.microbatches) for k in local))
    return Schedule("forward", schedule.num_ranks, schedule.num_stages, schedule.microbatches,
                    schedule.stage_rank, tuple(rows))
