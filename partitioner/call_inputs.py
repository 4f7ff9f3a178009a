"""How a ParallelModel's calls reach its stages: the example call it was compiled for, a call's inputs laid
out as that call's (positional or keyword), and cut into this replica's microbatches, flat as the stages take
them, with errors that name the input that differs and how to fix it (a DataLoader's last batch, padding).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from partitioner.errors import RuntimeConfigError
from partitioner.microbatch import BatchDims, batch_size, cut_dim, leaf_dim, split_batch
from partitioner.passes.capture_io import Captured, input_leaf_names


@dataclass
class CallLayout:
    """The example call (its flat leaves and tree spec) and how calls are cut: `microbatches` per replica
    along `batch_dims`, `dp` replicas of which this process is `dp_rank`. model: the model's skeleton,
    whose forward signature binds positional and keyword inputs alike (None: calls as the example's)."""

    example_leaves: list[Any]
    example_spec: pytree.TreeSpec
    microbatches: int
    batch_dims: BatchDims = BatchDims()
    dp: int = 1
    dp_rank: int = 0
    model: torch.nn.Module | None = None
    example_args: tuple = field(init=False)
    example_kwargs: dict = field(init=False)

    def __post_init__(self) -> None:
        self.example_args, self.example_kwargs = pytree.tree_unflatten(self.example_leaves, self.example_spec)

    def as_example_call(self, inputs: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The call's inputs laid out as the example inputs were (positional or keyword, keywords in
        their order), where forward's signature binds both to the same parameters: a module takes
        model(x) and model(input_ids=x) alike, but the stages take their inputs in the captured layout."""
        inputs = tuple(inputs)
        if pytree.tree_structure((inputs, dict(kwargs))) == self.example_spec or self.model is None:
            return inputs, kwargs
        example_args, example_kwargs = self.example_args, self.example_kwargs
        try:
            signature = inspect.signature(self.model.forward)
            bound = signature.bind(*inputs, **kwargs).arguments
        except (TypeError, ValueError):
            return inputs, kwargs
        params = list(signature.parameters.values())
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params[:len(example_args)]) or \
                any(p.kind == p.VAR_KEYWORD and p.name in bound for p in params):
            return inputs, kwargs
        positional = [p.name for p in params[:len(example_args)]]
        if set(bound) != {*positional, *example_kwargs}:
            return inputs, kwargs  # microbatch_inputs names the difference
        return tuple(bound[n] for n in positional), {k: bound[k] for k in example_kwargs}

    def check_target_by_keyword(self, inputs: tuple, target: Any) -> None:
        """pm.train_step(x, y), as a script calls loss_fn(model(x), y): one positional argument more than
        the example inputs and no target= is the target passed by position."""
        if target is None and len(inputs) == len(self.example_args) + 1:
            raise RuntimeConfigError(f"train_step got {len(inputs)} positional arguments but the example inputs had "
                                     f"{len(self.example_args)}, and no target=: pass the target by keyword, "
                                     "pm.train_step(*inputs, target=y) (every positional argument is an input).")

    def microbatch_inputs(self, captured: Captured, inputs: tuple, kwargs: dict, any_batch: bool = False,
                          graphs: bool = False) -> list[list[Any]]:
        """This replica's microbatches of the call's inputs, flat as `captured`'s stages take them. Inputs must be shaped
        as the example inputs; with any_batch (inference) the batch may be any multiple of the example's
        microbatch (times dp), run as that many microbatches of the captured shape (not where the stages replay
        as CUDA graphs: `graphs`)."""
        leaves, spec = pytree.tree_flatten((tuple(inputs), dict(kwargs)))
        dims = self.batch_dims.inputs
        if spec != self.example_spec:
            raise RuntimeConfigError(_mismatch(tuple(inputs), dict(kwargs), self.example_args, self.example_kwargs))
        example_batch, batch = batch_size(self.example_leaves, dims), batch_size(leaves, dims)
        per_replica = self.microbatches
        if any_batch and batch != example_batch and example_batch is not None and batch is not None:
            per_replica = self.inference_microbatches(leaves, batch, example_batch, graphs)
        for i, (x, ex) in enumerate(zip(leaves, self.example_leaves)):
            want = ex
            d = cut_dim(ex, example_batch, leaf_dim(dims, i)) if example_batch is not None else None
            if per_replica != self.microbatches and d is not None:  # cut as the example was, `batch` long
                want = ex.new_empty(ex.shape[:d] + (batch,) + ex.shape[d + 1:], device="meta")
            if isinstance(ex, torch.Tensor) != isinstance(x, torch.Tensor) or (
                    isinstance(x, torch.Tensor) and (x.shape != want.shape or x.dtype != ex.dtype)):
                got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else repr(x)
                shape = f"{tuple(ex.shape)} {ex.dtype}" if isinstance(ex, torch.Tensor) else repr(ex)
                if isinstance(ex, torch.Tensor) != isinstance(x, torch.Tensor):  # an Optional input given None once
                    name = input_leaf_names(self.model, self.example_args, self.example_kwargs)[i]
                    raise RuntimeConfigError(
                        f"input {i} ('{name}') is {got} but the example inputs had {shape}: the stages were captured "
                        f"with {'a tensor' if isinstance(ex, torch.Tensor) else f'{shape}, a constant of the graph,'} "
                        "there. Pass it as the example inputs did, or give compile_parallel example inputs with "
                        f"{'a tensor' if isinstance(x, torch.Tensor) else got} there.")
                if want is not ex:
                    raise RuntimeConfigError(f"input {i} is {got}, but in a batch of {batch} (the first batched "
                                             f"input's) it is {tuple(want.shape)} {ex.dtype}, as the example inputs "
                                             f"had it {shape} in a batch of {example_batch}.")
                raise RuntimeConfigError(f"input {i} is {got} but the example inputs had {shape}; the stages were "
                                         f"captured for that shape. Pass batches shaped like the example inputs"
                                         f"{_shape_hint(x, ex, leaf_dim(dims, i), any_batch)}.")
        shares = split_batch((tuple(inputs), dict(kwargs)), self.dp * per_replica, "input", batch, dims)
        return [captured.flatten_inputs(a, kw) for a, kw in self.own_share(shares, per_replica)]

    def inference_microbatches(self, leaves: list[Any], batch: int, example_batch: int,
                               graphs: bool = False) -> int:
        """How many microbatches of the captured size (per replica) a batch of `batch` makes for pm(...), or
        RuntimeConfigError naming the sizes it takes."""
        rows = example_batch // (self.dp * self.microbatches)  # one microbatch's samples
        step = rows * self.dp
        dims = self.batch_dims.inputs
        if graphs:
            raise RuntimeConfigError(f"pm(...) got a batch of {batch}, but its stages replay as CUDA graphs (compile "
                                     f"mode 'reduce-overhead'), recorded for batches of {example_batch}: pass those.")
        if batch % step:
            lower = f"{batch // step * step} or " if batch > step else ""
            raise RuntimeConfigError(f"pm(...) got a batch of {batch}; it infers on batches of a multiple of {step} "
                                     f"samples (the microbatch of {rows} the stages were captured for"
                                     f"{f', times {self.dp} replicas' if self.dp > 1 else ''}), e.g. "
                                     f"{lower}{(batch // step + 1) * step} (pad the batch, or drop_last=True).")
        shared = [i for i, (x, ex) in enumerate(zip(leaves, self.example_leaves))
                  if isinstance(ex, torch.Tensor) and cut_dim(ex, example_batch, leaf_dim(dims, i)) is None
                  and cut_dim(x, batch, leaf_dim(dims, i)) is not None]
        if shared:
            raise RuntimeConfigError(f"pm(...) got a batch of {batch}, but input {shared[0]}, whole to every "
                                     f"microbatch, is {batch} long along its batch dim too, so it would be cut; pass "
                                     f"a batch of another multiple of {step}, or of {example_batch}.")
        return batch // step

    def own_share(self, microbatches: list[Any], per_replica: int | None = None) -> list[Any]:
        """This replica's microbatches of the global batch's dp x m (replica d takes the d-th run of m)."""
        if self.dp == 1:
            return microbatches
        d, m = self.dp_rank, per_replica or self.microbatches
        return microbatches[d * m:(d + 1) * m]


def _shape_hint(x: Any, example: Any, dim: int, any_batch: bool = False) -> str:
    """How to make an input `x` shaped as `example` (batch dim `dim`): a DataLoader's last, smaller batch
    (drop_last=True), a bigger batch (compile with it), other lengths along other dims (pad or truncate
    to it), another dtype (convert)."""
    if not isinstance(x, torch.Tensor) or not isinstance(example, torch.Tensor) or x.dim() != example.dim():
        return ""
    if x.shape == example.shape:
        return f" (convert it: x.to({example.dtype}))" if x.dtype != example.dtype else ""
    other = [k for k, (a, b) in enumerate(zip(x.shape, example.shape)) if a != b and k != dim]
    if other:
        k, n = other[0], example.shape[other[0]]
        fix = (f"pad every batch to {n}, e.g. a tokenizer's padding='max_length', max_length={n}, with an attention "
               "mask where the model takes one") if x.shape[k] < n else (
               f"truncate it to {n}, or call compile_parallel with example inputs of the longest length and pad "
               "every batch to it")
        return f" (dim {k} is {x.shape[k]}, not {n}: {fix})"
    if any_batch:  # its batch dim differs where other inputs' do not
        return f" (dim {dim} is the batch: as long as the other inputs' batch)"
    if x.dim() > dim and x.shape[dim] < example.shape[dim]:
        return " (a DataLoader's last, smaller batch: drop_last=True)"
    if x.dim() > dim and x.shape[dim] > example.shape[dim]:
        return (f" (a batch of {x.shape[dim]}: call compile_parallel with example inputs of that batch, or pass "
                f"batches of {example.shape[dim]})")
    return ""


def _mismatch(args: tuple, kwargs: dict, example_args: tuple, example_kwargs: dict) -> str:
    """Name the argument by which a call differs from the example inputs."""
    missing = [k for k in example_kwargs if k not in kwargs]
    extra = [k for k in kwargs if k not in example_kwargs]
    fix = "call with the same arguments as the example inputs given to compile_parallel."
    if missing:
        return f"inputs lack keyword argument {missing[0]!r} that the example inputs had; {fix}"
    if extra:
        return f"inputs have keyword argument {extra[0]!r} that the example inputs did not; {fix}"
    if len(args) != len(example_args):
        return f"inputs have {len(args)} positional arguments but the example inputs had {len(example_args)}; {fix}"
    for i, (a, b) in enumerate(list(zip(args, example_args)) + [(kwargs[k], example_kwargs[k]) for k in kwargs]):
        if pytree.tree_structure(a) != pytree.tree_structure(b):
            where = f"positional argument {i}" if i < len(args) else f"keyword argument {list(kwargs)[i - len(args)]!r}"
            return (f"{where} is nested differently from the example inputs' ({type(a).__name__} vs "
                    f"{type(b).__name__}); {fix}")
    return f"inputs are structured differently from the example inputs; {fix}"
