"""ParameterStore: the real parameters and buffers of the stages a process runs, under the model's own names.

Each stage GraphModule holds its parameters as attributes; the store makes them the tensors
the optimizer and the state dict see (original FQNs), keeps replicas of a tied weight on
several ranks in step (their gradients all-reduced after the step), and loads and exposes
them for checkpoints.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.module import _IncompatibleKeys

from partitioner.errors import RuntimeConfigError
from partitioner.passes.graph_nodes import get_attr, set_attr
from partitioner.passes.split import StageModule
from partitioner.runtime.data_parallel import copy_full_, local_tensor
from partitioner.runtime.parameter_hooks import check_hooks_whole, copy_hooks
from partitioner.runtime.peer_waits import PeerWaits


class ParameterStore:
    """The parameters and buffers of this process's stages, as real tensors on their devices.

    One tensor per FQN and rank, shared by that rank's stages (interleaved chunks of one rank
    use one copy); in one process, ranks on the same device share it too. An FQN held on
    several ranks (a tied weight split across stages) is replicated: under torchrun its
    gradient is all-reduced (summed) over the ranks holding it after every step; in one
    process the first copy is the one exposed (parameters(), state_dict), the others are
    refreshed from it before each step and their gradients summed into it after.
    State the graph never reads (e.g. an unused head) is kept on rank 0 for the state dict (and its
    parameters among rank 0's parameters).
    A tensor of a model built on the meta device is allocated uninitialised on its device and
    named in `from_meta` (unused meta state: on the CPU); partitioner/materialise.py fills them.
    """

    def __init__(self, model: torch.nn.Module, captured, stages: list[StageModule], devices: list[torch.device],
                 local_ranks: list[int], distributed: bool, timeout_s: float = 300.0,
                 replicas: tuple[tuple[int, ...], ...] | None = None, replica: int = 0):
        self.distributed = distributed
        names_of: dict[int, list[str]] = {}
        for name, t in [*model.named_parameters(remove_duplicate=False),
                        *model.named_buffers(remove_duplicate=False)]:
            names_of.setdefault(id(t), []).append(name)
        model_state = model.state_dict(keep_vars=True)
        self.model_keys = set(model_state)
        # the model's own order: a plain optimizer.load_state_dict maps state to parameters by position
        self._position = {fqn: i for i, fqn in enumerate(model_state)}
        self.holders: dict[str, list[int]] = {}
        self.is_param: dict[str, bool] = {}
        for st in stages:
            for fqn in [*st.params, *st.buffers]:
                self.is_param[fqn] = fqn in st.params
                if st.rank not in self.holders.setdefault(fqn, []):
                    self.holders[fqn].append(st.rank)
        self.aliases: dict[str, list[str]] = {}
        self.replicas: dict[str, list[torch.Tensor]] = {}
        self.from_meta: set[str] = set()
        made: dict[tuple[str, Any], torch.Tensor] = {}
        for st in stages:
            if st.rank not in local_ranks:
                continue
            device = devices[st.rank]
            for fqn in [*st.params, *st.buffers]:
                key = (fqn, st.rank if distributed else device)
                if key not in made:
                    src = _source(model, captured, fqn)
                    self.aliases[fqn] = [n for n in names_of.get(id(src), [fqn]) if n in self.model_keys]
                    made[key] = _materialise(src, device, self.is_param[fqn])
                    if src.device.type == "meta":
                        self.from_meta.add(fqn)
                    self.replicas.setdefault(fqn, []).append(made[key])
                set_attr(st.graph_module, fqn, made[key])
        check_hooks_whole(model, self.holders, sharded=False)
        covered = {n for fqn in self.holders for n in _all_names(model, captured, fqn, names_of)}
        params = {id(p): fqn for fqn, p in model.named_parameters()}  # each tied parameter under its first FQN
        self.unused = {k: _materialise(v, torch.device("cpu") if v.is_meta else v.device, params.get(id(v)) == k)
                       for k, v in model_state.items() if k not in covered} if 0 in local_ranks else {}
        self.groups: dict[tuple[int, ...], Any] = {}
        self.peer_waits = PeerWaits(dist.get_rank(), timeout_s) if distributed else None
        rows = replicas or (tuple(range(len(devices))),)  # pipeline rank -> global rank, per dp replica
        self._global_rank = rows[replica]
        if distributed:
            sets = sorted({tuple(sorted(r)) for f, r in self.holders.items() if len(r) > 1 and self.is_param[f]})
            for d, row in enumerate(rows):
                for ranks in sets:  # created in the same order on every rank
                    group = dist.new_group([row[r] for r in ranks], timeout=timedelta(seconds=timeout_s))
                    if d == replica and local_ranks[0] in ranks:
                        self.groups[ranks] = group
        self._stash: dict[str, torch.Tensor | None] = {}

    # ------------------------------------------------------------------ replicas

    def _shared(self) -> list[str]:
        """Trainable FQNs with copies on several ranks."""
        return [f for f, r in self.holders.items() if len(r) > 1 and self.is_param[f] and f in self.replicas
                and self.replicas[f][0].requires_grad]

    @torch.no_grad()
    def refresh_replicas(self) -> None:
        """In one process: copy the exposed tensor of every FQN into its other copies (the optimizer
        or load_state_dict changed only the exposed one)."""
        if not self.distributed:
            for copies in self.replicas.values():
                for t in copies[1:]:
                    t.copy_(copies[0])

    def before_step(self) -> None:
        """Refresh replicas, each trainable as its exposed tensor is (a parameter frozen or unfrozen
        through parameters() between steps: a copy left trainable would give the frozen one a .grad);
        under torchrun set aside the gradient so far, so that only this step's gradient of a
        replicated parameter is all-reduced."""
        self.refresh_replicas()
        for copies in self.replicas.values():
            for t in copies[1:]:
                t.grad = None
                if t.requires_grad != copies[0].requires_grad and t.is_leaf:
                    t.requires_grad_(copies[0].requires_grad)
        if self.distributed:
            for fqn in self._shared():
                p = self.replicas[fqn][0]
                self._stash[fqn], p.grad = p.grad, None

    @torch.no_grad()
    def after_step(self) -> None:
        if not self.distributed:
            for fqn, copies in self.replicas.items():
                for t in copies[1:]:
                    if t.grad is not None:
                        g = t.grad.to(copies[0].device)
                        copies[0].grad = g if copies[0].grad is None else copies[0].grad + g
                        t.grad = None
            return
        for fqn in self._shared():
            p = self.replicas[fqn][0]
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            # under FSDP the gradient is this rank's shard: the holders' shards line up
            holders = sorted(self.holders[fqn])
            self.peer_waits.all_reduce(
                local_tensor(g), f"the gradient all-reduce of tied '{fqn}'", self.groups[tuple(holders)],
                [self._global_rank[r] for r in holders],
                hint=f" Or '{fqn}' was frozen (requires_grad_(False)) on some of the ranks holding it, not all: "
                     "freeze a tied parameter on every rank.")
            stash = self._stash.pop(fqn, None)
            p.grad = g if stash is None else stash + g

    def adopt(self, stages: list[StageModule]) -> None:
        """Take the tensors the local stage modules now hold (FSDP2 replaced their parameters by
        sharded ones, runtime/data_parallel.py) as this rank's parameters."""
        for st in stages:
            for fqn in [*st.params, *st.buffers]:
                if fqn in self.replicas:
                    self.replicas[fqn] = [get_attr(st.graph_module, fqn)]

    def exposed(self, fqn: str) -> torch.Tensor | None:
        """The tensor of `fqn` that parameters() and state_dict() give (None: not held here)."""
        return self.replicas[fqn][0] if fqn in self.replicas else self.unused.get(fqn)

    def read_on(self, fqn: str, device: torch.device) -> torch.Tensor:
        """In one process, `fqn`'s tensor for a stage on `device` whose rank does not hold it (the other
        train/eval mode reads it there, partitioner/modes.py): one already on `device`, else a copy
        there kept in step as replicas are (refreshed before every step and forward, its gradient
        summed into the exposed tensor after)."""
        if fqn not in self.replicas:  # state no stage read: it gets replicas of its own
            t = self.unused.pop(fqn)
            self.replicas[fqn], self.aliases[fqn], self.is_param[fqn] = [t], [fqn], isinstance(t, torch.nn.Parameter)
        copies = self.replicas[fqn]
        here = next((t for t in copies if t.device == device), None)
        if here is None:
            here = _materialise(copies[0], device, self.is_param[fqn])
            copies.append(here)
        return here

    # ------------------------------------------------------------------ views

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Every parameter of the local stages, and on rank 0 those the graph never reads (e.g. the token
        embedding of a model called with inputs_embeds: no gradient, as in the model), so that an
        optimizer over them holds the model's parameters. In the model's order (in one process, that of
        model.parameters()): an optimizer state saved from the unpartitioned model's optimizer loads by
        position onto the same parameters."""
        return self._in_model_order([(f, c[0]) for f, c in self.replicas.items() if self.is_param[f]] + [
            (k, t) for k, t in self.unused.items() if isinstance(t, torch.nn.Parameter)])

    def named_buffers(self) -> list[tuple[str, torch.Tensor]]:
        return self._in_model_order([(f, c[0]) for f, c in self.replicas.items() if not self.is_param[f]])

    def _in_model_order(self, items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        end = len(self._position)
        return sorted(items, key=lambda item: self._position.get(item[0], end))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for copies in self.replicas.values():
            for t in copies:
                if t.grad is not None:
                    if set_to_none:
                        t.grad = None
                    else:
                        t.grad.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {name: copies[0] for fqn, copies in self.replicas.items() for name in self.aliases[fqn]}
        out.update(self.unused)
        return dict(self._in_model_order(list(out.items())))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> Any:
        """Copy this rank's entries of `state` in, after checking them all (as Module.load_state_dict, a
        wrong shape is refused, not broadcast into the tensor; unlike it, nothing is copied then).
        Returns Module.load_state_dict's (missing_keys, unexpected_keys): FQNs this rank holds that
        `state` lacks, keys no FQN of the model has."""
        missing, load = [], []
        for fqn, copies in self.replicas.items():
            key = next((k for k in [*self.aliases[fqn], fqn] if k in state), None)
            if key is None:
                if self.aliases[fqn]:
                    missing.append(fqn)
                continue
            load += [(key, t) for t in copies]
        for k, t in self.unused.items():
            if k in state:
                load.append((k, t))
            else:
                missing.append(k)
        unexpected = [k for k in state if k not in self.model_keys]
        if strict and (missing or unexpected):
            raise RuntimeConfigError(f"load_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}; "
                                     "pass a state dict of the original model (or strict=False)."
                                     + _prefix_hint(unexpected, self.model_keys))
        wrong = [(k, tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__,
                  tuple(t.shape)) for k, t in load
                 if not isinstance(state[k], torch.Tensor) or state[k].shape != t.shape]
        if wrong:
            key, got, want = wrong[0]
            raise RuntimeConfigError(f"load_state_dict: '{key}' is {got} but the model's shape is {want} "
                                     f"({len(wrong)} such key(s)); pass a state dict of the model compile_parallel "
                                     "was given. Nothing was loaded.")
        for k, t in load:
            copy_full_(t, state[k])
        return _IncompatibleKeys(missing, unexpected)


def _prefix_hint(unexpected: list[str], model_keys) -> str:
    """Where every unexpected key is a model key under one prefix (DistributedDataParallel's 'module.',
    torch.compile's '_orig_mod.'), say how to strip it."""
    first = next(iter(unexpected), "")
    prefix = next((first[:i + 1] for i, c in enumerate(first) if c == "." and first[i + 1:] in model_keys), None)
    if prefix is None or not all(k.startswith(prefix) and k[len(prefix):] in model_keys for k in unexpected):
        return ""
    return (f" Its keys carry the prefix '{prefix}' (a DistributedDataParallel or torch.compile wrapper's): strip it, "
            f"{{k.removeprefix('{prefix}'): v for k, v in state_dict.items()}}.")


def _source(model: torch.nn.Module, captured, fqn: str) -> torch.Tensor:
    """The model's tensor behind FQN (constants the capture created come from the captured graph)."""
    for getter in (model.get_parameter, model.get_buffer, captured.graph_module.get_parameter,
                   captured.graph_module.get_buffer):
        try:
            return getter(fqn)
        except (AttributeError, KeyError):
            continue
    return get_attr(captured.graph_module, fqn)


def _all_names(model, captured, fqn: str, names_of: dict[int, list[str]]) -> list[str]:
    return names_of.get(id(_source(model, captured, fqn)), [fqn])


def _materialise(src: torch.Tensor, device: torch.device, is_param: bool) -> torch.Tensor:
    """A copy of `src` on `device`; uninitialised memory for a meta tensor (filled later)."""
    if src.device.type == "meta":
        t = torch.empty_like(src, device=device)
    else:
        t = src.detach().to(device, copy=True)
    if not is_param:
        return t
    param = torch.nn.Parameter(t, requires_grad=src.requires_grad)
    copy_hooks(src, param)  # a gradient hook the user put on the model's parameter
    return param


