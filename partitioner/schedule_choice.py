"""chunks="auto": plan one stage per rank (1F1B) and interleaved with 2 and 4 stages per rank, and keep
the one the simulator predicts fastest, interleaving only where it predicts a clear gain.

Interleaving shrinks the bubble but sends v times the messages, and under torchrun an NCCL send that
waits for its receiver holds SMs of the sender while it computes (DeviceSpec.waiting_send_slowdown_for;
runtime/simulator.py plays it): on 2 GPUs gpt2-xl in bf16 ran 4-7% slower interleaved, which the simulator
now predicts, while an fp32 chain ran 6% faster (benchmarks/RESULTS.md). The choice rests on those
predictions, so interleaving must win by INTERLEAVING_MARGIN, about the simulator's error on measured
pipelines."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

from partitioner.errors import PlanError

AUTO = "auto"
CHUNK_CANDIDATES = (1, 2, 4)
INTERLEAVING_MARGIN = 0.02  # interleaving must predict this fraction faster than 1F1B to be chosen

R = TypeVar("R")


@dataclass(frozen=True)
class ChunkChoice:
    """One candidate of chunks="auto": its predicted step, or why it could not be planned."""

    chunks: int
    step_time_s: float | None  # None: not plannable (see why)
    why_not: str = ""

    @property
    def schedule(self) -> str:
        return "1f1b" if self.chunks == 1 else "interleaved-1f1b"


def fixed_chunks(chunks: int | str, schedule: str | None) -> int:
    """The chunk count to validate a configuration with: 1 for "auto" (whose candidates are checked as
    they are planned), else `chunks`. PlanError for "auto" with a schedule, which it chooses itself."""
    if chunks != AUTO:
        if isinstance(chunks, str):
            raise PlanError(f"chunks={chunks!r}: pass a number of stages per rank (1, 2, ...) or 'auto'")
        return chunks
    if schedule is not None:
        raise PlanError(f"chunks='auto' chooses the schedule (1f1b or interleaved-1f1b) but schedule={schedule!r} "
                        "was given; leave the schedule unset, or give chunks a number")
    return 1


def choose_chunks(plan_one: Callable[[int, float], R], step_time_s: Callable[[R], float], num_ranks: int,
                  microbatches: int, time_limit_s: float) -> tuple[R, list[ChunkChoice]]:
    """Plan every candidate chunk count with plan_one(chunks, time_limit_s) (a PlanError skips it) and
    return the chosen result and every candidate's ChunkChoice. The solve time is shared among them."""
    candidates = CHUNK_CANDIDATES if num_ranks > 1 else (1,)
    results: dict[int, R] = {}
    choices: list[ChunkChoice] = []
    first_error: PlanError | None = None
    for chunks in candidates:
        if chunks > 1 and microbatches % num_ranks:
            choices.append(ChunkChoice(chunks, None, f"interleaving needs microbatches a multiple of {num_ranks}"))
            continue
        try:
            results[chunks] = plan_one(chunks, time_limit_s / len(candidates))
        except PlanError as err:
            first_error = first_error or err
            choices.append(ChunkChoice(chunks, None, str(err).splitlines()[0]))
            continue
        choices.append(ChunkChoice(chunks, step_time_s(results[chunks])))
    if not results:
        raise first_error or PlanError("chunks='auto': no candidate could be planned")
    interleaved = min((c for c in results if c > 1), key=lambda c: step_time_s(results[c]), default=None)
    chosen = 1 if 1 in results else interleaved
    if interleaved is not None and 1 in results and \
            step_time_s(results[interleaved]) < (1 - INTERLEAVING_MARGIN) * step_time_s(results[1]):
        chosen = interleaved
    return results[chosen], sorted(choices, key=lambda c: c.chunks)


def choice_line(choices: list[ChunkChoice], chosen: int) -> str:
    """One line saying what chunks="auto" compared and chose."""
    def one(c: ChunkChoice) -> str:
        name = "1f1b" if c.chunks == 1 else f"interleaved x{c.chunks}"
        return f"{name} {c.step_time_s * 1e3:.2f} ms" if c.step_time_s is not None else f"{name} ({c.why_not})"
    picked = "1f1b" if chosen == 1 else f"interleaved-1f1b with {chosen} stages per rank"
    return (f"chunks='auto': {', '.join(one(c) for c in choices)} predicted -> {picked} (interleaving must "
            f"predict {INTERLEAVING_MARGIN:.0%} faster)")
