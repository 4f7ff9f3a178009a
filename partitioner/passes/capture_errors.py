"""Why a capture failed, in words a user can act on.

Names the module that was running when tracing failed (global forward hooks),
tells data-dependent control flow apart from bad example inputs (by running the
model on them), and turns both tracers' exceptions into one CaptureError that
says what to try.
"""
from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch.nn.modules import module as nn_module
from torch.utils import _pytree as pytree

from partitioner.errors import CaptureError


_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "data-dependent", "data dependent",
                   "symbolically traced variables cannot be used as inputs to control flow",
                   "Could not guard on data-dependent", "Could not extract specialized integer")


def is_data_dependent(err: BaseException) -> bool:
    e: BaseException | None = err
    while e is not None:
        if type(e).__name__ in ("GuardOnDataDependentSymNode", "DataDependentOutputException",
                                "DynamicOutputShapeException"):
            return True
        if any(s in str(e) for s in _DATA_DEPENDENT):
            return True
        e = e.__cause__ or e.__context__
    return False


def first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    msg = text[0] if text else ""
    msg = msg if len(msg) <= limit else msg[:limit] + "..."
    return f"{type(err).__name__}: {msg}"


class ModuleTracker:
    """Records which submodule is running (global forward hooks), to name where tracing fails."""

    def __init__(self, model: torch.nn.Module):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[tuple[str, str, tuple]] = []
        self.failed: tuple[str, str, tuple] | None = None
        self.failed_module: torch.nn.Module | None = None
        self._modules: list[torch.nn.Module] = []
        self._handles: list = []

    def __enter__(self) -> "ModuleTracker":
        def pre(mod, args):
            name = self.names.get(id(mod))
            if name is not None:
                self.stack.append((name, type(mod).__name__, args))
                self._modules.append(mod)

        def post(mod, args, out):
            if self.names.get(id(mod)) is not None and self.stack:
                self.stack.pop()
                self._modules.pop()

        self._handles = [nn_module.register_module_forward_pre_hook(pre),
                         nn_module.register_module_forward_hook(post)]
        # a torch.compile'd submodule warns that global hooks fire twice for it: ours only name modules
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", r"Using `torch.compile\(module\)` when there are global hooks")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._warnings.__exit__(None, None, None)
        for h in self._handles:
            h.remove()
        if exc_type is not None and self.stack:
            self.failed, self.failed_module = self.stack[-1], self._modules[-1]

    def where(self) -> str:
        if self.failed is None:
            return "the model's forward"
        name, typ, _ = self.failed
        return f"module '{name or '<root>'}' ({typ})"


def model_name(model: torch.nn.Module) -> str:
    return type(model).__name__


def _describe_inputs(names: list[str], leaves: list[Any]) -> str:
    if not leaves:
        return "empty (no args, no kwargs)"
    parts = []
    for n, v in zip(names, leaves):
        if isinstance(v, torch.Tensor):
            parts.append(f"'{n}': {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}")
        else:
            parts.append(f"'{n}': {v!r}")
    return ", ".join(parts)


def check_inputs_eagerly(model: torch.nn.Module, args: tuple, kwargs: dict,
                          names: list[str], leaves: list[Any]) -> None:
    """Run the model on its example inputs; if it fails there, name the module and the input. The
    model's buffers (a batch norm's running statistics) and torch's random state are left as they were."""
    tracker = ModuleTracker(model)
    buffers = [(b, b.clone()) for b in model.buffers() if not b.is_meta]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    try:
        with torch.no_grad(), tracker, torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda else []):
            model(*args, **kwargs)
    except Exception as err:  # the model's own exception on the example inputs
        if is_data_dependent(err) or _is_meta_item_error(err):
            return
        culprit = ""
        if tracker.failed is not None:
            got = [a for a in pytree.tree_leaves(tracker.failed[2]) if isinstance(a, torch.Tensor)]
            ids = {id(a) for a in got}
            hit = [n for n, v in zip(names, leaves) if id(v) in ids]
            if hit:
                culprit = f" The failing module received input {', '.join(repr(h) for h in hit)} directly."
            else:  # e.g. a reshaped view of an input: match by shape and dtype
                sigs = {(tuple(a.shape), a.dtype) for a in got}
                hit = [n for n, v in zip(names, leaves)
                       if isinstance(v, torch.Tensor) and (tuple(v.shape), v.dtype) in sigs]
                if hit:
                    culprit = f" The failing module received a tensor shaped like input {', '.join(repr(h) for h in hit)}."
        raise CaptureError(
            f"cannot capture {model_name(model)}: the model itself fails on the example inputs in "
            f"{tracker.where()}: {first_line(err)}.{culprit} Example inputs were "
            f"{_describe_inputs(names, leaves)}. Check the shape/dtype of these inputs "
            "(and pass keyword inputs as example_kwargs).") from err
    finally:
        with torch.no_grad():
            for b, before in buffers:
                b.copy_(before)


def _is_meta_item_error(err: BaseException) -> bool:
    # eager code that calls .item() cannot run on meta tensors; that says nothing about the inputs
    return "meta" in str(err).lower() and ("item" in str(err).lower() or "data" in str(err).lower())



def known_cause(module: torch.nn.Module | None, model: torch.nn.Module | None = None) -> str:
    """Why a module known to read a tensor as a Python number fails to trace, or ""."""
    skips = random_layer_skips(module, model)
    if skips:
        return (f" In training, {', '.join(skips)} skip(s) layers at random (layerdrop: each layer draws a random "
                "number and branches on it), which no graph can hold; set it to 0 for the pipeline (in the config "
                "the model is built from, or on the module) or use dropout instead.")
    if (isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training
            and module.track_running_stats and module.momentum is None):
        return (" Its momentum is None (a cumulative moving average of the batch statistics), so torch's "
                "BatchNorm divides by float(num_batches_tracked), a value read from a buffer that changes "
                "every step; set the module's momentum to a number (e.g. 0.1, the default).")
    return ""


def packed_sequence_error(model: torch.nn.Module, failed: tuple[str, str, tuple] | None) -> CaptureError | None:
    """The error for an RNN that failed to trace on a PackedSequence (`failed`: the tracker's (name,
    type, args) of the module running when tracing failed), or None."""
    if failed is None or not any(isinstance(a, torch.nn.utils.rnn.PackedSequence) for a in failed[2]):
        return None
    return CaptureError(
        f"cannot capture {model_name(model)}: module '{failed[0]}' ({failed[1]}) reads a PackedSequence "
        "(torch.nn.utils.rnn.pack_padded_sequence): how many sequences run at each time step comes from the "
        "lengths' values, which a captured graph cannot depend on. Run it on the padded batch and read each "
        "sequence's output at its last valid step (out.gather(1, (lengths - 1).view(-1, 1, 1).expand(-1, 1, "
        "out.shape[-1])) for batch_first): a unidirectional RNN's outputs up to a sequence's length do not depend "
        "on its padding.")


def random_layer_skips(module: torch.nn.Module | None, model: torch.nn.Module | None) -> list[str]:
    """Nonzero layerdrop probabilities of a model in training (its config's and the failing module's)."""
    found = []
    for owner, prefix in ((getattr(model, "config", None), "config."), (module, ""), (model, "")):
        if owner is None or (model is not None and not model.training):
            continue
        found += [f"{prefix}{k} = {v}" for k, v in vars(owner).items()
                  if "layerdrop" in k.lower() and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0]
    return list(dict.fromkeys(found))


def _model_frame(err: BaseException) -> tuple[str, int, str] | None:
    """(file, line, code) of the innermost frame of the model's own code (not torch's, not ours) in err's
    traceback, or None."""
    import linecache
    import os
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    e: BaseException | None = err
    while e is not None:
        tb, found = e.__traceback__, None
        while tb is not None:
            path = tb.tb_frame.f_code.co_filename
            if not path.startswith(skip) and not path.startswith("<"):
                found = (path, tb.tb_lineno, linecache.getline(path, tb.tb_lineno).strip())
            tb = tb.tb_next
        if found is not None:
            return found
        e = e.__cause__ or e.__context__
    return None


def model_source_line(err: BaseException) -> str:
    """' at file.py:line (`code`)': the innermost frame of the model's own code in err's traceback, or ""."""
    import os
    frame = _model_frame(err)
    if frame is None:
        return ""
    path, line, code = frame
    return f" at {os.path.basename(path)}:{line}" + (f" (`{code}`)" if code else "")


def _assert_hint(err: BaseException) -> str:
    """For a data-dependent `assert` of the model's (ProphetNet's `assert torch.all(shifted_input_ids >= 0).item()`):
    a check that computes nothing, which Python's -O drops."""
    frame = _model_frame(err)
    if frame is None or not re.match(r"assert\b", frame[2]):
        return ""
    return (" The line is an assert, a check that computes nothing: run Python with -O (or PYTHONOPTIMIZE=1), "
            "which drops asserts, to capture the model without it.")


def capture_error(model: torch.nn.Module, export_err: BaseException, export_where: str,
                   trace_err: BaseException, trace_where: str,
                   failed: torch.nn.Module | None = None) -> CaptureError:
    """failed: the module that was running when export failed, if known."""
    name = model_name(model)
    unknown = re.search(r"Found <class '([\w.]+)'> in output, which is not a known type", str(export_err))
    if unknown:
        hint = (" A Hugging Face model given use_cache=True returns its KV cache, which a pipeline cannot use: "
                "pass use_cache=False or leave it out (compile_parallel then runs the model without the cache)."
                if "cache" in unknown.group(1).lower() else "")
        return CaptureError(
            f"cannot capture {name}: its output holds a {unknown.group(1)}, which torch's pytree cannot "
            f"flatten.{hint} Otherwise return tensors/tuples/dicts, or register the type with "
            "torch.utils._pytree.register_pytree_node.")
    if is_data_dependent(export_err):
        return CaptureError(
            f"cannot capture {name}: data-dependent control flow in {export_where}"
            f"{model_source_line(export_err)}: a Python branch or "
            f"shape depends on tensor values ({first_line(export_err, 200)}).{known_cause(failed, model)}"
            f"{_assert_hint(export_err)} Make the "
            "branch independent of tensor data (static shapes, torch.where, torch.cond), or move it "
            "out of the model.")
    trace_kind = " (data-dependent control flow)" if is_data_dependent(trace_err) else ""
    return CaptureError(
        f"cannot capture {name}: torch.export failed in {export_where} ({first_line(export_err)}) and "
        f"torch.fx.symbolic_trace failed in {trace_where}{trace_kind} ({first_line(trace_err)}). Try "
        "passing keyword inputs as example_kwargs, static shapes, or simplifying that module's forward.")
