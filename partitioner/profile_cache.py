"""On-disk cache of what capture and profiling produce for a model (AnnotatedGraph, NodeCosts).

A second plan of the same model with other --devices / --memory / --microbatches (same
microbatch shape) reads them back instead of capturing and profiling again. The key is
computed without capturing (capture is half of what it saves): the model's module tree
(classes, their source, their plain attributes, extra_repr, the code of their forward hooks), its parameters' and buffers'
names, shapes and dtypes, the example inputs' shapes and dtypes, the loss, the cost options
(device spec, dtype, optimizer), and the versions of torch, transformers and of this
package's capture and cost-model sources. An entry is one file in cost_models.measure.cache_dir():
a SHA-256 of its payload, a newline, then the payload (torch.save of the dataclasses); an
entry whose hash does not match (truncated, flipped bytes, half written) is never used.

A model named by how it is built (a zoo name with its microbatch size, sequence length and
dtype: `recipe_key`) also gets a recipe entry, the key of its profile: a second
`partitioner plan gpt2-xl` then finds the profile without building the model or importing
transformers. Its key covers the same versions and options, the sources that build the model
and cut its inputs, and the transformers release installed (read from its metadata, not imported).
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from partitioner.cost_models.measure import cache_dir

log = logging.getLogger(__name__)

_FORMAT = "profile-cache-v1"
# sources whose change changes what capture/annotate/profile produce
_SOURCES = ("partitioner/passes/capture.py", "partitioner/passes/capture_io.py", "partitioner/passes/annotate.py",
            "partitioner/passes/regions.py", "partitioner/passes/graph_nodes.py",
            "partitioner/passes/autograd_functions.py",
            "partitioner/passes/mixed_precision.py", "partitioner/passes/causal_mask.py",
            "partitioner/passes/writes.py", "partitioner/passes/constants.py", "partitioner/passes/onehot_lookup.py",
            "partitioner/passes/attention_mask_layout.py",
            "partitioner/cost_models/profile.py", "partitioner/cost_models/fusion.py", "partitioner/cost_models/contention.py",
            "partitioner/cost_models/compiled_memory.py",
            "partitioner/cost_models/flops.py", "partitioner/cost_models/trace_reuse.py",
            "partitioner/cost_models/memory.py", "partitioner/cost_models/time.py", "partitioner/cost_models/measure.py",
            "partitioner/cost_models/loss.py",
            "partitioner/cost_models/device.py", "partitioner/cost_models/node_costs.py")
# and those that build a model from its recipe and cut its inputs to one microbatch
_RECIPE_SOURCES = ("partitioner/zoo.py", "partitioner/cost_models/profile_command.py", "partitioner/plan_model.py",
                   "partitioner/microbatch.py")
_PLAIN = (bool, int, float, str, type(None))


@dataclasses.dataclass
class CachedProfile:
    """What planning needs from capture and profiling: per-node facts and costs (and the loss's)."""

    annotated: Any  # passes.annotate.AnnotatedGraph
    costs: Any  # cost_models.node_costs.NodeCosts
    loss_costs: Any = None  # NodeCosts of the loss, or None


def _code_version(sources: tuple[str, ...] = _SOURCES) -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in sources:
        try:
            h.update((root / rel).read_bytes())
        except OSError:
            h.update(rel.encode())
    return h.hexdigest()


def _class_source(cls: type, seen: dict[type, str]) -> str:
    if cls not in seen:
        try:
            seen[cls] = hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()
        except (OSError, TypeError):
            seen[cls] = f"{cls.__module__}.{cls.__qualname__}"
    return seen[cls]


def _code_facts(fn: Any, seen: dict[type, str]) -> tuple:
    """What a hook (or a function set on a module instance) computes by: its code, constants and the
    plain values of its closure; a callable object: its class and plain attributes."""
    fn = getattr(fn, "__func__", fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        attrs = sorted((k, v) for k, v in vars(fn).items() if isinstance(v, _PLAIN)) if hasattr(fn, "__dict__") else []
        return _class_source(type(fn), seen), attrs, repr(getattr(fn, "args", ())), repr(getattr(fn, "keywords", {}))
    cells = []
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            value = None
        cells.append(value if isinstance(value, _PLAIN) else type(value).__qualname__)
    return code.co_code, repr(code.co_consts), code.co_names, cells, repr(fn.__defaults__)


def _tensor_facts(value: Any) -> list:
    return [(tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else repr(x)
            for x in pytree.tree_leaves(value)]


def model_key(model: torch.nn.Module, args: tuple, kwargs: dict, *, device_spec: Any, optimizer: str,
              options: tuple = (), loss_fn: Any = None, target: Any = None) -> str:
    """Hex key of everything capture and profile(model, one microbatch of inputs) depend on;
    options: the other planning options they read (cost dtype, mixed precision, compiled)."""
    h = hashlib.sha256()
    sources: dict[type, str] = {}

    def add(*parts: Any) -> None:
        h.update(repr(parts).encode())

    add(_FORMAT, torch.__version__, _code_version())
    try:
        import transformers  # lazy: optional, and slow to import
        add(transformers.__version__)
    except ImportError:
        pass
    for name, module in model.named_modules(remove_duplicate=False):
        attrs = sorted((k, v) for k, v in vars(module).items() if isinstance(v, _PLAIN) and not k.startswith("_"))
        add(name, type(module).__qualname__, _class_source(type(module), sources), module.extra_repr(), attrs)
        hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
        own = [v for k, v in vars(module).items() if callable(v) and not isinstance(v, (type, torch.nn.Module))]
        if hooks or own:  # a hook or a forward of the instance's own changes the graph
            add([_code_facts(f, sources) for f in [*hooks, *own]])
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        add(config.to_json_string())
    first: dict[int, str] = {}  # tied parameters: the first name of their tensor
    for name, t in model.named_parameters(remove_duplicate=False):
        add(name, tuple(t.shape), str(t.dtype), t.requires_grad, first.setdefault(id(t), name))
    for name, t in model.named_buffers(remove_duplicate=False):
        add(name, tuple(t.shape), str(t.dtype))
    add(_tensor_facts((args, kwargs)), pytree.tree_structure((args, kwargs)))
    spec = dataclasses.asdict(device_spec) if dataclasses.is_dataclass(device_spec) else repr(device_spec)
    add(spec, optimizer, options)
    if loss_fn is not None:
        fn = getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__)
        try:
            src = inspect.getsource(loss_fn)
        except (OSError, TypeError):
            src = ""
        add(fn, src, _tensor_facts(target))
    return h.hexdigest()[:40]


def recipe_key(recipe: tuple, *, device_spec: Any, optimizer: str, options: tuple = ()) -> str:
    """Hex key of a model given by how it is built, e.g. ("zoo", "gpt2-xl", microbatch size, seq, dtype,
    device), with the planning options its profile depends on (as in model_key)."""
    try:
        transformers_version = version("transformers")
    except PackageNotFoundError:
        transformers_version = None
    spec = dataclasses.asdict(device_spec) if dataclasses.is_dataclass(device_spec) else repr(device_spec)
    parts = (_FORMAT, "recipe", torch.__version__, transformers_version, _code_version(_SOURCES + _RECIPE_SOURCES),
             recipe, spec, optimizer, options)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:40]


def cache_path(key: str, suffix: str = ".pt") -> Path:
    return cache_dir() / "profiles" / f"{key}{suffix}"


def _read(path: Path) -> bytes | None:
    """The payload of the entry at `path`, or None when there is none or it is corrupt (then it is removed)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    digest, _, payload = data.partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        log.warning("profile cache entry %s is corrupt (hash mismatch): recomputing it", path.name)
        path.unlink(missing_ok=True)
        return None
    return payload


def _write(path: Path, payload: bytes) -> None:
    """Write the entry atomically (a temporary file renamed over it); a failure only logs."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
        tmp.replace(path)
    except OSError as e:
        log.warning("cannot write the profile cache %s: %s", path, e)


def load(key: str) -> CachedProfile | None:
    """The entry of `key`, or None when there is none or it is corrupt (then it is removed)."""
    path = cache_path(key)
    payload = _read(path)
    if payload is None:
        return None
    try:
        entry = torch.load(io.BytesIO(payload), weights_only=False)
    except Exception as e:  # an entry from an incompatible version of the classes
        log.warning("profile cache entry %s cannot be read (%s): recomputing it", path.name, e)
        path.unlink(missing_ok=True)
        return None
    return entry if isinstance(entry, CachedProfile) else None


def store(key: str, entry: CachedProfile) -> None:
    """Write the entry of `key`."""
    buf = io.BytesIO()
    torch.save(entry, buf)
    _write(cache_path(key), buf.getvalue())


def load_recipe(key: str) -> tuple[str, CachedProfile] | None:
    """(model key, its entry) of the recipe `key`, or None (no recipe entry, or no valid entry behind it)."""
    payload = _read(cache_path(key, ".recipe"))
    if payload is None:
        return None
    model = payload.decode(errors="replace")
    if len(model) != 40 or any(c not in "0123456789abcdef" for c in model):
        return None
    entry = load(model)
    return (model, entry) if entry is not None else None


def store_recipe(key: str, model: str) -> None:
    """Record that the recipe `key` builds the model whose entry is `model` (a model_key)."""
    _write(cache_path(key, ".recipe"), model.encode())
