"""partitioner/cost_models/loss.py and passes.coarsen.attach_loss: the loss is costed on the last stage."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from partitioner.cost_models.loss import profile_loss
from partitioner import zoo
from partitioner.plan_model import PlanConfig, plan_model
from partitioner.passes.capture import capture


def _lm_loss(out, target):
    return F.cross_entropy(out.flatten(0, 1), target.flatten())


def test_cross_entropy_saves_fp32_log_probabilities_and_writes_their_gradient():
    B, T, V = 2, 8, 50
    model = torch.nn.Linear(16, V)
    captured = capture(model, (torch.randn(B, T, 16),))
    costs = profile_loss(_lm_loss, captured, torch.randint(0, V, (B, T)), device="h100")
    logits = B * T * V * 4
    # log_softmax's output, plus the int64 target and a scalar nll_loss keeps for its backward
    assert costs.total("saved_bytes") == logits + B * T * 8 + 4
    assert max(c.bwd_working_bytes for c in costs.nodes.values()) >= 2 * logits  # grad in + grad out
    assert costs.total("fwd_time_s") > 0 and costs.total("bwd_time_s") > 0


def test_plans_count_the_loss_on_the_last_stage():
    zm = zoo.build("gpt2", small=True, batch=8, seq=16)
    config = PlanConfig(num_ranks=2, microbatches=4)
    without = plan_model(zm.model, zm.example_args, zm.example_kwargs, config)
    with_loss = plan_model(zm.model, zm.example_args, zm.example_kwargs, config, loss_fn=zm.loss_fn,
                           example_target=zm.target)
    assert sum(b.saved_bytes for b in with_loss.block_graph.blocks) > sum(b.saved_bytes for b in without.block_graph.blocks)
    assert with_loss.plan.rank_mem_bytes[-1] > without.plan.rank_mem_bytes[-1]
    assert with_loss.plan.rank_mem_bytes[0] == without.plan.rank_mem_bytes[0] or \
        with_loss.plan.block_stage != without.plan.block_stage
    work = sum(b.time_s for b in with_loss.block_graph.blocks) - sum(b.time_s for b in without.block_graph.blocks)
    assert work > 0


def test_compile_parallel_with_example_target_and_a_dict_output_trains_exactly():
    """The loss reads one entry of a dict output; planning with example_target costs it and the
    pipeline still gives the plain model's loss and gradients."""
    import copy

    class DictOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 16)
            self.body = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
            self.head = torch.nn.Linear(16, 20)

        def forward(self, tokens):
            h = self.body(self.emb(tokens))
            return {"logits": self.head(h), "hidden": h}

    from partitioner import compile_parallel

    torch.manual_seed(0)
    model, tokens, target = DictOut(), torch.randint(0, 20, (8, 6)), torch.randint(0, 20, (8, 6))
    loss_fn = lambda out, t: _lm_loss(out["logits"], t)  # noqa: E731
    ref = copy.deepcopy(model)
    want = loss_fn(ref(tokens), target)
    want.backward()
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (tokens,), loss_fn, microbatches=4,
                          example_target=target)
    got = pm.train_step(tokens, target=target)
    assert torch.allclose(got, want, rtol=1e-5)
    grads = dict(ref.named_parameters())
    for name, p in pm.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7), name


def test_mixed_precision_costs_the_loss_in_fp32_as_autocast_runs_it():
    """With mixed_precision the model computes in bf16, but its loss runs under autocast, whose
    cross-entropy keeps fp32 log-probabilities: the loss adds what it adds to an fp32 model."""
    zm = zoo.build("gpt2", small=True, batch=8, seq=16)
    loss_fn = _lm_loss  # no .float() of its own (the zoo's casts the logits itself)

    def loss_saved_bytes(mixed_precision):
        config = PlanConfig(num_ranks=2, microbatches=4, dtype=None, mixed_precision=mixed_precision, use_cache=False)
        saved = [sum(b.saved_bytes for b in plan_model(zm.model, zm.example_args, zm.example_kwargs, config,
                                                       **extra).block_graph.blocks)
                 for extra in ({}, {"loss_fn": lambda out, y: loss_fn(out.logits, y), "example_target": zm.target})]
        return saved[1] - saved[0]

    assert loss_saved_bytes("bf16") == loss_saved_bytes(None) > 0
