"""The loss's cost: loss_fn(model output, target) runs on the last stage, outside the model's graph.

A language model's loss is not small: a cross-entropy over a 50k vocabulary saves
log-probabilities as large as the logits (in fp32) and its backward writes gradients
of that size too, all on the last stage. `profile_loss` captures loss_fn on meta
tensors shaped like the model's outputs and the target, and profiles it like a model
whose inputs carry gradients; passes.coarsen.attach_loss adds the result to the
block that produces the model's output. A loss that cannot be traced (CTC's data-dependent output
shape, a branch on the target's values) is planned without its costs, said in a warning: it runs
as given at each step, outside any graph.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import torch

from partitioner.cost_models.node_costs import NodeCosts
from partitioner.cost_models.profile import profile
from partitioner.cost_models.time import NO_TIME
from partitioner.errors import CaptureError
from partitioner.passes.capture import capture
from partitioner.passes.capture_io import Captured, meta_like


class _Loss(torch.nn.Module):
    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor]):
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, output: Any, target: Any) -> torch.Tensor:
        return self.loss_fn(output, target)


def profile_loss(loss_fn: Callable[[Any, Any], torch.Tensor], captured: Captured, target: Any, *,
                 autocast_fp32: bool = False, **profile_kwargs) -> NodeCosts | None:
    """Costs of loss_fn(output, target) for one microbatch; output shaped as `captured`'s outputs.

    target: one microbatch of the target (any device; only shapes and dtypes are used).
    autocast_fp32: the loss runs under autocast (mixed precision), which computes a log-softmax,
    cross-entropy, MSE and the other losses on its fp32 list in fp32 from bf16 outputs; meta tensors
    do not autocast, so the outputs are given to loss_fn in fp32 (a matmul inside a loss, which
    autocast would run in bf16, is then counted in fp32).
    profile_kwargs: as cost_models.profile.profile (device, dtype, optimizer).
    None, said in a warning, where loss_fn cannot be captured.
    """
    outputs = captured.meta_outputs()
    if autocast_fp32:
        outputs = [o.float() if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in outputs]
    output = captured.unflatten_outputs(outputs)
    try:
        loss_graph = capture(_Loss(loss_fn), (output, meta_like(target)))
    except CaptureError as err:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        why = str(err).removeprefix("cannot capture _Loss: ").replace(" in module '<root>' (_Loss)", "")
        warnings.warn(f"loss_fn {name} cannot be traced to count its time and memory in the plan ({why}); the plan "
                      "leaves them out of the last stage, and the loss runs as given at each step.", RuntimeWarning,
                      stacklevel=2)
        return None
    costs = profile(loss_graph, inputs_require_grad=True, progress=False, **profile_kwargs)
    return dataclasses.replace(costs, stage_pass=NO_TIME)  # it runs inside the last stage's passes
