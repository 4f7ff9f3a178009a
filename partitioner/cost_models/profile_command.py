"""`partitioner profile`: capture a model, profile it and print a per-module table.

`load_model_spec` (a zoo name or `package.module:function`) is shared with the
plan command: it is the one place that turns the MODEL argument into a model
and example inputs.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from partitioner import zoo
from partitioner.cost_models.device import get_device_spec, spec_for_torch_device
from partitioner.cost_models.profile import module_costs, profile
from partitioner.errors import CostModelError, PartitionerError
from partitioner.passes.annotate import annotate
from partitioner.passes.capture import capture
from partitioner.units import human_bytes, human_flops, human_time
from partitioner.zoo import context_note

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """A model ready to capture: model(*example_args, **example_kwargs); zoo models also bring
    their loss_fn(output, target) and a target, so plans count the loss."""

    name: str
    model: torch.nn.Module
    example_args: tuple
    example_kwargs: dict = field(default_factory=dict)
    loss_fn: Any = None
    target: Any = None


def load_model_spec(spec: str, batch: int | None = None, seq: int | None = None,
                    device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> ModelSpec:
    """Build the MODEL of the command line.

    spec: a zoo name (partitioner.zoo) or "package.module:function" returning
        (model, example_args[, example_kwargs]); the function gets batch, seq,
        device and dtype as keyword arguments when its signature takes them.
    device: None = the zoo's default (meta for large models); "meta" builds
        without allocating weights.
    """
    for flag, value, what in (("batch", batch, "batch size"), ("seq", seq, "sequence length")):
        if value is not None and value < 1:
            raise PartitionerError(f"--{flag} is {value}: give a positive {what}, or leave --{flag} out for "
                                   "the model's default")
    if ":" not in spec:
        kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        if batch is not None:
            kwargs["batch"] = batch
        if seq is not None:
            kwargs["seq"] = seq
        zm = zoo.build(spec, **kwargs)
        return ModelSpec(spec, zm.model, tuple(zm.example_args), dict(zm.example_kwargs), zm.loss_fn, zm.target)

    module_name, _, fn_name = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:  # console scripts do not import from the cwd
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise PartitionerError(f"cannot load model '{spec}': {e}. Give package.module:function, "
                               "importable from the current directory or PYTHONPATH") from e
    offered = {"batch": batch, "seq": seq, "device": device, "dtype": dtype}
    try:
        params = inspect.signature(fn).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in offered.items() if v is not None and (takes_all or k in params)}
    except (TypeError, ValueError):
        kwargs = {}
    try:
        result = fn(**kwargs)
    except Exception as e:  # the user's code: one line naming it, not the traceback of its internals
        first_line = next(iter(str(e).splitlines()), "")
        raise PartitionerError(f"model function '{spec}' raised {type(e).__name__}: {first_line} (called with "
                               f"{', '.join(f'{k}={v}' for k, v in kwargs.items()) or 'no arguments'}); "
                               "run it on its own to see the traceback") from e
    if not isinstance(result, tuple) or len(result) not in (2, 3) or not isinstance(result[0], torch.nn.Module):
        raise PartitionerError(f"model function '{spec}' must return (model, example_args[, example_kwargs]); "
                               f"it returned {type(result).__name__}")
    model, args = result[0], result[1]
    example_kwargs = dict(result[2]) if len(result) == 3 else {}
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    if device is not None and "device" not in kwargs and torch.device(device).type != "meta" and not on_meta:
        model = model.to(device)
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        example_kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in example_kwargs.items()}
    return ModelSpec(spec, model, args, example_kwargs)


def _measure_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def auto_depth(module_paths: list[str], max_rows: int = 40) -> int:
    """The deepest module depth whose table has at most `max_rows` rows (at least 1)."""
    deepest = max((p.count(".") + 1 for p in module_paths if p), default=1)
    best = 1
    for depth in range(1, deepest + 1):
        rows = {".".join(p.split(".")[:depth]) for p in module_paths}
        if len(rows) > max_rows:
            break
        best = depth
    return best



def run_profile(args: argparse.Namespace) -> None:
    """The `partitioner profile` command: capture, annotate, profile, print a per-module table."""
    from partitioner.plan_command import check_output_paths  # lazy: plan_command imports this module

    check_output_paths(args.json, None)  # before the capture, not after it
    dtype = DTYPES[args.dtype]
    console = Console()
    if not console.is_terminal:  # piped: do not squeeze the table to 80 columns
        console = Console(width=150)
    note = context_note(args.model, args.seq)
    if note:
        Console(stderr=True).print(f"note: {note}", highlight=False)
    device = _measure_device() if args.measure else torch.device("meta")
    spec = load_model_spec(args.model, args.batch, args.seq, device=device, dtype=dtype)
    if args.measure and any(p.device.type == "meta" for p in spec.model.parameters()):
        raise CostModelError(f"--measure needs real weights, but '{args.model}' was built on the meta device: "
                             f"make its function accept device= (it is called with device='{device}')")
    with console.status(f"capturing {args.model}"):
        captured = capture(spec.model, spec.example_args, spec.example_kwargs)
        annotated = annotate(captured)
    device_spec = spec_for_torch_device(device) if args.measure else get_device_spec(args.device_type)
    example_inputs = captured.flatten_inputs(spec.example_args, spec.example_kwargs) if args.measure else None
    if args.measure:  # profile() shows a progress bar while measuring
        costs = profile(captured, annotated, device=device_spec, dtype=dtype, optimizer=args.optimizer,
                        measure=True, example_inputs=example_inputs)
    else:
        with console.status(f"profiling {len(annotated.nodes)} nodes"):
            costs = profile(captured, annotated, device=device_spec, dtype=dtype, optimizer=args.optimizer)

    paths = {n.name: n.module_path for n in annotated.nodes}
    depth = args.depth if args.depth is not None else auto_depth(list(paths.values()))
    per_module = module_costs(costs, captured.graph_module, paths, depth=depth, tied=captured.tied)
    types = {n.module_path: n.module_type for n in annotated.nodes}
    types.update(getattr(captured, "module_types", None) or {})

    shapes = [f"{tuple(a.shape)}" for a in spec.example_args if isinstance(a, torch.Tensor)]
    shapes += [f"{k}={tuple(v.shape)}" for k, v in spec.example_kwargs.items() if isinstance(v, torch.Tensor)]
    n_params = sum(annotated.param_numel.values())
    total = per_module[""]
    count = f"{n_params / 1e6:,.1f}M" if n_params >= 1e5 else f"{n_params:,}"
    title = (f"{args.model}: {count} parameters, inputs {', '.join(shapes)}, {args.dtype}, "
             f"{costs.time_source} times on {costs.device}")
    table = Table(title=title, title_justify="left")
    for col in ("module", "type", "FLOPs fwd+bwd", "params", "activations out", "saved for bwd", "time fwd+bwd"):
        table.add_column(col, justify="left" if col in ("module", "type") else "right")
    for path, c in per_module.items():
        if path == "":
            continue
        indent = "  " * path.count(".")
        table.add_row(indent + path.rpartition(".")[2] if indent else path, types.get(path, "").rpartition(".")[2],
                      human_flops(c.fwd_flops + c.bwd_flops), human_bytes(c.param_bytes),
                      human_bytes(c.output_bytes), human_bytes(c.saved_bytes), human_time(c.time_s))
    table.add_section()
    table.add_row("total", types.get("", "").rpartition(".")[2], human_flops(total.fwd_flops + total.bwd_flops),
                  human_bytes(total.param_bytes), human_bytes(total.output_bytes), human_bytes(total.saved_bytes),
                  human_time(total.time_s))
    console.print(table)
    state = sum(costs.param_state_bytes.values())
    # the whole model as one stage
    fwd_s = costs.stage_pass.fwd_pass_s(total.fwd_time_s, total.host_fwd_time_s)
    bwd_s = costs.stage_pass.bwd_pass_s(total.bwd_time_s, total.host_bwd_time_s)
    console.print(f"one microbatch: forward {human_time(fwd_s)}, backward {human_time(bwd_s)}; "
                  f"parameters + gradients + {args.optimizer} state: {human_bytes(state)}; "
                  f"activations saved for backward: {human_bytes(total.saved_bytes)} (depth {depth})")
    if args.json:
        Path(args.json).write_text(costs.to_json())
        console.print(f"NodeCosts written to {args.json}")
