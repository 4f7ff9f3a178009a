"""Module and tensor hooks, and what a captured graph keeps of them.

Forward hooks and pre-hooks run while the model is traced: what they compute into a module's inputs or
output is in the graph, but they run once, on fake tensors, so their Python side effects (storing
activations in a list, logging) do not happen per step: said in a warning naming the modules (hooks of
torch's own that only compute tensors, pruning's and the old spectral_norm / weight_norm's, and
transformers' enable_input_require_grads, are left unsaid). Gradient hooks are dropped: a module's
backward hooks (register_full_backward_hook, register_full_backward_pre_hook, the old
register_backward_hook) run at the module's boundaries in autograd, which a flat graph of aten ops no
longer has; a hook that forward registers on an activation (`h.register_hook(fn)`) is not an op, so
torch.export records nothing for it. Either way the stages' gradients would silently differ from the
model's: refused, naming the module and the fix. Hooks on parameters are carried to the stages' copies
(runtime/parameter_hooks.py).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator

import torch
from torch.nn.modules import module as nn_module

from partitioner.errors import CaptureError
from partitioner.units import first_few

_FIX = ("Compute what it does inside forward with a torch.autograd.Function (kept whole: its own backward runs "
        "in the stage), or remove the hook.")


def check_no_module_backward_hooks(model: torch.nn.Module, model_name: str) -> None:
    """Raise CaptureError naming the first module of `model` with a backward hook (or a global one)."""
    if nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks:
        raise CaptureError(f"cannot capture {model_name}: a global module backward hook is registered "
                           "(torch.nn.modules.module.register_module_full_backward_hook or _pre_hook); the captured "
                           f"graph has no module boundaries in backward, so it would never run. {_FIX}")
    for name, m in model.named_modules():
        if m._backward_hooks or m._backward_pre_hooks:
            raise CaptureError(
                f"cannot capture {model_name}: module '{name or '<root>'}' ({type(m).__name__}) has a backward hook "
                "(register_full_backward_hook, register_full_backward_pre_hook or register_backward_hook); the "
                f"captured graph has no module boundaries in backward, so it would never run. {_FIX}")


@contextlib.contextmanager
def tensor_hooks_recorded(where: Callable[[], str], found: list[str]) -> Iterator[None]:
    """Around torch.export: appends to `found` where (`where()`, the running module) forward calls
    Tensor.register_hook on a tensor that requires grad."""
    original = torch.Tensor.register_hook

    def register_hook(self: torch.Tensor, hook):
        if self.requires_grad:
            found.append(where())
        return original(self, hook)

    torch.Tensor.register_hook = register_hook
    try:
        yield
    finally:
        torch.Tensor.register_hook = original


def tensor_hook_error(model_name: str, where: str) -> CaptureError:
    place = f"module '{where}'" if where else "the model's forward"
    return CaptureError(f"cannot capture {model_name}: {place} registers a gradient hook on a tensor in forward "
                        "(Tensor.register_hook), which torch.export does not record, so the stages' gradients would "
                        f"not pass through it. {_FIX}")


def _computes_tensors_only(hook) -> bool:
    """torch's own forward pre-hooks that only compute tensors (a weight from its parts), and the forward
    hook transformers' enable_input_require_grads puts on the input embeddings (gradient_checkpointing_enable
    and adapter recipes call it): it sets the embeddings' output to require grad, which reentrant
    checkpointing needs under frozen embeddings, and the graph keeps (checkpoints are inlined at capture)."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm, SpectralNormLoadStateDictPreHook
    from torch.nn.utils.weight_norm import WeightNorm
    if getattr(hook, "__module__", "").startswith("transformers.") and \
            getattr(hook, "__qualname__", "").endswith("enable_input_require_grads.<locals>.make_inputs_require_grads"):
        return True
    return isinstance(hook, (prune.BasePruningMethod, SpectralNorm, SpectralNormLoadStateDictPreHook, WeightNorm))


def warn_forward_hooks(model: torch.nn.Module) -> None:
    """Warn, naming the modules, where forward hooks or pre-hooks of the user's are registered."""
    hooked = [f"'{name or '<root>'}' ({type(m).__name__})" for name, m in model.named_modules()
              if any(not _computes_tensors_only(h) for h in [*m._forward_hooks.values(),
                                                               *m._forward_pre_hooks.values()])]
    if hooked:
        warnings.warn(f"forward hooks or pre-hooks on module {first_few(hooked)} ran once, while the model "
                      "was captured (on fake tensors): what they compute into a module's inputs or output is in the "
                      "stages' graphs, but their Python side effects (storing activations, logging) do not happen in "
                      "train_step or pm(...).", RuntimeWarning, stacklevel=3)
