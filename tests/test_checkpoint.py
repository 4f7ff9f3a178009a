"""partitioner/checkpoint.py: save under one plan, resume under another (ranks, chunks), in one
process and over gloo; to and from the unpartitioned model and Hugging Face safetensors; bad
checkpoints raise one error and change nothing."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_utils import build, run_workers

from partitioner.api import compile_parallel
from partitioner.checkpoint import save_model, to_torch_save
from partitioner.errors import RuntimeConfigError
from partitioner.passes.capture import capture
from partitioner.passes.split import even_plan

LR = 1e-2


def _compile(zm, ranks: int = 2, chunks: int = 1):
    """Evenly cut plans: the tests are about state, not plan quality (and skip the solver's time)."""
    schedule = "interleaved-1f1b" if chunks > 1 else "1f1b"
    plan = even_plan(capture(zm.model, tuple(x[:1] for x in zm.example_args)), ranks, chunks, schedule, 4)
    return compile_parallel(copy.deepcopy(zm.model), ["cpu"] * ranks, zm.example_args, zm.loss_fn,
                            microbatches=4, plan=plan, timeout_s=60)


def _steps(pm, opt, zm, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        losses.append(pm.train_step(*zm.example_args, target=zm.target).item())
        pm.clip_grad_norm_(1.0)
        opt.step()
        pm.zero_grad()
    return losses


def _unsplit_steps(model, opt, zm, n: int) -> list[float]:
    losses = []
    for _ in range(n):
        loss = zm.loss_fn(model(*zm.example_args, **zm.example_kwargs), zm.target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _reference(zm, n: int = 6) -> list[float]:
    model = copy.deepcopy(zm.model)
    return _unsplit_steps(model, torch.optim.AdamW(model.parameters(), lr=LR), zm, n)


def _close(got: list[float], want: list[float], tol: float = 1e-6) -> bool:
    return all(abs(a - b) <= tol * abs(b) for a, b in zip(got, want)) and len(got) == len(want)


def test_resume_under_another_plan_and_in_the_unpartitioned_model(tmp_path):
    zm = build("llama-1b")  # tied embedding
    want = _reference(zm)
    pm = _compile(zm, ranks=2)
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    first = _steps(pm, opt, zm, 3)
    pm.save(tmp_path / "ckpt", optimizer=opt, extra={"step": 3})
    assert {"plan.json", "checkpoint.json", ".metadata"} <= set(os.listdir(tmp_path / "ckpt"))
    assert "model.lm_head.weight" not in dcp.FileSystemReader(tmp_path / "ckpt").read_metadata().state_dict_metadata

    for ranks, chunks in [(2, 2), (3, 1)]:
        pm2 = _compile(zm, ranks=ranks, chunks=chunks)
        opt2 = torch.optim.AdamW(pm2.parameters(), lr=LR)
        assert pm2.load(tmp_path / "ckpt", optimizer=opt2) == {"step": 3}
        assert _close(first + _steps(pm2, opt2, zm, 3), want), (ranks, chunks)

    # into the unpartitioned model: weights under every tied name, optimizer state by FQN
    from torch.distributed.checkpoint.state_dict import set_state_dict
    to_torch_save(tmp_path / "ckpt", tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    assert full["extra"] == {"step": 3}
    model = copy.deepcopy(zm.model)
    model.load_state_dict(full["model"], strict=True)
    opt3 = torch.optim.AdamW(model.parameters(), lr=LR)
    set_state_dict(model, opt3, model_state_dict=full["model"], optim_state_dict=full["optim"])
    assert _close(first + _unsplit_steps(model, opt3, zm, 3), want)


def test_unpartitioned_and_hugging_face_checkpoints_load_into_a_parallel_model(tmp_path):
    zm = build("llama-1b")
    want = _reference(zm)
    model = copy.deepcopy(zm.model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    first = _unsplit_steps(model, opt, zm, 3)
    save_model(model, tmp_path / "unsplit", optimizer=opt, extra={"step": 3})
    model.save_pretrained(tmp_path / "hf")  # model.safetensors + config.json
    pm = _compile(zm)
    opt2 = torch.optim.AdamW(pm.parameters(), lr=LR)
    assert pm.load(tmp_path / "unsplit", optimizer=opt2) == {"step": 3}
    assert _close(first + _steps(pm, opt2, zm, 3), want)

    pm = _compile(zm, chunks=2)
    assert pm.load(tmp_path / "hf") == {}
    for name, t in pm.full_state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name
    with pytest.raises(RuntimeConfigError, match="weights only"):
        pm.load(tmp_path / "hf", optimizer=torch.optim.AdamW(pm.parameters()))


def _snapshot(pm, opt) -> tuple[dict, dict]:
    return ({k: v.clone() for k, v in pm.state_dict().items()},
            copy.deepcopy(opt.state_dict()))


def test_bad_checkpoints_raise_one_error_and_change_nothing(tmp_path):
    zm = build("llama-1b")
    pm = _compile(zm)
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    _steps(pm, opt, zm, 1)
    pm.save(tmp_path / "good", optimizer=opt)
    state = {f"model.{k}": v for k, v in zm.model.state_dict().items() if k != "lm_head.weight"}
    dcp.save(state, checkpoint_id=tmp_path / "weights", no_dist=True)
    missing = dict(state)
    del missing["model.model.layers.1.mlp.up_proj.weight"]
    dcp.save(missing, checkpoint_id=tmp_path / "missing", no_dist=True)
    wrong = dict(state, **{"model.model.norm.weight": torch.ones(7)})
    dcp.save(wrong, checkpoint_id=tmp_path / "wrong", no_dist=True)
    save_model(build("gpt2").model, tmp_path / "gpt2")
    dcp.save({f"model.{k}": v for k, v in build("mlp").model.state_dict().items()},
             checkpoint_id=tmp_path / "mlp", no_dist=True)
    torch.save(zm.model.state_dict(), tmp_path / "plain.pt")

    pm.train_step(*zm.example_args, target=zm.target)
    opt.step()  # state differs from the good checkpoint's
    before = _snapshot(pm, opt)
    cases = [("missing", "has no tensor 'model.layers.1.mlp.up_proj.weight' \\(shape \\(64, 32\\)\\)"),
             ("wrong", "'model.norm.weight' has shape \\(7,\\) in the checkpoint but \\(32,\\) in the model"),
             ("gpt2", "from another model: it was saved from GPT2LMHeadModel"),
             ("mlp", "from another model: it holds 0 of the"),
             ("nowhere", "not a DCP directory"),
             ("plain.pt", r"is a file, not a DCP .* pm.load_state_dict\(torch.load\(path\)\)")]
    for name, message in cases:
        with pytest.raises(RuntimeConfigError, match=message):
            pm.load(tmp_path / name, optimizer=opt)
    with pytest.raises(RuntimeConfigError, match="holds no optimizer state"):
        pm.load(tmp_path / "weights", optimizer=opt)
    # saved with two groups (no weight decay on norms), loaded into one group: one lr and decay would win
    norms = [p for n, p in pm.named_parameters() if "norm" in n]
    others = [p for n, p in pm.named_parameters() if "norm" not in n]
    grouped = torch.optim.AdamW([{"params": others}, {"params": norms, "weight_decay": 0.0}], lr=LR)
    pm.save(tmp_path / "grouped", optimizer=grouped)
    with pytest.raises(RuntimeConfigError, match=r"in one param group of the optimizer, but were saved in groups "
                                                 r"with different hyper-parameters \(weight_decay: 0.01 vs 0.0\)"):
        pm.load(tmp_path / "grouped", optimizer=opt)
    after = _snapshot(pm, opt)
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), k
    assert str(before[1]) == str(after[1])
    regrouped = torch.optim.AdamW([{"params": others}, {"params": norms, "weight_decay": 0.5}], lr=LR)
    pm.load(tmp_path / "grouped", optimizer=regrouped)  # the same groups: each takes what it was saved with
    assert [g["weight_decay"] for g in regrouped.param_groups] == [0.01, 0.0]
    pm.load(tmp_path / "good", optimizer=opt)  # and a good one still loads
    pm.load(tmp_path / "weights")


# ---------------------------------------------------------------------- several processes (gloo)


def _worker(rank: int, world: int, path: str) -> dict:
    """3 steps, save, then a new ParallelModel with another plan (2 chunks) loads and trains 3 more."""
    zm = build("llama-1b")
    pm = _compile(zm, ranks=world)
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    losses = _steps(pm, opt, zm, 3)
    pm.save(path, optimizer=opt, extra={"step": 3})
    pm = _compile(zm, ranks=world, chunks=2)
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    try:  # a bad checkpoint raises on every rank, and nobody waits for the others
        pm.load(os.path.join(os.path.dirname(path), "nowhere"), optimizer=opt)
        error = None
    except RuntimeConfigError as err:
        error = str(err)
    extra = pm.load(path, optimizer=opt)
    return {"losses": losses + _steps(pm, opt, zm, 3), "extra": extra, "error": error}


def test_resume_over_gloo_and_in_one_process_from_a_gloo_checkpoint(tmp_path):
    zm = build("llama-1b")
    want = _reference(zm)
    path = str(tmp_path / "ckpt")
    results = run_workers(_worker, 2, path, timeout_s=150)
    for r in results:
        assert r["extra"] == {"step": 3} and "not a DCP directory" in r["error"]
        assert _close(r["losses"], want), (r["losses"], want)
    pm = _compile(zm, ranks=3)  # written by 2 processes, read by one driving 3 ranks
    opt = torch.optim.AdamW(pm.parameters(), lr=LR)
    assert pm.load(path, optimizer=opt) == {"step": 3}
    assert _close(results[0]["losses"][:3] + _steps(pm, opt, zm, 3), want)
