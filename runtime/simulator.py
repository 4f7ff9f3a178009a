"""Event simulator of a Schedule with per-stage costs (INTERFACE: implementation pending)."""
from __future__ import annotations

from dataclasses import dataclass, field

from runtime.schedules import Action, Schedule


@dataclass(frozen=True)
class StageCosts:
    """Per-microbatch costs of every virtual stage, as the simulator needs them.

    comm_time_s[j][k]: time to move stage j's values that stage k reads (j < k),
    paid when j and k sit on different ranks (the same for the gradient back).
    saved_bytes[k]: activations stage k keeps per in-flight microbatch.
    static_bytes[r]: parameters + grads + optimizer state on rank r.
    """

    fwd_time_s: tuple[float, ...]
    bwd_time_s: tuple[float, ...]
    comm_time_s: tuple[tuple[float, ...], ...]
    saved_bytes: tuple[int, ...]
    static_bytes: tuple[int, ...] = ()


@dataclass
class Timeline:
    """Start/end of every action, and what follows from them."""

    schedule: Schedule
    start_s: dict[Action, float]
    end_s: dict[Action, float]
    step_time_s: float
    bubble: float  # idle fraction over all ranks: 1 - busy / (num_ranks * step_time)
    peak_inflight: list[int]  # per rank: max microbatch-chunks with saved activations
    peak_mem_bytes: list[int] = field(default_factory=list)

    def order(self) -> list[Action]:
        """All actions in start-time order: a valid single-process execution order."""
        return sorted(self.start_s, key=lambda a: (self.start_s[a], a.stage))


def simulate(schedule: Schedule, costs: StageCosts) -> Timeline:
    """Play the schedule: each rank runs its actions in order, as soon as inputs arrive."""
    raise NotImplementedError
