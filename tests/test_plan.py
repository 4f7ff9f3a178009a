"""Plan: JSON round trip, scoring of an assignment, pipeline-shape checks."""
from __future__ import annotations

import dataclasses
import json

import pytest

from partitioner.errors import PlanError
from partitioner.plan import Plan, evaluate_assignment, model_step_time, plan_timeline
from partitioner.problem import check_config, inflight_microbatches
from partitioner.passes.coarsen import synthetic_block_graph


def test_json_round_trip_keeps_every_field():
    bg = synthetic_block_graph([1.0, 2.0, 3.0, 4.0], {(0, 1): 10, (1, 2): 20, (2, 3): 30, (0, 3): 5},
                               [100] * 4, [7] * 4, [("tied", 400, (0, 3))])
    plan = evaluate_assignment(bg, [0, 0, 1, 1], 2, microbatches=4, memory_cap_bytes=10**6)
    plan = plan.replace(solver_status="OPTIMAL", gap=0.01, model="m", version="1")
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.num_stages == 2


# A plan as partitioner wrote it before Plan was split into placement, scores, report and origin:
# every field at the top level. Saved plans in this form must still load.
FLAT_PLAN_JSON = """{
 "num_ranks": 2, "chunks": 1, "schedule": "1f1b", "microbatches": 4,
 "block_stage": [0, 0, 1, 1], "stage_rank": [0, 1], "node_stage": {"n0": 0, "n1": 0, "n2": 1, "n3": 1},
 "method": "ilp", "replicated_params": ["tied"],
 "stage_fwd_time_s": [1.0, 2.0], "stage_bwd_time_s": [2.0, 4.0], "stage_comm_time_s": [0.0, 0.5],
 "rank_param_bytes": [100, 200], "rank_mem_bytes": [1000, 2000], "bytes_crossing": 10,
 "step_time_s": 30.0, "bubble": 0.2, "solver_status": "OPTIMAL+refined", "objective": 29.0, "bound": 28.0,
 "gap": 0.03, "solve_time_s": 1.5, "rank_time_s": [3.0, 6.0], "stage_saved_bytes": [7, 7],
 "stage_param_bytes": [100, 200], "allreduce_time_s": 0.1, "model_step_time_s": 29.0, "simulated": true,
 "memory_cap_bytes": 4096, "link_bw_bytes_per_s": 50000000000.0, "step_lower_bound_s": 29.5,
 "gap_limit": 0.01, "time_limit_s": 10.0, "model": "gpt2", "device": "h100", "device_mem_bytes": 85899345920,
 "version": "0.1.0"
}"""


def test_a_plan_saved_in_the_flat_json_of_earlier_versions_loads():
    plan = Plan.from_json(FLAT_PLAN_JSON)
    assert plan.placement.block_stage == [0, 0, 1, 1] and plan.scores.step_time_s == 30.0
    assert plan.report.solver_status == "OPTIMAL+refined" and plan.origin.model == "gpt2"
    assert plan.replicated_params == ["tied"] and plan.memory_cap_bytes == 4096 and plan.step_gap is not None
    assert Plan.from_json(plan.to_json()) == plan  # and it writes the current form, which loads back
    assert "placement" in json.loads(plan.to_json())


def test_plan_parts_are_frozen_and_replace_changes_a_copy():
    plan = Plan.from_json(FLAT_PLAN_JSON)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.step_time_s = 1.0
    faster = plan.replace(step_time_s=20.0, solver_status="x")
    assert faster.step_time_s == 20.0 and faster.solver_status == "x" and plan.step_time_s == 30.0
    assert faster.placement is plan.placement
    with pytest.raises(TypeError, match="no field"):
        plan.replace(steptime=1.0)


def test_evaluate_assignment_costs():
    bw = 10.0
    bg = synthetic_block_graph([3.0, 6.0, 9.0], {(0, 1): 20, (1, 2): 40, (0, 2): 10}, [100, 200, 300], [1, 2, 3],
                               [("tied", 40, (0, 2))], output_bytes=50)
    plan = evaluate_assignment(bg, [0, 1, 1], 2, microbatches=4, link_bw_bytes_per_s=bw, simulate=False)
    assert plan.stage_fwd_time_s == pytest.approx([1.0, 5.0]) and plan.stage_bwd_time_s == pytest.approx([2.0, 10.0])
    # stage 1 receives v0_1 and v0_2 (the skip) from rank 0; the output is produced on the last stage
    assert plan.stage_comm_time_s == pytest.approx([0.0, 3.0]) and plan.bytes_crossing == 30
    # the tied weight is on both ranks: memory on both, an all-reduce of 2 * 10 bytes
    assert plan.replicated_params == ["tied"] and plan.allreduce_time_s == pytest.approx(2.0)
    inflight = inflight_microbatches("1f1b", 2, 4)
    assert inflight == [2, 1]
    # per microbatch in flight, stage 0 also holds what it sends (20 + 10), stage 1 what it receives
    assert plan.rank_mem_bytes == [100 + 40 + 2 * (1 + 30), 500 + 40 + 1 * (5 + 30)]
    assert set(plan.node_stage) == {"n0", "n1", "n2"}  # the replicated get_attr is in no stage
    co = evaluate_assignment(bg, [0, 0, 0], 1, microbatches=4, link_bw_bytes_per_s=bw, simulate=False)
    assert co.replicated_params == [] and co.node_stage["attr_tied"] == 0 and co.allreduce_time_s == 0


def test_held_values_count_unless_the_stage_saves_them():
    """The executor keeps a stage's sent outputs and received inputs until the backward, unless
    one of the stage's own blocks saves that storage (then it is in its saved bytes already)."""
    import dataclasses
    bg = synthetic_block_graph([1.0] * 4, {(0, 1): 8, (1, 2): 16, (2, 3): 32}, None, [0] * 4)
    split = [0, 0, 1, 1]  # 1 -> 2 crosses: 16 bytes held on both sides
    assert evaluate_assignment(bg, split, 2, microbatches=2, simulate=False).stage_saved_bytes == [16, 16]
    saved_by_consumer = [dataclasses.replace(v, saver=2) if v.node == "v1_2" else v for v in bg.values]
    bg2 = dataclasses.replace(bg, values=saved_by_consumer)
    assert evaluate_assignment(bg2, split, 2, microbatches=2, simulate=False).stage_saved_bytes == [16, 0]
    no_grad = [dataclasses.replace(v, requires_grad=False) for v in bg.values]
    bg3 = dataclasses.replace(bg, values=no_grad)
    assert evaluate_assignment(bg3, split, 2, microbatches=2, simulate=False).stage_saved_bytes == [16, 0]
    # interleaved: stage 2 on rank 0 reads a value of stage 0 (same rank): the tensor is shared
    bg4 = synthetic_block_graph([1.0] * 4, {(0, 1): 8, (0, 2): 4, (1, 2): 16, (2, 3): 32}, None, [0] * 4)
    saved = evaluate_assignment(bg4, [0, 1, 2, 3], 2, chunks=2, microbatches=2, simulate=False).stage_saved_bytes
    assert saved == [8 + 4, 8 + 16, 16 + 32, 32]


def test_simulator_scores_the_plan():
    bg = synthetic_block_graph([3.0] * 8)
    plan = evaluate_assignment(bg, [0, 0, 1, 1, 2, 2, 3, 3], 4, microbatches=8)
    assert plan.simulated
    assert plan.step_time_s == pytest.approx((8 + 4 - 1) * 6.0)  # 1F1B with equal stages
    assert plan.bubble == pytest.approx(3 / 11)
    assert plan_timeline(plan, bg).step_time_s == pytest.approx(plan.step_time_s)


def test_closed_form_matches_the_textbook_formulas():
    p, v, m, t = 4, 2, 8, 1.0
    assert model_step_time([t] * p, [0.0] * p, p, 1, m) == pytest.approx((m + p - 1) * t)
    assert model_step_time([t / v] * (p * v), [0.0] * (p * v), p, v, m) == pytest.approx(m * t + (p - 1) * t / v)


def test_check_config_defaults_and_errors():
    assert check_config(10, 4) == ("1f1b", 8)
    assert check_config(10, 2, chunks=2) == ("interleaved-1f1b", 4)
    with pytest.raises(PlanError, match="only 3 blocks"):
        check_config(3, 4)
    with pytest.raises(PlanError, match="--microbatches 8"):
        check_config(100, 4, chunks=2, microbatches=5)
    with pytest.raises(PlanError, match="at least 1"):
        check_config(100, 2, microbatches=0)


def test_a_stage_overlaps_its_blocks_host_and_device_time():
    """Stage time per pass is max(sum of device times, sum of host times) of its blocks, not the
    sum of per-block maxima: a host-bound block hides behind a GPU-bound one on the same stage."""
    import dataclasses

    from partitioner.stage_costs import stage_totals

    bg = synthetic_block_graph([3.0, 3.0, 3.0, 3.0])
    gpu_bound = [dataclasses.replace(b, host_fwd_time_s=0.1, host_bwd_time_s=0.2) for b in bg.blocks[:2]]
    host_bound = [dataclasses.replace(b, fwd_time_s=0.1, bwd_time_s=0.2, host_fwd_time_s=2.0, host_bwd_time_s=2.5)
                  for b in bg.blocks[2:]]
    bg = dataclasses.replace(bg, blocks=gpu_bound + host_bound)
    assert [b.time_s for b in bg.blocks] == [3.0, 3.0, 4.5, 4.5]
    st = stage_totals(bg, [0, 1, 0, 1], 2, 1, 1e12)  # each stage: one GPU-bound and one host-bound block
    for k in range(2):
        assert st.fwd_time_s[k] == pytest.approx(max(1.0 + 0.1, 0.1 + 2.0))
        assert st.bwd_time_s[k] == pytest.approx(max(2.0 + 0.2, 0.2 + 2.5))
    st = stage_totals(bg, [0, 0, 1, 1], 2, 1, 1e12)
    assert st.fwd_time_s == pytest.approx([2.0, 4.0]) and st.bwd_time_s == pytest.approx([4.0, 5.0])


def test_waiting_sends_rescore_an_interleaved_plan_and_travel_with_it():
    """with_waiting_sends re-simulates a plan with its senders slowed while their values wait (the
    simulator's waiting_send_slowdown), records the slowdown, and the plan's timeline and JSON keep it."""
    from partitioner.plan import with_waiting_sends
    bg = synthetic_block_graph([1.0] * 8, {(i, i + 1): 10 for i in range(7)}, [100] * 8, [7] * 8)
    plan = evaluate_assignment(bg, [0, 0, 1, 1, 2, 2, 3, 3], 2, chunks=2, microbatches=8, link_bw_bytes_per_s=1e6)
    slowed = with_waiting_sends(plan, bg, 1.14)
    assert plan.waiting_send_slowdown == 1.0 and slowed.waiting_send_slowdown == 1.14
    assert plan.step_time_s < slowed.step_time_s < 1.14 * plan.step_time_s
    assert plan_timeline(slowed, bg).step_time_s == pytest.approx(slowed.step_time_s - slowed.allreduce_time_s)
    assert Plan.from_json(slowed.to_json()) == slowed
    assert with_waiting_sends(slowed, bg, 1.14) is slowed
    one_f_one_b = evaluate_assignment(bg, [0] * 4 + [1] * 4, 2, microbatches=8, link_bw_bytes_per_s=1e6)
    assert with_waiting_sends(one_f_one_b, bg, 1.14).step_time_s == pytest.approx(one_f_one_b.step_time_s, rel=1e-3)


def test_the_planner_slows_senders_only_for_ranks_in_their_own_processes_by_compute_dtype():
    """PlanConfig.sends_hold_sms (compile_parallel: under torchrun) applies the device's
    waiting_send_slowdown for the compute dtype (16-bit, mixed precision's included, or fp32's own);
    stages in one process send nothing that holds SMs."""
    import torch

    from partitioner.cost_models.device import get_device_spec
    from partitioner.plan_model import PlanConfig, plan_model
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
    spec = dataclasses.replace(get_device_spec("h100"), waiting_send_slowdown=1.14, fp32_waiting_send_slowdown=1.05)
    slowdowns = {}
    for held, dtype, mixed in [(True, "bfloat16", None), (False, "bfloat16", None), (True, "float32", None),
                               (True, "float32", "bf16")]:
        config = PlanConfig(num_ranks=2, chunks=2, microbatches=8, device_type=spec, time_limit_s=2,
                            use_cache=False, sends_hold_sms=held, dtype=dtype, mixed_precision=mixed)
        slowdowns[held, dtype, mixed] = plan_model(model, (torch.randn(32, 64),), {}, config).plan.waiting_send_slowdown
    assert slowdowns == {(True, "bfloat16", None): 1.14, (False, "bfloat16", None): 1.0,
                         (True, "float32", None): 1.05, (True, "float32", "bf16"): 1.14}
