"""Named, randomly initialised models with example inputs and a loss (INTERFACE: pending).

Nothing is downloaded: every model is built from a config. Large ones are built
on the meta device. `small=True` gives a tiny config of the same class for tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class ZooModel:
    """A model ready to capture: call model(*example_args, **example_kwargs);
    loss_fn(output, target) -> scalar loss (mean over the batch)."""

    name: str
    model: torch.nn.Module
    example_args: tuple
    example_kwargs: dict = field(default_factory=dict)
    target: Any = None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None


def model_names() -> list[str]:
    raise NotImplementedError


def build(name: str, *, batch: int = 8, seq: int | None = None, device: str | torch.device | None = None,
          dtype: torch.dtype = torch.float32, small: bool = False, seed: int = 0) -> ZooModel:
    """Build zoo model `name`; device None = meta for large models, cpu for small ones."""
    raise NotImplementedError
