"""Save and resume: checkpoints of a ParallelModel and its optimizer, independent of the plan.

    pm = compile_parallel(model, devices, (x,), loss_fn)
    opt = torch.optim.AdamW(pm.parameters())
    ...
    pm.save("ckpt/step-1000", optimizer=opt, extra={"step": 1000})   # every rank calls it
    ...                                                              # later, any plan, any world size:
    pm = compile_parallel(model, other_devices, (x,), loss_fn, chunks=2)
    opt = torch.optim.AdamW(pm.parameters())
    step = pm.load("ckpt/step-1000", optimizer=opt)["step"]

A checkpoint is a torch.distributed.checkpoint (DCP) directory: each rank writes
the tensors it holds (with data parallelism: FSDP2 shards from every replica, whole
tensors from replica 0, as full_state_dict) under the ORIGINAL model's FQNs
("model.<fqn>"; a tied weight once, under its first name in named_parameters), its
optimizer state keyed by parameter FQN, not position ("optim.state.<fqn>.<exp_avg|step|...>", and
"optim.param_groups.<fqn>": that parameter's group hyper-parameters, lr included,
so an LR scheduler's state carries over), and `extra` (any picklable dict: the step,
the scheduler's state_dict()). Next to it: plan.json (the plan it was trained
with, for the record) and checkpoint.json (model class, tied groups). So it loads
under another plan (other ranks, chunks, split), into the unpartitioned model
(`to_torch_save`, then `model.load_state_dict(sd["model"])` and
`torch.distributed.checkpoint.state_dict.set_state_dict` for the optimizer), and
an unpartitioned model's checkpoint (`save_model`), or a Hugging Face
safetensors directory (model only), loads into a ParallelModel.

Loading checks the checkpoint's metadata against the whole model before reading
any tensor (another model, a missing tensor, a wrong shape: one RuntimeConfigError
naming the FQN), reads into fresh tensors and only then copies them in, so a
failed load leaves model and optimizer unchanged. In one process DCP runs without
a process group; under torchrun save is collective (DCP's, over the default
group) and each rank reads only its own tensors.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from partitioner.errors import RuntimeConfigError
from partitioner.passes.capture_io import find_tied
from partitioner.runtime.data_parallel import is_sharded
from partitioner.tensor_sources import MODEL_PREFIX, DCPSource, match_model, model_tensors, open_source

if TYPE_CHECKING:
    from partitioner.parallel_model import ParallelModel

OPTIM_STATE = "optim.state."
OPTIM_GROUP = "optim.param_groups."
EXTRA = "extra"
FORMAT = "partitioner-dcp/1"


# ---------------------------------------------------------------------- save


def save(pm: "ParallelModel", path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
         extra: dict | None = None) -> None:
    """Write pm's weights (and the optimizer's state, and `extra`) to the DCP directory `path`.
    Under torchrun every rank calls it with its own optimizer."""
    path = os.fspath(path)
    canon = _canonical(pm.model)
    state: dict[str, Any] = {}
    for fqn, copies in pm.store.replicas.items():
        if pm.store.aliases[fqn]:  # in the state dict (not a non-persistent buffer)
            state[MODEL_PREFIX + canon[pm.store.aliases[fqn][0]]] = copies[0].detach()
    for key, t in pm.store.unused.items():
        state.setdefault(MODEL_PREFIX + canon[key], t)
    error = None
    try:
        if optimizer is not None:
            state.update(_optimizer_state(optimizer, {id(p): canon.get(f, f) for f, p in pm.named_parameters()}))
    except RuntimeConfigError as err:
        error = err
    _raise_if_any(pm, error)
    if pm.dp > 1 and pm.layout.dp_rank != 0:
        # whole tensors are replica 0's, as in full_state_dict: buffers (BatchNorm's running statistics)
        # differ between replicas, and DCP would take each duplicated key from whichever rank it picks
        state = {k: v for k, v in state.items() if is_sharded(v)}
    if pm.rank is None or dist.get_rank() == 0:
        state[EXTRA] = dict(extra or {})
    _write(state, path, distributed=pm.rank is not None)
    if pm.rank is None or dist.get_rank() == 0:
        _write_info(path, pm.model, pm.plan.to_json())
    if pm.rank is not None:
        dist.barrier()  # the JSON files are there when save returns on any rank


def save_model(model: torch.nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
               extra: dict | None = None) -> None:
    """Write an unpartitioned model (and its optimizer) in the same format, from one process:
    a ParallelModel under any plan loads it with pm.load."""
    path = os.fspath(path)
    canon = _canonical(model)
    state: dict[str, Any] = {MODEL_PREFIX + fqn: model.state_dict(keep_vars=True)[aliases[0]].detach()
                             for fqn, (aliases, _) in model_tensors(model).items()}
    if optimizer is not None:
        state.update(_optimizer_state(optimizer, {id(p): canon.get(n, n) for n, p in model.named_parameters()}))
    state[EXTRA] = dict(extra or {})
    _write(state, path, distributed=False)
    _write_info(path, model, None)


def _optimizer_state(optimizer: torch.optim.Optimizer, fqn_of: dict[int, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for group in optimizer.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            if id(p) not in fqn_of:
                raise RuntimeConfigError(f"save: the optimizer holds a parameter of shape {tuple(p.shape)} that is "
                                         "not one of the model's; build it over pm.parameters().")
            fqn = fqn_of[id(p)]
            out[OPTIM_GROUP + fqn] = hyper
            for k, v in optimizer.state.get(p, {}).items():
                out[f"{OPTIM_STATE}{fqn}.{k}"] = v
    return out


def _write(state: dict[str, Any], path: str, distributed: bool) -> None:
    # lazy: torch.distributed.checkpoint is slow to import and only checkpointing needs it
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    # flat keys as given: a hyper-parameter dict or `extra` is one pickled value, not split into keys
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.save(state, checkpoint_id=path, planner=DefaultSavePlanner(flatten_state_dict=False),
                 no_dist=not distributed)


def _write_info(path: str, model: torch.nn.Module, plan_json: str | None) -> None:
    with open(os.path.join(path, "checkpoint.json"), "w") as f:
        json.dump({"format": FORMAT, "model_class": type(model).__name__, "tied": find_tied(model)}, f, indent=1)
    if plan_json is not None:
        with open(os.path.join(path, "plan.json"), "w") as f:
            f.write(plan_json)


def _canonical(model: torch.nn.Module) -> dict[str, str]:
    """Every FQN of the model's state (and of its parameters) -> its canonical FQN."""
    out = {alias: fqn for fqn, (aliases, _) in model_tensors(model).items() for alias in aliases}
    for group in _param_groups_by_tensor(model):
        for name in group:
            out.setdefault(name, out.get(group[0], group[0]))
    return out


def _param_groups_by_tensor(model: torch.nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return list(groups.values())


# ---------------------------------------------------------------------- load


def load(pm: "ParallelModel", path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load weights (and optimizer state) saved under any plan, or by save_model, or a Hugging Face
    safetensors directory (weights only); returns the `extra` dict saved with them ({} if none).
    On any error nothing changes. Under torchrun every rank calls it with its own optimizer."""
    error, staged, optim_sd, extra = None, None, None, {}
    try:
        source = open_source(path)
        keys = match_model(source, model_tensors(pm.model), type(pm.model).__name__)
        canon = _canonical(pm.model)
        local = _local_tensors(pm, canon)
        staged = {keys[fqn]: torch.empty_like(copies[0]) for fqn, copies in local.items()}
        optim_keys: dict[str, str] = {}
        if optimizer is not None:
            optim_keys = _check_optimizer_state(source, pm.model, canon)
            fqn_of = {id(p): canon.get(f, f) for f, p in pm.named_parameters()}
            wanted = {fqn_of.get(id(p)) for g in optimizer.param_groups for p in g["params"]}
            if None in wanted:
                raise RuntimeConfigError("load: the optimizer holds a parameter that is not one of this "
                                         "ParallelModel's; build it over pm.parameters().")
            optim_keys = {k: f for k, f in optim_keys.items() if f in wanted}
            param_of = {canon.get(f, f): p for f, p in pm.named_parameters()}
            staged.update({k: _empty_state(*source.shapes[k], param_of[f]) for k, f in optim_keys.items()
                           if k in source.shapes})
        source.read(staged)
        objects = source.read_objects([EXTRA, *(k for k in optim_keys if k not in source.shapes)])
        extra = objects.pop(EXTRA, None) or {}
        if optimizer is not None:
            optim_sd = _optimizer_state_dict(optimizer, fqn_of, optim_keys, {**staged, **objects})
    except Exception as err:  # noqa: BLE001 -- every rank must hear of it before anyone applies
        error = err
    _raise_if_any(pm, error)
    with torch.no_grad():  # everything read and checked on every rank: apply
        for fqn, copies in local.items():
            for t in copies:
                t.copy_(staged[keys[fqn]])
    if optim_sd is not None:
        optimizer.load_state_dict(optim_sd)
    return extra


def _local_tensors(pm: "ParallelModel", canon: dict[str, str]) -> dict[str, list[torch.Tensor]]:
    """canonical FQN -> every copy this process holds (tied replicas, stages on several devices)."""
    out: dict[str, list[torch.Tensor]] = {}
    for fqn, copies in pm.store.replicas.items():
        if pm.store.aliases[fqn]:
            out.setdefault(canon[pm.store.aliases[fqn][0]], []).extend(copies)
    for key, t in pm.store.unused.items():
        out.setdefault(canon[key], []).append(t)
    return out


def _empty_state(shape: tuple[int, ...], dtype: torch.dtype, param: torch.Tensor) -> torch.Tensor:
    """Where to read a saved optimizer tensor of `param`: shaped like an FSDP2-sharded parameter, a
    DTensor placed as it is (this rank's shard is read), as the optimizer's own state is (exp_avg is
    zeros_like(param)); a whole tensor would make the next step mix DTensor and Tensor."""
    if hasattr(param, "device_mesh") and tuple(shape) == tuple(param.shape):
        return torch.empty_like(param, dtype=dtype)
    return torch.empty(shape, dtype=dtype)


def _check_optimizer_state(source, model: torch.nn.Module, canon: dict[str, str]) -> dict[str, str]:
    """key -> parameter FQN of every optimizer entry of the checkpoint; its tensors' shapes checked."""
    if not isinstance(source, DCPSource):
        raise RuntimeConfigError(f"checkpoint '{source.path}' holds weights only (safetensors); load it without "
                                 "optimizer= and start the optimizer fresh.")
    shapes = {canon.get(n, n): tuple(p.shape) for n, p in model.named_parameters()}
    out: dict[str, str] = {}
    for key in [*source.shapes, *source.objects]:
        if key.startswith(OPTIM_GROUP):
            fqn = key[len(OPTIM_GROUP):]
        elif key.startswith(OPTIM_STATE):
            fqn = key[len(OPTIM_STATE):].rpartition(".")[0]
        else:
            continue
        if fqn not in shapes:
            raise RuntimeConfigError(f"checkpoint '{source.path}' holds optimizer state of '{fqn}', which is not a "
                                     f"parameter of {type(model).__name__}. Nothing was loaded.")
        saved = source.shapes.get(key, ((),))[0]
        if len(saved) > 0 and tuple(saved) != shapes[fqn]:
            raise RuntimeConfigError(f"checkpoint '{source.path}': optimizer state '{key}' has shape {tuple(saved)} "
                                     f"but '{fqn}' has shape {shapes[fqn]} in the model. Nothing was loaded.")
        out[key] = fqn
    if not out:
        raise RuntimeConfigError(f"checkpoint '{source.path}' holds no optimizer state (saved without optimizer=); "
                                 "load it without optimizer= and start the optimizer fresh.")
    return out


def _optimizer_state_dict(optimizer: torch.optim.Optimizer, fqn_of: dict[int, str], keys: dict[str, str],
                          values: dict[str, Any]) -> dict:
    """optimizer.state_dict() format (positional ids) from the FQN-keyed entries read."""
    per_fqn: dict[str, dict[str, Any]] = {}
    hyper: dict[str, dict] = {}
    for key, fqn in keys.items():
        if key.startswith(OPTIM_GROUP):
            hyper[fqn] = values[key]
        else:
            per_fqn.setdefault(fqn, {})[key.rpartition(".")[2]] = values[key]
    state, groups, i = {}, [], 0
    for group in optimizer.param_groups:
        ids = []
        saved_hyper, first = None, None
        for p in group["params"]:
            fqn = fqn_of[id(p)]
            if fqn in per_fqn:
                state[i] = per_fqn[fqn]
            if fqn in hyper:
                if saved_hyper is None:
                    saved_hyper, first = hyper[fqn], fqn
                else:
                    _check_same_group(first, saved_hyper, fqn, hyper[fqn])
            ids.append(i)
            i += 1
        base = {k: v for k, v in group.items() if k != "params"}
        groups.append({**base, **(saved_hyper or {}), "params": ids})
    return {"state": state, "param_groups": groups}


def _check_same_group(first: str, a: dict, fqn: str, b: dict) -> None:
    """Two parameters of one optimizer group were saved with different hyper-parameters: the group
    can take only one set, so loading would change one parameter's lr or weight decay silently."""
    differ = sorted(k for k in a.keys() | b.keys() if not _same_value(a.get(k), b.get(k)))
    if differ:
        shown = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in differ[:3])
        raise RuntimeConfigError(
            f"load: '{first}' and '{fqn}' are in one param group of the optimizer, but were saved in groups with "
            f"different hyper-parameters ({shown}). Build the optimizer with the param groups it was saved with, "
            "or load without optimizer= and start it fresh. Nothing was loaded.")


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(
            torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b


def _raise_if_any(pm: "ParallelModel", error: Exception | None) -> None:
    """Raise `error`, or another rank's as a RuntimeConfigError, on every rank: all ranks apply a
    checkpoint or none does (a rank that raised alone would leave the others waiting)."""
    if pm.rank is not None:
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
        first = next(((r, e) for r, e in enumerate(errors) if e), None)
        if first and error is None:
            raise RuntimeConfigError(f"rank {first[0]}: {first[1]}")
    if error is not None:
        raise error


# ---------------------------------------------------------------------- conversion


def to_torch_save(dcp_dir: str | os.PathLike, out_file: str | os.PathLike) -> None:
    """Convert a checkpoint to one torch.save file for the unpartitioned model, in one process:
    {"model": state dict (tied weights under every name), "optim": FQN-keyed optimizer state dict
    (torch.distributed.checkpoint.state_dict's format: set_state_dict loads it), "extra": ...}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # lazy: slow import, one use
    dcp_dir = os.fspath(dcp_dir)
    with tempfile.TemporaryDirectory() as tmp:
        flat_file = os.path.join(tmp, "flat.pt")
        dcp_to_torch_save(dcp_dir, flat_file)
        flat = torch.load(flat_file, weights_only=False)
    info_file = os.path.join(dcp_dir, "checkpoint.json")
    tied = json.load(open(info_file)).get("tied", []) if os.path.exists(info_file) else []
    model: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    hyper: dict[str, dict] = {}
    for key, value in flat.items():
        if key.startswith(MODEL_PREFIX):
            model[key[len(MODEL_PREFIX):]] = value
        elif key.startswith(OPTIM_GROUP):
            hyper[key[len(OPTIM_GROUP):]] = value
        elif key.startswith(OPTIM_STATE):
            fqn, _, name = key[len(OPTIM_STATE):].rpartition(".")
            state.setdefault(fqn, {})[name] = value
    for group in tied:
        held = next((n for n in group if n in model), None)
        for name in group:
            if held is not None:
                model.setdefault(name, model[held])
    groups: list[dict] = []
    for fqn, h in hyper.items():
        match = next((g for g in groups if {k: v for k, v in g.items() if k != "params"} == h), None)
        if match is None:
            groups.append({**h, "params": [fqn]})
        else:
            match["params"].append(fqn)
    out = {"model": model, "extra": flat.get(EXTRA, {})}
    if hyper or state:
        out["optim"] = {"state": state, "param_groups": groups}
    torch.save(out, os.fspath(out_file))


