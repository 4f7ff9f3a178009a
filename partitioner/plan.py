"""Plan: which virtual stage every block goes to and what that is predicted to cost (INTERFACE)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class Plan:
    """A partition of a BlockGraph onto ranks.

    Virtual stage k lives on rank stage_rank[k] (k mod num_ranks for Megatron
    interleaving). block_stage[b] is the stage of block b; node_stage maps every
    fx node name (get_attr of a replicated tied weight excluded) to its stage so
    passes/split.py needs nothing else. Stages are ordered: along every edge
    stage(u) <= stage(v).
    Times are per microbatch; step_time_s is the simulator's (or solver's)
    prediction for a whole step of `microbatches` microbatches.
    """

    num_ranks: int
    chunks: int
    schedule: str
    microbatches: int
    block_stage: list[int]
    stage_rank: list[int]
    node_stage: dict[str, int]
    method: str = "ilp"  # "ilp", "dp", "uniform", "torchtitan", "parameters", "flops", "size"
    replicated_params: list[str] = field(default_factory=list)  # tied FQNs replicated across ranks
    stage_fwd_time_s: list[float] = field(default_factory=list)
    stage_bwd_time_s: list[float] = field(default_factory=list)
    stage_comm_time_s: list[float] = field(default_factory=list)
    rank_param_bytes: list[int] = field(default_factory=list)
    rank_mem_bytes: list[int] = field(default_factory=list)
    bytes_crossing: int = 0
    step_time_s: float = 0.0
    bubble: float = 0.0
    solver_status: str = ""
    objective: float = 0.0
    bound: float = 0.0
    gap: float = 0.0
    solve_time_s: float = 0.0

    @property
    def num_stages(self) -> int:
        return len(self.stage_rank)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls(**json.loads(text))
