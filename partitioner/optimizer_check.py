"""An optimizer built on the model given to compile_parallel, instead of on the ParallelModel.

The ParallelModel trains copies of the model's parameters (runtime/parameter_store.py's ParameterStore:
each stage's on its device); the model's own get no gradients. An optimizer built on
`model.parameters()` (before compile_parallel, as a single-device loop builds it) steps nothing
and the run trains nothing, silently: its first step says so, once, naming a parameter and the fix.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

# id of a parameter of a model given to compile_parallel -> (a weak reference to it, its FQN)
_handed_over: dict[int, tuple[weakref.ref, str]] = {}
_checked: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
_hook: Any = None


def watch_model_parameters(model: torch.nn.Module) -> None:
    """Remember `model`'s parameters (weakly) so that an optimizer stepping them is named at its first step."""
    global _hook
    for fqn, p in model.named_parameters():
        key = id(p)
        _handed_over[key] = (weakref.ref(p, lambda _, key=key: _handed_over.pop(key, None)), fqn)
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check_first_step)


def _check_first_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if optimizer in _checked:
        return
    _checked.add(optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = _handed_over.get(id(p))
            if entry is not None and entry[0]() is p:
                warnings.warn(f"{type(optimizer).__name__} steps '{entry[1]}' of the model given to compile_parallel, "
                              "but the ParallelModel trains its own copies of the parameters (the model's get no "
                              "gradients, so this optimizer changes nothing): build the optimizer after "
                              "compile_parallel, on pm.parameters().", RuntimeWarning, stacklevel=3)
                return
