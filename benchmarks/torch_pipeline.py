"""The user's alternative: torch.distributed.pipelining with a hand-written uniform split.

What a user writes today for a Hugging Face decoder LM (torchtitan's way): the
repeated layers cut into equal runs, the embedding on the first stage, the final
norm and head on the last, each stage a small nn.Module driven by torch's
PipelineStage and Schedule1F1B / ScheduleInterleaved1F1B. `compile_blocks`
puts every layer under torch.compile, as torchtitan does.

Supported families: GPT-2 (GPT2LMHeadModel) and Llama (LlamaForCausalLM).
Stages deep-copy their modules, so a tied embedding and head are untied (each
stage trains its own copy), as in torchtitan.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn


def _layers_and_parts(model: nn.Module) -> tuple[str, nn.ModuleList]:
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        return "gpt2", model.transformer.h
    if hasattr(model, "model") and hasattr(model.model, "layers"):
        return "llama", model.model.layers
    raise ValueError(f"no hand-written uniform split for {type(model).__name__}: GPT-2 and Llama only")


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class DecoderStage(nn.Module):
    """Layers [lo, hi) of a decoder LM, with the embedding on stage 0 and the norm + head on the last."""

    def __init__(self, model: nn.Module, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        family, layers = _layers_and_parts(model)
        self.family, self.first, self.last = family, first, last
        self.layers = nn.ModuleList(copy.deepcopy(layers[i]) for i in range(lo, hi))
        if family == "gpt2":
            t = model.transformer
            self.embed = nn.ModuleDict({"wte": copy.deepcopy(t.wte), "wpe": copy.deepcopy(t.wpe)}) if first else None
            self.norm = copy.deepcopy(t.ln_f) if last else None
            self.rotary = None
        else:
            m = model.model
            self.embed = copy.deepcopy(m.embed_tokens) if first else None
            self.norm = copy.deepcopy(m.norm) if last else None
            self.rotary = copy.deepcopy(m.rotary_emb)
        self.head = copy.deepcopy(model.lm_head) if last else None
        if self.head is not None and self.embed is not None:  # one stage holds both: keep them distinct
            self.head.weight = nn.Parameter(self.head.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.shape[1]
        pos = torch.arange(seq, device=x.device).unsqueeze(0)
        if self.first:
            x = self.embed["wte"](x) + self.embed["wpe"](pos) if self.family == "gpt2" else self.embed(x)
        if self.family == "gpt2":
            for layer in self.layers:
                x = _first(layer(x))
        else:
            rope = self.rotary(x, pos)
            for layer in self.layers:
                x = _first(layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope))
        if self.last:
            x = self.head(self.norm(x))
        return x


def uniform_stages(model: nn.Module, num_stages: int) -> list[DecoderStage]:
    """The model cut into num_stages runs of equal layer counts (extra layers to the later stages)."""
    _, layers = _layers_and_parts(model)
    n = len(layers)
    if n < num_stages:
        raise ValueError(f"{n} layers cannot fill {num_stages} stages")
    bounds = [n * k // num_stages for k in range(num_stages + 1)]
    return [DecoderStage(model, bounds[k], bounds[k + 1], k == 0, k == num_stages - 1) for k in range(num_stages)]


def compile_blocks(stage: nn.Module) -> None:
    """Each layer under torch.compile (torchtitan's per-block compile)."""
    for layer in stage.layers:
        layer.compile(dynamic=False)


class TorchPipeline:
    """This rank's stages of a uniform split, under torch's 1F1B or interleaved 1F1B schedule.

    stage_ids: the virtual stages this process holds (rank r holds r, r + p, ... as torch's
    interleaved schedule expects; in one process at world size 1, all of them).
    """

    def __init__(self, model: nn.Module, num_stages: int, stage_ids: list[int], device: torch.device,
                 microbatches: int, loss_fn: Callable, compiled: bool, group=None):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

        modules = uniform_stages(model, num_stages)
        self.modules = [modules[k].to(device) for k in stage_ids]
        for m in self.modules:
            m.train()
            if compiled:
                compile_blocks(m)
        self.stages = [PipelineStage(m, k, num_stages, device, group=group) for m, k in zip(self.modules, stage_ids)]
        if len(self.stages) == 1:
            self.schedule = Schedule1F1B(self.stages[0], microbatches, loss_fn=loss_fn)
        else:
            self.schedule = ScheduleInterleaved1F1B(self.stages, microbatches, loss_fn=loss_fn)
        self.first = 0 in stage_ids
        self.last = num_stages - 1 in stage_ids

    def parameters(self):
        return [p for m in self.modules for p in m.parameters()]

    def train_step(self, tokens: torch.Tensor, target: torch.Tensor) -> None:
        args = (tokens,) if self.first else ()
        kwargs = {"target": target, "losses": []} if self.last else {}
        self.schedule.step(*args, **kwargs)

    def zero_grad(self) -> None:
        for m in self.modules:
            m.zero_grad(set_to_none=True)
