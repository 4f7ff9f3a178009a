"""A model's own torch.autograd.Function, kept whole in the captured graph so that its backward runs.

Non-strict torch.export traces a Function's forward as plain ops and drops its backward: the
graph's gradient would be autograd's derivative of that forward, not what the Function returns (a
straight-through estimator's gradient is passed through where round() has none; a reversible
layer, whose forward runs under no_grad and recomputes in backward, would pass none back). So
while the model is exported, each Function applied becomes one call of the custom op
`partitioner::autograd_function` (its tensor arguments, and a key naming the Function and its
other arguments). The op runs the Function's forward; its backward recomputes that forward with
gradients on and runs the Function's own backward through it (torch.autograd.grad), as a
checkpoint does: it saves the inputs, not the Function's saved tensors. Inductor and CUDA graphs
see an opaque op, as for any custom op. A forward that draws random numbers would draw anew in that
recompute: said in a warning at its first run.

A Function applied with keyword arguments, with arguments other than tensors and plain constants
(a module whose parameters it reads, a list it appends to: effects an op cannot carry),
returning other than tensors, or writing into an input is traced as before, with a warning that
names it.
"""
from __future__ import annotations

import contextlib
import enum
import warnings
from typing import Any, Iterator

import torch
from torch.autograd.function import Function

class _TensorSlot:
    def __repr__(self) -> str:
        return "<tensor>"


_TENSOR = _TensorSlot()  # where a tensor argument goes (a None argument stays None)
# key -> (the Function class, its positional arguments with _TENSOR where a tensor goes)
_FUNCTIONS: dict[str, tuple[type, list[Any]]] = {}
_ORIGINAL_APPLY = Function.__dict__["apply"]
_SINGLE: dict[str, bool] = {}  # key -> the Function returns one tensor (not a tuple of them)


class _NotWhole(Exception):
    """The Function returned something other than a tensor or a tuple of tensors, or wrote into an input."""


def _run(key: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    cls, template = _FUNCTIONS[key]
    it = iter(tensors)
    versions = [t._version for t in tensors]
    out = _ORIGINAL_APPLY.__func__(cls, *[next(it) if a is _TENSOR else a for a in template])
    _SINGLE[key] = isinstance(out, torch.Tensor)
    outs = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, tuple) else None
    if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
        raise _NotWhole(key)
    if [t._version for t in tensors] != versions:  # it wrote into an input (mark_dirty): not an op's effect
        raise _NotWhole(key)
    return outs


_CHECKED: set[str] = set()  # keys whose forward was run for real once: whether it draws random numbers is known


@contextlib.contextmanager
def _random_draws_said(key: str, tensors: list[torch.Tensor]) -> Iterator[None]:
    """The first real run of a Function's forward: a warning where it draws random numbers (the
    generator of its tensors' device moved), since its backward recomputes the forward with new draws."""
    if key in _CHECKED or any(t.is_meta for t in tensors):  # meta (the cost model's runs): nothing is drawn
        yield
        return
    cuda = next((t.device for t in tensors if t.is_cuda), None)
    if cuda is not None and torch.cuda.is_current_stream_capturing():
        yield
        return
    state = (lambda: torch.cuda.get_rng_state(cuda)) if cuda is not None else torch.get_rng_state
    before = state()
    yield
    _CHECKED.add(key)
    if not torch.equal(before, state()):
        warnings.warn(f"torch.autograd.Function {key.split('@')[0]} draws random numbers in its forward; the "
                      "pipeline runs it as one op whose backward recomputes that forward, drawing anew, so its "
                      "backward sees other random values than its forward used (a dropout mask: gradients of "
                      "another mask). Draw them outside the Function (torch.rand_like in the model's forward) and "
                      "pass them in as a tensor argument.", RuntimeWarning, stacklevel=3)


def forward_ops(tensors: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    """The Function's forward run as its own ops, without gradients (what the cost model counts: the op
    itself is opaque to a dispatch mode)."""
    with torch.no_grad():
        return _run(key, tensors)


@torch.library.custom_op("partitioner::autograd_function", mutates_args=())
def autograd_function(tensors: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    """The forward of the Function `key` names, on `tensors`; an output that is an input is copied
    (a custom op's outputs may not alias its inputs)."""
    with torch.no_grad(), _random_draws_said(key, tensors):
        outs = _run(key, tensors)
    inputs = {t.untyped_storage().data_ptr() for t in tensors}
    return [o.clone() if o.untyped_storage().data_ptr() in inputs else o for o in outs]


@autograd_function.register_fake
def _(tensors: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    with torch.no_grad():
        return [o.clone() for o in _run(key, tensors)]


def _setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
    tensors, key = inputs
    ctx.save_for_backward(*tensors)
    ctx.key = key


def _backward(ctx: Any, grads: list[torch.Tensor | None]) -> tuple[list[torch.Tensor | None], None]:
    """The Function's own backward, through its forward recomputed with gradients on."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in ctx.saved_tensors]
        outs = _run(ctx.key, inputs)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        need = [t for t in inputs if t.requires_grad]
        got = (torch.autograd.grad([o for o, _ in pairs], need, [g for _, g in pairs], allow_unused=True)
               if pairs and need else [None] * len(need))
    it = iter(got)
    return [next(it) if t.requires_grad else None for t in inputs], None


autograd_function.register_autograd(_backward, setup_context=_setup_context)


_PLAIN = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device, torch.Size, enum.Enum)


def _plain(value: Any) -> bool:
    """A value the op can take as a constant: immutable, holding no tensor and no module (a Function given
    a module reads its parameters, or a list it appends to, has effects the op cannot carry)."""
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


@contextlib.contextmanager
def kept_whole(where: Any) -> Iterator[dict[str, list[str]]]:
    """While the model is exported: each Function it applies becomes one autograd_function op.
    `where()` names the module running; yields {Function: [modules]} of those traced as before
    (for warn_traced). Torch's own Functions (checkpoint's, a custom op's autograd) are left alone."""
    traced: dict[str, list[str]] = {}

    def apply(cls, *args, **kwargs):
        if cls.__module__.startswith("torch"):
            return _ORIGINAL_APPLY.__func__(cls, *args, **kwargs)
        name = f"{cls.__module__}.{cls.__qualname__}"
        template = [_TENSOR if isinstance(a, torch.Tensor) else a for a in args]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not kwargs and tensors and all(a is _TENSOR or _plain(a) for a in template):
            key = f"{name}@{id(cls):x}|{template!r}"
            _FUNCTIONS[key] = (cls, template)
            try:
                outs = torch.ops.partitioner.autograd_function(tensors, key)
            except _NotWhole:
                pass
            else:
                return outs[0] if _SINGLE[key] else tuple(outs)
        modules = traced.setdefault(name, [])
        if where() not in modules:
            modules.append(where())
        return _ORIGINAL_APPLY.__func__(cls, *args, **kwargs)

    Function.apply = classmethod(apply)
    try:
        yield traced
    finally:
        Function.apply = _ORIGINAL_APPLY


def warn_traced(model_name: str, traced: dict[str, list[str]]) -> None:
    """Say which Functions were traced through (their own backward does not run)."""
    for qualname, modules in traced.items():
        shown = ", ".join(f"'{m or '<root>'}'" for m in modules[:3]) + (f" and {len(modules) - 3} more"
                                                                         if len(modules) > 3 else "")
        warnings.warn(
            f"{model_name} applies torch.autograd.Function {qualname} (in module {shown}) with keyword arguments, "
            "arguments other than tensors and plain values (a module whose parameters it reads, a list it fills), "
            "outputs other than tensors, or writes into an input: the captured graph holds the ops of its "
            "forward, and its own backward does not run; gradients are autograd's derivative of that forward "
            "(a straight-through or clipped gradient differs; a forward that turns gradients off inside, as a "
            "reversible layer's, passes none back). Apply it with positional tensors returning tensors, or write it as differentiable ops (a "
            "straight-through estimator: x + (f(x) - x).detach()).", RuntimeWarning, stacklevel=2)
