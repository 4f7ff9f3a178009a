"""Pipeline schedules as data (INTERFACE: implementation pending).

A schedule is, per rank, an ordered list of compute actions. Communication is
derived from the plan (which stage needs which value) by the executor and the
simulator, so the same schedule serves chains and DAG plans alike: stage k is
taken to depend on every stage before it.
"""
from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")


@dataclass(frozen=True)
class Action:
    """One compute action: "F" (forward) or "B" (backward) of `stage` on `microbatch`.

    str(action) is the compact form of torch.distributed.pipelining, e.g. "0F3".
    """

    stage: int
    kind: str  # "F" | "B"
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists. Stage k lives on rank stage_rank[k]."""

    name: str
    num_ranks: int
    num_stages: int
    microbatches: int
    stage_rank: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]  # actions[r] = rank r's actions in order


def make_schedule(name: str, num_ranks: int, microbatches: int, chunks: int = 1) -> Schedule:
    """Generate gpipe, 1f1b or interleaved-1f1b (Megatron order)."""
    raise NotImplementedError


def validate(schedule: Schedule) -> None:
    """Raise ScheduleError unless every action runs exactly once and no rank deadlocks."""
    raise NotImplementedError
