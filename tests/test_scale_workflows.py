"""A training job's life as a user scaling it runs it, over gloo processes (2 and 4 ranks), against the
unpartitioned model trained the same way in one process.

- Two ranks: a tiny Llama (tied embeddings) built under meta_parameters() loads a save_pretrained directory
  (checkpoint=), trains 3 steps with AdamW, a LambdaLR warmup and pm.clip_grad_norm_, and saves with the
  scheduler's state in `extra`; chunks="auto" (every rank runs the plan rank 0 chose) trains as the model.
- Four fresh ranks, dp 2 x pp 2 under FSDP2: the same script compiles on another layout, loads the checkpoint
  and continues 2 steps: parameters equal 5 straight steps of the model; full_state_dict on every rank;
  gradients accumulated over two train_steps without zero_grad with a layer frozen on one pipeline rank;
  then data_parallel="replicate" with mixed_precision="bf16" and the model's own loss over -100 labels with
  num_items_in_batch.
- In one process: the DCP checkpoint into the plain model by `dcp.load({"model": model.state_dict()})`, by
  to_torch_save, and back through save_pretrained / from_pretrained.
- Failure: a rank that raises mid-step (its loss_fn, or its own script between train_step and clipping) and
  stays alive does not hold the others past timeout_s; their error names the rank(s) they waited for, also
  where the process group came from the user with torch's default timeout (30 minutes on gloo); a tied weight
  frozen on one of its two ranks only, and ranks given different batches (a DistributedSampler's), are named.

fp32 comparisons: rel err < 1e-5 (AdamW with eps=1e-4: its first step is lr * sign(g) for gradients far above
eps, which flips for gradients at rounding level; test_data_parallel.py says the same).
"""
from __future__ import annotations

import copy
import os
import time

import pytest
import torch
import torch.distributed as dist
from dist_utils import max_rel_err, run_workers

from partitioner.api import compile_parallel
from partitioner.errors import RuntimeConfigError
from partitioner.materialise import meta_parameters
from partitioner.runtime.data_parallel import full_tensor

transformers = pytest.importorskip("transformers")

BATCH, SEQ, VOCAB = 8, 8, 64
LR, EPS, CLIP = 1e-2, 1e-4, 0.5
TIMEOUT_S = 5.0  # how long a rank waits for a failed peer in the failure checks (normal steps of these
# pipelines, first ones included, take well under it on a loaded 2-core machine)
CONFIG = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=True,
              use_cache=False)


def llama(meta: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    if not meta:
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    with meta_parameters():
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen), torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)


def token_loss(out, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB), target.reshape(-1))


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 4)


def optimizer(params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.AdamW(params, lr=LR, eps=EPS)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup)


def train(pm, opt, sched, steps: range) -> None:
    for step in steps:
        pm.train_step(batch(step)[0], target=batch(step)[1])
        pm.clip_grad_norm_(CLIP)
        opt.step()
        sched.step()
        pm.zero_grad()


def reference(path: str, steps: int) -> torch.nn.Module:
    """The plain model from the same safetensors, trained `steps` steps by the same script."""
    model = transformers.LlamaForCausalLM.from_pretrained(path)
    opt, sched = optimizer(model.parameters())
    for step in range(steps):
        token_loss(model(batch(step)[0]), batch(step)[1]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad()
    return model


def grads_error(pm, model: torch.nn.Module) -> float:
    """The largest relative gradient error of pm's (local, gathered) parameters; inf where one has a
    gradient and the other none."""
    want, errors = dict(model.named_parameters()), [0.0]
    for name, p in pm.named_parameters():
        g, w = (None if p.grad is None else full_tensor(p.grad)), want[name].grad
        errors.append(0.0 if g is None and w is None else float("inf") if g is None or w is None
                      else max_rel_err(g, w))
    return max(errors)


def failure(fn) -> tuple[str, float]:
    """The error `fn` raised and how long it took."""
    start = time.monotonic()
    try:
        fn()
    except Exception as err:  # noqa: BLE001 -- reported to the test
        return f"{type(err).__name__}: {err}", time.monotonic() - start
    return "no error", time.monotonic() - start


# ------------------------------------------------------------------------------ two ranks


def _two_ranks(rank: int, world: int, path: str) -> dict:
    dist.init_process_group("gloo")  # as a script under torchrun does: torch's default timeout
    out: dict = {}
    x, _ = batch(0)
    pm = compile_parallel(llama(meta=True), ["cpu"] * world, (x,), token_loss, microbatches=4,
                          checkpoint=os.path.join(path, "hf"), time_limit_s=1, timeout_s=60)
    opt, sched = optimizer(pm.parameters())
    train(pm, opt, sched, range(3))
    pm.save(os.path.join(path, "ckpt"), optimizer=opt, extra={"step": 3, "scheduler": sched.state_dict()})

    # chunks="auto": rank 0 plans, every rank runs its choice; one step's loss and gradients as the model's
    model = llama()
    pm = compile_parallel(copy.deepcopy(model), ["cpu"] * world, (x,), token_loss, microbatches=4, chunks="auto",
                          time_limit_s=1, timeout_s=TIMEOUT_S)
    loss = pm.train_step(x, target=batch(0)[1])
    want = token_loss(model(x), batch(0)[1])
    want.backward()
    out["auto"] = (pm.plan.chunks, pm.plan.schedule, max_rel_err(loss, want.detach()), grads_error(pm, model))

    # rank 1's own script raises between train_step and clipping (a NaN check) and stays alive: rank 0's
    # clip waits for it at most timeout_s, though the process group has torch's default timeout
    side = dist.new_group(backend="gloo")  # joined once the failure is reported (no sleeps)
    pm.train_step(x, target=batch(0)[1])
    out["failure"] = failure(lambda: pm.clip_grad_norm_(CLIP)) if rank == 0 else ("rank 1 raised", 0.0)
    dist.barrier(group=side)
    return out


# ------------------------------------------------------------------------------ four ranks


def _mesh(mode: str, model: torch.nn.Module, args: tuple, loss_fn, timeout_s: float = 60, **kw):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    return compile_parallel(model, mesh=mesh, example_inputs=args, loss_fn=loss_fn, microbatches=2,
                            data_parallel=mode, time_limit_s=1, timeout_s=timeout_s, **kw)


def _four_ranks(rank: int, world: int, path: str) -> dict:
    dist.init_process_group("gloo")
    out: dict = {}
    x, y = batch(0)
    # the same script on another layout: resume from the 2-rank checkpoint and train on
    pm = _mesh("fsdp", llama(meta=True), (x,), token_loss, checkpoint=os.path.join(path, "hf"))
    opt, sched = optimizer(pm.parameters())
    extra = pm.load(os.path.join(path, "ckpt"), optimizer=opt)
    sched.load_state_dict(extra["scheduler"])
    train(pm, opt, sched, range(extra["step"], 5))
    out["resumed"] = pm.full_state_dict()  # on every rank: rank 0 gets it, the others {}
    out["lr"] = [g["lr"] for g in opt.param_groups]
    pm.save(os.path.join(path, "ckpt5"), optimizer=opt, extra={"step": 5})

    # accumulation over two train_steps without zero_grad, layers.0 (on pipeline rank 0 only) frozen
    model = reference(os.path.join(path, "hf"), 5)
    for m in (model, pm):
        for name, p in m.named_parameters():
            if name.startswith("model.layers.0."):
                p.requires_grad_(False)
    model.zero_grad()
    for step in (5, 6):
        pm.train_step(batch(step)[0], target=batch(step)[1])
        token_loss(model(batch(step)[0]), batch(step)[1]).backward()
    out["accumulated"] = grads_error(pm, model)

    # replicate, bf16 compute, the model's own loss over -100 labels with num_items_in_batch
    labels = y.clone()
    labels[:3] = -100  # replica 0's first microbatch has almost no label token
    labels[5, 2:] = -100
    kwargs = {"labels": labels, "num_items_in_batch": (labels[:, 1:] != -100).sum()}
    model = llama()
    pm = _mesh("replicate", copy.deepcopy(model), (x,), None, example_kwargs=kwargs, mixed_precision="bf16")
    loss = pm.train_step(x, **kwargs)
    with torch.autocast("cpu", torch.bfloat16):
        want = model(x, **kwargs).loss
    want.backward()
    errors = [((full_tensor(p.grad) - model.get_parameter(n).grad).norm() / model.get_parameter(n).grad.norm()).item()
              for n, p in pm.named_parameters()]
    out["bf16"] = (max_rel_err(loss, want.detach()), max(errors))

    # the last rank of replica 1 raises in its loss_fn mid-step and stays alive: replica 0 waits for it in
    # the data-parallel reduce at most timeout_s, its pipeline peer in a receive
    side = dist.new_group(backend="gloo")
    armed = [False]

    def nan_check(out, target):
        if armed[0] and rank == 3:
            raise FloatingPointError("loss is NaN")
        return token_loss(out, target)
    pm = _mesh("fsdp", llama(), (x,), nan_check, timeout_s=TIMEOUT_S)
    pm.train_step(x, target=y)
    armed[0] = True
    out["failure"] = failure(lambda: pm.train_step(x, target=y))
    dist.barrier(group=side)
    return out


def test_a_training_jobs_life_over_two_then_four_ranks(tmp_path):
    path = str(tmp_path)
    llama().save_pretrained(os.path.join(path, "hf"))
    two = run_workers(_two_ranks, 2, path, timeout_s=120)
    four = run_workers(_four_ranks, 4, path, timeout_s=150)

    # chunks="auto" under torchrun: one choice on every rank, trained as the model
    assert two[0]["auto"][:2] == two[1]["auto"][:2], two
    for r in two:
        assert r["auto"][2] < 1e-5 and r["auto"][3] < 1e-5, r["auto"]

    # resumed on dp 2 x pp 2 from a 2-rank checkpoint: 5 steps of the model
    want = reference(os.path.join(path, "hf"), 5).state_dict()
    assert [len(r["resumed"]) > 0 for r in four] == [True, False, False, False]
    assert max(max_rel_err(v, want[k]) for k, v in four[0]["resumed"].items()) < 1e-5
    assert set(four[0]["resumed"]) == set(want)
    assert all(r["lr"] == [LR * warmup(5)] for r in four)  # the scheduler's state carried over
    for r in four:
        assert r["accumulated"] < 1e-5, r["accumulated"]
        # bf16 compute against the model under autocast (which keeps SDPA's softmax in fp32): loss within 1e-2,
        # each gradient within 5e-2 relative norm (bf16 rounds at 3 decimal digits)
        assert r["bf16"][0] < 1e-2 and r["bf16"][1] < 5e-2, r["bf16"]

    # failures: each waiting rank names whom it waited for, within about timeout_s
    message, took = two[0]["failure"]
    assert "RuntimeConfigError" in message and "rank 1" in message and "timeout_s" in message, message
    assert took < 5 * TIMEOUT_S, took
    for rank, waited_for in [(0, "with rank 2"), (1, "with rank 3"), (2, "rank 3 (pipeline rank 1) did not answer")]:
        message, took = four[rank]["failure"]  # rank 0 waits for its replica peer 2, which waits for rank 3
        assert "RuntimeConfigError" in message and waited_for in message, (rank, message)
        assert took < 5 * TIMEOUT_S, (rank, took)
    assert "FloatingPointError: loss is NaN" in four[3]["failure"][0]

    # the DCP checkpoint into the plain model, as torch.distributed.checkpoint users load one
    _check_exports(path, four[0]["resumed"])


def _check_exports(path: str, trained: dict[str, torch.Tensor]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from partitioner.checkpoint import save_model, to_torch_save
    # a tied weight is stored once, under its first name (as save_pretrained does): a partial load fills
    # lm_head.weight through the embedding it is (README, "Save and resume")
    model = llama()
    state = {"model": model.state_dict()}
    with pytest.raises(CheckpointException) as err:  # a BaseException: each rank's error in .failures
        dcp.load(state, checkpoint_id=os.path.join(path, "ckpt5"), no_dist=True)
    assert "Missing key in checkpoint state_dict: model.lm_head.weight" in str(err.value.failures[0])
    dcp.load(state, checkpoint_id=os.path.join(path, "ckpt5"), no_dist=True,
             planner=DefaultLoadPlanner(allow_partial_load=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for k, v in trained.items():
        assert torch.equal(model.state_dict()[k], v), k

    to_torch_save(os.path.join(path, "ckpt5"), os.path.join(path, "full.pt"))
    full = torch.load(os.path.join(path, "full.pt"), weights_only=False)
    assert full["extra"] == {"step": 5}
    model = llama()
    model.load_state_dict(full["model"], strict=True)
    model.save_pretrained(os.path.join(path, "trained-hf"))
    back = transformers.LlamaForCausalLM.from_pretrained(os.path.join(path, "trained-hf"))
    for k, v in trained.items():
        assert torch.equal(back.state_dict()[k], v), k
    save_model(back, os.path.join(path, "from-plain"))  # and back into a ParallelModel
    pm = compile_parallel(llama(meta=True), ["cpu"] * 2, (batch(0)[0],), token_loss, microbatches=2,
                          checkpoint=os.path.join(path, "from-plain"), time_limit_s=1)
    for k, v in pm.full_state_dict().items():
        assert torch.equal(v, trained[k]), k


def _freeze_one_copy(rank: int, world: int, _arg) -> str:
    x, y = batch(0)
    pm = compile_parallel(llama(), ["cpu"] * world, (x,), token_loss, microbatches=2, time_limit_s=1,
                          timeout_s=TIMEOUT_S)
    # first: each rank loads its own batch, as a DistributedSampler under DDP gives it
    other = failure(lambda: pm.train_step(batch(rank)[0], target=batch(rank)[1]))[0]
    if rank == 0:  # the embedding here, its tied lm_head on rank 1: frozen on one of them only
        dict(pm.named_parameters())["model.embed_tokens.weight"].requires_grad_(False)
    return other, failure(lambda: pm.train_step(x, target=y))[0]


def test_a_batch_that_differs_across_ranks_and_a_tied_weight_frozen_on_one_of_its_ranks_are_named():
    """Regressions: ranks given their own batches (a DistributedSampler's) trained rank 0's inputs against the last
    rank's labels of other samples, silently; refused at the first step. Rank 1 waited for rank 0 in the tied
    gradient's all-reduce (and rank 0 for rank 1 in the loss's) until the process group's timeout, with gloo's
    error naming neither the weight nor the fix."""
    results = run_workers(_freeze_one_copy, 2, None, timeout_s=60)
    for other, _ in results:
        assert "ranks [1] were given another batch than rank 0" in other and "DistributedSampler" in other, other
    results = [frozen for _, frozen in results]
    # rank 0 waits for rank 1 in the loss's all-reduce (or, on a loaded machine, for its gradient)
    assert "RuntimeConfigError: rank 0: " in results[0] and "rank 1" in results[0], results[0]
    assert "tied 'model.embed_tokens.weight' with rank 0" in results[1], results[1]
    assert "freeze a tied parameter on every rank" in results[1], results[1]
