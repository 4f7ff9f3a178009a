"""Give the tensors of a model built on the meta device real values, rank by rank.

compile_parallel captures and plans a meta model as it is (FakeTensors), and the
ParameterStore allocates only this rank's stages' tensors, uninitialised, on this
rank's device. This fills them, from a checkpoint or an init function:

- checkpoint: a Hugging Face safetensors directory or a DCP directory
  (partitioner/tensor_sources.py); each rank reads only its own tensors, lazily.
- init_fn(module), called per module like torchtitan's `init_weights` or a Hugging
  Face model's `_init_weights` (pass `model._init_weights`); default: each
  module's `reset_parameters()`. Used for everything a checkpoint does not hold
  (with a checkpoint: non-persistent buffers such as Llama's rotary `inv_freq`).

init_fn runs on the original model's modules with this rank's real tensors swapped
in for their meta ones (restored afterwards); the model's other tensors stay on
meta, where init ops are no-ops, so a rank never allocates another rank's weights.
Every module is initialised under its own seed (from the base seed and its FQN), so
a module gets the same values on every rank; a tied weight replicated on several
ranks is then broadcast from its first holder, so replicas are equal whatever the
init does. Buffers computed in `__init__` (rotary `inv_freq`, position ids) must
be rebuilt by init_fn (HF's `_init_weights` recomputes rotary frequencies) or come
from the model: build it with `partitioner.materialise.meta_parameters()` (parameters
on meta, buffers real and small), and they are copied as they are. Anything left
unset is reported by FQN: before the init, floating tensors are filled with NaN
(integer ones with their minimum), and a value still there afterwards is an error.
"""
from __future__ import annotations

import contextlib
import os
import zlib
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.distributed as dist

from partitioner.errors import RuntimeConfigError
from partitioner.tensor_sources import match_model, model_tensors, open_source

if TYPE_CHECKING:
    from partitioner.runtime.parameter_store import ParameterStore


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Build a model with parameters on the meta device and buffers real (on the CPU), e.g.
    `with meta_parameters(): model = LlamaForCausalLM(config)`: no memory for weights, while
    buffers computed in __init__ (rotary frequencies, masks) keep their values."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def materialise(model: torch.nn.Module, store: "ParameterStore", rank: int | None,
                init_fn: Callable[[torch.nn.Module], None] | None = None,
                checkpoint: str | os.PathLike | None = None) -> None:
    """Fill `store`'s tensors that came from meta (and with a checkpoint, every tensor it holds)."""
    seed = _base_seed(rank)
    canon = {alias: fqn for fqn, (aliases, _) in model_tensors(model).items() for alias in aliases}
    model_state = model.state_dict(keep_vars=True)
    todo: dict[str, list[torch.Tensor]] = {fqn: store.replicas[fqn] for fqn in store.replicas
                                           if fqn in store.from_meta}
    todo.update({k: [t] for k, t in store.unused.items() if model_state[k].is_meta})
    error = None
    try:
        if checkpoint is not None:
            todo = _load(model, store, todo, canon, checkpoint, model_state)
        if todo:
            _initialise(model, todo, init_fn, seed)
    except Exception as err:  # noqa: BLE001 -- every rank must hear of it
        error = err
    if rank is not None:  # every rank raises, or none: a rank left behind would wait for its peers
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
        other = next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)
        if error is None and other:
            raise RuntimeConfigError(other)
    if error is not None:
        raise error
    if rank is not None:
        _broadcast_tied(store, set(todo), rank)
    for copies in store.replicas.values():  # in one process: every replica equal to the first
        with torch.no_grad():
            for t in copies[1:]:
                t.copy_(copies[0])


def _load(model, store, todo, canon, checkpoint, model_state) -> dict[str, list[torch.Tensor]]:
    """Read every tensor the checkpoint holds for this rank; return what is left to initialise."""
    source = open_source(checkpoint)
    required = {canon[k] for k, v in model_state.items() if v.is_meta}
    keys = match_model(source, model_tensors(model), type(model).__name__, required)
    targets: dict[str, list[torch.Tensor]] = {}
    for fqn, copies in store.replicas.items():
        for alias in store.aliases[fqn][:1]:
            if canon[alias] in keys:
                targets.setdefault(keys[canon[alias]], []).extend(copies)
    for k, t in store.unused.items():
        if canon[k] in keys:
            targets.setdefault(keys[canon[k]], []).append(t)
    source.read({key: copies[0] for key, copies in targets.items()})
    with torch.no_grad():
        for copies in targets.values():
            for t in copies[1:]:
                t.copy_(copies[0])
    loaded = {id(t) for copies in targets.values() for t in copies}
    return {fqn: copies for fqn, copies in todo.items() if id(copies[0]) not in loaded}


def _base_seed(rank: int | None) -> int:
    """One seed for every rank: rank 0's torch.initial_seed()."""
    box = [torch.initial_seed()]
    if rank is not None:
        dist.broadcast_object_list(box, src=0)
    return int(box[0])


def _initialise(model: torch.nn.Module, todo: dict[str, list[torch.Tensor]],
                init_fn: Callable[[torch.nn.Module], None] | None, seed: int) -> None:
    paths: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        paths.setdefault(id(t), []).append(name)
    real: dict[str, torch.Tensor] = {}  # every path of a tensor to fill -> this rank's tensor
    for fqn, copies in todo.items():
        meta = _lookup(model, fqn)
        for path in paths.get(id(meta), [fqn]):
            real[path] = copies[0]
    owners = sorted({p.rpartition(".")[0] for p in real})
    if init_fn is None:
        lacking = [o for o in owners if not hasattr(model.get_submodule(o), "reset_parameters")]
        if lacking:
            kinds = sorted({type(model.get_submodule(o)).__name__ for o in lacking})
            raise RuntimeConfigError(
                f"compile_parallel: the model is on the meta device and {', '.join(kinds)} (e.g. '{lacking[0]}') "
                "has no reset_parameters() to initialise it; pass init_fn= (for a Hugging Face model "
                "model._init_weights), checkpoint= (a safetensors or DCP directory), or a model with real weights.")
    with torch.no_grad():
        for t in {id(t): t for t in real.values()}.values():
            t.fill_(float("nan") if t.is_floating_point() or t.is_complex() else
                    torch.iinfo(t.dtype).min if t.dtype != torch.bool else False)
    # the modules to call: owners of the tensors and, for init_fn, their ancestors (an HF
    # model's _init_weights initialises some weights from the root), children first
    calls = set(owners)
    if init_fn is not None:
        for o in owners:
            parts = o.split(".") if o else []
            calls.update(".".join(parts[:i]) for i in range(len(parts)))
    originals = _swap(model, real)
    try:
        for name, module in reversed(list(model.named_modules())):
            if name not in calls:
                continue
            with torch.random.fork_rng(devices=_cuda_devices(real.values())):
                torch.manual_seed((seed + zlib.crc32(name.encode())) % 2 ** 63)
                if init_fn is not None:
                    init_fn(module)
                else:
                    module.reset_parameters()
            _read_back(model, real)
    finally:
        _swap(model, originals)
    with torch.no_grad():
        for fqn, copies in todo.items():
            t = copies[0]
            unset = t.isnan().any() if t.is_floating_point() or t.is_complex() else (
                t.dtype != torch.bool and (t == torch.iinfo(t.dtype).min).any())
            if unset:
                how = "init_fn" if init_fn is not None else "reset_parameters()"
                raise RuntimeConfigError(
                    f"compile_parallel: '{fqn}' of the meta model was not initialised by {how}; pass an init_fn "
                    "that sets it (a Hugging Face model: init_fn=model._init_weights), a checkpoint= holding it, "
                    "or build the model under partitioner.materialise.meta_parameters() so buffers stay real.")
            for other in copies[1:]:
                other.copy_(t)


def _swap(model: torch.nn.Module, tensors: dict[str, Any]) -> dict[str, Any]:
    """Put tensors[path] at every path of the model; returns what was there."""
    old = {}
    for path, t in tensors.items():
        prefix, _, name = path.rpartition(".")
        owner = model.get_submodule(prefix)
        table = owner._parameters if name in owner._parameters else owner._buffers
        old[path] = table[name]
        table[name] = t
    return old


def _read_back(model: torch.nn.Module, real: dict[str, torch.Tensor]) -> None:
    """An init that assigned a new tensor (module.weight = Parameter(...)) instead of writing in place."""
    for path, t in real.items():
        now = _lookup(model, path)
        if now is not t:
            with torch.no_grad():
                t.copy_(now)
            _swap(model, {path: t})


def _lookup(model: torch.nn.Module, path: str) -> torch.Tensor:
    prefix, _, name = path.rpartition(".")
    owner = model.get_submodule(prefix)
    return owner._parameters[name] if name in owner._parameters else owner._buffers[name]


def _cuda_devices(tensors) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def _broadcast_tied(store: "ParameterStore", filled: set[str], rank: int) -> None:
    """Replicas of a tied weight on several ranks get the values of its first holder.

    `ranks` are pipeline ranks; the group holds their global ranks in this dp replica (the same
    order), so the first holder is the group's rank 0 (its global rank is not ranks[0] beyond
    replica 0)."""
    for fqn in sorted(filled):
        ranks = tuple(sorted(store.holders.get(fqn, [])))
        if len(ranks) > 1 and ranks in store.groups and fqn in store.replicas:
            dist.broadcast(store.replicas[fqn][0].data, group=store.groups[ranks], group_src=0)
