"""Pipeline schedules as data: generate, validate, print.

A schedule is, per rank, an ordered list of compute actions. Communication is
derived from the plan (which stage needs which value) by the executor and the
simulator, so the same schedule serves chains and DAG plans alike: stage k is
taken to depend on every stage before it.

Virtual stage k lives on rank k % p (Megatron interleaving); with chunks = v
each rank owns v stages. The orders follow torch.distributed.pipelining
(ScheduleGPipe, Schedule1F1B, ScheduleLoopedBFS) and Megatron-LM's
interleaved schedule (``forward_backward_pipelining_with_interleaving``).
"""
from __future__ import annotations

from dataclasses import dataclass

from partitioner.errors import ScheduleError

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

    @classmethod
    def from_str(cls, text: str) -> "Action":
        """Parse the compact form "0F3" (stage 0, forward, microbatch 3)."""
        for kind in ("F", "B"):
            stage, sep, mb = text.strip().partition(kind)
            if sep and stage.isdigit() and mb.isdigit():
                return cls(int(stage), kind, int(mb))
        raise ScheduleError(
            f"cannot parse action {text!r}: expected <stage><F|B><microbatch>, e.g. '0F3'."
        )


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists. Stage k lives on rank stage_rank[k]."""

    name: str
    num_ranks: int
    num_stages: int
    microbatches: int
    stage_rank: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]  # actions[r] = rank r's actions in order

    @property
    def chunks(self) -> int:
        """Virtual stages per rank (the most any rank owns)."""
        return max((self.stage_rank.count(r) for r in range(self.num_ranks)), default=0)

    def local_chunk(self, stage: int) -> int:
        """Index of `stage` among the stages of its rank (0 for the rank's first stage)."""
        rank = self.stage_rank[stage]
        return sum(1 for k in range(stage) if self.stage_rank[k] == rank)

    def to_str(self) -> str:
        """One line per rank, e.g. "rank 0: 0F0 0F1 0B0 ...", columns aligned."""
        width = max((len(str(a)) for row in self.actions for a in row), default=0)
        lines = []
        for r, row in enumerate(self.actions):
            cells = " ".join(str(a).ljust(width) for a in row).rstrip()
            lines.append(f"rank {r}: {cells}")
        return "\n".join(lines)

    @classmethod
    def from_str(cls, text: str, name: str = "custom", num_ranks: int | None = None) -> "Schedule":
        """Parse `to_str` output (one line per rank; a "rank r:" prefix is optional).

        Stages are assigned to the rank whose line runs them; the stage and
        microbatch counts are the largest indices seen plus one.
        """
        rows: list[tuple[Action, ...]] = []
        for line in text.strip().splitlines():
            _, _, body = line.rpartition(":")
            rows.append(tuple(Action.from_str(tok) for tok in body.split()))
        num_ranks = len(rows) if num_ranks is None else num_ranks
        rows += [()] * (num_ranks - len(rows))
        everything = [a for row in rows for a in row]
        num_stages = max((a.stage for a in everything), default=-1) + 1
        microbatches = max((a.microbatch for a in everything), default=-1) + 1
        stage_rank = [k % max(num_ranks, 1) for k in range(num_stages)]
        for r, row in enumerate(rows):
            for a in row:
                stage_rank[a.stage] = r
        return cls(name, num_ranks, num_stages, microbatches, tuple(stage_rank), tuple(rows))


def warmup_microbatches(name: str, num_ranks: int, microbatches: int, chunks: int, rank: int) -> int:
    """Forwards rank `rank` runs before its first backward (microbatch-chunks).

    gpipe: all of them. 1f1b: min(p - r - 1, m). interleaved-1f1b (Megatron):
    min((p - r - 1) * 2 + (v - 1) * p, m * v); with v = 1 it is 1F1B.
    Peak activations in flight on the rank are min(warm-up + 1, m * v).
    """
    p, m, v, r = num_ranks, microbatches, chunks, rank
    if name == "gpipe":
        return m * v
    if name == "1f1b" or (name == "interleaved-1f1b" and v == 1):
        return min(p - r - 1, m)
    if name == "interleaved-1f1b":
        return min((p - r - 1) * 2 + (v - 1) * p, m * v)
    raise ScheduleError(f"unknown schedule {name!r}; known schedules: {', '.join(SCHEDULES)}.")


def make_schedule(name: str, num_ranks: int, microbatches: int, chunks: int = 1) -> Schedule:
    """Generate gpipe, 1f1b or interleaved-1f1b (Megatron order).

    gpipe with chunks > 1 is breadth-first (all microbatches through a rank's
    first stage, then its next): torch's ScheduleLoopedBFS. 1f1b runs one
    stage per rank; interleaved-1f1b with chunks = 1 is 1f1b.
    """
    p, m, v = num_ranks, microbatches, chunks
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; known schedules: {', '.join(SCHEDULES)}.")
    if p < 1:
        raise ScheduleError(f"schedule {name!r}: num_ranks={p}; a pipeline needs at least 1 rank.")
    if m < 1:
        raise ScheduleError(f"schedule {name!r}: microbatches={m}; use at least 1 microbatch.")
    if v < 1:
        raise ScheduleError(f"schedule {name!r}: chunks={v}; each rank needs at least 1 stage.")
    if name == "1f1b" and v > 1:
        raise ScheduleError(
            f"schedule '1f1b' runs one stage per rank but chunks={v} was asked; "
            "use 'interleaved-1f1b' (or 'gpipe') for several stages per rank."
        )
    if name == "interleaved-1f1b" and v > 1 and m % p != 0:
        ok = ", ".join(str(p * i) for i in range(1, 5))
        raise ScheduleError(
            f"schedule 'interleaved-1f1b' (Megatron order) needs microbatches to be a multiple "
            f"of num_ranks={p}, got {m}; use {ok}, ... microbatches, or schedule '1f1b'/'gpipe'."
        )
    stage_rank = tuple(k % p for k in range(p * v))
    if name == "gpipe":
        rows = [_gpipe_rank(p, m, v, r) for r in range(p)]
    elif v == 1:
        rows = [_one_f_one_b_rank(p, m, r) for r in range(p)]
    else:
        rows = [_interleaved_rank(p, m, v, r) for r in range(p)]
    return Schedule(name, p, p * v, m, stage_rank, tuple(tuple(row) for row in rows))


def _gpipe_rank(p: int, m: int, v: int, r: int) -> list[Action]:
    forwards = [Action(c * p + r, "F", mb) for c in range(v) for mb in range(m)]
    backwards = [Action(c * p + r, "B", mb) for c in reversed(range(v)) for mb in range(m)]
    return forwards + backwards


def _one_f_one_b_rank(p: int, m: int, r: int) -> list[Action]:
    warmup = warmup_microbatches("1f1b", p, m, 1, r)
    row = [Action(r, "F", mb) for mb in range(warmup)]
    for i in range(m - warmup):
        row += [Action(r, "F", warmup + i), Action(r, "B", i)]
    row += [Action(r, "B", mb) for mb in range(m - warmup, m)]
    return row


def _interleaved_rank(p: int, m: int, v: int, r: int) -> list[Action]:
    # Megatron: virtual microbatch i runs chunk (i % (p*v)) // p (reversed for
    # backward) on microbatch (i // (p*v)) * p + i % p; groups of p microbatches
    # go through chunk 0, then chunk 1, ...
    total = m * v

    def action(i: int, kind: str) -> Action:
        chunk = (i % (p * v)) // p
        if kind == "B":
            chunk = v - 1 - chunk
        return Action(chunk * p + r, kind, (i // (p * v)) * p + i % p)

    warmup = warmup_microbatches("interleaved-1f1b", p, m, v, r)
    row = [action(i, "F") for i in range(warmup)]
    for i in range(total - warmup):
        row += [action(warmup + i, "F"), action(i, "B")]
    row += [action(i, "B") for i in range(total - warmup, total)]
    return row


def dependencies(schedule: Schedule, action: Action) -> list[Action]:
    """Actions of other stages (or the same stage's forward) that `action` waits for.

    Chain model: F(k, mb) needs F(k-1, mb); B(k, mb) needs F(k, mb) and
    B(k+1, mb). Every stage-to-stage dependency of a DAG plan with stages in
    topological order follows from these transitively.
    """
    k, mb = action.stage, action.microbatch
    if action.kind == "F":
        return [Action(k - 1, "F", mb)] if k > 0 else []
    deps = [Action(k, "F", mb)]
    if k + 1 < schedule.num_stages:
        deps.append(Action(k + 1, "B", mb))
    return deps


def validate(schedule: Schedule) -> None:
    """Raise ScheduleError unless every action runs exactly once and no rank deadlocks."""
    s = schedule
    where = f"schedule {s.name!r}"
    if len(s.stage_rank) != s.num_stages:
        raise ScheduleError(
            f"{where}: stage_rank has {len(s.stage_rank)} entries for {s.num_stages} stages; "
            "give the rank of every stage."
        )
    if len(s.actions) != s.num_ranks:
        raise ScheduleError(
            f"{where}: {len(s.actions)} action lists for {s.num_ranks} ranks; give one per rank."
        )
    for k, r in enumerate(s.stage_rank):
        if not 0 <= r < s.num_ranks:
            raise ScheduleError(f"{where}: stage {k} is placed on rank {r}, outside 0..{s.num_ranks - 1}.")
    seen: dict[Action, int] = {}
    for r, row in enumerate(s.actions):
        for pos, a in enumerate(row):
            if a.kind not in ("F", "B"):
                raise ScheduleError(f"{where}: rank {r} action {pos} has kind {a.kind!r}; use 'F' or 'B'.")
            if not (0 <= a.stage < s.num_stages and 0 <= a.microbatch < s.microbatches):
                raise ScheduleError(
                    f"{where}: rank {r} runs {a}, outside stages 0..{s.num_stages - 1} "
                    f"or microbatches 0..{s.microbatches - 1}."
                )
            if s.stage_rank[a.stage] != r:
                raise ScheduleError(
                    f"{where}: rank {r} runs {a} but stage {a.stage} lives on rank "
                    f"{s.stage_rank[a.stage]}; move the action to that rank's list."
                )
            if a in seen:
                raise ScheduleError(f"{where}: rank {r} runs {a} twice (positions {seen[a]} and {pos}).")
            if a.kind == "B" and Action(a.stage, "F", a.microbatch) not in seen:
                raise ScheduleError(
                    f"{where}: rank {r} runs {a} before its forward "
                    f"{Action(a.stage, 'F', a.microbatch)}; put the forward first."
                )
            seen[a] = pos
    missing = [
        Action(k, kind, mb)
        for k in range(s.num_stages)
        for kind in ("F", "B")
        for mb in range(s.microbatches)
        if Action(k, kind, mb) not in seen
    ]
    if missing:
        shown = " ".join(str(a) for a in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ScheduleError(f"{where}: {len(missing)} actions never run: {shown}; add them.")
    _check_no_deadlock(s)


def _check_no_deadlock(s: Schedule) -> None:
    """Run every rank's list in order (unit times); fail if all ranks wait at once."""
    done: set[Action] = set()
    pos = [0] * s.num_ranks
    progress = True
    while progress:
        progress = False
        for r, row in enumerate(s.actions):
            while pos[r] < len(row) and all(d in done for d in dependencies(s, row[pos[r]])):
                done.add(row[pos[r]])
                pos[r] += 1
                progress = True
    stuck = []
    for r, row in enumerate(s.actions):
        if pos[r] < len(row):
            a = row[pos[r]]
            waits = " ".join(str(d) for d in dependencies(s, a) if d not in done)
            stuck.append(f"rank {r} at {a} (waits for {waits})")
    if stuck:
        raise ScheduleError(
            f"schedule {s.name!r} deadlocks: " + "; ".join(stuck)
            + ". Reorder the actions so each rank's next action can always run."
        )
