"""Local search on the simulator's step time, run after the ILP.

The ILP optimises a closed-form step time; the simulator plays the real
schedule (warm-up, interleaving, per-stage communication). Starting from the
ILP's answer and from every baseline split, `refine` moves blocks to other
stages while the simulated step time drops, so the final plan is never worse
(in the simulator) than any of its seeds. Three kinds of move, each keeping the
stage order along every edge and every stage non-empty:

- one block to another stage (nearest stages first);
- a ripple: the boundaries between stages lo..hi all shift by the same number
  of blocks (up to a quarter of an average stage) in the same direction, so
  the stages between keep their size and only their ends change. Interleaved
  plans balance a rank's chunks against each other and the pipeline's fill
  against its drain, which takes many boundaries moving together: plans exist
  that no single move and no single boundary's shift improves but a ripple does
  (tests/test_refine.py has one; benchmarks/RESULTS.md, one on gpt2-xl);
- kicks (optional): a random ripple (and half the time a few random single
  moves) off the current plan, then single moves again. A kick that ends below
  the best plan descends with ripples too and becomes the best and the current
  plan; one that ends within WALK_TOLERANCE above the current plan becomes the
  current plan, so the search walks across near-equal plans instead of kicking
  from one local optimum only.

Scores come from partitioner/stage_costs.py and the simulator's step_time_s,
so a search of a few seconds scores thousands of plans. What the search gains
over the ILP's plans is measured by benchmarks/plan_quality.py (figures in
benchmarks/RESULTS.md).
"""
from __future__ import annotations

import random
import time

from partitioner.problem import PlanProblem
from partitioner.runtime.schedules import make_schedule
from partitioner.runtime.simulator import step_time_s
from partitioner.stage_costs import StageCostModel, closed_form_rank_mem_bytes

KICK_MOVES = 3  # random single moves in half the kicks
KICKS_WITHOUT_GAIN = 300  # kicks stop after this many in a row found nothing
WALK_TOLERANCE = 0.002  # a kick ending this close above the current plan becomes the current plan


class _Search:
    """The moves and the score of one refine() call; `a` is the current assignment."""

    def __init__(self, problem: PlanProblem, deadline: float, target_s: float = 0.0):
        bg, p, v = problem.block_graph, problem.num_ranks, problem.chunks
        self.cap, self.deadline = problem.memory_cap_bytes, deadline
        self.target_s, self.best_seen = target_s, float("inf")
        self.sched = make_schedule(problem.schedule, p, problem.microbatches, v)
        self.inflight = problem.inflight()
        n = len(bg.blocks)
        self.preds = [list(bg.graph.predecessors(b)) for b in range(n)]
        self.succs = [list(bg.graph.successors(b)) for b in range(n)]
        self.K = p * v
        self.cost_model = StageCostModel(bg, p, v, problem.link_bw_bytes_per_s)
        self.max_shift = max(1, -(-n // (4 * self.K)))  # ripples shift up to a quarter of an average stage

    def out_of_time(self) -> bool:
        """Past the deadline, or some plan scored reached the target (good enough: stop)."""
        return self.best_seen <= self.target_s or time.perf_counter() > self.deadline

    def score(self, a: list[int]) -> float:
        costs, allreduce_s = self.cost_model.costs(a)
        if self.cap is not None and max(closed_form_rank_mem_bytes(costs, self.inflight)) > self.cap:
            return float("inf")
        step = step_time_s(self.sched, costs) + allreduce_s
        self.best_seen = min(self.best_seen, step)
        return step

    def stage_range(self, a: list[int], b: int) -> range:
        """The stages block b may move to: from its latest predecessor's to its earliest successor's."""
        lo = max((a[u] for u in self.preds[b]), default=0)
        hi = min((a[w] for w in self.succs[b]), default=self.K - 1)
        return range(lo, hi + 1)

    def single_moves(self, a: list[int], best: float) -> float:
        """First-improvement sweeps of one-block moves until none helps; edits `a`, returns its step."""
        counts = self.stage_ends(a)[2]
        improved = True
        while improved and not self.out_of_time():
            improved = False
            for b in range(len(a)):
                old = a[b]
                if counts[old] == 1:
                    continue
                for to in sorted(self.stage_range(a, b), key=lambda k: abs(k - old)):
                    if to == old:
                        continue
                    a[b] = to
                    new = self.score(a)
                    if new < best * (1 - 1e-9):
                        best, improved = new, True
                        counts[old] -= 1
                        counts[to] += 1
                        break
                    a[b] = old
                    if self.out_of_time():
                        return best
        return best

    def ripple(self, a: list[int], lo: int, hi: int, right: bool) -> list[int] | None:
        """Shift the boundaries between stages lo..hi by one block: right, the last block of each stage
        lo..hi-1 (in topological order, so its successors lie on later stages) moves to the next stage;
        left, the first block of each stage hi..lo+1 to the previous one. None where stage lo (right) or
        hi (left) would empty; the stages between gain a block before they give one."""
        first, last, count = self.stage_ends(a)
        if count[lo if right else hi] < 2:
            return None
        x, carried = list(a), None
        for k in (range(lo, hi) if right else range(hi, lo, -1)):
            if right:
                b = last[k] if carried is None else max(last[k], carried)
            else:
                b = first[k] if carried is None else min(first[k], carried)
            x[b] = k + 1 if right else k - 1
            carried = b
        return x

    def stage_ends(self, a: list[int]) -> tuple[list[int], list[int], list[int]]:
        """The first and last block (blocks are listed in a topological order) and the size of every stage."""
        first, last, count = [len(a)] * self.K, [-1] * self.K, [0] * self.K
        for b, k in enumerate(a):
            first[k] = min(first[k], b)
            last[k] = b
            count[k] += 1
        return first, last, count

    def ripples(self, a: list[int], best: float) -> tuple[list[int], float]:
        """One sweep over every range of boundaries lo..hi and shifts of 1..max_shift blocks either way,
        keeping each that shortens the step (one boundary alone: 2 blocks or more, single moves do 1)."""
        for lo in range(self.K - 1):
            for hi in range(lo + 1, self.K):
                for right in (True, False):
                    x, last, rising = a, best, 0
                    for steps in range(1, self.max_shift + 1):
                        x = self.ripple(x, lo, hi, right)
                        if x is None:
                            break
                        if hi == lo + 1 and steps == 1:
                            continue
                        new = self.score(x)
                        if new < best * (1 - 1e-9):  # kept; shifting further may pay too
                            a, best = x, new
                        rising = rising + 1 if new > last else 0
                        last = new
                        if rising == 2 or self.out_of_time():  # two steps uphill in a row: stop this way
                            break
                    if self.out_of_time():
                        return a, best
        return a, best

    def descend(self, a: list[int], best: float) -> tuple[list[int], float]:
        """Single moves and ripple sweeps, in turn, until neither shortens the step."""
        a = list(a)
        while True:
            best = self.single_moves(a, best)
            if self.out_of_time():
                return a, best
            x, new = self.ripples(a, best)
            if x is a:
                return a, best
            a, best = list(x), new

    def kick(self, a: list[int], rng: random.Random) -> list[int]:
        """`a` after a random ripple (boundaries lo..hi, either way, 1..max_shift blocks) and, half the
        time, KICK_MOVES random valid one-block moves too."""
        lo = rng.randrange(self.K - 1)
        hi, right = rng.randrange(lo + 1, self.K), rng.random() < 0.5
        x = a
        for _ in range(rng.randint(1, self.max_shift)):
            x = self.ripple(x, lo, hi, right) or x
        x = list(x)
        if rng.random() < 0.5:
            counts = self.stage_ends(x)[2]
            for _ in range(KICK_MOVES):
                b = rng.randrange(len(x))
                allowed = self.stage_range(x, b)
                if counts[x[b]] > 1 and len(allowed) > 1:
                    to = rng.choice(allowed)
                    counts[x[b]] -= 1
                    counts[to] += 1
                    x[b] = to
        return x


def refine(problem: PlanProblem, assign: list[int], budget_s: float, kicks: bool = False, seed: int = 0,
           target_s: float = 0.0) -> tuple[list[int], float]:
    """Local search on the simulated step time from `assign`; returns (assignment, step time).

    Single-block moves (first improvement, nearer stages first) and ripples (module docstring)
    until neither shortens the step or `budget_s` is spent. With `kicks`, the rest of the budget
    goes to kicks (module docstring) until KICKS_WITHOUT_GAIN of them in a row found no better
    plan; `seed` seeds them. Plans over problem.memory_cap_bytes score infinite. A ripple sweep stops
    shifting one way after two steps that each lengthen the step. It stops as soon as it scores a
    plan at most target_s (a proven bound's tolerance: nothing worth finding below it).
    """
    search = _Search(problem, time.perf_counter() + budget_s, target_s)
    best_a, best = search.descend(assign, search.score(assign))
    rng = random.Random(seed)
    failed, current_a, current = 0, best_a, best
    while kicks and search.K > 1 and failed < KICKS_WITHOUT_GAIN and not search.out_of_time():
        x = search.kick(current_a, rng)
        step = search.single_moves(x, search.score(x))  # ripples (slow) only for a kick that pays
        failed += 1
        if step < best * (1 - 1e-9):
            best_a, best = search.descend(x, step)
            current_a, current, failed = best_a, best, 0
        elif step < current * (1 + WALK_TOLERANCE):
            current_a, current = x, step
    return best_a, best
