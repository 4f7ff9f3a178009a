"""Modules no tracer can see into, refused by name before capture.

A TorchScript module (torch.jit.script / torch.jit.trace) holds TorchScript, not Python: torch.export
refuses its parameters and symbolic_trace cannot call it on proxies, so capture failed with torch's own
message. DataParallel and DistributedDataParallel wrap a model to replicate it over devices or processes,
which compile_parallel does itself (`mesh=`): DDP's forward could not be exported and its gradient
all-reduce would not run on the stages' copies.
"""
from __future__ import annotations

import torch

from partitioner.errors import CaptureError

_WRAPPERS = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)


def check_traceable_modules(model: torch.nn.Module, model_name: str) -> None:
    """Raise CaptureError naming the first TorchScript module or data-parallel wrapper in `model`."""
    for name, m in model.named_modules():
        where = f"module '{name or '<root>'}' ({type(m).__name__})"
        if isinstance(m, _WRAPPERS):
            fix = "pass model.module" if not name else f"use '{name}.module' in its place"
            raise CaptureError(
                f"cannot capture {model_name}: {where} wraps a module for data parallelism, which compile_parallel "
                f"does itself (a (dp, pp) mesh=); {fix}.")
        if isinstance(m, torch.jit.ScriptModule):
            raise CaptureError(
                f"cannot capture {model_name}: {where} is a TorchScript module (torch.jit.script or torch.jit.trace), "
                "which torch.export cannot trace into. Use the Python module it was made from (script it for "
                "deployment after training, if at all).")
