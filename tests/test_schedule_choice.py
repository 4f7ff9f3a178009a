"""partitioner/schedule_choice.py: chunks="auto" plans 1, 2 and 4 stages per rank and keeps interleaving
only where it predicts a clear gain; through plan_model, the CLI and compile_parallel."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from dist_utils import grad_errors, max_rel_err

from partitioner.api import compile_parallel
from partitioner.cost_models.device import get_device_spec
from partitioner.errors import PlanError, RuntimeConfigError
from partitioner.plan_model import PlanConfig, plan_model
from partitioner.schedule_choice import INTERLEAVING_MARGIN, choice_line, choose_chunks


def choose(times: dict[int, float | Exception], ranks: int = 2, microbatches: int = 8):
    """choose_chunks over made-up predicted steps (an exception: that candidate fails)."""
    def plan_one(chunks, limit):
        assert limit == pytest.approx(3.0 / 3)  # the solve time is shared
        if isinstance(times[chunks], Exception):
            raise times[chunks]
        return chunks, times[chunks]
    (chosen, _), choices = choose_chunks(plan_one, lambda r: r[1], ranks, microbatches, 3.0)
    return chosen, choices


def test_interleaving_is_chosen_only_where_it_predicts_the_margin_faster():
    just_inside = 1.0 - INTERLEAVING_MARGIN * 1.01
    assert choose({1: 1.0, 2: just_inside, 4: 0.999})[0] == 2
    assert choose({1: 1.0, 2: 0.99, 4: 0.995})[0] == 1  # 1% faster: within the simulator's error
    assert choose({1: 1.0, 2: 1.05, 4: 0.9})[0] == 4
    chosen, choices = choose({1: 1.0, 2: 1.1, 4: 1.2})
    assert chosen == 1 and [(c.chunks, c.schedule, c.step_time_s) for c in choices] == [
        (1, "1f1b", 1.0), (2, "interleaved-1f1b", 1.1), (4, "interleaved-1f1b", 1.2)]


def test_candidates_that_cannot_be_planned_are_skipped_and_said():
    chosen, choices = choose({1: PlanError("memory cap 1 GiB per device is too small\nmore"), 2: 1.3, 4: 1.2})
    assert chosen == 4 and choices[0].step_time_s is None and choices[0].why_not == "memory cap 1 GiB per device " \
                                                                                   "is too small"
    assert "1f1b (memory cap 1 GiB per device is too small)" in choice_line(choices, chosen)
    with pytest.raises(PlanError, match="only 3 blocks"):
        choose({c: PlanError("only 3 blocks") for c in (1, 2, 4)})
    chosen, choices = choose_chunks(lambda c, t: (c, 1.0 / c), lambda r: r[1], 2, 5, 3.0)
    assert chosen == (1, 1.0) and "multiple of 2" in choices[1].why_not  # 5 microbatches: no interleaving
    (_, _), only = choose_chunks(lambda c, t: (c, 1.0), lambda r: r[1], 1, 4, 3.0)
    assert [c.chunks for c in only] == [1]  # one rank: nothing to interleave


def chain(n: int = 8, width: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh())
                                 for _ in range(n)])


def test_plan_model_follows_what_waiting_sends_cost_the_sender():
    """The same chain planned with auto: with sends that cost their sender nothing interleaving's smaller
    bubble wins; where a waiting send slows the sender enough, 1F1B is kept."""
    model, x = chain(), (torch.randn(32, 64),)
    chosen = {}
    for slowdown in (1.0, 3.0):
        spec = dataclasses.replace(get_device_spec("h100"), fp32_waiting_send_slowdown=slowdown)
        config = PlanConfig(num_ranks=2, chunks="auto", microbatches=8, device_type=spec, time_limit_s=3,
                            use_cache=False)
        result = plan_model(model, x, {}, config)
        assert [c.chunks for c in result.chunk_choices] == [1, 2, 4]
        assert result.plan.schedule == ("1f1b" if result.plan.chunks == 1 else "interleaved-1f1b")
        picked = next(c for c in result.chunk_choices if c.chunks == result.plan.chunks)
        assert result.plan.step_time_s == picked.step_time_s
        chosen[slowdown] = result.plan.chunks
    assert chosen[1.0] > 1 and chosen[3.0] == 1
    with pytest.raises(PlanError, match="chooses the schedule"):
        plan_model(model, x, {}, PlanConfig(num_ranks=2, chunks="auto", schedule="1f1b", use_cache=False))


def test_compile_parallel_with_auto_chunks_trains_as_the_model(monkeypatch, capsys):
    """In one process on one device nothing overlaps: 1f1b, said. Where the ranks run apart (as under torchrun
    or on several GPUs; here pretended) the chosen plan trains as the model."""
    from partitioner import api
    model, x, y = chain(), torch.randn(16, 64), torch.randn(16, 64)
    loss_fn = torch.nn.functional.mse_loss
    ref = sum(loss_fn(model(xm), ym) for xm, ym in zip(x.chunk(4), y.chunk(4))) / 4
    ref.backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), loss_fn, microbatches=4, chunks="auto",
                          time_limit_s=2)
    assert pm.plan.chunks == 1 and "ranks share a device in this process" in capsys.readouterr().err
    monkeypatch.setattr(api, "_ranks_share_a_device", lambda devices, rank: False)
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), loss_fn, microbatches=4, chunks="auto",
                          time_limit_s=2)
    said = next(line for line in capsys.readouterr().err.splitlines() if "chunks='auto': 1f1b" in line)
    assert pm.plan.num_stages == 2 * pm.plan.chunks and pm.plan.schedule in said.split("->")[1]
    assert max_rel_err(pm.train_step(x, target=y), ref) < 1e-5
    assert max(grad_errors(pm, want).values()) < 1e-5
    with pytest.raises(RuntimeConfigError, match="chunks='auto' chooses the schedule"):
        compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), loss_fn, chunks="auto", schedule="gpipe")
