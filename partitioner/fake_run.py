"""The model run on fake tensors at a chosen batch size: shapes only, no weights touched.

ParallelModel needs shapes the captured graph (one microbatch) cannot give: an output's shape for
the whole batch (output_assembly.py), what a sequence module receives as its sequence when the
batch is cut into microbatches (sequence_first.py). Parameters and buffers are swapped for fake
meta tensors (torch.func.functional_call), so the real ones are neither read nor written, and the
inputs split_batch cuts are resized to `rows` along their batch dims. A size that depends on the data
(the rows a mixture of experts routes to an expert) is symbolic: callers read only concrete sizes.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils import _pytree as pytree

from partitioner.microbatch import Dims, batch_size, cut_dim, leaf_dim
from partitioner.passes.kv_cache import without_kv_cache
from partitioner.passes.transformer_masks import causal_mask_detection_off


def run_fake(model: torch.nn.Module, training: bool, args: tuple, kwargs: dict, rows: int | None,
             dims: Dims = 0) -> Any:
    """model(*args, **kwargs) in `training` mode on fake tensors, the inputs cut on the batch resized
    to `rows` along their batch dims (`dims`, as split_batch takes them; rows None: as they are).
    Raises whatever the model raises there (e.g. data-dependent control flow); the model's mode is
    restored."""
    full = batch_size((args, kwargs), dims)  # None: no input has a batch dim, none is resized
    # a tensor attribute that is no buffer stays usable; a shape env gives ops whose output size depends on
    # the data (nonzero, a mixture of experts' routing) a symbolic size instead of failing
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)

    # each tensor on its own device (no memory: made under the mode), so that a tensor the forward makes
    # itself (a causal mask on the CPU) meets the weights and inputs there; a model built on meta runs on meta
    on_meta = any(t.is_meta for t in model.parameters())

    def fake(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        shape = list(t.shape)
        if dim is not None and rows is not None:
            shape[dim] = rows
        with mode:
            return torch.empty(shape, dtype=t.dtype, device="meta" if on_meta else t.device)

    # parameters require grad as the real ones do, and the run keeps grad on, as capture does: a module
    # with an inference-only fast path (nn.TransformerEncoder's nested tensors) takes the path captured
    state = {name: fake(t).requires_grad_(t.requires_grad) for name, t in model.named_parameters()}
    state.update({name: fake(t) for name, t in model.named_buffers()})
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    leaves = [fake(x, None if full is None else cut_dim(x, full, leaf_dim(dims, i)))
              if isinstance(x, torch.Tensor) else x for i, x in enumerate(leaves)]
    fake_args, fake_kwargs = pytree.tree_unflatten(leaves, spec)
    switch = model.training != training
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")  # logs a failing op before raising it:
    level = fake_log.level                                          # the caller reports the failure
    try:
        if switch:
            model.train(training)
        fake_log.setLevel(logging.CRITICAL)
        with torch.enable_grad(), mode, without_kv_cache(model, fake_kwargs), \
                causal_mask_detection_off():  # as capture runs it
            return torch.func.functional_call(model, state, fake_args, fake_kwargs)
    finally:
        fake_log.setLevel(level)
        if switch:
            model.train(not training)
