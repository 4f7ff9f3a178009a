"""Event simulator of a Schedule with per-stage costs.

Each rank runs its actions in list order; an action starts when its rank is
free and its inputs have arrived:
- F(k, mb) waits for F(j, mb) of every j < k, plus comm_time_s[j][k] when j
  and k sit on different ranks (stage k depends on every stage before it);
- B(k, mb) waits for F(k, mb) and B(j, mb) of every j > k, plus
  comm_time_s[k][j] across ranks (the gradient goes back the same way).
Sends never block compute and links are not contended. A send does hold
compute back in one way, where `waiting_send_slowdown` > 1 (NCCL between
processes): its kernel stays resident on some of the sender's SMs from the
moment the value is ready until the receiving rank reaches the action that
needs it (receives are posted when needed) and the transfer ends, and the
sender's compute in that window runs that many times slower (one GPU, two SMs
held: a transformer layer's bf16 GEMMs 1.14x, benchmarks/resident_kernels.py).
A balanced 1F1B meets its receivers nearly on time; interleaving's values wait
for ranks busy with other chunks, under the compute that follows. Off (1.0) in
the device tables until measured on 2 GPUs (cost_models/device.py says why).

bubble = 1 - Σ busy / (num_ranks · step_time): the idle fraction of all
ranks. With equal stages and no communication, 1F1B gives (p-1)/(m+p-1).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from partitioner.errors import ScheduleError
from partitioner.runtime.schedules import Action, Schedule, dependencies, validate


@dataclass(frozen=True)
class StageCosts:
    """Per-microbatch costs of every virtual stage, as the simulator needs them.

    comm_time_s[j][k]: time to move stage j's values that stage k reads (j < k),
    paid when j and k sit on different ranks (the same for the gradient back).
    An empty comm_time_s means no communication cost.
    saved_bytes[k]: activations stage k keeps per in-flight microbatch.
    static_bytes[r]: parameters + grads + optimizer state on rank r (empty: 0).
    working_bytes[k]: transient bytes while a backward of stage k runs (empty: 0).
    waiting_send_slowdown: how many times slower a rank computes while a send of its waits for
        its receiver (module docstring); 1.0: sends cost the sender nothing.
    """

    fwd_time_s: tuple[float, ...]
    bwd_time_s: tuple[float, ...]
    comm_time_s: tuple[tuple[float, ...], ...]
    saved_bytes: tuple[int, ...]
    static_bytes: tuple[int, ...] = ()
    working_bytes: tuple[int, ...] = ()
    waiting_send_slowdown: float = 1.0

    @classmethod
    def chain(
        cls,
        fwd_time_s: list[float] | tuple[float, ...],
        bwd_time_s: list[float] | tuple[float, ...],
        send_time_s: list[float] | tuple[float, ...] | float = 0.0,
        saved_bytes: list[int] | tuple[int, ...] | int = 0,
        static_bytes: list[int] | tuple[int, ...] = (),
    ) -> "StageCosts":
        """Costs of a chain: stage k only sends to k+1, taking send_time_s[k]."""
        n = len(fwd_time_s)
        sends = [send_time_s] * max(n - 1, 0) if isinstance(send_time_s, (int, float)) else list(send_time_s)
        saved = [saved_bytes] * n if isinstance(saved_bytes, int) else list(saved_bytes)
        comm = tuple(
            tuple(float(sends[j]) if k == j + 1 else 0.0 for k in range(n)) for j in range(n)
        )
        return cls(tuple(fwd_time_s), tuple(bwd_time_s), comm, tuple(saved), tuple(static_bytes))

    @classmethod
    def uniform(cls, num_stages: int, fwd_time_s: float = 1.0, bwd_time_s: float = 2.0,
                send_time_s: float = 0.0, saved_bytes: int = 0) -> "StageCosts":
        """Equal stages: every stage takes the same time and saves the same bytes."""
        return cls.chain([fwd_time_s] * num_stages, [bwd_time_s] * num_stages, send_time_s, saved_bytes)


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

    def busy_s(self) -> list[float]:
        """Compute time of every rank."""
        return [sum(self.end_s[a] - self.start_s[a] for a in row) for row in self.schedule.actions]

    def order(self) -> list[Action]:
        """All actions in start-time order: a valid single-process execution order.

        A topological sort of the dependencies (rank order and data) that takes
        the earliest (start, end) first, so zero-length actions never jump
        ahead of what they wait for.
        """
        s = self.schedule
        rank_pos = {a: (r, i) for r, row in enumerate(s.actions) for i, a in enumerate(row)}
        waiting: dict[Action, int] = {}
        unblocks: dict[Action, list[Action]] = {a: [] for a in rank_pos}
        for a, (r, i) in rank_pos.items():
            deps = dependencies(s, a) + ([s.actions[r][i - 1]] if i > 0 else [])
            waiting[a] = len(deps)
            for d in deps:
                unblocks[d].append(a)

        def key(a: Action) -> tuple:
            return (self.start_s[a], self.end_s[a], rank_pos[a])

        ready = [(key(a), a) for a, n in waiting.items() if n == 0]
        heapq.heapify(ready)
        out: list[Action] = []
        while ready:
            _, a = heapq.heappop(ready)
            out.append(a)
            for b in unblocks[a]:
                waiting[b] -= 1
                if waiting[b] == 0:
                    heapq.heappush(ready, (key(b), b))
        if len(out) != len(rank_pos):
            raise ScheduleError(f"schedule {s.name!r} has a dependency cycle; validate() it first.")
        return out


def _check_costs(s: Schedule, c: StageCosts) -> None:
    n = s.num_stages
    for name in ("fwd_time_s", "bwd_time_s", "saved_bytes"):
        if len(getattr(c, name)) != n:
            raise ScheduleError(
                f"simulate({s.name!r}): StageCosts.{name} has {len(getattr(c, name))} entries "
                f"for {n} stages; give one per virtual stage."
            )
    if c.comm_time_s and (len(c.comm_time_s) != n or any(len(row) != n for row in c.comm_time_s)):
        raise ScheduleError(
            f"simulate({s.name!r}): StageCosts.comm_time_s must be {n}x{n} (or empty for no comm)."
        )
    if c.static_bytes and len(c.static_bytes) != s.num_ranks:
        raise ScheduleError(
            f"simulate({s.name!r}): StageCosts.static_bytes has {len(c.static_bytes)} entries "
            f"for {s.num_ranks} ranks; give one per rank (or none)."
        )


def input_links(schedule: Schedule, a: Action) -> list[tuple[Action, int, int]]:
    """The actions `a` waits for, each with the link (j, k) its data crosses, paid as
    comm_time_s[j][k] after it ends; (-1, -1) where no link is crossed (same rank, or B(k) on
    its own F(k)): F(k, mb) the forwards of every stage before k; B(k, mb) F(k, mb) and the
    backwards of every stage after k."""
    s = schedule

    def link(dep: Action, j: int, k: int) -> tuple[Action, int, int]:
        return (dep, j, k) if s.stage_rank[j] != s.stage_rank[k] else (dep, -1, -1)

    k, mb = a.stage, a.microbatch
    if a.kind == "F":
        return [link(Action(j, "F", mb), j, k) for j in range(k)]
    return [(Action(k, "F", mb), -1, -1)] + [link(Action(j, "B", mb), k, j) for j in range(k + 1, s.num_stages)]


def input_delays(schedule: Schedule, costs: StageCosts, a: Action) -> list[tuple[Action, float]]:
    """The actions `a` waits for, each with the delay after it ends (`input_links` priced by
    costs.comm_time_s; no delay when that is empty)."""
    comm = costs.comm_time_s
    return [(dep, comm[j][k] if j >= 0 and comm else 0.0) for dep, j, k in input_links(schedule, a)]


@dataclass
class _Plan:
    """A validated schedule as flat arrays, for simulating it many times (the planner's local
    search and row generation score thousands of plans on one schedule)."""

    actions: list[Action]  # rank by rank, each rank's in order
    forward: list[bool]
    stage: list[int]
    microbatch: list[int]
    rank: list[int]
    order: list[int]  # every action after its inputs and its rank's earlier ones
    fwd_index: list[list[int]]  # [stage][microbatch]: index of the forward in actions
    bwd_index: list[list[int]]  # the same for the backward (-1: none, a forward-only schedule)
    cross: list[list[bool]]  # [j][k]: stages j and k sit on different ranks


# id(schedule) -> (schedule, its plan), the latest few; a Schedule is not changed once made
_PLANS: dict[int, tuple[Schedule, _Plan]] = {}


def _plan(s: Schedule) -> _Plan:
    got = _PLANS.get(id(s))
    if got is not None and got[0] is s:
        return got[1]
    validate(s)
    actions = [a for row in s.actions for a in row]
    index = {a: i for i, a in enumerate(actions)}
    rows, n = [], 0
    for row in s.actions:
        rows.append(list(range(n, n + len(row))))
        n += len(row)
    deps = [[index[dep] for dep, _, _ in input_links(s, a)] for a in actions]
    mbs = 1 + max((a.microbatch for a in actions), default=-1)
    slots = {kind: [[index.get(Action(k, kind, mb), -1) for mb in range(mbs)] for k in range(s.num_stages)]
             for kind in "FB"}
    plan = _Plan(actions, [a.kind == "F" for a in actions], [a.stage for a in actions],
                 [a.microbatch for a in actions], [r for r, row in enumerate(rows) for _ in row],
                 _topological_order(rows, deps), slots["F"], slots["B"],
                 [[s.stage_rank[j] != s.stage_rank[k] for k in range(s.num_stages)] for j in range(s.num_stages)])
    if len(_PLANS) >= 32:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[id(s)] = (s, plan)
    return plan


def _topological_order(rows: list[list[int]], deps: list[list[int]]) -> list[int]:
    """Actions in an order that puts each after its inputs and its rank's earlier actions (ranks
    visited in turn, each as far as its inputs allow; validate() has ruled out cycles)."""
    done = [False] * sum(len(row) for row in rows)
    pos, order = [0] * len(rows), []
    while len(order) < len(done):
        before = len(order)
        for r, row in enumerate(rows):
            while pos[r] < len(row) and all(done[d] for d in deps[row[pos[r]]]):
                done[row[pos[r]]] = True
                order.append(row[pos[r]])
                pos[r] += 1
        if len(order) == before:
            raise ScheduleError("the schedule has a dependency cycle; validate() it first.")
    return order


def _event_times(plan: _Plan, s: Schedule, c: StageCosts) -> tuple[list[float], list[float]]:
    """Start and end of every action (indices as plan.actions); with c.waiting_send_slowdown > 1 each
    action stretched by the sends of its rank waiting meanwhile (`_waiting_sends`), to a fixed point."""
    starts, ends = _event_pass(plan, s, c, None)
    if c.waiting_send_slowdown <= 1.0 or s.num_ranks < 2:
        return starts, ends
    extra = [0.0] * len(plan.actions)
    for _ in range(_WAITING_SEND_ROUNDS):
        new = _waiting_sends(plan, s, c, starts, ends)
        if max((abs(a - b) for a, b in zip(new, extra)), default=0.0) < 1e-12:
            break
        extra = new
        starts, ends = _event_pass(plan, s, c, extra)
    return starts, ends


# the stretch feeds back into when receivers get free; at a slowdown of 1.14 the step settles within 16 rounds
_WAITING_SEND_ROUNDS = 32


def _waiting_sends(plan: _Plan, s: Schedule, c: StageCosts, starts: list[float], ends: list[float]) -> list[float]:
    """Per action: the time it loses to its rank's waiting sends: an action overlapping them for w
    seconds of wall time (`_held_by_sends`) takes w (1 - 1 / slowdown) longer than its own time."""
    keep = 1.0 - 1.0 / c.waiting_send_slowdown
    return [held * keep for held in _held_by_sends(plan, s, c.comm_time_s, starts, ends)]


def _held_by_sends(plan: _Plan, s: Schedule, comm_time_s, starts: list[float], ends: list[float]) -> list[float]:
    """Per action: the wall time it overlaps a send of its rank that is waiting. A value sent across ranks
    holds the sender from its producer's end until the receiving rank is free for the consumer (its
    previous action ends: the receive is posted when needed) and the transfer is over."""
    K, cross = s.num_stages, plan.cross
    comm = comm_time_s or [[0.0] * K for _ in range(K)]
    prev_end = [0.0] * len(plan.actions)
    windows: list[list[tuple[float, float]]] = [[] for _ in range(s.num_ranks)]
    first = 0
    for row in s.actions:
        for i in range(1, len(row)):
            prev_end[first + i] = ends[first + i - 1]
        first += len(row)
    F, B = plan.fwd_index, plan.bwd_index
    for b in range(len(plan.actions)):
        k, mb = plan.stage[b], plan.microbatch[b]
        if plan.forward[b]:
            sources = [(F[j][mb], comm[j][k]) for j in range(k) if cross[j][k] and (j == k - 1 or comm[j][k] > 0)]
        else:
            sources = [(B[j][mb], comm[k][j]) for j in range(k + 1, K) if cross[k][j] and (j == k + 1 or comm[k][j] > 0)]
        for a, delay in sources:
            if a >= 0:
                windows[plan.rank[a]].append((ends[a], max(ends[a], prev_end[b]) + delay))
    merged = [_union(w) for w in windows]
    return [sum(max(0.0, min(ends[a], y) - max(starts[a], x)) for x, y in merged[plan.rank[a]]
                if y > starts[a] and x < ends[a]) for a in range(len(plan.actions))]


def held_by_waiting_sends(timeline: Timeline, comm_time_s: tuple[tuple[float, ...], ...] = ()) -> dict[Action, float]:
    """Per action of `timeline` (simulated or measured): the seconds it ran while a send of its rank
    waited for a busy receiver (the windows `StageCosts.waiting_send_slowdown` slows). A measured
    timeline's passes that ran slower than planned where this is large point at those sends."""
    plan = _plan(timeline.schedule)
    starts = [timeline.start_s[a] for a in plan.actions]
    ends = [timeline.end_s[a] for a in plan.actions]
    return dict(zip(plan.actions, _held_by_sends(plan, timeline.schedule, comm_time_s, starts, ends)))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for x, y in sorted(i for i in intervals if i[1] > i[0]):
        if out and x <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], y))
        else:
            out.append((x, y))
    return out


def _event_pass(plan: _Plan, s: Schedule, c: StageCosts, extra: list[float] | None
                ) -> tuple[list[float], list[float]]:
    """Start and end of every action (indices as plan.actions): each starts once its rank is free and
    its inputs (`input_links`) have arrived, in one pass over plan.order; `extra`: time added to each.

    Of F(k, mb)'s inputs only F(k-1, mb) and the forwards that reach k over a link that takes
    time can bind: F(j, mb) for j < k-1 ended before F(k-1, mb) began. Likewise B(k, mb) needs
    F(k, mb), B(k+1, mb) and the backwards of later stages whose link to k takes time."""
    _check_costs(s, c)
    K, cross = s.num_stages, plan.cross
    comm = c.comm_time_s or [[0.0] * K for _ in range(K)]
    # per stage: the (stage, delay) inputs that can bind, F(k-1) and B(k+1) first
    inputs_f = [[(j, comm[j][k] if cross[j][k] else 0.0) for j in range(k - 1, -1, -1)
                 if j == k - 1 or (comm[j][k] > 0 and cross[j][k])] for k in range(K)]
    inputs_b = [[(j, comm[k][j] if cross[k][j] else 0.0) for j in range(k + 1, K)
                 if j == k + 1 or (comm[k][j] > 0 and cross[k][j])] for k in range(K)]
    fwd_s, bwd_s, F, B = c.fwd_time_s, c.bwd_time_s, plan.fwd_index, plan.bwd_index
    stage, micro, rank, forward = plan.stage, plan.microbatch, plan.rank, plan.forward
    starts, ends = [0.0] * len(plan.actions), [0.0] * len(plan.actions)
    free = [0.0] * s.num_ranks
    for a in plan.order:
        k, mb, r = stage[a], micro[a], rank[a]
        t = free[r]
        if forward[a]:
            index, inputs, duration = F, inputs_f[k], fwd_s[k]
        else:
            index, inputs, duration = B, inputs_b[k], bwd_s[k]
            e = ends[F[k][mb]]  # its own forward
            if e > t:
                t = e
        for j, d in inputs:
            e = ends[index[j][mb]] + d
            if e > t:
                t = e
        starts[a] = t
        ends[a] = free[r] = t + duration + (extra[a] if extra is not None else 0.0)
    return starts, ends


def step_time_s(schedule: Schedule, costs: StageCosts) -> float:
    """simulate(schedule, costs).step_time_s, without building the timeline (for searches)."""
    return max(_event_times(_plan(schedule), schedule, costs)[1], default=0.0)


def simulate(schedule: Schedule, costs: StageCosts) -> Timeline:
    """Play the schedule: each rank runs its actions in order, as soon as inputs arrive."""
    s, c = schedule, costs
    plan = _plan(s)
    starts, ends = _event_times(plan, s, c)
    start = dict(zip(plan.actions, starts))
    end = dict(zip(plan.actions, ends))

    step = max(end.values(), default=0.0)
    busy = sum(end[a] - start[a] for a in end)
    bubble = 1.0 - busy / (s.num_ranks * step) if step > 0 else 0.0

    # Saved activations on a rank come only from its own stages, so walking its
    # list in order gives the exact peak: a forward holds them until its backward ends.
    peak_inflight, peak_mem = [], []
    for r, row in enumerate(s.actions):
        count = most = 0
        mem = most_mem = 0
        for a in row:
            if a.kind == "F":
                count += 1
                mem += c.saved_bytes[a.stage]
                most, most_mem = max(most, count), max(most_mem, mem)
            else:
                if c.working_bytes:  # its backward runs with this microbatch's activations still held
                    most_mem = max(most_mem, mem + c.working_bytes[a.stage])
                count -= 1
                mem -= c.saved_bytes[a.stage]
        peak_inflight.append(most)
        peak_mem.append((c.static_bytes[r] if c.static_bytes else 0) + most_mem)
    return Timeline(s, start, end, step, bubble, peak_inflight, peak_mem)
