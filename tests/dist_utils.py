"""Helpers for the runtime tests: reference gradients and multi-process gloo runs with timeouts."""
from __future__ import annotations

import atexit
import copy
import os
import pickle
import socket
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from partitioner import zoo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(name: str, batch: int = 4, seq: int = 8, seed: int = 0) -> zoo.ZooModel:
    """A small zoo model with a batch big enough to split into microbatches."""
    return zoo.build(name, small=True, batch=batch, seq=seq, seed=seed)


def reference(zm: zoo.ZooModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients (by FQN, each tied parameter once) of the unpartitioned model."""
    model = copy.deepcopy(zm.model)
    loss = zm.loss_fn(model(*zm.example_args, **zm.example_kwargs), zm.target)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.detach().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def grad_errors(pm, ref_grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative error of every gradient of the ParallelModel's (local) parameters."""
    out = {}
    for name, p in pm.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        out[name] = max_rel_err(p.grad, ref_grads[name])
    return out


# run_workers forks its processes from a forkserver that imported these once per test session instead
# of spawning fresh interpreters that each import them (about 7 s of CPU a process: torch, the partitioner,
# transformers' model classes, inductor); each process still starts with the caller's environment and
# builds its own model. Modules that fail to import are skipped by the forkserver.
PRELOAD = ["dist_utils", "partitioner.api", "partitioner.zoo", "torch._inductor.compile_fx",
           "torch.distributed.checkpoint", "transformers.models.gpt2.modeling_gpt2",
           "transformers.models.t5.modeling_t5", "transformers.models.llama.modeling_llama"]


def run_workers(fn: Callable[[int, int, Any], Any], world_size: int, arg: Any = None,
                timeout_s: float = 150.0, hosts: int = 1, start_method: str = "forkserver") -> list[Any]:
    """Run fn(rank, world_size, arg) in world_size new processes (torchrun's environment variables
    set, gloo rendezvous on a free port); return each rank's result. Raises on error or timeout.
    hosts: the processes pretend to be spread over that many hosts (LOCAL_RANK, GROUP_RANK and
    LOCAL_WORLD_SIZE as torchrun --nnodes sets them). start_method "spawn" for workers that use CUDA:
    a forked process cannot once the forkserver's preloaded modules have initialised it."""
    port = free_port()
    if start_method == "forkserver":
        mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(fn, world_size, arg, port, tmp, hosts, dict(os.environ)),
                                 nprocs=world_size, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} workers did not finish within {timeout_s} s")
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
        results = []
        for rank in range(world_size):  # None for a rank that exited without a result
            path = os.path.join(tmp, f"{rank}.pkl")
            with open(path, "rb") if os.path.exists(path) else open(os.devnull, "rb") as f:
                results.append(pickle.load(f) if f.name == path else None)
        return results


def _worker(rank: int, fn, world_size: int, arg, port: int, tmp: str, hosts: int, environ: dict) -> None:
    per_host = world_size // hosts
    os.environ.clear()  # the caller's environment now, not the forkserver's at its start
    os.environ.update(environ)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank % per_host),
                      LOCAL_WORLD_SIZE=str(per_host), GROUP_RANK=str(rank // per_host),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = fn(rank, world_size, arg)
    with open(os.path.join(tmp, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    # exit handlers run as at a normal exit, but the interpreter's teardown of torch's modules is
    # skipped: it took about 3 s of every multi-process test for nothing the tests check
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
