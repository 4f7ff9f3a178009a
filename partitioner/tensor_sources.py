"""Named tensors on disk, read lazily one by one: DCP directories and Hugging Face safetensors.

A TensorSource lists the names, shapes and dtypes it holds without reading
any weights, and copies the tensors asked for into tensors the caller owns
(on their device, in their dtype). So a rank reads only its own stages'
tensors: a DCP directory through `dcp.load(..., no_dist=True)` with only those
keys, a safetensors file through `safe_open` one tensor at a time.

- DCP: any directory with a `.metadata` file (partitioner.checkpoint.save, or
  `dcp.save({"model": model.state_dict()})`, or `dcp.save(model.state_dict())`).
  Model tensors are looked up as "model.<fqn>", then "<fqn>".
- Hugging Face: a directory with `model.safetensors`, or shards and
  `model.safetensors.index.json` (save_pretrained's layout), or one `.safetensors` file.
"""
from __future__ import annotations

import json
import os
import warnings
from abc import ABC, abstractmethod
from typing import Any

import torch

from partitioner.errors import RuntimeConfigError

MODEL_PREFIX = "model."


class TensorSource(ABC):
    """Tensors by name: `shapes` without reading weights, `read` into the caller's tensors."""

    path: str
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype | None]]
    model_class: str | None = None  # the saved model's class name, when the files say it
    model_prefix = ""  # DCP checkpoints of partitioner.checkpoint keep model tensors under "model."

    def model_key(self, names: list[str]) -> str | None:
        """The key holding a model tensor known by any of `names` (tied aliases), or None."""
        for name in names:
            for key in (self.model_prefix + name, name):
                if key in self.shapes:
                    return key
        return None

    @abstractmethod
    def read(self, targets: dict[str, torch.Tensor]) -> None:
        """Copy tensor `key` of the source into targets[key], for every key (in place)."""

    def read_objects(self, keys: list[str]) -> dict[str, Any]:
        """Non-tensor values saved under `keys` (DCP only)."""
        return {}


class DCPSource(TensorSource):
    model_prefix = MODEL_PREFIX

    def __init__(self, path: str):
        import torch.distributed.checkpoint as dcp  # lazy: slow to import, only DCP sources need it
        self.path = path
        self.metadata = dcp.FileSystemReader(path).read_metadata()
        self.shapes = {}
        self.objects: set[str] = set()
        for key, meta in self.metadata.state_dict_metadata.items():
            if hasattr(meta, "size"):
                self.shapes[key] = (tuple(meta.size), meta.properties.dtype)
            else:
                self.objects.add(key)
        info = os.path.join(path, "checkpoint.json")
        if os.path.exists(info):
            with open(info) as f:
                self.info = json.load(f)
            self.model_class = self.info.get("model_class")
        else:
            self.info = {}

    def read(self, targets: dict[str, torch.Tensor]) -> None:
        if targets:
            _dcp_load(dict(targets), self.path)

    def read_objects(self, keys: list[str]) -> dict[str, Any]:
        box: dict[str, Any] = {k: None for k in keys if k in self.objects}
        if box:
            _dcp_load(box, self.path)
        return box


def _dcp_load(state: dict[str, Any], path: str) -> None:
    # lazy: torch.distributed.checkpoint is slow to import, only DCP sources need it
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    # each rank reads its own keys; no collective, so ranks never wait on each other here. Keys as
    # given (no flattening), so non-tensor values land in `state` itself.
    planner = DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False, allow_partial_load=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load(state, checkpoint_id=path, planner=planner, no_dist=True)


class SafetensorsSource(TensorSource):
    def __init__(self, path: str):
        from safetensors import safe_open  # lazy: safetensors is optional (comes with transformers)
        self.path = path
        if os.path.isfile(path):
            files = {path: None}
        elif os.path.exists(os.path.join(path, "model.safetensors.index.json")):
            with open(os.path.join(path, "model.safetensors.index.json")) as f:
                weight_map = json.load(f)["weight_map"]
            files = {os.path.join(path, name): None for name in sorted(set(weight_map.values()))}
        else:
            files = {os.path.join(path, "model.safetensors"): None}
        self.file_of: dict[str, str] = {}
        self.shapes = {}
        for file in files:  # headers only
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    self.shapes[key] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype()))
                    self.file_of[key] = file
        config = os.path.join(path, "config.json") if os.path.isdir(path) else ""
        if config and os.path.exists(config):
            with open(config) as f:
                self.model_class = (json.load(f).get("architectures") or [None])[0]

    def read(self, targets: dict[str, torch.Tensor]) -> None:
        from safetensors import safe_open  # lazy: optional dependency
        by_file: dict[str, list[str]] = {}
        for key in targets:
            by_file.setdefault(self.file_of[key], []).append(key)
        with torch.no_grad():
            for file, keys in by_file.items():
                with safe_open(file, framework="pt", device="cpu") as f:
                    for key in keys:
                        targets[key].copy_(f.get_tensor(key))


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def open_source(path: str | os.PathLike) -> TensorSource:
    """The TensorSource of a DCP directory, a safetensors directory (HF layout) or a .safetensors file."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, ".metadata")):
        return DCPSource(path)
    if (os.path.isfile(path) and path.endswith(".safetensors")) or os.path.exists(
            os.path.join(path, "model.safetensors")) or os.path.exists(
            os.path.join(path, "model.safetensors.index.json")):
        return SafetensorsSource(path)
    if os.path.isfile(path):  # most likely torch.save(model.state_dict(), path)
        raise RuntimeConfigError(f"checkpoint '{path}' is a file, not a DCP or safetensors directory. A torch.save'd "
                                 "state dict loads with pm.load_state_dict(torch.load(path)) (a model built on meta: "
                                 "compile it with init_fn= first); or write it once as a checkpoint directory with "
                                 "partitioner.checkpoint.save_model(model, dir) from a model holding it, and pass dir.")
    raise RuntimeConfigError(f"checkpoint '{path}': not a DCP directory (no .metadata) nor a safetensors checkpoint "
                             "(model.safetensors or model.safetensors.index.json); pass the directory "
                             "pm.save or save_pretrained wrote.")


def model_tensors(model: torch.nn.Module) -> dict[str, tuple[list[str], tuple[int, ...]]]:
    """Every tensor of model.state_dict() once: canonical FQN -> (every FQN naming it, shape).
    The canonical FQN of a tied weight is its first name in named_parameters (the one
    checkpoints store it under, and the one the captured graph reads it through)."""
    state = model.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *state.items()]:
        if name in state and name not in names.setdefault(id(t), []):
            names[id(t)].append(name)
    out: dict[str, tuple[list[str], tuple[int, ...]]] = {}
    for name, t in state.items():
        group = names[id(t)]
        if group[0] not in out:
            out[group[0]] = (group, tuple(t.shape))
    return out


def match_model(source: TensorSource, tensors: dict[str, tuple[list[str], tuple[int, ...]]],
                model_class: str, required: set[str] | None = None) -> dict[str, str]:
    """canonical FQN -> key in `source` for every tensor of the model (from model_tensors).

    Checks before anything is read: a source of another model (other class, or fewer than half
    of the tensors found) is named as such; a missing tensor (of `required`, default all) or one of
    another shape raises one RuntimeConfigError naming the FQN (and both shapes)."""
    where = f"checkpoint '{source.path}'"
    found = {fqn: source.model_key(aliases) for fqn, (aliases, _) in tensors.items()}
    present = [f for f, k in found.items() if k is not None]
    if source.model_class and source.model_class != model_class:
        raise RuntimeConfigError(f"{where} is from another model: it was saved from {source.model_class}, this is "
                                 f"{model_class}. Nothing was loaded; pass a checkpoint of this model.")
    if tensors and 2 * len(present) < len(tensors):
        lacking = next(f for f, k in found.items() if k is None)
        used = {k for k in found.values() if k}
        extra = next((k for k in source.shapes if k not in used), None)
        raise RuntimeConfigError(f"{where} is from another model: it holds {len(present)} of the {len(tensors)} "
                                 f"tensors of {model_class} (it lacks e.g. '{lacking}'"
                                 f"{f' and holds e.g. {extra!r}' if extra else ''}). Nothing was loaded; pass a "
                                 "checkpoint of this model.")
    for fqn, (aliases, shape) in tensors.items():
        key = found[fqn]
        if key is None:
            if required is None or fqn in required:
                raise RuntimeConfigError(f"{where} has no tensor '{fqn}' (shape {shape}) of {model_class}. Nothing "
                                         "was loaded; pass a complete checkpoint of this model.")
            continue
        saved = source.shapes[key][0]
        if tuple(saved) != tuple(shape):
            raise RuntimeConfigError(f"{where}: '{fqn}' has shape {tuple(saved)} in the checkpoint but {tuple(shape)} "
                                     f"in the model. Nothing was loaded; pass a checkpoint of this model's "
                                     "configuration.")
    return {f: k for f, k in found.items() if k is not None}
