"""Today's training-loop features over processes: 2 gloo ranks, and data parallel x pipeline on 4 (dp 2 x pp 2,
data_parallel 'replicate' and 'fsdp'), some with compile=True: loss_fn=None (the model's own output.loss; with
HF's num_items_in_batch the whole batch's token mean), a GradScaler (refused by name), dataclass inputs / target /
output, gradient hooks on the model's parameters, inputs by keyword in another order, freezing through
pm.named_parameters() mid-training, an optimizer state of the unpartitioned model, and pm.save / pm.load with the
optimizer. Each equals the unpartitioned model with gradient accumulation over the same microbatches (fp32 rel err
< 1e-5, compiled < 1e-4); under 'replicate' a gradient hook sees each replica's own gradient, as under DDP.
"""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import test_architectures_more as tam
from dist_utils import build, max_rel_err, run_workers
from torch.distributed.device_mesh import init_device_mesh

from partitioner.api import compile_parallel
from partitioner.checkpoint import save_model
from partitioner.errors import RuntimeConfigError
from partitioner.microbatch import split_batch
from partitioner.runtime.data_parallel import full_tensor

BATCH, MB = 8, 2  # MB microbatches per replica


def _compile(model, args, loss_fn, mode, compiled=False, **kw):
    """2 pipeline ranks; with mode ('replicate' / 'fsdp') 2 replicas of them on a (dp, pp) mesh."""
    kw.update(microbatches=MB, compile=compiled, time_limit_s=1, timeout_s=60)
    if mode is None:
        return compile_parallel(model, ["cpu"] * 2, args, loss_fn, **kw)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    return compile_parallel(model, mesh=mesh, example_inputs=args, loss_fn=loss_fn, data_parallel=mode, **kw)


def _errors(pm, loss, want_loss, want_grads) -> float:
    """Largest relative error of the loss and of this rank's (gathered) gradients."""
    errs = [max_rel_err(full_tensor(p.grad), want_grads[n]) for n, p in pm.named_parameters()]
    return max([max_rel_err(loss, want_loss), *errs])


def _reference(model, args, kwargs, target=None, loss_fn=None):
    model = copy.deepcopy(model)
    out = model(*args, **kwargs)
    loss = out.loss if loss_fn is None else loss_fn(out, target)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def own_loss_save_load(mode, tmp, compiled):
    """loss_fn=None (labels=), then save after an AdamW step and load: weights and the resumed step as saved."""
    zm = build("gpt2", batch=BATCH)
    pm = _compile(copy.deepcopy(zm.model), zm.example_args, None, mode, compiled, example_kwargs={"labels": zm.target})
    loss = pm.train_step(*zm.example_args, labels=zm.target)
    err = _errors(pm, loss, *_reference(zm.model, zm.example_args, {"labels": zm.target}))
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2, eps=1e-4)
    states = []
    for step in range(2):
        opt.step(), opt.zero_grad()
        if step == 0:
            pm.save(os.path.join(tmp, f"{mode}-{compiled}"), optimizer=opt, extra={"step": 1})
        states.append({k: v.clone() for k, v in pm.full_state_dict().items()})  # rank 0's only
        pm.train_step(*zm.example_args, labels=zm.target)
    assert pm.load(os.path.join(tmp, f"{mode}-{compiled}"), optimizer=opt) == {"step": 1}
    loaded = pm.full_state_dict()
    pm.zero_grad()
    pm.train_step(*zm.example_args, labels=zm.target)
    opt.step()
    resumed = pm.full_state_dict()
    return {"err": err, "loaded": max((max_rel_err(loaded[k], v) for k, v in states[0].items()), default=0.0),
            "resumed": max((max_rel_err(resumed[k], v) for k, v in states[1].items()), default=0.0)}


def scaler(mode, tmp, compiled):
    zm = build("mlp", batch=BATCH)
    pm = _compile(copy.deepcopy(zm.model), zm.example_args, zm.loss_fn, mode)
    with pytest.raises(RuntimeConfigError, match=r"scaler=\.\.\.\) under torchrun .* mixed_precision='bf16'"):
        pm.train_step(*zm.example_args, target=zm.target, scaler=torch.amp.GradScaler("cpu"))
    return {}


def dataclasses_(mode, tmp, compiled):
    torch.manual_seed(0)
    model = tam.DataclassModel()
    args = (tam.Batch(torch.randn(BATCH, tam.DIM), torch.rand(BATCH, 1)),)
    target = tam.Target(torch.randint(0, 3, (BATCH,)))
    pm = _compile(copy.deepcopy(model), args, tam.output_loss, mode, compiled, example_target=target)
    err = _errors(pm, pm.train_step(*args, target=target), *_reference(model, args, {}, target, tam.output_loss))
    with torch.no_grad():
        out = pm.eval()(*args)
    return {"err": err, "output": type(out).__name__}  # each replica's last rank: an Output


def hooks(mode, tmp, compiled):
    """Hooked parameters: under 'replicate' each replica's copies see its own microbatches' gradients before
    the dp average, as DDP's parameters do (no_sync over the microbatches); 'fsdp' refuses them."""
    g = torch.Generator().manual_seed(1)
    args, target = (torch.randn(BATCH, tam.DIM, generator=g),), torch.randint(0, 3, (BATCH,), generator=g)
    try:
        pm = _compile(tam.hooked_mlp(), args, tam.loss_fn, mode, compiled)
    except RuntimeConfigError as err:
        return {"refused": str(err)}
    pm.train_step(*args, target=target)
    dp = pm.dp
    shares = zip(split_batch(args, dp, "input", BATCH), split_batch(target, dp, "target"))
    replicas = []
    for share, share_target in shares:  # as DDP with no_sync computes it (torch 2.13: equal), then the average
        model = tam.hooked_mlp()
        mbs = zip(split_batch(share, MB, "input", BATCH // dp), split_batch(share_target, MB, "target"))
        for mb, mb_target in mbs:
            (tam.loss_fn(model(*mb), mb_target) / MB).backward()
        replicas.append(dict(model.named_parameters()))
    return {"err": max(max_rel_err(full_tensor(p.grad), sum(r[n].grad for r in replicas) / dp)
                       for n, p in pm.named_parameters())}


def keywords(mode, tmp, compiled):
    zm = build("t5-base", batch=BATCH)
    x, d = zm.example_args[0], zm.example_kwargs["decoder_input_ids"]
    pm = _compile(copy.deepcopy(zm.model), zm.example_args, zm.loss_fn, mode, compiled,
                  example_kwargs=zm.example_kwargs)
    loss = pm.train_step(decoder_input_ids=d, input_ids=x, target=zm.target)
    return {"err": _errors(pm, loss, *_reference(zm.model, (), {"input_ids": x, "decoder_input_ids": d},
                                                 zm.target, zm.loss_fn))}


def freeze(mode, tmp, compiled):
    """Two parameters (one on each pipeline rank) frozen after the first step, in pm and in the reference."""
    zm = build("mlp", batch=BATCH)
    model = copy.deepcopy(zm.model)
    pm = _compile(copy.deepcopy(zm.model), zm.example_args, zm.loss_fn, mode, compiled)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (pm, model)]
    names = [n for n, _ in model.named_parameters()]
    err = 0.0
    for step in range(3):
        if step == 1:
            for m in (pm, model):
                for n, p in m.named_parameters():
                    p.requires_grad_(n not in (names[0], names[-1]))
        loss = pm.train_step(*zm.example_args, target=zm.target)
        want = zm.loss_fn(model(*zm.example_args), zm.target)
        want.backward()
        ref = dict(model.named_parameters())
        for n, p in pm.named_parameters():
            assert (p.grad is None) == (ref[n].grad is None), (step, n)
            err = max(err, max_rel_err(full_tensor(p.grad), ref[n].grad) if p.grad is not None else 0.0)
        err = max(err, max_rel_err(loss, want.detach()))
        for opt in opts:
            opt.step(), opt.zero_grad()
    full = pm.full_state_dict()
    return {"err": max([err, *(max_rel_err(full[n], p.detach()) for n, p in model.named_parameters() if n in full)])}


def optimizer_state(mode, tmp, compiled):
    """An unpartitioned model's optimizer state: under torchrun each rank's optimizer holds its stages'
    parameters only, so it loads by FQN through checkpoint.save_model and pm.load (load_state_dict refuses)."""
    zm = build("t5-base", batch=BATCH)
    model = copy.deepcopy(zm.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        zm.loss_fn(model(*zm.example_args, **zm.example_kwargs), zm.target).backward()
        if _ == 0:
            opt.step(), opt.zero_grad()
    pm = _compile(copy.deepcopy(zm.model), zm.example_args, zm.loss_fn, mode, compiled,
                  example_kwargs=zm.example_kwargs)
    mine = [n for n, _ in pm.named_parameters()]
    assert mine == [n for n, _ in model.named_parameters() if n in mine]  # this rank's, in the model's order
    pm_opt = torch.optim.SGD(pm.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        pm_opt.load_state_dict(opt.state_dict())
    path = os.path.join(tmp, f"unpartitioned-{mode}")
    if dist.get_rank() == 0:
        save_model(model, path, optimizer=opt)
    dist.barrier()
    pm.load(path, optimizer=pm_opt)
    pm.train_step(*zm.example_args, target=zm.target, **zm.example_kwargs)
    opt.step(), pm_opt.step()
    want = dict(model.named_parameters())
    return {"err": max(max_rel_err(full_tensor(p.detach()), want[n].detach()) for n, p in pm.named_parameters())}


def num_items(mode, tmp, compiled):
    """HF's num_items_in_batch: each microbatch's loss is its share of the global batch's token mean, so the
    step sums them (and replicas, which average their gradients, weigh theirs by dp): loss and gradients of one
    forward of the whole batch, -100 labels spread unevenly. Then pm(...) on half the batch and on 1.5 times
    it (multiples of the microbatch times dp), each replica's last rank holding its share."""
    zm = build("gpt2", batch=BATCH)
    tokens, = zm.example_args
    labels = zm.target.clone()
    labels[0, :5], labels[1, 1:], labels[6, 3:] = -100, -100, -100
    kwargs = {"labels": labels, "num_items_in_batch": (labels[:, 1:] != -100).sum()}
    pm = _compile(copy.deepcopy(zm.model), (tokens,), None, mode, compiled, example_kwargs=kwargs)
    loss = pm.train_step(tokens, **kwargs)
    err = _errors(pm, loss, *_reference(zm.model, (tokens,), {"labels": labels}))
    pm.eval()
    model = copy.deepcopy(zm.model).eval()
    more = torch.cat([tokens, tokens[:BATCH // 2]])
    for n in (BATCH // 2, BATCH + BATCH // 2):
        with torch.no_grad():
            out = pm(more[:n], labels=torch.cat([labels, labels])[:n], num_items_in_batch=kwargs["num_items_in_batch"])
            want = model(more[:n]).logits
        if out is not None:  # this replica's share of the batch
            share = n // pm.dp
            rows = want[pm.layout.dp_rank * share:(pm.layout.dp_rank + 1) * share] if pm.dp > 1 else want
            err = max(err, max_rel_err(out.logits, rows))
    return {"err": err}


def _worker(rank: int, world: int, arg) -> dict:
    tmp, mode, cases = arg
    dist.init_process_group("gloo")
    warnings.simplefilter("ignore")
    out = {}
    for fn, compiled in cases:
        out[(fn.__name__, compiled)] = fn(mode, tmp, compiled)
        dist.barrier()
    return out


@pytest.mark.parametrize("mode", [None, "replicate", "fsdp"])
def test_training_loop_features_over_gloo_ranks(mode, tmp_path):
    cases = [(own_loss_save_load, mode != "fsdp"), (scaler, False), (dataclasses_, mode == "fsdp"),
             (hooks, mode == "replicate"), (keywords, False), (freeze, mode == "fsdp"),
             (optimizer_state, False), (num_items, False)]
    results = run_workers(_worker, 2 if mode is None else 4, (str(tmp_path), mode, cases), timeout_s=240)
    for name, compiled in results[0]:
        for rank, res in enumerate(results):
            got = res[(name, compiled)]
            if "refused" in got:
                assert mode == "fsdp" and name == "hooks", got
                assert "has a gradient hook, but data_parallel='fsdp'" in got["refused"] and "'replicate'" in \
                    got["refused"], got
                continue
            assert got.get("err", 0.0) < (1e-4 if compiled else 1e-5), (name, compiled, rank, got)
            assert got.get("loaded", 0.0) == 0.0 and got.get("resumed", 0.0) < 1e-6, (name, rank, got)
        if name == "dataclasses_":
            assert sorted(res[(name, compiled)]["output"] for res in results) == \
                sorted(["NoneType", "Output"] * (len(results) // 2))
