"""PlanProblem: what the partition search is asked to solve, and the checks on its shape.

One frozen value, passed whole from solve() to the ILP, the seeds, the local search and the
row generation in place of the seven arguments each of them used to take.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from partitioner.errors import PlanError
from partitioner.runtime.schedules import SCHEDULES, warmup_microbatches

if TYPE_CHECKING:
    from partitioner.passes.coarsen import BlockGraph

DEFAULT_LINK_BW_BYTES_PER_S = 50e9  # a conservative GPU-to-GPU point-to-point link (PCIe 5 / slow NVLink)


@dataclass(frozen=True, eq=False)
class PlanProblem:
    """Blocks to place on num_ranks x chunks virtual stages (stage k on rank k % num_ranks), run with
    `schedule` on `microbatches` microbatches, over links of link_bw_bytes_per_s, each rank within
    memory_cap_bytes (None: no cap). Build it with `PlanProblem.checked`, which fills in defaults.
    """

    block_graph: BlockGraph
    num_ranks: int
    chunks: int
    microbatches: int
    schedule: str
    link_bw_bytes_per_s: float = DEFAULT_LINK_BW_BYTES_PER_S
    memory_cap_bytes: int | None = None

    @classmethod
    def checked(cls, block_graph: BlockGraph, num_ranks: int, chunks: int = 1, microbatches: int | None = None,
                schedule: str | None = None, memory_cap_bytes: int | None = None,
                link_bw_bytes_per_s: float = DEFAULT_LINK_BW_BYTES_PER_S) -> PlanProblem:
        """The problem with check_config's defaults filled in; PlanError for a bad pipeline shape."""
        schedule, microbatches = check_config(len(block_graph.blocks), num_ranks, chunks, microbatches, schedule)
        return cls(block_graph, num_ranks, chunks, microbatches, schedule, link_bw_bytes_per_s, memory_cap_bytes)

    @property
    def num_stages(self) -> int:
        return self.num_ranks * self.chunks

    @property
    def num_blocks(self) -> int:
        return len(self.block_graph.blocks)

    def inflight(self) -> list[int]:
        """Per rank: microbatch-chunks alive at the peak (inflight_microbatches)."""
        return inflight_microbatches(self.schedule, self.num_ranks, self.microbatches, self.chunks)


def check_gap(gap: float) -> float:
    """`gap` (a fraction) if within [0, 1), else PlanError."""
    if not 0.0 <= gap < 1.0:
        raise PlanError(f"gap {gap * 100:g}% is outside 0-100%: give --gap as a percentage, e.g. --gap 1 "
                        "(stop once the plan is proven within 1% of the best possible)")
    return gap


def check_config(num_blocks: int, num_ranks: int, chunks: int = 1, microbatches: int | None = None,
                 schedule: str | None = None) -> tuple[str, int]:
    """Validate the pipeline shape; return (schedule, microbatches) with defaults filled in.

    Defaults: 1f1b (interleaved-1f1b when chunks > 1), 2 x num_ranks microbatches.
    """
    if num_ranks < 1:
        raise PlanError(f"--devices is {num_ranks}: a pipeline needs at least 1 device")
    if chunks < 1:
        raise PlanError(f"--chunks is {chunks}: every device needs at least 1 stage")
    if schedule is None:
        schedule = "interleaved-1f1b" if chunks > 1 else "1f1b"
    if schedule not in SCHEDULES:
        raise PlanError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if schedule == "1f1b" and chunks > 1:
        raise PlanError(f"schedule '1f1b' runs one stage per device but --chunks is {chunks}: "
                        "use --schedule interleaved-1f1b (or gpipe)")
    if microbatches is None:
        microbatches = 2 * num_ranks
    if microbatches < 1:
        raise PlanError(f"--microbatches is {microbatches}: use at least 1")
    if schedule == "interleaved-1f1b" and chunks > 1 and microbatches % num_ranks:
        fit = num_ranks * max(1, -(-microbatches // num_ranks))
        raise PlanError(f"interleaved-1f1b needs microbatches to be a multiple of the {num_ranks} devices, "
                        f"got {microbatches}: use {fit} (--microbatches {fit}; microbatches={fit} in Python)")
    num_stages = num_ranks * chunks
    if num_stages > num_blocks:
        raise PlanError(f"{num_stages} stages ({num_ranks} devices x {chunks} chunks) but the model has only "
                        f"{num_blocks} blocks at this module depth: use at most {num_blocks} stages (fewer devices "
                        "or chunks), a deeper module depth (--depth), or cut it yourself between any two ops "
                        "(passes.split.valid_cuts / plan_from_cuts, then compile_parallel(..., plan=...))")
    return schedule, microbatches


def inflight_microbatches(schedule: str, num_ranks: int, microbatches: int, chunks: int = 1) -> list[int]:
    """Per rank: microbatch-chunks whose activations are alive at the peak (warm-up + 1, capped)."""
    total = microbatches * chunks
    return [min(warmup_microbatches(schedule, num_ranks, microbatches, chunks, r) + 1, total)
            for r in range(num_ranks)]
