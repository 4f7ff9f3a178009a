"""partitioner/runtime/executor.py: in one process, loss and every gradient equal the unpartitioned model's
for every model, schedule and (random) plan."""
from __future__ import annotations

import copy
import random
import sys
import zlib

import pytest
import torch
import torch.nn as nn
from dist_utils import build, grad_errors, max_rel_err, reference

from partitioner.api import compile_parallel
from partitioner.passes.capture import capture
from partitioner.passes.split import plan_from_cuts, valid_cuts
from partitioner.runtime.executor import in_process_order
from partitioner.runtime.schedules import dependencies, make_schedule

SCHEDULES = [("gpipe", 2, 1), ("1f1b", 2, 1), ("interleaved-1f1b", 2, 2)]


@pytest.mark.parametrize("name,ranks,chunks", [("1f1b", 3, 1), ("gpipe", 2, 3), ("interleaved-1f1b", 2, 2)])
def test_in_process_order_runs_dependencies_first(name, ranks, chunks):
    schedule = make_schedule(name, ranks, 4, chunks)
    order = in_process_order(schedule)
    assert sorted(map(str, order)) == sorted(str(a) for row in schedule.actions for a in row)
    seen = set()
    for a in order:
        assert all(d in seen for d in dependencies(schedule, a)), a
        seen.add(a)
    for row in schedule.actions:  # every rank's own order is kept
        assert [a for a in order if a in set(row)] == list(row)


def random_plan(zm, microbatches, ranks, chunks, schedule, seed):
    """A plan cutting the microbatch-sized graph at random places where tensors cross."""
    mb = [x[: x.shape[0] // microbatches] for x in zm.example_args]
    mb_kwargs = {k: v[: v.shape[0] // microbatches] for k, v in zm.example_kwargs.items()}
    captured = capture(zm.model, tuple(mb), mb_kwargs)
    cuts = sorted(random.Random(seed).sample(valid_cuts(captured), ranks * chunks - 1))
    return plan_from_cuts(captured, cuts, ranks, chunks, schedule, microbatches)


def check_equivalent(zm, schedule, ranks, chunks, seed, microbatches=4):
    ref_loss, ref_grads = reference(zm)
    plan = random_plan(zm, microbatches, ranks, chunks, schedule, seed)
    pm = compile_parallel(copy.deepcopy(zm.model), ["cpu"] * ranks, zm.example_args, zm.loss_fn,
                          example_kwargs=zm.example_kwargs, microbatches=microbatches, schedule=schedule,
                          plan=plan)
    loss = pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
    assert max_rel_err(loss, ref_loss) < 1e-5
    errors = grad_errors(pm, ref_grads)
    assert set(errors) == set(ref_grads)
    assert max(errors.values()) < 1e-5, max(errors.items(), key=lambda kv: kv[1])
    return pm, ref_grads


@pytest.mark.parametrize("model", ["mlp", "cnn", "gpt2", "t5-base"])
@pytest.mark.parametrize("schedule,ranks,chunks", SCHEDULES)
def test_loss_and_gradients_equal_the_unpartitioned_model(model, schedule, ranks, chunks):
    check_equivalent(build(model), schedule, ranks, chunks, seed=zlib.crc32(f"{model}{schedule}{ranks}".encode()))


def test_looped_gpipe_with_a_tied_weight_across_six_stages():
    check_equivalent(build("gpt2"), "gpipe", 3, 2, seed=5)


@pytest.mark.parametrize("seed", range(3))
def test_random_eight_stage_plans_of_t5(seed):
    """Encoder output read by many decoder stages, decoder inputs read by later stages."""
    pm, _ = check_equivalent(build("t5-base"), "interleaved-1f1b", 4, 2, seed=seed)
    assert max(len(c) for st in pm.stages for c in st.output_consumers.values()) > 1


def test_gradients_accumulate_across_steps():
    zm = build("gpt2")
    pm, ref_grads = check_equivalent(zm, "1f1b", 2, 1, seed=3)
    pm.train_step(*zm.example_args, target=zm.target)
    errors = grad_errors(pm, {n: 2 * g for n, g in ref_grads.items()})
    assert max(errors.values()) < 1e-5
    pm.zero_grad()
    assert all(p.grad is None for p in pm.parameters())


class SkipInPlace(nn.Module):
    """A skip connection across stages, an in-place op on a received value, an integer output."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.l0(x)
        top = h.argmax(-1)
        y = self.act(self.l1(self.act(h * 1.0)))
        return {"out": self.l2(y) + h, "top": top}


def skip_loss(output, target):
    return nn.functional.mse_loss(output["out"], target)


@pytest.mark.parametrize("seed", range(4))
def test_skip_connections_in_place_ops_and_integer_values(seed):
    torch.manual_seed(seed)
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    zm = type("ZM", (), dict(model=SkipInPlace(), example_args=(x,), example_kwargs={}, target=y,
                             loss_fn=staticmethod(skip_loss)))
    pm, _ = check_equivalent(zm, "1f1b", 3, 1, seed=seed)
    out = pm(x)
    torch.testing.assert_close(out["out"], zm.model(x)["out"])
    assert torch.equal(out["top"], zm.model(x)["top"])


def test_frozen_parameters_send_no_gradients():
    zm = build("mlp")
    for p in zm.model.layers[0].parameters():
        p.requires_grad_(False)
    ref_loss, ref_grads = reference(zm)
    captured = capture(zm.model, (zm.example_args[0][:1],))
    plan = plan_from_cuts(captured, [2], 2)  # stage 0: the frozen layer and its activation
    pm = compile_parallel(copy.deepcopy(zm.model), ["cpu"] * 2, zm.example_args, zm.loss_fn, microbatches=4,
                          plan=plan)
    first = pm.stages[0]
    assert first.outputs and not any(first.value_meta[v].requires_grad for v in first.outputs)
    assert not pm.executor.train_comm.sends[pm.schedule.actions[1][1]]  # 1B0 sends nothing back
    pm.train_step(*zm.example_args, target=zm.target)
    for name, p in pm.named_parameters():
        if name.startswith("layers.0."):
            assert p.grad is None and not p.requires_grad
        else:
            assert max_rel_err(p.grad, ref_grads[name]) < 1e-5


@pytest.mark.parametrize("model", ["bert-base", "llama-1b"])
@pytest.mark.parametrize("schedule,ranks,chunks", [("gpipe", 2, 1), ("1f1b", 3, 1), ("interleaved-1f1b", 2, 2)])
def test_bert_and_llama_equal_the_unpartitioned_model(model, schedule, ranks, chunks):
    """BERT's attention key biases get an analytically zero gradient (softmax ignores a shift along
    the keys): both sides hold rounding noise of ~1e-13 there, so those are compared absolutely."""
    zm = build(model)
    ref_loss, ref_grads = reference(zm)
    plan = random_plan(zm, 4, ranks, chunks, schedule, seed=zlib.crc32(f"{model}{schedule}".encode()))
    pm = compile_parallel(copy.deepcopy(zm.model), ["cpu"] * ranks, zm.example_args, zm.loss_fn,
                          example_kwargs=zm.example_kwargs, microbatches=4, schedule=schedule, plan=plan)
    loss = pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
    assert max_rel_err(loss, ref_loss) < 1e-5
    got = dict(pm.named_parameters())
    assert set(got) == set(ref_grads)
    for name, want in ref_grads.items():
        diff = (got[name].grad - want).abs().max().item()
        if want.abs().max() < 1e-10:
            assert diff < 1e-10, name
        else:
            assert diff / want.abs().max().item() < 1e-5, name


def test_step_graph_keys_a_step_by_everything_but_tensor_values(monkeypatch):
    """A captured step replays only for inputs of the captured structure, shapes, dtypes and
    non-tensor values (partitioner/runtime/step_graph.py); tensor values may change."""
    from partitioner.runtime.step_graph import StepGraph
    a = ([[torch.zeros(2, 3), 4]], [torch.zeros(2)])
    tensors, key = StepGraph._flatten(*a)
    assert len(tensors) == 2
    assert StepGraph._flatten([[torch.ones(2, 3), 4]], [torch.ones(2)])[1] == key
    for other in (([[torch.zeros(2, 3), 5]], [torch.zeros(2)]), ([[torch.zeros(3, 3), 4]], [torch.zeros(2)]),
                  ([[torch.zeros(2, 3, dtype=torch.int64), 4]], [torch.zeros(2)])):
        assert StepGraph._flatten(*other)[1] != key
    with torch.autocast("cuda", torch.bfloat16, enabled=False):  # off: its dtype does not matter
        assert StepGraph._flatten(*a)[1] == key
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type: True)  # on: baked into a captured step
    assert StepGraph._flatten(*a)[1] != key
    monkeypatch.undo()
    graph = StepGraph(lambda i, t: None, lambda: [], torch.device("cpu"))
    graph._spec = key
    inputs, targets = graph._unflatten([torch.ones(2, 3), torch.ones(2)])
    assert inputs[0][1] == 4 and torch.equal(inputs[0][0], torch.ones(2, 3)) and torch.equal(targets[0], torch.ones(2))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_an_error_inside_a_stage_says_which_stage_pass_and_microbatch_raised_it():
    class Bags(torch.nn.Module):  # tokens + offsets: offsets' length is the batch, but the tokens are cut
        def __init__(self):
            super().__init__()
            self.bag = torch.nn.EmbeddingBag(64, 8, mode="sum")
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

        def forward(self, tokens, offsets):
            h = self.bag(tokens, offsets)
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return h

    tokens, offsets = torch.randint(0, 64, (12,)), torch.tensor([0, 3, 5, 9])
    pm = compile_parallel(Bags(), ["cpu", "cpu"], (tokens, offsets), lambda out, t: out.pow(2).mean(),
                          microbatches=2)
    with pytest.raises(RuntimeError, match="offsets") as err:
        pm.train_step(tokens, offsets)
    assert any(note.startswith("partitioner: raised by 0F0 (forward of stage 0, microbatch 0; the stage holds bag.weight")
               and "batch_dims" in note for note in err.value.__notes__)


class _AuxHead(torch.nn.Module):
    """A model returning (head(h), aux(h)): the loss reads only the first output."""

    def __init__(self):
        super().__init__()
        self.a, self.aux, self.b, self.head = (torch.nn.Linear(8, 8), torch.nn.Linear(8, 3), torch.nn.Linear(8, 8),
                                              torch.nn.Linear(8, 3))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.head(torch.tanh(self.b(h))), self.aux(h)


@pytest.mark.parametrize("with_target", [True, False])
def test_an_output_the_loss_ignores_leaves_its_parameters_without_gradient(with_target):
    """aux(h) is made in stage 0 and ignored by the loss: as in the model, aux's parameters get no
    gradient (not a zero one, which AdamW's weight decay would act on); with no example_target the
    runtime cannot tell and sends zeros (the gradients still equal, aux's being 0)."""
    import torch.nn.functional as F

    from partitioner.passes.capture import capture
    from partitioner.passes.split import plan_from_cuts
    torch.manual_seed(0)
    model, x, y = _AuxHead(), torch.randn(8, 8), torch.randint(0, 3, (8,))
    loss_fn = lambda out, t: F.cross_entropy(out[0], t)  # noqa: E731
    captured = capture(model, (x[:2],))
    compute = [n for n in captured.graph_module.graph.nodes if n.op == "call_function"]
    cut = next(i for i, n in enumerate(compute) if "aux" in str(n.meta.get("nn_module_stack"))) + 1
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * 2, (x,), loss_fn, microbatches=4,
                          plan=plan_from_cuts(captured, [cut], 2, 1, "1f1b", 4),
                          example_target=y if with_target else None)
    assert pm.stages[0].graph_module is not None and any("aux" in f for f in pm.stages[0].params)
    loss = pm.train_step(x, target=y)
    ref = copy.deepcopy(model)
    ref_loss = loss_fn(ref(x), y)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())
    got = dict(pm.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is None:
            assert name.startswith("aux.")
            assert (got[name].grad is None) if with_target else not got[name].grad.any(), name
        else:
            assert (got[name].grad - p.grad).abs().max() <= 1e-5 * p.grad.abs().max(), name
