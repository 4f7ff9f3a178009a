"""Pipelined steps under torch.compile's CUDA graphs (compile={"mode": "reduce-overhead"}).

Cudagraph trees record each compiled call (a stage's forward, its backward) once and then
replay it: one launch instead of every kernel, and none of the compiled call's per-kernel host
work. Each process records its own calls, so this works under torchrun too (the P2P transfers
run between the graphs). The trees replay a graph only where the same tensors are alive at the
same points of every step as when it was recorded; what keeps a pipelined step so:

- One step is one tree generation: torch.compiler.cudagraph_mark_step_begin() starts it.
  Otherwise the trees start a new generation whenever a forward runs with no backward pending,
  which in a pipeline happens in the middle of a step.
- A forward's outputs let go of their autograd graph once its backward has run. The trees
  hand back the same output tensors on every replay, and an output keeps its grad_fn (and
  through it the next stage's received inputs and their gradients) until its graph replays
  again: to the trees those tensors would still be alive in the middle of the next step,
  where recording saw them dead, and they would record the rest of the step anew.
- Gradients accumulate into buffers allocated outside the graphs. A parameter's first
  gradient of a step would otherwise be the backward graph's output itself (AccumulateGrad
  keeps it as .grad), which a later replay overwrites. Before a step, every parameter that had
  a gradient in an earlier step and has none now gets a zeroed .grad (views into one buffer:
  one fill, not a launch per parameter); after a step, a gradient that came out of a graph (a
  parameter's first) is copied out once.
- Under torchrun the transport keeps every sent tensor until the step ends
  (DistTransport(hold_sends=True)): when a transfer completes depends on timing.

A step's outputs (inference results) live in the graphs' memory until the next step: forward
returns copies.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.utils import _pytree as pytree

from partitioner.runtime.gradients import zero_gradients


class CudagraphSteps:
    """Brackets each step of an executor whose stages run under cudagraph trees.

    params(): the trainable parameters the local stages hold (their .grad is what the steps
    accumulate into).
    """

    def __init__(self, params: Callable[[], Iterable[torch.Tensor]]):
        self.params = params
        self._had_grad: set[int] = set()  # ids of parameters given a gradient by an earlier step
        self._outputs: dict[Any, list[torch.Tensor]] = {}  # a forward action's outputs, until its backward

    def before_step(self) -> None:
        self._outputs.clear()  # left by a step that raised
        torch.compiler.cudagraph_mark_step_begin()
        zero_gradients([p for p in self.params() if p.grad is None and id(p) in self._had_grad])

    def before_inference(self) -> None:
        """An inference step is a tree generation of its own, as a training step is."""
        torch.compiler.cudagraph_mark_step_begin()

    @staticmethod
    def hand_out(outputs: Any) -> Any:
        """Copies of an inference step's outputs: the graphs' memory is overwritten by the next step."""
        return pytree.tree_map_only(torch.Tensor, torch.clone, outputs)

    def keep(self, action: Any, outputs: Iterable[Any]) -> None:
        """The outputs of a training forward `action`, to release after its backward."""
        self._outputs[action] = [t for t in outputs if isinstance(t, torch.Tensor)]

    def release(self, action: Any) -> None:
        """After the backward of forward `action`: its outputs drop their autograd graph."""
        for t in self._outputs.pop(action, []):
            if t.grad_fn is not None and not t._is_view():  # views are made anew each call
                t.detach_()

    def after_step(self) -> None:
        self._outputs.clear()
        with torch.no_grad():
            for p in self.params():
                if p.grad is not None and id(p) not in self._had_grad:
                    p.grad = p.grad.clone()  # it may be a graph's output: the next replay overwrites those
                    self._had_grad.add(id(p))
