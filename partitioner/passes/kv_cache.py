"""Hugging Face models whose config says use_cache=True (from_pretrained's default) run without a KV cache.

With use_cache on, a Hugging Face model's forward returns a Cache object (DynamicCache,
EncoderDecoderCache) in its output: torch's pytree cannot flatten it, so the model could not be
captured, and a pipeline has no use for it: train_step never reads it, and pm(...) takes whole
batches of the captured shape, so there is no next token to decode from it. capture() (and the
runs on fake tensors, fake_run.py) therefore run the model with every config's use_cache False: it
computes the same values and returns past_key_values=None. A use_cache passed as an input is the
caller's and kept (True is refused at capture, naming the fix).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch


def configs_with_cache(model: torch.nn.Module, kwargs: dict | None = None) -> list[Any]:
    """The configs of `model`'s modules (each once) with use_cache=True, unless the call passes use_cache
    itself. A sub-model may keep its own copy of the config (T5's decoder): each copy is listed."""
    if kwargs and "use_cache" in kwargs:
        return []
    found: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None) is True:
            found.setdefault(id(config), config)
    return list(found.values())


@contextlib.contextmanager
def without_kv_cache(model: torch.nn.Module, kwargs: dict | None = None) -> Iterator[None]:
    """Run `model` inside with every config's use_cache False (see the module docstring); restored after."""
    configs = configs_with_cache(model, kwargs)
    for config in configs:
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = True


def output_has_cache_field(out_spec: Any) -> bool:
    """Whether the captured output is a dataclass (an HF ModelOutput) with a past_key_values field (`cache`
    from transformers 5.2x on): one the model fills with its cache under use_cache=True, so that running
    without it changes what pm(...) returns (an encoder's output has no such field, though its config may
    say use_cache=True: BERT's)."""
    kind = getattr(out_spec, "type", None)
    return dataclasses.is_dataclass(kind) and any(f.name in ("past_key_values", "cache")
                                                  for f in dataclasses.fields(kind))
