"""Python attributes a model's forward changes (a call counter, a list it appends to), said once at capture.

A captured graph holds tensor ops only: `self.calls += 1` runs once, while the model is traced (torch.export
then restores the attribute), and a branch on it is baked in as taken then. Buffers the forward writes are
kept per microbatch; plain attributes silently were not.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch

from partitioner.units import first_few

_PLAIN = (bool, int, float, str, type(None))


def _plain_state(model: torch.nn.Module) -> dict[tuple[str, str], str]:
    """(module name, attribute) -> its value's repr, or a container's length, for the public plain attributes."""
    state: dict[tuple[str, str], str] = {}
    for name, m in model.named_modules():
        for attr, value in vars(m).items():
            if attr.startswith("_") or attr == "training":
                continue
            if isinstance(value, _PLAIN):
                state[(name, attr)] = repr(value)
            elif isinstance(value, (list, dict, set)):
                state[(name, attr)] = f"{len(value)} items"
    return state


@contextlib.contextmanager
def python_state_watched(model: torch.nn.Module, changed: list[str]) -> Iterator[None]:
    """While the model is traced: appends to `changed` each public plain attribute its forward changed, as
    "'module.attr' (before -> after)" (read by a forward hook on the root, before the tracer restores it).
    One the forward sets from None or unset is left out: scratch of one call (Funnel's pooling_mult)."""
    before = _plain_state(model)

    def after_forward(module, args, out) -> None:
        after = _plain_state(model)
        for (name, attr), value in after.items():
            if before.get((name, attr), "None") not in ("None", value):
                changed.append(f"'{name + '.' if name else ''}{attr}' ({before[(name, attr)]} -> {value})")

    handle = model.register_forward_hook(after_forward)
    try:
        yield
    finally:
        handle.remove()


def warn_python_state(model_name: str, changed: list[str]) -> None:
    if changed:
        warnings.warn(f"{model_name}'s forward changes Python attributes {first_few(changed)}: that ran "
                      "once, while the model was captured; the stages run the captured graph, which does not update "
                      "them and keeps any branch on them as taken then. Keep state the forward updates in a buffer "
                      "(register_buffer), which the stages update per microbatch.", RuntimeWarning, stacklevel=3)
