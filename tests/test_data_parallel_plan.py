"""Data parallel x pipeline in the plan: per-GPU memory under FSDP / replicate, the replicas' reduce
in the step time, the CLI's --data-parallel and its one-line errors, the plan JSON."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from partitioner.cli import main
from partitioner.cost_models.device import get_device_spec
from partitioner.data_parallel_costs import (DataParallel, ParamBytes, apply_data_parallel, check_data_parallel,
                                       dp_bandwidth, microbatch_size, param_bytes, reduce_time_s,
                                       shard_block_graph)
from partitioner.errors import PlanError
from partitioner.passes.coarsen import synthetic_block_graph
from partitioner.plan import Plan, evaluate_assignment, plan_timeline
from partitioner.plan_model import PlanConfig, plan_model
from tests.test_cli_plan import MODEL, Tiny


def _plan(batch: int, dp: int = 1, mode: str = "fsdp", cap: int | None = None, width: int = 32, **kw):
    model = Tiny(width=width)
    config = PlanConfig(num_ranks=2, microbatches=4, data_parallel=dp, data_parallel_mode=mode, time_limit_s=3,
                        memory_cap_bytes=cap, use_cache=False, **kw)
    return model, plan_model(model, (torch.randint(0, 64, (batch, 16)),), {}, config)


def _rank_numel(model: torch.nn.Module, result) -> list[int]:
    """Parameter elements each rank holds, from the module (a tied weight on every rank using it)."""
    plan, bg = result.plan, result.block_graph
    params = [set() for _ in range(plan.num_ranks)]
    for b, blk in enumerate(bg.blocks):
        params[plan.stage_rank[plan.block_stage[b]]].update(blk.params)
    return [sum(model.get_parameter(f).numel() for f in fqns) for fqns in params]


def test_fsdp_shards_the_optimizer_state_and_replicate_keeps_a_second_copy():
    # equal microbatches (2 samples): dp = 2 runs a global batch twice as large
    model, one = _plan(batch=8)
    _, two = _plan(batch=16, dp=2)
    assert one.microbatch_args[0].shape[0] == two.microbatch_args[0].shape[0] == 2
    numel = _rank_numel(model, one)
    bg1, bg2 = one.block_graph, two.block_graph
    assign = one.plan.block_stage
    base = evaluate_assignment(bg1, assign, 2, microbatches=4).rank_mem_bytes
    fsdp = evaluate_assignment(bg2, assign, 2, microbatches=4).rank_mem_bytes
    # fp32 AdamW: 4 (weight) + 4 (grad) + 8 (moments) bytes per element at dp = 1; under fsdp over 2
    # the moments halve (-4) and FSDP keeps a 2-byte shard of the weight beside the whole one (+2)
    assert [a - b for a, b in zip(base, fsdp)] == [2 * n for n in numel]
    _, rep = _plan(batch=16, dp=2, mode="replicate")
    replicate = evaluate_assignment(rep.block_graph, assign, 2, microbatches=4).rank_mem_bytes
    assert [r - a for r, a in zip(replicate, base)] == [4 * n for n in numel]  # the sharded param is whole
    # the planner's own plan carries the same per-GPU memory
    got = two.plan
    assert got.rank_mem_bytes == evaluate_assignment(bg2, got.block_stage, 2, microbatches=4).rank_mem_bytes


def test_param_bytes_split_weight_gradient_and_optimizer_state():
    bg = synthetic_block_graph([1.0, 1.0], param_state_bytes=[0, 0], shared=[("tied", 160, (0, 1))])
    blocks = [dataclasses.replace(bg.blocks[0], params=("a", "frozen", "tied")),
              dataclasses.replace(bg.blocks[1], params=("b", "tied"))]
    bg = dataclasses.replace(bg, blocks=blocks)
    weights = {"a": 40, "frozen": 8, "b": 4, "tied": 10}
    states = {"a": 160, "frozen": 8, "b": 16, "tied": 40}  # fp32 AdamW: 4 x the weight
    own, shared = param_bytes(bg, weights, states)
    assert own == [ParamBytes(48, 40, 80), ParamBytes(4, 4, 8)] and shared == [ParamBytes(10, 10, 20)]
    dp = DataParallel(4, "fsdp", 1.0)
    assert own[0].static_bytes(dp) == 48 + 40 + 20 + 10 and own[0].static_bytes(DataParallel(1)) == 168
    sharded = shard_block_graph(bg, own, shared, dp)
    assert [b.param_state_bytes for b in sharded.blocks] == [118, 4 + 4 + 2 + 1]
    assert sharded.shared_params[0].state_bytes == 10 + 10 + 5 + 3  # shards round up
    assert shard_block_graph(bg, own, shared, DataParallel(1)) is bg


def test_reduce_time_is_a_ring_reduce_scatter_and_all_gather():
    pb = ParamBytes(weight=500, trainable=400, optimizer=800)
    # (dp - 1) / dp x bytes / bw for the reduce-scatter of 400 gradient bytes and the all-gather of 400
    assert reduce_time_s(pb, DataParallel(4, "fsdp", 100.0)) == pytest.approx(2 * 0.75 * 400 / 100)
    # an all-reduce moves as much: 2 (dp - 1) / dp x bytes / bw
    assert reduce_time_s(pb, DataParallel(4, "replicate", 100.0)) == pytest.approx(2 * 0.75 * 400 / 100)
    assert reduce_time_s(pb, DataParallel(1, "fsdp", 100.0)) == 0.0
    assert reduce_time_s(ParamBytes(8, 0, 0), DataParallel(4, "fsdp", 100.0)) == 0.0  # frozen: nothing to reduce


def test_the_reduce_follows_each_ranks_last_backward():
    bg = synthetic_block_graph([3.0, 3.0, 3.0, 3.0], param_state_bytes=[0] * 4)
    dp = DataParallel(2, "fsdp", 100.0)
    # parameters on rank 0 only: it runs the step's last backward, so its reduce adds in full
    blocks = [ParamBytes(1000, 1000, 2000), ParamBytes(0, 0, 0), ParamBytes(0, 0, 0), ParamBytes(0, 0, 0)]
    plan = evaluate_assignment(bg, [0, 0, 1, 1], 2, microbatches=4)
    step = plan.step_time_s
    plan = apply_data_parallel(plan, bg, blocks, [], dp)
    assert plan.rank_dp_reduce_time_s == pytest.approx([10.0, 0.0])
    assert plan.dp_reduce_time_s == pytest.approx(10.0) and plan.step_time_s == pytest.approx(step + 10.0)
    # parameters on rank 1 only: its reduce overlaps the rest of rank 0's last backwards
    plan = evaluate_assignment(bg, [0, 0, 1, 1], 2, microbatches=4)
    tl = plan_timeline(plan, bg)
    end_1 = max(tl.end_s[a] for a in tl.schedule.actions[1])
    assert end_1 < tl.step_time_s
    plan = apply_data_parallel(plan, bg, blocks[::-1], [], dp)
    assert plan.dp_reduce_time_s == pytest.approx(end_1 + 10.0 - tl.step_time_s)
    assert (plan.data_parallel, plan.data_parallel_mode, plan.dp_bw_bytes_per_s) == (2, "fsdp", 100.0)


def test_a_model_that_fits_only_sharded_is_planned():
    # parameter-heavy: 256-wide layers, microbatches of 2 x 16 tokens
    _, sharded = _plan(batch=32, dp=4, width=256)
    cap = max(sharded.plan.rank_mem_bytes)
    with pytest.raises(PlanError, match="smallest per-device memory that fits"):
        _plan(batch=8, width=256, cap=cap)
    _, fits = _plan(batch=32, dp=4, width=256, cap=cap)
    assert max(fits.plan.rank_mem_bytes) <= cap and fits.plan.data_parallel == 4


def test_checks_and_bandwidth_rule():
    for size in (0, -2, 1.5, True, "4"):
        with pytest.raises(PlanError, match="--data-parallel is"):
            check_data_parallel(size, "fsdp")
    with pytest.raises(PlanError, match="unknown data-parallel mode 'zero3'"):
        check_data_parallel(2, "zero3")
    with pytest.raises(PlanError, match="unknown data-parallel mode"):
        _plan(batch=16, dp=2, mode="ddp")
    h100 = get_device_spec("h100")
    assert dp_bandwidth(h100, 4, 2) == h100.intra_node_bw_bytes_per_s  # 8 GPUs: one host
    assert dp_bandwidth(h100, 4, 8) == h100.inter_node_bw_bytes_per_s  # 32 GPUs
    assert dp_bandwidth(h100, 4, 8, gpus_per_host=32) == h100.intra_node_bw_bytes_per_s
    assert dp_bandwidth(h100, 4, 8, bw_bytes_per_s=1e9) == 1e9
    with pytest.raises(PlanError, match="positive bandwidth"):
        dp_bandwidth(h100, 4, 8, bw_bytes_per_s=0.0)
    assert microbatch_size(64, 4, 8) == 2
    with pytest.raises(PlanError, match="the global batch 60 does not split into 4 replicas x 8 microbatches"):
        microbatch_size(60, 4, 8)


def test_json_round_trip_and_plans_from_before_dp():
    _, result = _plan(batch=16, dp=2, compare=True)
    plan = result.plan
    assert plan.dp_reduce_time_s > 0 and len(plan.rank_dp_reduce_time_s) == 2
    # the baselines are scored alike: same replicas, their own reduce
    assert all(b.data_parallel == 2 and b.dp_reduce_time_s > 0 for b in result.baselines.values())
    assert Plan.from_json(plan.to_json()) == plan
    old = json.loads(plan.to_json())
    for key in ("data_parallel", "data_parallel_mode", "dp_bw_bytes_per_s", "rank_dp_reduce_time_s",
                "dp_reduce_time_s"):
        del old["placement" if key.startswith("data_parallel") else "scores"][key]
    before = Plan.from_json(json.dumps(old))
    assert before.data_parallel == 1 and before.dp_reduce_time_s == 0.0 and before.rank_dp_reduce_time_s == []


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_replicas_memory_and_reduce(capsys, tmp_path):
    path = tmp_path / "plan.json"
    code, out, err = run(capsys, MODEL, "--devices", "2", "--microbatches", "4", "--batch", "16",
                         "--data-parallel", "2", "--dp-bandwidth", "1GB/s", "--json", str(path), "--time-limit", "3")
    assert code == 0, err
    plan = Plan.from_json(path.read_text())
    assert plan.data_parallel == 2 and plan.dp_bw_bytes_per_s == 1e9
    text = " ".join(out.split())
    assert "data parallel: 2 replicas x 2 ranks = 4 GPUs (fsdp); memory is per GPU" in text
    assert "gradient reduce-scatter + parameter all-gather: " in text and " per step at 1 GB/s" in text
    assert "global batch 16 = 2 replicas x 4 microbatches x 2 samples" in text
    code, out, err = run(capsys, MODEL, "--devices", "2", "--microbatches", "4", "--batch", "16",
                         "--data-parallel", "2", "--dp-mode", "replicate", "--time-limit", "3")
    assert code == 0 and "gradient all-reduce over the replicas: " in out and "(replicate)" in out


@pytest.mark.parametrize("argv,match", [
    (["--batch", "12", "--microbatches", "4", "--data-parallel", "2"],
     "the global batch 12 does not split into 2 replicas x 4 microbatches (8 equal parts): use --batch 16"),
    (["--data-parallel", "0"], "--data-parallel is 0"),
    (["--data-parallel", "2", "--dp-bandwidth", "fast"], "cannot read bandwidth 'fast'"),
    (["--data-parallel", "2", "--dp-bandwidth", "0GB/s"], "positive bandwidth"),
    (["--data-parallel", "2", "--gpus-per-host", "0"], "--gpus-per-host is 0"),
])
def test_cli_bad_dp_input_is_one_line_and_exit_2(capsys, argv, match):
    code, out, err = run(capsys, MODEL, "--devices", "2", *argv, "--time-limit", "3")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and match in lines[0], err


def test_cli_rounds_the_default_batch_to_replicas_x_microbatches(capsys):
    code, out, err = run(capsys, "tests.test_cli_plan:tiny_model", "--devices", "2", "--microbatches", "4",
                         "--data-parallel", "3", "--time-limit", "3")
    assert code == 0, err
    assert "using --batch 12: the default batch 8 does not split into 3 replicas x 4 microbatches" in \
        " ".join(err.split())
    assert "global batch 12 = 3 replicas x 4 microbatches x 1 sample" in " ".join(out.split())
