"""Schedule generation and the validator (partitioner/runtime/schedules.py)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partitioner.errors import ScheduleError
from partitioner.runtime.schedules import (
    SCHEDULES, Action, Schedule, make_schedule, validate, warmup_microbatches,
)


def _cases():
    for p in (1, 2, 3, 4):
        for m in range(1, 9):
            yield "gpipe", p, m, 1
            yield "1f1b", p, m, 1
            yield "interleaved-1f1b", p, m, 1
            for v in (2, 3):
                yield "gpipe", p, m, v
                if m % p == 0:
                    yield "interleaved-1f1b", p, m, v


@pytest.mark.parametrize("name,p,m,v", list(_cases()))
def test_generated_schedules_validate(name, p, m, v):
    s = make_schedule(name, p, m, v)
    validate(s)
    assert s.num_stages == p * v and s.chunks == v
    assert all(s.stage_rank[k] == k % p for k in range(p * v))
    assert sum(len(row) for row in s.actions) == 2 * p * v * m


def test_1f1b_order_matches_warmup_then_steady_state():
    s = make_schedule("1f1b", 4, 6)
    assert s.to_str().splitlines()[1].split()[2:9] == "1F0 1F1 1F2 1B0 1F3 1B1 1F4".split()
    for r, row in enumerate(s.actions):
        first_b = next(i for i, a in enumerate(row) if a.kind == "B")
        assert first_b == min(4 - r - 1, 6) + 1  # warm-up forwards, then one more F, then B


def test_interleaved_warmup_is_megatrons_count():
    p, m, v = 4, 8, 2
    s = make_schedule("interleaved-1f1b", p, m, v)
    for r, row in enumerate(s.actions):
        warmup = min((p - r - 1) * 2 + (v - 1) * p, m * v)
        assert warmup_microbatches("interleaved-1f1b", p, m, v, r) == warmup
        first_b = next(i for i, a in enumerate(row) if a.kind == "B")
        assert first_b == min(warmup + 1, m * v)
        # rank r's first p forwards go through its first chunk, the next p its second
        assert [a.stage for a in row[:2 * p]] == [r] * p + [r + p] * p


def test_gpipe_runs_all_forwards_first():
    s = make_schedule("gpipe", 3, 5)
    for row in s.actions:
        assert [a.kind for a in row] == ["F"] * 5 + ["B"] * 5


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="zero-bubble", num_ranks=2, microbatches=4), "gpipe, 1f1b, interleaved-1f1b"),
    (dict(name="1f1b", num_ranks=2, microbatches=0), "at least 1 microbatch"),
    (dict(name="1f1b", num_ranks=0, microbatches=4), "at least 1 rank"),
    (dict(name="1f1b", num_ranks=2, microbatches=4, chunks=2), "interleaved-1f1b"),
    (dict(name="interleaved-1f1b", num_ranks=4, microbatches=6, chunks=2), "4, 8, 12"),
])
def test_bad_requests_are_refused(kwargs, match):
    with pytest.raises(ScheduleError, match=match):
        make_schedule(**kwargs)


def _replace_rows(s: Schedule, rows) -> Schedule:
    return Schedule(s.name, s.num_ranks, s.num_stages, s.microbatches, s.stage_rank,
                    tuple(tuple(r) for r in rows))


def test_swapped_order_deadlocks():
    s = make_schedule("1f1b", 2, 2)
    rows = [list(r) for r in s.actions]
    # rank 1 (last stage) runs 1F1 before 1B0 is allowed, but rank 0 wants 0B0 before 0F1:
    rows[0] = [Action(0, "F", 0), Action(0, "B", 0), Action(0, "F", 1), Action(0, "B", 1)]
    rows[1] = [Action(1, "F", 1), Action(1, "B", 1), Action(1, "F", 0), Action(1, "B", 0)]
    with pytest.raises(ScheduleError, match=r"deadlocks: rank 0 at 0B0 \(waits for 1B0\); rank 1 at 1F1"):
        validate(_replace_rows(s, rows))


def test_missing_duplicated_and_misplaced_actions_are_refused():
    s = make_schedule("gpipe", 2, 3)
    rows = [list(r) for r in s.actions]
    with pytest.raises(ScheduleError, match="never run: 1B2"):
        validate(_replace_rows(s, [rows[0], rows[1][:-1]]))
    with pytest.raises(ScheduleError, match="runs 0F1 twice"):
        validate(_replace_rows(s, [rows[0][:3] + [Action(0, "F", 1)] + rows[0][3:], rows[1]]))
    with pytest.raises(ScheduleError, match="stage 1 lives on rank 1"):
        validate(_replace_rows(s, [rows[0] + [Action(1, "F", 0)], rows[1][1:]]))
    with pytest.raises(ScheduleError, match="before its forward"):
        validate(_replace_rows(s, [rows[0], [rows[1][3]] + rows[1][:3] + rows[1][4:]]))


def test_string_round_trip():
    s = make_schedule("interleaved-1f1b", 2, 4, 2)
    text = s.to_str()
    assert text.startswith("rank 0: 0F0 0F1 2F0")
    back = Schedule.from_str(text, name=s.name)
    assert back == s
    assert Action.from_str("12B3") == Action(12, "B", 3)
    with pytest.raises(ScheduleError, match="cannot parse"):
        Action.from_str("F3")


@settings(max_examples=60, deadline=None)
@given(p=st.integers(1, 5), groups=st.integers(1, 4), v=st.integers(1, 3),
       name=st.sampled_from(SCHEDULES))
def test_property_generated_schedules_validate(p, groups, v, name):
    if name == "1f1b":
        v = 1
    s = make_schedule(name, p, p * groups, v)
    validate(s)
