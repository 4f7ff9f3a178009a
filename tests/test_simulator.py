"""Event simulator (partitioner/runtime/simulator.py)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partitioner.errors import ScheduleError
from partitioner.runtime.schedules import Action, dependencies, make_schedule
from partitioner.runtime.simulator import StageCosts, input_delays, simulate, step_time_s


def _assert_order_respects_dependencies(timeline):
    s = timeline.schedule
    order = timeline.order()
    assert sorted(order, key=str) == sorted(timeline.start_s, key=str)
    index = {a: i for i, a in enumerate(order)}
    for row in s.actions:
        for before, after in zip(row, row[1:]):
            assert index[before] < index[after]
    for a in order:
        for d in dependencies(s, a):
            assert index[d] < index[a], f"{a} placed before its dependency {d}"
        for j in range(a.stage):  # F(k) after F(j) of every earlier stage
            assert index[Action(j, "F", a.microbatch)] < index[Action(a.stage, "F", a.microbatch)]


@pytest.mark.parametrize("p,m", [(1, 1), (2, 1), (2, 4), (4, 4), (4, 8), (3, 7)])
def test_1f1b_bubble_with_equal_stages(p, m):
    tl = simulate(make_schedule("1f1b", p, m), StageCosts.uniform(p, 1.0, 2.0))
    assert tl.step_time_s == pytest.approx((m + p - 1) * 3.0)
    assert tl.bubble == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 4, 3), (3, 6, 2)])
def test_interleaving_lowers_the_bubble(p, m, v):
    plain = simulate(make_schedule("1f1b", p, m), StageCosts.uniform(p, 1.0, 2.0))
    # the same total work, cut into v times as many stages
    inter = simulate(make_schedule("interleaved-1f1b", p, m, v), StageCosts.uniform(p * v, 1.0 / v, 2.0 / v))
    assert sum(inter.busy_s()) == pytest.approx(sum(plain.busy_s()))
    assert inter.bubble < plain.bubble
    assert inter.step_time_s < plain.step_time_s


@pytest.mark.parametrize("p,m,v", [(1, 3, 1), (3, 5, 1), (4, 8, 2), (2, 4, 3)])
def test_gpipe_keeps_every_microbatch_in_flight(p, m, v):
    tl = simulate(make_schedule("gpipe", p, m, v), StageCosts.uniform(p * v, saved_bytes=10))
    assert tl.peak_inflight == [m * v] * p
    assert tl.peak_mem_bytes == [10 * m * v] * p


@pytest.mark.parametrize("p,m", [(1, 4), (2, 1), (3, 2), (4, 8), (4, 3)])
def test_1f1b_peak_inflight(p, m):
    tl = simulate(make_schedule("1f1b", p, m), StageCosts.uniform(p))
    assert tl.peak_inflight == [min(p - r, m) for r in range(p)]


@pytest.mark.parametrize("p,m,v", [(2, 2, 2), (2, 4, 2), (4, 4, 2), (4, 8, 2), (3, 6, 3), (4, 8, 3)])
def test_interleaved_peak_inflight_is_megatrons_warmup_plus_one(p, m, v):
    tl = simulate(make_schedule("interleaved-1f1b", p, m, v), StageCosts.uniform(p * v))
    expected = [min((p - r - 1) * 2 + (v - 1) * p + 1, m * v) for r in range(p)]
    assert tl.peak_inflight == expected


def test_peak_memory_adds_static_bytes_and_per_stage_saved_bytes():
    s = make_schedule("interleaved-1f1b", 2, 2, 2)
    costs = StageCosts.chain([1.0] * 4, [2.0] * 4, 0.0, saved_bytes=[100, 10, 1000, 1], static_bytes=[7, 9])
    tl = simulate(s, costs)
    # rank 0 runs 0F0 0F1 2F0 2F1 before any backward; rank 1 holds at most 1F0 1F1 3F0
    assert tl.peak_mem_bytes == [7 + 2 * 100 + 2 * 1000, 9 + 2 * 10 + 1]


def test_comm_time_increases_step_time():
    s = make_schedule("1f1b", 4, 8)
    fast = simulate(s, StageCosts.uniform(4, 1.0, 2.0, send_time_s=0.0))
    slow = simulate(s, StageCosts.uniform(4, 1.0, 2.0, send_time_s=0.5))
    assert slow.step_time_s > fast.step_time_s
    # the first microbatch pays 3 sends forward and 3 back before rank 0 runs 0B0
    assert slow.start_s[Action(0, "B", 0)] == pytest.approx(fast.start_s[Action(0, "B", 0)] + 6 * 0.5)


def test_comm_within_a_rank_is_free_and_skip_connections_are_paid():
    s = make_schedule("gpipe", 2, 1, 2)  # stages 0, 2 on rank 0; 1, 3 on rank 1
    comm = [[0.0] * 4 for _ in range(4)]
    comm[0][2] = 5.0  # same rank: free
    comm[0][3] = 7.0  # skip connection across ranks
    tl = simulate(s, StageCosts((1.0,) * 4, (1.0,) * 4, tuple(map(tuple, comm)), (0,) * 4))
    assert tl.start_s[Action(2, "F", 0)] == pytest.approx(2.0)
    assert tl.start_s[Action(3, "F", 0)] == pytest.approx(8.0)  # 0F0 ends at 1, +7
    assert tl.start_s[Action(0, "B", 0)] == pytest.approx(tl.end_s[Action(3, "B", 0)] + 7.0)


def test_mismatched_costs_are_refused():
    with pytest.raises(ScheduleError, match="fwd_time_s has 3 entries for 4 stages"):
        simulate(make_schedule("1f1b", 4, 4), StageCosts.uniform(3))


@pytest.mark.parametrize("name,v", [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("gpipe", 3)])
def test_order_respects_dependencies_with_zero_costs(name, v):
    p, m = 4, 8
    tl = simulate(make_schedule(name, p, m, v), StageCosts.uniform(p * v, 0.0, 0.0))
    assert tl.step_time_s == 0.0 and tl.bubble == 0.0
    _assert_order_respects_dependencies(tl)


@settings(max_examples=60, deadline=None)
@given(p=st.integers(1, 4), groups=st.integers(1, 3), v=st.integers(1, 3),
       name=st.sampled_from(["gpipe", "1f1b", "interleaved-1f1b"]),
       data=st.data())
def test_property_order_respects_dependencies(p, groups, v, name, data):
    v = 1 if name == "1f1b" else v
    n = p * v
    times = st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=n, max_size=n)
    costs = StageCosts.chain(data.draw(times), data.draw(times), data.draw(
        st.lists(st.sampled_from([0.0, 0.25]), min_size=n - 1, max_size=n - 1)))
    tl = simulate(make_schedule(name, p, p * groups, v), costs)
    _assert_order_respects_dependencies(tl)
    for a, t in tl.start_s.items():
        assert tl.end_s[a] >= t
        for d in dependencies(tl.schedule, a):
            assert tl.end_s[d] <= t + 1e-12
    for row in tl.schedule.actions:  # every action starts as soon as its rank and its inputs allow
        for i, a in enumerate(row):
            ready = [tl.end_s[row[i - 1]]] if i else [0.0]
            ready += [tl.end_s[d] + delay for d, delay in input_delays(tl.schedule, costs, a)]
            assert tl.start_s[a] == pytest.approx(max(ready))
    assert step_time_s(tl.schedule, costs) == tl.step_time_s


def test_a_schedule_simulated_again_with_other_costs_times_like_a_fresh_one():
    """simulate keeps a schedule's dependency arrays between calls: only the structure, not the costs."""
    sched = make_schedule("interleaved-1f1b", 2, 4, 2)
    slow = StageCosts.chain([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0], 0.5)
    fast = StageCosts.chain([1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], 0.0)
    first = simulate(sched, slow)
    second = simulate(sched, fast)
    assert second.end_s == simulate(make_schedule("interleaved-1f1b", 2, 4, 2), fast).end_s
    assert simulate(sched, slow).end_s == first.end_s
    assert first.step_time_s > second.step_time_s


def test_waiting_sends_slow_an_interleaved_sender_not_a_balanced_1f1b():
    """waiting_send_slowdown: a rank computing while a send of its waits for a busy receiver runs that
    much slower. A balanced 1F1B meets its receivers on time (no change); interleaving does not."""
    import dataclasses

    for p in (2, 4):
        flat = StageCosts.uniform(p, 1.0, 2.0)
        s = make_schedule("1f1b", p, 8)
        assert step_time_s(s, dataclasses.replace(flat, waiting_send_slowdown=1.3)) == step_time_s(s, flat)
    s = make_schedule("interleaved-1f1b", 2, 4, 2)
    costs = StageCosts.chain([1.0] * 4, [1.0] * 4, 0.0)
    base, slow = simulate(s, costs), simulate(s, dataclasses.replace(costs, waiting_send_slowdown=2.0))
    # 2F1 ends at 4 and sends to 3F1, whose rank is busy with 3B0 until 5: 0F2 on [4, 5] runs at half speed
    assert (base.start_s[Action(0, "F", 2)], base.end_s[Action(0, "F", 2)]) == (4.0, 5.0)
    assert base.end_s[Action(3, "B", 0)] == 5.0
    assert slow.start_s[Action(0, "F", 2)] == 4.0 and slow.end_s[Action(0, "F", 2)] > 5.0
    for c in (costs, StageCosts.chain([1.0] * 8, [2.0] * 8, 0.01)):
        s = make_schedule("interleaved-1f1b", len(c.fwd_time_s) // 2, 8, 2)
        t1 = step_time_s(s, c)
        t2 = step_time_s(s, dataclasses.replace(c, waiting_send_slowdown=1.14))
        assert t1 < t2 < 1.14 * t1
        tl = simulate(s, dataclasses.replace(c, waiting_send_slowdown=1.14))
        for row in s.actions:  # a rank still runs one action at a time, each at least its own time
            for a, b in zip(row, row[1:]):
                assert tl.end_s[a] <= tl.start_s[b] + 1e-12
            for a in row:
                own = (c.fwd_time_s if a.kind == "F" else c.bwd_time_s)[a.stage]
                assert tl.end_s[a] - tl.start_s[a] >= own - 1e-12


def test_held_by_waiting_sends_reads_any_timeline():
    """held_by_waiting_sends: the seconds each action runs beside a send of its rank that waits for a busy
    receiver, on a simulated (or measured) timeline; none in a balanced 1F1B."""
    from partitioner.runtime.simulator import held_by_waiting_sends
    tl = simulate(make_schedule("interleaved-1f1b", 2, 4, 2), StageCosts.chain([1.0] * 4, [1.0] * 4, 0.0))
    held = held_by_waiting_sends(tl)
    assert held[Action(0, "F", 2)] == 1.0  # 2F1's value waits for 3B0 on the other rank: [4, 5]
    assert held[Action(0, "F", 0)] == 0.0 and sum(held.values()) > 1.0
    flat = simulate(make_schedule("1f1b", 2, 8), StageCosts.uniform(2, 1.0, 2.0))
    assert sum(held_by_waiting_sends(flat).values()) == 0.0
