"""A whole training step replayed as one CUDA graph (compile_parallel(cuda_graph=True)).

A pipeline of many small kernels is host-bound: the GPU waits for Python to launch them
(figures in benchmarks/RESULTS.md). Captured once, a step (every microbatch's forward and
backward of every local stage, the loss, the gradient accumulation) is one graph launch,
and the step takes its kernels' time.

Capture needs fixed addresses: the inputs and targets are copied into buffers captured
with the graph, and every trainable parameter's `.grad` is a tensor allocated before the
capture, into which each replay accumulates (as eager steps do); a parameter the warm-up
steps gave no gradient keeps its `.grad` (None), as in eager steps. A `.grad` set to None
(`zero_grad()`) or replaced between steps is re-attached before the next replay, zeroed
or holding the replaced values. Parameters are read in place, so optimizer steps and
load_state_dict are seen. Dropout draws fresh random numbers on every replay.

Applies where every stage of the process is on one CUDA device and the stages pass
tensors in-process (one process). The first `warmup_steps` steps run eagerly on a side
stream (they compile the stages and initialise cuBLAS); the next one is captured and
replayed. A capture that fails (an operation that synchronises with the host, for
example) warns with the reason, and every step runs without the graph from then on.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

StepFn = Callable[[list[list[Any]], list[Any]], "torch.Tensor | None"]


class StepGraph:
    """Runs `step(mb_inputs, mb_targets)` (the executor's train_step) as a CUDA graph on `device`.

    params: the trainable parameters whose gradients the step accumulates (read at capture).
    """

    def __init__(self, step: StepFn, params: Callable[[], list[torch.Tensor]], device: torch.device,
                 warmup_steps: int = 2):
        self.step = step
        self.params = params
        self.device = device
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.failed: str | None = None  # why the step could not be captured
        self.graph: torch.cuda.CUDAGraph | None = None
        self._stream: torch.cuda.Stream | None = None
        self._static: list[torch.Tensor] = []  # the captured inputs' and targets' tensor leaves
        self._spec: Any = None  # their tree structure and non-tensor leaves: a call must match them
        self._loss: torch.Tensor | None = None
        self._grads: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its captured .grad)
        self._mismatch_warned = False
        self._with_grad: set[int] = set()  # ids of the parameters the warm-up steps gave a gradient

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, mb_inputs: list[list[Any]], mb_targets: list[Any]) -> torch.Tensor | None:
        self.steps += 1
        if self.failed is not None:
            return self.step(mb_inputs, mb_targets)
        if self.graph is None:
            if self.steps <= self.warmup_steps:
                loss = self._on_side_stream(mb_inputs, mb_targets)
                self._with_grad |= {id(p) for p in self.params() if p.grad is not None}
                return loss
            if not self._capture(mb_inputs, mb_targets):
                return self.step(mb_inputs, mb_targets)
        leaves, spec = self._flatten(mb_inputs, mb_targets)
        if spec != self._spec:  # a Python value the graph baked in changed: this step runs eagerly
            if not self._mismatch_warned:
                self._mismatch_warned = True
                warnings.warn("cuda_graph: this train_step's non-tensor inputs or autocast differ from the "
                              "captured step's; such steps run without the CUDA graph.", RuntimeWarning,
                              stacklevel=3)
            return self.step(mb_inputs, mb_targets)
        for static, x in zip(self._static, leaves):
            static.copy_(x, non_blocking=True)
        self._attach_grads()
        self.graph.replay()
        return None if self._loss is None else self._loss.clone()

    # ------------------------------------------------------------------ capture

    def _side_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _on_side_stream(self, mb_inputs: list[list[Any]], mb_targets: list[Any]) -> torch.Tensor | None:
        """A warm-up step on the stream the capture will use (as torch.cuda.graph's docs ask)."""
        stream, current = self._side_stream(), torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            loss = self.step(mb_inputs, mb_targets)
        current.wait_stream(stream)
        return loss

    def _capture(self, mb_inputs: list[list[Any]], mb_targets: list[Any]) -> bool:
        leaves, self._spec = self._flatten(mb_inputs, mb_targets)
        self._static = [x.detach().to(self.device, copy=True) for x in leaves]
        static_inputs, static_targets = self._unflatten(self._static)
        self._grads = []
        for p in self.params():
            if id(p) not in self._with_grad:  # no gradient reaches it: its .grad stays as it is (None)
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self._grads.append((p, p.grad))
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the warm-up steps' cached blocks go back: the graph's pool takes its own
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._side_stream()):
                self._loss = self.step(static_inputs, static_targets)
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to uncaptured steps, said once
            self.failed = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            warnings.warn(f"cuda_graph: capturing the training step failed ({self.failed[:300]}); every step runs "
                          "without the CUDA graph. Operations that wait for the GPU on the host (.item(), "
                          "printing a tensor, data-dependent shapes) cannot be captured.", RuntimeWarning,
                          stacklevel=4)
            self._static, self._grads, self._loss = [], [], None
            torch.cuda.synchronize(self.device)
            return False
        self.graph = graph
        return True

    def _attach_grads(self) -> None:
        """Point every parameter's .grad at the captured tensor: zeroed where the user set it to None,
        holding the values where the user replaced it."""
        zero = []
        for p, g in self._grads:
            if p.grad is None:
                zero.append(g)
                p.grad = g
            elif p.grad is not g:
                g.copy_(p.grad)
                p.grad = g
        if zero:
            torch._foreach_zero_(zero)

    @staticmethod
    def _flatten(mb_inputs: list[list[Any]], mb_targets: list[Any]) -> tuple[list[torch.Tensor], Any]:
        """The tensor leaves, and a key of everything else: the tree, the non-tensor leaves, the
        tensors' shapes and dtypes (a replay must see the same)."""
        leaves, tree = pytree.tree_flatten((mb_inputs, mb_targets))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        rest = tuple((True, tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else (False, x) for x in leaves)
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None  # baked in
        return tensors, (tree, rest, autocast)

    def _unflatten(self, tensors: list[torch.Tensor]) -> tuple[list[list[Any]], list[Any]]:
        """(mb_inputs, mb_targets) with `tensors` in the places of the tensor leaves."""
        tree, rest, _ = self._spec
        it = iter(tensors)
        return pytree.tree_unflatten([next(it) if key[0] else key[1] for key in rest], tree)
