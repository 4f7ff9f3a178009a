"""The user's loss function as train_step runs it: the model's own loss where none is given (`model_loss`),
a summing loss refused (the step averages microbatches), Hugging Face's num_items_in_batch turning the
average into a sum of shares (`microbatch_loss_weight`), and a loss's common mistakes named in one line
each (`checked_loss`)."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from partitioner.errors import RuntimeConfigError
from partitioner.passes.capture_io import Captured, input_leaf_names


def check_mean_loss(loss_fn: Callable) -> None:
    """A loss that sums over its batch (reduction="sum") would train with 1 / (microbatches x dp) of the
    unpartitioned model's gradient: train_step averages the microbatches' losses (and the replicas'),
    as gradient accumulation of a mean loss does. Refused, naming the fix, where it shows: a loss
    module's reduction, a functools.partial's reduction= (a function summing inside cannot be seen)."""
    if isinstance(loss_fn, functools.partial) and loss_fn.keywords.get("reduction") == "sum":
        name = getattr(loss_fn.func, "__name__", type(loss_fn.func).__name__)
    elif getattr(loss_fn, "reduction", None) == "sum":
        name = type(loss_fn).__name__
    else:
        return
    raise RuntimeConfigError(f"compile_parallel: loss_fn {name}(reduction='sum') sums over its batch, but train_step "
                             "averages the loss over microbatches (and data-parallel replicas), so the gradients "
                             "would be a fraction of the model's; pass reduction='mean' (and scale the learning rate "
                             "by the batch size if you trained with the sum).")


def model_loss(output: Any, target: Any = None) -> torch.Tensor:
    """compile_parallel's loss_fn=None: the loss the model computed itself (HF models given labels=):
    output.loss or output["loss"], or the output if it is a 0-dim tensor; the target is not read."""
    loss = output if isinstance(output, torch.Tensor) and output.dim() == 0 else getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if not isinstance(loss, torch.Tensor):
        keys = f" with keys {list(output.keys())}" if isinstance(output, dict) else ""
        raise RuntimeConfigError(f"compile_parallel(loss_fn=None) trains the loss the model computes itself "
                                 f"(output.loss), but its output, a {type(output).__name__}{keys}, has none: pass "
                                 "the labels it computes the loss from (a Hugging Face model: "
                                 "example_kwargs={'labels': labels}, and labels= to train_step), or pass "
                                 "loss_fn(output, target).")
    return loss


def microbatch_loss_weight(model: torch.nn.Module, captured: Captured, args: tuple, kwargs: dict,
                           dp: int) -> float | None:
    """The weight of each microbatch's loss in the step's loss: None (1/m, their mean) unless the model is
    given Hugging Face's `num_items_in_batch`, the count of the global batch's label tokens that its loss
    divides its summed token losses by (the Trainer's fix for gradient accumulation). Then each microbatch's
    loss is already its share of the whole batch's token mean, so the step sums them: weight 1, times dp
    since data-parallel replicas average their gradients. Refused where the model does not read it (its
    loss would be a per-microbatch mean, summed) or it is not a 0-dim tensor (a Python int is a constant of
    the captured graph: the next batch's count would be refused)."""
    if kwargs.get("num_items_in_batch") is None:
        return None
    value, name = kwargs["num_items_in_batch"], type(model).__name__
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise RuntimeConfigError(f"compile_parallel: num_items_in_batch is {_what_loss(value)}; pass the global "
                                 "batch's count of label tokens as a 0-dim tensor, num_items_in_batch=torch.tensor(n) "
                                 "(a Python number is baked into the captured graph as a constant), in every call.")
    leaf = input_leaf_names(model, args, kwargs).index("num_items_in_batch")
    placeholders = [n for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    node = next((ph for ph, i in zip(placeholders, captured.input_leaf_indices) if i == leaf), None)
    if node is None or not node.users:
        raise RuntimeConfigError(f"compile_parallel: {name} is given num_items_in_batch but does not read it, so its "
                                 "loss is each microbatch's own mean, not a share of the batch's: drop "
                                 "num_items_in_batch (train_step then averages the microbatches' losses).")
    return float(dp)


def checked_loss(loss_fn: Callable[[Any, Any], Any], user_fn: Callable | None = None
                  ) -> Callable[[Any, Any], torch.Tensor]:
    """loss_fn (the user's user_fn, perhaps compiled) with its two common mistakes turned into one
    clear line each: a target it needs but train_step was not given (loss_fn may ignore the target,
    so only a failure with None says so), and a loss that is not a scalar tensor."""
    user_fn = user_fn or loss_fn
    name = getattr(user_fn, "__name__", type(user_fn).__name__)

    def loss(output: Any, target: Any) -> torch.Tensor:
        try:
            value = loss_fn(output, target)
        except RuntimeConfigError:
            raise
        except Exception as e:
            if target is None:
                first_line = next(iter(str(e).splitlines()), "")
                raise RuntimeConfigError(f"loss_fn(output, target) failed with target=None ({type(e).__name__}: "
                                         f"{first_line}); {name} needs the target: pass target= to train_step."
                                         ) from e
            raise
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise RuntimeConfigError(f"loss_fn {name} returned {_what_loss(value)}; it must return a 0-dim tensor, "
                                     f"the mean loss of the batch ({_loss_fix(value)}).")
        return value
    return loss


def _what_loss(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"a {type(value).__name__} with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


def _loss_fix(value: Any) -> str:
    """How to make a loss_fn that returned `value` return the scalar train_step backpropagates."""
    if isinstance(value, dict):
        key = "loss" if "loss" in value else next(iter(value), "loss")
        return (f"return its {key!r} entry, loss_fn=lambda out, t: fn(out, t)[{key!r}]; the other entries (logged "
                "terms) can be computed from pm(...) outputs under torch.no_grad()")
    if isinstance(value, (tuple, list)):
        return ("return the one element to backpropagate, e.g. loss_fn=lambda out, t: fn(out, t)[0], or their sum "
                "if the total loss is their sum")
    return "e.g. end it with .mean()"
