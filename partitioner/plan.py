"""Plan: which virtual stage every block goes to and what that is predicted to cost.

`evaluate_assignment` turns any block -> stage assignment (the ILP's or a
baseline's) into a Plan with per-stage times, per-rank memory and the
simulator's step time, so every method is scored in one unit.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from partitioner.problem import DEFAULT_LINK_BW_BYTES_PER_S, check_config, inflight_microbatches
from partitioner.runtime.schedules import make_schedule
from partitioner.runtime.simulator import simulate
from partitioner.stage_costs import StageTotals, stage_totals


@dataclass
class Plan:
    """A partition of a BlockGraph onto ranks.

    Virtual stage k lives on rank stage_rank[k] (k mod num_ranks for Megatron
    interleaving). block_stage[b] is the stage of block b; node_stage maps every
    fx node name (get_attr of a replicated tied weight excluded) to its stage so
    partitioner/passes/split.py needs nothing else. Stages are ordered: along every edge
    stage(u) <= stage(v).
    Times are per microbatch; step_time_s is the simulator's (or solver's)
    prediction for a whole step of `microbatches` microbatches, plus the
    gradient all-reduce of tied parameters replicated on several ranks.
    replicated_params: shared FQNs loaded by more than one stage (each such stage
    loads its own copy; copies on different ranks get their gradients all-reduced).
    rank_mem_bytes: peak per rank (simulator's when available, else the solver's
    conservative model); model_step_time_s: the ILP's closed-form objective
    (plan.model_step_time + all-reduce; see partitioner/ilp.py).
    step_lower_bound_s: proven lower bound on the simulated step of every valid plan within the
    memory cap (the exact split search's or critical-path row generation's; 0 when not known).
    model, device, device_mem_bytes, version: what was planned, the DeviceSpec the costs assume
    and the partitioner version that planned it (for a plan read back from JSON later).
    data_parallel / data_parallel_mode / dp_bw_bytes_per_s: replicas of this pipeline, "fsdp" or
    "replicate", and their collectives' bandwidth; rank_mem_bytes is then per GPU with that
    sharding, rank_dp_reduce_time_s each rank's gradient reduce (+ parameter all-gather) per step and
    dp_reduce_time_s what they add to step_time_s (partitioner/data_parallel_costs.py).
    str(plan) is a summary of a few lines; partitioner.plan_command.print_plan(plan) prints the full table.
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
    rank_time_s: list[float] = field(default_factory=list)  # per microbatch: fwd+bwd of its stages
    stage_saved_bytes: list[int] = field(default_factory=list)
    stage_param_bytes: list[int] = field(default_factory=list)
    allreduce_time_s: float = 0.0
    model_step_time_s: float = 0.0
    simulated: bool = False
    memory_cap_bytes: int | None = None
    link_bw_bytes_per_s: float = 0.0
    step_lower_bound_s: float = 0.0  # no valid plan within the cap simulates faster (0: not known)
    gap_limit: float = 0.0  # the search stopped once step_gap was within this (solve's gap)
    time_limit_s: float = 0.0  # the search's upper limit on time
    model: str = ""
    device: str = ""  # DeviceSpec name
    device_mem_bytes: int = 0
    version: str = ""
    data_parallel: int = 1
    data_parallel_mode: str = "fsdp"
    dp_bw_bytes_per_s: float = 0.0
    rank_dp_reduce_time_s: list[float] = field(default_factory=list)
    dp_reduce_time_s: float = 0.0  # included in step_time_s

    @property
    def num_stages(self) -> int:
        return len(self.stage_rank)

    @property
    def step_gap(self) -> float | None:
        """(step - step_lower_bound_s) / step: at most this much faster could any plan be (None: no bound);
        of the pipeline's step, without the data-parallel collectives the search does not price."""
        step = self.step_time_s - self.dp_reduce_time_s
        if self.step_lower_bound_s <= 0 or step <= 0:
            return None
        return max(0.0, (step - self.step_lower_bound_s) / step)

    def __repr__(self) -> str:
        """A few lines: shape, step time, memory per rank (the full table: report.print_plan)."""
        from partitioner.plan_command import plan_summary  # lazy: plan_command imports this module
        return plan_summary(self)

    __str__ = __repr__

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls(**json.loads(text))


def model_step_time(compute_s: list[float], latency_s: list[float], num_ranks: int, chunks: int,
                    microbatches: int) -> float:
    """The ILP's closed form of a step (no all-reduce); see partitioner/ilp.py.

    compute_s[k]: fwd+bwd of stage k; latency_s[k]: receiving its inputs. With
    M = max(busiest rank's compute, slowest link) and t_k = compute + latency:
    v = 1: (m - 1) M + sum_k t_k, i.e. (m + p - 1) t for p equal stages;
    v > 1: m M + (p - 1) max_k t_k, i.e. m t + (p - 1) t / v for equal chunks.
    """
    p, m = num_ranks, microbatches
    t = [a + b for a, b in zip(compute_s, latency_s)]
    busy = t if chunks > 1 else compute_s
    top = max([sum(busy[r::p]) for r in range(p)] + list(latency_s))
    if chunks == 1:
        return (m - 1) * top + sum(t)
    return m * top + (p - 1) * max(t)


def evaluate_assignment(bg, block_stage: list[int], num_ranks: int, chunks: int = 1,
                        microbatches: int | None = None, schedule: str | None = None,
                        link_bw_bytes_per_s: float = DEFAULT_LINK_BW_BYTES_PER_S,
                        memory_cap_bytes: int | None = None, method: str = "ilp",
                        simulate: bool = True) -> Plan:
    """Score an assignment of blocks to stages: a Plan with every field but the solver's.

    The simulator (partitioner/runtime/simulator.py) plays the schedule with these stage
    costs: step_time_s, bubble and per-rank peak memory come from it.
    """
    schedule, microbatches = check_config(len(bg.blocks), num_ranks, chunks, microbatches, schedule)
    K = num_ranks * chunks
    st = stage_totals(bg, block_stage, num_ranks, chunks, link_bw_bytes_per_s)
    compute = [f + b for f, b in zip(st.fwd_time_s, st.bwd_time_s)]
    rank_time = [sum(compute[r::num_ranks]) for r in range(num_ranks)]
    closed = model_step_time(compute, st.recv_time_s, num_ranks, chunks, microbatches) + st.allreduce_time_s
    inflight = inflight_microbatches(schedule, num_ranks, microbatches, chunks)
    mem = st.rank_mem_bytes(inflight)
    plan = Plan(num_ranks=num_ranks, chunks=chunks, schedule=schedule, microbatches=microbatches,
                block_stage=list(block_stage), stage_rank=[k % num_ranks for k in range(K)],
                node_stage=st.node_stage, method=method, replicated_params=st.replicated_params,
                stage_fwd_time_s=st.fwd_time_s, stage_bwd_time_s=st.bwd_time_s,
                stage_comm_time_s=st.recv_time_s, rank_param_bytes=st.rank_param_bytes,
                rank_mem_bytes=mem, bytes_crossing=sum(map(sum, st.comm_bytes)),
                step_time_s=closed, bubble=1 - sum(st.fwd_time_s + st.bwd_time_s) * microbatches / (num_ranks * closed) if closed else 0.0,
                rank_time_s=rank_time, stage_saved_bytes=st.saved_bytes, stage_param_bytes=st.param_bytes,
                allreduce_time_s=st.allreduce_time_s, model_step_time_s=closed,
                memory_cap_bytes=memory_cap_bytes, link_bw_bytes_per_s=link_bw_bytes_per_s)
    if simulate:
        simulate_plan(plan, st)
    return plan


def simulate_plan(plan: Plan, st: StageTotals) -> None:
    """Re-score `plan` in place with the event simulator (step time, bubble, peak memory)."""
    tl = _simulate(plan, st)
    plan.step_time_s = tl.step_time_s + st.allreduce_time_s
    plan.bubble = tl.bubble
    plan.rank_mem_bytes = list(tl.peak_mem_bytes)
    plan.simulated = True


def plan_timeline(plan: Plan, bg):
    """The simulator's Timeline of `plan` on block graph `bg` (for drawing)."""
    return _simulate(plan, stage_totals(bg, plan.block_stage, plan.num_ranks, plan.chunks,
                                       plan.link_bw_bytes_per_s))


def _simulate(plan: Plan, st: StageTotals):
    return simulate(make_schedule(plan.schedule, plan.num_ranks, plan.microbatches, plan.chunks),
                    st.stage_costs(plan.link_bw_bytes_per_s))
