"""Plan: which virtual stage every block goes to, what that is predicted to cost, and how it was found.

A Plan is four frozen parts: the decision (Placement), its predicted costs (PlanScores), the
search's report (SolverReport, empty for a plan made by hand or a baseline) and what was planned
(PlanOrigin). Every field of the parts reads as an attribute of the plan (plan.step_time_s is
plan.scores.step_time_s); plan.replace(**fields) returns a changed copy. `evaluate_assignment`
turns any block -> stage assignment (the ILP's or a baseline's) into a Plan with per-stage
times, per-rank memory and the simulator's step time, so every method is scored in one unit.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field

from partitioner.problem import DEFAULT_LINK_BW_BYTES_PER_S, PlanProblem
from partitioner.runtime import simulator
from partitioner.runtime.schedules import make_schedule
from partitioner.stage_costs import StageTotals, stage_totals


@dataclass(frozen=True)
class Placement:
    """The decision: virtual stage k lives on rank stage_rank[k] (k mod num_ranks for Megatron
    interleaving); block_stage[b] is the stage of block b; node_stage maps every fx node name
    (get_attr of a replicated tied weight excluded) to its stage, so partitioner/passes/split.py
    needs nothing else. Stages are ordered: along every edge stage(u) <= stage(v).
    replicated_params: shared FQNs loaded by more than one stage (each such stage loads its own
    copy; copies on different ranks get their gradients all-reduced).
    data_parallel / data_parallel_mode: replicas of this pipeline, "fsdp" or "replicate"
    (partitioner/data_parallel_costs.py).
    """

    num_ranks: int
    chunks: int
    schedule: str
    microbatches: int
    block_stage: list[int]
    stage_rank: list[int]
    node_stage: dict[str, int]
    method: str = "ilp"  # "ilp", "dp", "uniform", "torchtitan", "parameters", "flops", "size", "cuts"
    replicated_params: list[str] = field(default_factory=list)
    data_parallel: int = 1
    data_parallel_mode: str = "fsdp"


@dataclass(frozen=True)
class PlanScores:
    """What the placement is predicted to cost. Times are per microbatch; step_time_s is the
    simulator's (or, with simulated False, the closed form's) prediction for a whole step of
    `microbatches` microbatches, plus the gradient all-reduce of tied parameters replicated on
    several ranks. rank_mem_bytes: peak per rank (the simulator's when simulated, else the
    solver's conservative model); model_step_time_s: the ILP's closed form (model_step_time +
    all-reduce; see partitioner/ilp.py). memory_cap_bytes and link_bw_bytes_per_s: what the
    scores assume. With data-parallel replicas rank_mem_bytes is per GPU with their sharding,
    rank_dp_reduce_time_s each rank's gradient reduce (+ parameter all-gather) per step over
    dp_bw_bytes_per_s, and dp_reduce_time_s what they add to step_time_s."""

    stage_fwd_time_s: list[float] = field(default_factory=list)
    stage_bwd_time_s: list[float] = field(default_factory=list)
    stage_comm_time_s: list[float] = field(default_factory=list)
    stage_saved_bytes: list[int] = field(default_factory=list)
    stage_param_bytes: list[int] = field(default_factory=list)
    rank_param_bytes: list[int] = field(default_factory=list)
    rank_mem_bytes: list[int] = field(default_factory=list)
    rank_time_s: list[float] = field(default_factory=list)  # per microbatch: fwd+bwd of its stages
    bytes_crossing: int = 0
    step_time_s: float = 0.0
    bubble: float = 0.0
    allreduce_time_s: float = 0.0
    model_step_time_s: float = 0.0
    simulated: bool = False
    memory_cap_bytes: int | None = None
    link_bw_bytes_per_s: float = 0.0
    dp_bw_bytes_per_s: float = 0.0
    rank_dp_reduce_time_s: list[float] = field(default_factory=list)
    dp_reduce_time_s: float = 0.0  # included in step_time_s
    waiting_send_slowdown: float = 1.0  # the simulator's StageCosts.waiting_send_slowdown (1.0: sends cost nothing)


@dataclass(frozen=True)
class SolverReport:
    """How solve() found the plan: solver_status (CP-SAT's status plus what followed, e.g.
    "OPTIMAL+refined+exact(optimal)"), the ILP's objective, bound and gap (closed form, seconds),
    step_lower_bound_s (no valid plan within the memory cap simulates faster; 0: not known),
    the gap and time limits it ran under and the time it took."""

    solver_status: str = ""
    objective: float = 0.0
    bound: float = 0.0
    gap: float = 0.0
    solve_time_s: float = 0.0
    step_lower_bound_s: float = 0.0
    gap_limit: float = 0.0  # the search stopped once step_gap was within this (solve's gap)
    time_limit_s: float = 0.0  # the search's upper limit on time


@dataclass(frozen=True)
class PlanOrigin:
    """What was planned: the model, the DeviceSpec the costs assume and the partitioner version
    that planned it (for a plan read back from JSON later)."""

    model: str = ""
    device: str = ""  # DeviceSpec name
    device_mem_bytes: int = 0
    version: str = ""


_PARTS = {"placement": Placement, "scores": PlanScores, "report": SolverReport, "origin": PlanOrigin}
_PART_OF = {f.name: part for part, cls in _PARTS.items() for f in dataclasses.fields(cls)}


class _View:
    """A field of one of Plan's parts, read as an attribute of the plan (read-only)."""

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.part = name, _PART_OF[name]

    def __get__(self, plan, owner=None):
        if plan is None:
            return self
        return getattr(getattr(plan, self.part), self.name)


@dataclass(frozen=True, repr=False)
class Plan:
    """A partition of a BlockGraph onto ranks (module docstring): placement, scores, report, origin.

    str(plan) is a summary of a few lines; partitioner.plan_command.print_plan(plan) prints the full table.
    """

    placement: Placement
    scores: PlanScores = field(default_factory=PlanScores)
    report: SolverReport = field(default_factory=SolverReport)
    origin: PlanOrigin = field(default_factory=PlanOrigin)

    # Placement
    num_ranks = _View()
    chunks = _View()
    schedule = _View()
    microbatches = _View()
    block_stage = _View()
    stage_rank = _View()
    node_stage = _View()
    method = _View()
    replicated_params = _View()
    data_parallel = _View()
    data_parallel_mode = _View()
    # PlanScores
    stage_fwd_time_s = _View()
    stage_bwd_time_s = _View()
    stage_comm_time_s = _View()
    stage_saved_bytes = _View()
    stage_param_bytes = _View()
    rank_param_bytes = _View()
    rank_mem_bytes = _View()
    rank_time_s = _View()
    bytes_crossing = _View()
    step_time_s = _View()
    bubble = _View()
    allreduce_time_s = _View()
    model_step_time_s = _View()
    simulated = _View()
    memory_cap_bytes = _View()
    link_bw_bytes_per_s = _View()
    dp_bw_bytes_per_s = _View()
    rank_dp_reduce_time_s = _View()
    dp_reduce_time_s = _View()
    waiting_send_slowdown = _View()
    # SolverReport
    solver_status = _View()
    objective = _View()
    bound = _View()
    gap = _View()
    solve_time_s = _View()
    step_lower_bound_s = _View()
    gap_limit = _View()
    time_limit_s = _View()
    # PlanOrigin
    model = _View()
    device = _View()
    device_mem_bytes = _View()
    version = _View()

    @classmethod
    def of(cls, **fields) -> Plan:
        """A Plan from the parts' fields by name (the flat form of plan JSON written before the split)."""
        unknown = set(fields) - set(_PART_OF)
        if unknown:
            raise TypeError(f"Plan has no field {', '.join(sorted(unknown))}")
        parts = {part: {k: v for k, v in fields.items() if _PART_OF[k] == part} for part in _PARTS}
        return cls(**{part: _PARTS[part](**kw) for part, kw in parts.items()})

    def replace(self, **changes) -> Plan:
        """A copy with these fields (of any part, by name) changed."""
        unknown = set(changes) - set(_PART_OF)
        if unknown:
            raise TypeError(f"Plan has no field {', '.join(sorted(unknown))}")
        parts = {}
        for part in _PARTS:
            kw = {k: v for k, v in changes.items() if _PART_OF[k] == part}
            if kw:
                parts[part] = dataclasses.replace(getattr(self, part), **kw)
        return dataclasses.replace(self, **parts)

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
        """A few lines: shape, step time, memory per rank (the full table: plan_command.print_plan)."""
        from partitioner.plan_command import plan_summary  # lazy: plan_command imports this module
        return plan_summary(self)

    __str__ = __repr__

    def to_json(self) -> str:
        """{"placement": {...}, "scores": {...}, "report": {...}, "origin": {...}}."""
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """A plan from to_json's text, or from the flat JSON (every field at the top) of earlier versions."""
        data = json.loads(text)
        if "placement" not in data:
            return cls.of(**data)
        return cls(**{part: _PARTS[part](**data.get(part, {})) for part in _PARTS})


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
    problem = PlanProblem.checked(bg, num_ranks, chunks, microbatches, schedule, memory_cap_bytes,
                                  link_bw_bytes_per_s)
    return evaluate(problem, block_stage, method, simulate)


def evaluate(problem: PlanProblem, block_stage: list[int], method: str = "ilp", simulate: bool = True) -> Plan:
    """evaluate_assignment of a PlanProblem (its memory cap is recorded, not enforced)."""
    bg, num_ranks, chunks = problem.block_graph, problem.num_ranks, problem.chunks
    schedule, microbatches, link_bw_bytes_per_s = problem.schedule, problem.microbatches, problem.link_bw_bytes_per_s
    K = num_ranks * chunks
    st = stage_totals(bg, block_stage, num_ranks, chunks, link_bw_bytes_per_s)
    compute = [f + b for f, b in zip(st.fwd_time_s, st.bwd_time_s)]
    rank_time = [sum(compute[r::num_ranks]) for r in range(num_ranks)]
    closed = model_step_time(compute, st.recv_time_s, num_ranks, chunks, microbatches) + st.allreduce_time_s
    mem = st.rank_mem_bytes(problem.inflight())
    placement = Placement(num_ranks, chunks, schedule, microbatches, list(block_stage),
                          [k % num_ranks for k in range(K)], st.node_stage, method, st.replicated_params)
    bubble = 1 - sum(st.fwd_time_s + st.bwd_time_s) * microbatches / (num_ranks * closed) if closed else 0.0
    scores = PlanScores(stage_fwd_time_s=st.fwd_time_s, stage_bwd_time_s=st.bwd_time_s,
                        stage_comm_time_s=st.recv_time_s, stage_saved_bytes=st.saved_bytes,
                        stage_param_bytes=st.param_bytes, rank_param_bytes=st.rank_param_bytes, rank_mem_bytes=mem,
                        rank_time_s=rank_time, bytes_crossing=sum(map(sum, st.comm_bytes)), step_time_s=closed,
                        bubble=bubble, allreduce_time_s=st.allreduce_time_s, model_step_time_s=closed,
                        memory_cap_bytes=problem.memory_cap_bytes, link_bw_bytes_per_s=link_bw_bytes_per_s)
    plan = Plan(placement, scores)
    if simulate:
        plan = simulated_plan(plan, st)
    return plan


def simulated_plan(plan: Plan, st: StageTotals) -> Plan:
    """`plan` re-scored by the event simulator (step time, bubble, peak memory)."""
    tl = _simulate(plan, st)
    return plan.replace(step_time_s=tl.step_time_s + st.allreduce_time_s, bubble=tl.bubble,
                        rank_mem_bytes=list(tl.peak_mem_bytes), simulated=True)


def with_waiting_sends(plan: Plan, bg, slowdown: float) -> Plan:
    """`plan` re-simulated with its ranks' compute slowed by `slowdown` while their sends wait for busy
    receivers (StageCosts.waiting_send_slowdown: NCCL between processes); the search scores plans without
    it (it moves interleaved schedules, barely a balanced 1F1B). Unsimulated plans stay as they are."""
    if slowdown == plan.waiting_send_slowdown or not plan.simulated:
        return plan
    return simulated_plan(plan.replace(waiting_send_slowdown=slowdown),
                          stage_totals(bg, plan.block_stage, plan.num_ranks, plan.chunks, plan.link_bw_bytes_per_s))


def plan_timeline(plan: Plan, bg):
    """The simulator's Timeline of `plan` on block graph `bg` (for drawing)."""
    return _simulate(plan, stage_totals(bg, plan.block_stage, plan.num_ranks, plan.chunks,
                                       plan.link_bw_bytes_per_s))


def _simulate(plan: Plan, st: StageTotals):
    return simulator.simulate(make_schedule(plan.schedule, plan.num_ranks, plan.microbatches, plan.chunks),
                              st.stage_costs(plan.link_bw_bytes_per_s, plan.waiting_send_slowdown))
