"""Compiled stages: each stage GraphModule (and the loss) through torch.compile.

The stage graphs are ours, flat and of fixed shapes (the plan fixes the
microbatch), so inductor sees whole stages: elementwise chains fuse across
layer boundaries and the host dispatches a few fused kernels instead of every
aten op. Parameters stay attributes of the graph module, so optimizer steps,
load_state_dict and replica refreshes (all in place) are seen by the compiled
code.

A stage whose compilation fails runs eagerly, with a warning naming the stage
and the node inductor stopped at; so does one whose generated code fails on its
first call (inductor lowering an op wrongly: CPU LSTMs fed an input without
gradient get aten.mkldnn_rnn_layer with train=False, torch 2.13). Later runtime
errors of the compiled code are raised as is.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from partitioner.errors import RuntimeConfigError
from partitioner.passes.graph_nodes import vmap_level_change
from partitioner.runtime.cudagraph_trees import CudagraphSteps

# what compile=True passes to torch.compile: stage shapes are fixed by the plan
DEFAULT_OPTIONS: dict[str, Any] = {"dynamic": False}


def compile_options(compile: bool | dict | None, devices: list[torch.device]) -> dict[str, Any] | None:
    """torch.compile's keyword arguments, or None for eager stages.

    compile None: on where the stages run on CUDA, off on CPU; True: DEFAULT_OPTIONS;
    a dict: those options over DEFAULT_OPTIONS (e.g. {"mode": "max-autotune"}).
    """
    if compile is None:
        compile = all(d.type == "cuda" for d in devices)
    if compile is False:
        return None
    options = {**DEFAULT_OPTIONS, **(compile if isinstance(compile, dict) else {})}
    backend = options.get("backend", "inductor")
    if backend == "inductor" and any(d.type == "cpu" for d in devices) and not _cxx_compiler():
        raise RuntimeConfigError("compile_parallel(compile=True): inductor needs a C++ compiler for CPU stages and "
                                 "none was found (set CXX or install g++); pass compile=False to run eagerly.")
    return options


def uses_cudagraphs(options: dict[str, Any] | None) -> bool:
    """torch.compile's modes that turn on CUDA graphs (cudagraph trees), or the inductor option itself
    (None, eager stages: no)."""
    if options is None:
        return False
    inductor = options.get("options") or {}
    return options.get("mode") in ("reduce-overhead", "max-autotune") or bool(inductor.get("triton.cudagraphs"))


def _cxx_compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), None)


def _own_code(fn: Callable) -> Callable:
    """A copy of `fn` with its own code object. Dynamo keeps its compiled entries on the code object, at most
    recompile_limit (8) of them: the function compiled per ParallelModel (the last stage and the loss as one
    call) shared them, every new ParallelModel of a process recompiled it, and from the ninth on that stage
    ran eagerly."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__
    return copy


class CompiledStage:
    """Calls a stage's compiled graph; falls back to the eager graph module if compilation fails."""

    def __init__(self, name: str, module: Callable, graph: torch.fx.Graph | None, options: dict[str, Any],
                 fallback: Callable | None = None, fallback_how: str = "eagerly"):
        self.name = name
        self.eager = fallback or module  # what runs where compilation fails
        self.fallback_how = fallback_how
        self.graph = graph
        self.compiled = torch.compile(module, **options)
        self.failed = False
        self.compile_s = 0.0
        self._first = True

    @property
    def called(self) -> bool:
        return not self._first

    def __call__(self, *args: Any) -> Any:
        if self.failed:
            return self.eager(*args)
        start = time.perf_counter() if self._first else 0.0
        try:
            out = self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - only compile-time failures are caught, see _is_compile_error
            if not (_is_compile_error(err) or (self._first and _in_generated_code(err))):
                raise
            self.failed = True
            warnings.warn(f"torch.compile failed on {self.name}{_failing_node(err, self.graph)}: {_first_line(err)}. "
                          f"{self.name} runs {self.fallback_how} (the others stay compiled); pass compile=False to run "
                          "every stage eagerly.", RuntimeWarning, stacklevel=2)
            return self.eager(*args)
        if self._first:
            self.compile_s = time.perf_counter() - start
            self._first = False
        return out


@dataclass
class StageCallables:
    """What the executor calls: each stage's runner, the loss, and the last stage with the loss in
    one compiled call for training (None: eager stages, or the last stage not in this process)."""

    runners: dict[int, Callable]
    loss: Callable
    stage_loss: "CompiledStage | None" = None
    cudagraph_steps: CudagraphSteps | None = None  # brackets each step where the stages run under CUDA graphs

    @property
    def gradients_at_once(self) -> bool:
        """Whether a stage's backward hands out all its parameters' gradients at once (compiled: one
        backward call), so adding them with one foreach add holds no more memory than AccumulateGrad
        (an eager backward lets it free each gradient as it goes)."""
        return any(isinstance(r, CompiledStage) for r in self.runners.values())


def compile_stages(graph_modules: dict[int, torch.fx.GraphModule], loss_fn: Callable, options: dict[str, Any] | None,
                   *, last: int, unflatten: Callable[[list[Any]], Any],
                   check: Callable[..., Callable] | None = None) -> StageCallables:
    """The callables the executor runs for the stages `graph_modules` (of a model whose last stage is
    `last`), compiled with `options` (None: eagerly). check(loss, user_loss) wraps a loss function
    with the user-facing checks of its result (loss_fn.checked_loss)."""
    check = check or (lambda fn, user_fn=None: fn)
    if options is None:
        return StageCallables(dict(graph_modules), check(loss_fn, loss_fn))
    vmapped = sorted(k for k, gm in graph_modules.items() if any(vmap_level_change(n) for n in gm.graph.nodes))
    if vmapped:
        warnings.warn(f"stage(s) {', '.join(map(str, vmapped))} run eagerly: they hold a torch.vmap (a mask function "
                      "Hugging Face vmaps over positions, Gemma3's), whose calls torch.compile cannot run in a graph "
                      "(NYI: querying is_contiguous inside of vmap); the other stages are compiled.",
                      RuntimeWarning, stacklevel=3)
    runners: dict[int, Callable] = {k: gm if k in vmapped else CompiledStage(f"stage {k}", gm, gm.graph, options)
                                    for k, gm in graph_modules.items()}
    loss = check(CompiledStage("the loss function", loss_fn, None, options), loss_fn)
    steps = CudagraphSteps(lambda: _trainable(graph_modules)) if uses_cudagraphs(options) else None
    fused = None if last in vmapped else stage_with_loss(last, graph_modules, runners, loss, check(loss_fn),
                                                         unflatten, options)
    return StageCallables(runners, loss, fused, steps)


def _trainable(graph_modules: dict[int, torch.fx.GraphModule]) -> list[torch.Tensor]:
    """The trainable parameters of the stages, each once (a rank's chunks share tensors)."""
    seen: dict[int, torch.Tensor] = {}
    for gm in graph_modules.values():
        for p in gm.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def stage_with_loss(last: int, graph_modules: dict[int, torch.fx.GraphModule], runners: dict[int, Callable],
                    loss: Callable, user_loss: Callable, unflatten: Callable[[list[Any]], Any],
                    options: dict[str, Any]) -> "CompiledStage | None":
    """The last stage and the loss as one compiled call for training, (*stage inputs, target) -> loss, or
    None (the last stage not here).

    One call instead of two per microbatch, forward and backward: each compiled call costs the host
    a fixed time (benchmarks/RESULTS.md), and inductor fuses the loss into the stage's last kernels.
    user_loss: loss_fn as the user gave it (compiled with the stage); loss: what runs where that
    compilation fails, after runners[last] (both compiled on their own).
    """
    if last not in graph_modules:
        return None
    gm = graph_modules[last]

    def fused(*args: Any) -> torch.Tensor:
        return user_loss(unflatten(list(gm(*args[:-1]))), args[-1])

    def separate(*args: Any) -> torch.Tensor:
        return loss(unflatten(list(runners[last](*args[:-1]))), args[-1])

    return CompiledStage(f"stage {last} with the loss function", _own_code(fused), gm.graph, options,
                         fallback=separate,
                         fallback_how="as two calls, the stage and the loss each compiled on its own")


def compile_report(runners: dict[int, Callable]) -> str | None:
    """One line on what compiling the stages took (after the first step), or None if nothing compiled."""
    compiled = [r for r in runners.values() if isinstance(r, CompiledStage) and r.called]
    if not compiled:
        return None
    total = sum(r.compile_s for r in compiled)
    failed = [r.name for r in compiled if r.failed]
    tail = f"; not compiled after a failure: {', '.join(failed)}" if failed else ""
    return f"compiled {len(compiled)} stage graph(s) in {total:.1f} s (first step){tail}"


def _is_compile_error(err: BaseException) -> bool:
    from torch._dynamo import exc as dynamo_exc  # lazy: dynamo is slow to import; only a failure needs it
    kinds: tuple[type, ...] = (dynamo_exc.BackendCompilerFailed, dynamo_exc.Unsupported, dynamo_exc.InternalTorchDynamoError)
    try:
        from torch._inductor.exc import InductorError  # lazy, and absent from older torch
        kinds += (InductorError,)
    except ImportError:
        pass
    return isinstance(err, kinds)


def _in_generated_code(err: BaseException) -> bool:
    """Whether `err` was raised inside the code inductor generated (a file of its cache directory), not
    by torch.compile's guards or the model's inputs; memory errors are the device's, not the code's."""
    if isinstance(err, torch.OutOfMemoryError):
        return False
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir  # private: absent from some torch versions
        where = cache_dir()
    except ImportError:
        where = "torchinductor_"
    tb = err.__traceback__
    while tb is not None:
        if where in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _cause(err: BaseException) -> BaseException:
    """The backend's own exception where dynamo wrapped it (BackendCompilerFailed)."""
    return getattr(err, "inner_exception", None) or err.__cause__ or err


def _first_line(err: BaseException) -> str:
    inner = _cause(err)
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0] if text else ''}"[:300]


def _failing_node(err: BaseException, graph: torch.fx.Graph | None) -> str:
    """' at node NAME (TARGET)' for the first node of `graph` whose aten target the error names."""
    if graph is None:
        return ""
    text = f"{err}\n{_cause(err)}"
    names = set(re.findall(r"(?:aten|prims)\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?", text))
    for node in graph.nodes:
        if node.op == "call_function" and any(str(node.target).startswith(n) or n.startswith(str(node.target))
                                              for n in names):
            return f" at node '{node.name}' ({node.target})"
    return ""


def print_once(message: str | None, rank: int | None) -> None:
    if message and rank in (None, 0):
        print(f"partitioner: {message}", file=sys.stderr, flush=True)
