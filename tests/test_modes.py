"""partitioner/modes.py: pm.train()/pm.eval() switch every stage; eval is deterministic with
dropout > 0 and equals the unsplit model in eval mode; both modes share the parameters."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from dist_utils import max_rel_err, reference, run_workers

from partitioner import zoo
from partitioner.api import compile_parallel


def _dropout_gpt2(seed: int = 0) -> zoo.ZooModel:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, use_cache=False,
                                  resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).train()
    gen = torch.Generator().manual_seed(seed)
    tokens, target = torch.randint(0, 100, (4, 8), generator=gen), torch.randint(0, 100, (4, 8), generator=gen)
    return zoo.ZooModel("gpt2-dropout", model, (tokens,), {}, target, zoo.lm_loss)


def _compile(zm, world: int):
    return compile_parallel(copy.deepcopy(zm.model), ["cpu"] * world, zm.example_args, zm.loss_fn,
                            microbatches=2, timeout_s=60)


def test_eval_is_deterministic_and_equals_the_model_in_eval_mode():
    zm = _dropout_gpt2()
    pm = _compile(zm, 2)
    assert pm.training
    # what recaptures the other mode keeps no weights alive: a copy of the model on meta, still tied
    assert all(t.is_meta for t in [*pm.model.parameters(), *pm.model.buffers()])
    assert pm.model.lm_head.weight is pm.model.transformer.wte.weight
    x, = zm.example_args
    with torch.no_grad():
        a, b = pm(x).logits, pm(x).logits
        assert not torch.equal(a, b)  # dropout on: compiled in training mode
        pm.eval()
        assert not pm.training
        y1, y2 = pm(x).logits, pm(x).logits
        want = copy.deepcopy(zm.model).eval()(x).logits
    assert torch.equal(y1, y2)
    assert max_rel_err(y1, want) < 1e-5
    # training in eval mode: loss and gradients of the model in eval mode
    ref_model = copy.deepcopy(zm.model).eval()
    ref_loss, ref_grads = reference(zoo.ZooModel("m", ref_model, zm.example_args, {}, zm.target, zm.loss_fn))
    loss = pm.train_step(x, target=zm.target)
    assert max_rel_err(loss, ref_loss) < 1e-5
    for name, p in pm.named_parameters():
        assert max_rel_err(p.grad, ref_grads[name]) < 1e-5, name
    # both modes read the same tensors: weights loaded in train mode show in eval mode
    other = _dropout_gpt2(seed=1).model
    pm.train().load_state_dict(other.state_dict())
    with torch.no_grad():
        assert max_rel_err(pm.eval()(x).logits, other.eval()(x).logits) < 1e-5
    assert pm.train() is pm and pm.training


def _worker(rank: int, world: int, _arg) -> dict:
    zm = _dropout_gpt2()
    pm = _compile(zm, world)
    x, = zm.example_args
    with torch.no_grad():
        pm.eval()
        y1, y2 = pm(x), pm(x)
        want = copy.deepcopy(zm.model).eval()(x).logits
    pm.train()
    loss = pm.train_step(x, target=zm.target)  # the training graph still runs after the switch
    out = {"loss": float(loss)}
    if y1 is not None:
        out.update(equal=torch.equal(y1.logits, y2.logits), err=max_rel_err(y1.logits, want))
    return out


def test_eval_over_two_gloo_ranks():
    results = run_workers(_worker, 2, None, timeout_s=120)
    last = results[1]
    assert last["equal"] and last["err"] < 1e-5, last
    assert results[0]["loss"] == results[1]["loss"]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_eval_of_a_model_with_float_inputs_equals_the_model_in_eval_mode(name):
    """The other mode is captured from a copy on meta: float inputs (an MLP's features, the cnn's
    images) must meet meta weights there."""
    zm = zoo.build(name, small=True, batch=4)
    pm = _compile(zm, 2)
    x, = zm.example_args
    with torch.no_grad():
        got = pm.eval()(x)
        want = copy.deepcopy(zm.model).eval()(x)
        assert max_rel_err(got, want) < 1e-5
        assert max_rel_err(pm.train()(x), copy.deepcopy(zm.model).train()(x)) < 1e-5
