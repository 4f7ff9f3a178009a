"""ParallelModel: the pipeline compile_parallel builds, as a module-like object.

Trains with train_step (every microbatch's forward and backward, gradients accumulated into
.grad), infers with forward, switches train / eval mode, clips gradients over every rank, and
saves, loads and exposes this rank's parameters and state dict under the model's own names.
"""
from __future__ import annotations

import os
import warnings
import weakref
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from partitioner.call_inputs import CallLayout
from partitioner.checkpoint import load as load_checkpoint
from partitioner.checkpoint import save as save_checkpoint
from partitioner.cost_models.profile import graph_float_dtype
from partitioner.dataclass_trees import register_dataclasses
from partitioner.errors import RuntimeConfigError
from partitioner.grad_clip import clip_grad_norm_
from partitioner.microbatch import BatchDims, batch_size, split_target
from partitioner.modes import ModeGraphs, ModeSource, build_mode
from partitioner.output_assembly import assemble, whole_batch_shapes
from partitioner.plan import Plan
from partitioner.rank_agreement import check_same_batch
from partitioner.passes.capture_io import Captured, input_leaf_names
from partitioner.passes.split import StageModule
from partitioner.runtime.compiled import compile_report, print_once
from partitioner.runtime.data_parallel import DataParallelStages, MeshLayout, full_tensor
from partitioner.runtime.executor import Executor
from partitioner.runtime.parameter_store import ParameterStore
from partitioner.runtime.rank_random import ranked_random_draws
from partitioner.runtime.step_graph import StepGraph


class ParallelModel:
    """A model split into pipeline stages; trains with train_step, infers with forward.

    Under torchrun the parameters, state_dict and gradients are this rank's;
    without it (one process) they are every stage's.

    A training loop: `loss = pm.train_step(x, target=y)`, `pm.clip_grad_norm_(1.0)`,
    `opt.step()`, `sched.step()`, `pm.zero_grad()`, with `opt = AdamW(pm.parameters())` this
    rank's optimizer. LR schedulers work on it as usual: every rank's optimizer steps with the
    same schedule, so they stay in step. `pm.save` / `pm.load` checkpoint model and optimizer.
    """

    def __init__(self, captured: Captured, plan: Plan, stages: list[StageModule], executor: Executor,
                 store: ParameterStore, devices: list[torch.device], rank: int | None, example_args: tuple,
                 example_kwargs: dict, microbatches: int, *, source: ModeSource | None = None,
                 layout: MeshLayout | None = None, data_parallel: DataParallelStages | None = None,
                 step_graph: StepGraph | None = None, batch_dims: BatchDims = BatchDims(),
                 compiled_from: torch.nn.Module | None = None):
        self.captured = captured
        self.plan = plan
        self.stages = stages
        self.executor = executor
        self.store = store
        self.devices = devices
        self.rank = rank
        self._steps_run = 0
        self.source = source  # what captures the other mode (train/eval)
        self.model = source.model if source is not None else None  # fake weights: the structure, FQNs and shapes
        self.training = source.model.training if source is not None else True
        self._modes: dict[bool, Any] = {}
        self._whole_shapes: dict[tuple[bool, int], Any] = {}  # (mode, microbatches) -> output leaves' shapes
        self.layout = layout  # where this process sits among the data-parallel replicas (None: one process)
        self.call = CallLayout(*pytree.tree_flatten((example_args, example_kwargs)), microbatches,
                               batch_dims, self.dp, layout.dp_rank if layout is not None else 0, self.model)
        self.data_parallel = data_parallel  # this rank's stages under FSDP2 when dp > 1 ...
        self._sharded_mode = self.training  # ... in the mode compiled (the other mode reads its gathered tensors)
        self.step_graph = step_graph  # replays this mode's training steps (compile_parallel(cuda_graph=True))
        self._graph_executor = executor
        # the model given to compile_parallel, weakly: its mode and its parameters' requires_grad, as last seen
        self._compiled_from = weakref.ref(compiled_from) if compiled_from is not None else None
        self._model_mode = compiled_from.training if compiled_from is not None else None
        self._model_flags = {fqn: (weakref.ref(p), p.requires_grad)
                             for fqn, p in (compiled_from.named_parameters() if compiled_from is not None else [])}

    @property
    def microbatches(self) -> int:
        """Microbatches per replica that train_step cuts the batch into."""
        return self.call.microbatches

    @property
    def batch_dims(self) -> BatchDims:
        """Where train_step and forward cut each input leaf and the target."""
        return self.call.batch_dims

    @property
    def dp(self) -> int:
        """How many data-parallel replicas of the pipeline train together (1: none)."""
        return self.layout.dp if self.layout is not None else 1

    @property
    def schedule(self):
        return self.executor.schedule

    @property
    def compile_options(self) -> dict[str, Any] | None:
        """The torch.compile options the stages run under (None: eager), e.g. {"dynamic": False,
        "mode": "reduce-overhead"} where compile_parallel chose CUDA graphs for host-bound stages."""
        return dict(self.source.compile_options) if self.source and self.source.compile_options else None

    # ------------------------------------------------------------------ running

    def train_step(self, *inputs: Any, target: Any = None, scaler: torch.amp.GradScaler | None = None,
                   **kwargs: Any) -> torch.Tensor:
        """Forward and backward of every microbatch of the batch (inputs as in the example inputs).

        Gradients accumulate into .grad (call zero_grad between steps). Returns the loss, the mean
        of loss_fn over the microbatches, as a 0-dim float32 tensor on every rank; it requires grad
        as a module's loss does, and its backward (a script's loss.backward(), GradScaler's
        scaler.scale(loss).backward()) says that train_step ran it already. scaler: a torch.amp.GradScaler
        (fp16 training) whose scale multiplies the loss in the backward, as scaler.scale(loss).backward()
        would; then scaler.step(optimizer) and scaler.update() as usual (one process only). With data
        parallelism every rank passes the global batch; each replica trains on its 1/dp share, the
        gradients are averaged over the replicas and the loss is the mean over the global batch.
        Refused under torch.no_grad() / inference_mode (it would compute no gradients).
        """
        self._check_process_group("train_step")
        if not torch.is_grad_enabled():
            raise RuntimeConfigError("train_step under torch.no_grad() or torch.inference_mode(): it would compute the "
                                     "loss but no gradients, so the optimizer would step nothing. Call train_step with "
                                     "gradients enabled; for a loss without gradients (validation) use "
                                     "loss_fn(pm(...), target) under torch.no_grad().")
        if self.data_parallel is not None and self.training != self._sharded_mode:
            raise RuntimeConfigError(f"train_step in {'train' if self.training else 'eval'} mode: with data "
                                     "parallelism only the mode compile_parallel compiled in reduces gradients "
                                     f"across replicas; call pm.{'eval' if self._sharded_mode is False else 'train'}"
                                     "() first, or compile in the mode you train in.")
        inputs, kwargs = self.call.as_example_call(inputs, kwargs)
        self.call.check_target_by_keyword(inputs, target)
        self._check_no_input_grad(inputs, kwargs)
        if self.rank is not None and not self._steps_run:
            device = [self.devices[self.rank]] * dist.get_world_size()  # this process's, under any global rank
            check_same_batch((inputs, kwargs, target), dist.get_rank(), device)
        self._warn_model_changed()
        mb_inputs = self.call.microbatch_inputs(self.captured, inputs, kwargs)
        batch = batch_size((tuple(inputs), dict(kwargs)), self.batch_dims.inputs)
        register_dataclasses(target)  # one never seen before (no example_target)
        targets = self.call.own_share(split_target(target, self.dp * self.microbatches, batch, self.batch_dims))
        if not self._steps_run:
            self._warn_outer_autocast()
        self.store.before_step()
        if self.data_parallel is not None:
            self.data_parallel.before_step()
        graph = self.step_graph if self.step_graph is not None and self.executor is self._graph_executor else None
        scale = self._loss_scale(scaler, graph is not None)
        with self._random_draws():
            loss = graph(mb_inputs, targets) if graph is not None else \
                self.executor.train_step(mb_inputs, targets, loss_scale=scale)
        if self.data_parallel is not None:
            self.data_parallel.after_step()
        self.store.after_step()
        if not self._steps_run:
            print_once(compile_report(self.executor.compiled_calls()), self.rank)
        self._steps_run += 1
        return _backward_done(self._share_loss(loss))

    def _warn_model_changed(self) -> None:
        """The model given to compile_parallel switched to train / eval mode, or a parameter of it frozen
        (or unfrozen), after compile_parallel, as a script does mid-training: the ParallelModel runs its
        own mode and trains its own copies, so the change would do nothing, silently. Said once per
        change where pm differs, naming what to call on pm instead."""
        model = self._compiled_from() if self._compiled_from is not None else None
        if model is not None and model.training != self._model_mode:
            self._model_mode = model.training
            if model.training != self.training:
                now, was = ("train", "eval") if model.training else ("eval", "train")
                warnings.warn(f"{type(model).__name__}.{now}() was called on the model given to compile_parallel, but "
                              f"the ParallelModel runs in {was} mode: it switches with pm.{now}().", RuntimeWarning,
                              stacklevel=3)
        flipped = []
        for fqn, (ref, flag) in self._model_flags.items():
            p = ref()
            if p is not None and p.requires_grad != flag:
                self._model_flags[fqn] = (ref, p.requires_grad)
                flipped.append((fqn, p.requires_grad))
        mine = dict(self.named_parameters()) if flipped else {}
        changed = [(fqn, flag) for fqn, flag in flipped if fqn in mine and mine[fqn].requires_grad != flag]
        if changed:
            fqn, flag = changed[0]
            warnings.warn(f"'{fqn}' of the model given to compile_parallel was set to requires_grad={flag} after "
                          f"compile_parallel ({len(changed)} parameter(s)), but the ParallelModel trains its own "
                          f"copies, so it still {'trains' if not flag else 'freezes'} it. Set it on pm's copies: "
                          f"for name, p in pm.named_parameters(): p.requires_grad_({flag}) for the names to change "
                          f"(pm.requires_grad_({flag}) for all).", RuntimeWarning, stacklevel=3)

    def _warn_outer_autocast(self) -> None:
        """A torch.autocast around train_step runs the stages in its dtype (autocast applies to the
        aten ops of the stage graphs), but the plan was costed without it: say how to plan for it."""
        device_type = self.devices[0].type
        if not torch.is_autocast_enabled(device_type) or (self.source and self.source.mixed_precision):
            return
        dtype = torch.get_autocast_dtype(device_type)
        own = graph_float_dtype(self.captured.graph_module)
        if dtype != own:
            warnings.warn(f"train_step runs under torch.autocast('{device_type}', {dtype}), but the plan was costed "
                          f"in the model's {own} (stage times and activation memory). To plan for the autocast, "
                          f"drop it and pass mixed_precision='bf16' to compile_parallel: the same recipe (float32 "
                          f"parameters, bf16 compute), planned as it runs.", RuntimeWarning, stacklevel=3)

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Inference on a batch shaped like the example inputs, or of any multiple of their microbatch (run as
        that many microbatches): the model's output structure. Tensor
        leaves are assembled over the microbatches (partitioner/output_assembly.py): per-sample ones
        concatenated along their batch dim (dim 0, or 1 of a (seq, batch, ...) output), 0-dim ones
        stacked, other batch-independent ones returned once; a leaf that mixes samples across the
        batch (e.g. (batch, batch)) raises RuntimeConfigError.
        Under torchrun only the rank of the last stage gets the output; the other ranks return None.
        With data parallelism each replica's last rank gets the output of its 1/dp share of the batch."""
        self._check_process_group("forward")
        inputs, kwargs = self.call.as_example_call(inputs, kwargs)
        self._warn_model_changed()
        mb_inputs = self.call.microbatch_inputs(self.captured, inputs, kwargs, any_batch=True,
                                                graphs=self.executor.cudagraph_steps is not None)
        self.store.refresh_replicas()
        if self.data_parallel is not None and self.training != self._sharded_mode:
            self.data_parallel.unshard()  # this mode's stages read the gathered parameters
        with self._random_draws():
            flat = self.executor.forward(mb_inputs)
        if self.data_parallel is not None:
            self.data_parallel.reshard()
        if flat is None:
            return None
        key = (self.training, len(flat))  # once per mode (it may change shapes) and batch size
        if len(flat) > 1 and key not in self._whole_shapes:
            self._whole_shapes[key] = whole_batch_shapes(self.model, self.training, inputs, kwargs, flat[0], self.dp,
                                                         self.batch_dims.inputs)
        out = assemble(flat, self._whole_shapes.get(key), self.captured.out_spec)
        return _inference_only(out) if torch.is_grad_enabled() else out

    __call__ = forward

    def _random_draws(self):
        """Under torchrun, the stages' random draws (dropout) from a stream of this rank's (runtime/rank_random.py):
        ranks seeded alike drew the same masks. Stages replayed as CUDA graphs (compile mode "reduce-overhead")
        keep the default generator, whose state their graphs hold."""
        if self.rank is None or self.executor.cudagraph_steps is not None:
            return ranked_random_draws(None, self.devices[0])
        return ranked_random_draws(dist.get_rank(), self.devices[self.rank])

    def _check_no_input_grad(self, inputs: tuple, kwargs: dict) -> None:
        """An input that requires grad (computed by a module outside the model) would need its gradient
        back out of the stages; they send gradients only between stages, so say so instead of training
        the outside module wrongly (or failing in autograd: every microbatch's backward reaches its graph)."""
        leaves = pytree.tree_leaves((tuple(inputs), dict(kwargs)))
        grad = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
        if not grad or not torch.is_grad_enabled():
            return
        names = input_leaf_names(self.model, tuple(inputs), dict(kwargs)) if self.model is not None else []
        name = names[grad[0]] if grad[0] < len(names) else f"input {grad[0]}"
        raise RuntimeConfigError(f"train_step: input '{name}' requires grad (it was computed by something outside "
                                 "the model), but gradients do not flow back out of the pipeline's stages. Move what "
                                 "computes it into the model (one nn.Module around both), or pass it detached "
                                 f"({name}.detach()) if it needs no gradient.")

    def _loss_scale(self, scaler: torch.amp.GradScaler | None, graph: bool) -> torch.Tensor | None:
        """The scale of `scaler` (None: none, or disabled), refused where it cannot act as on one model:
        under torchrun each rank's scaler would find inf gradients in its own stages only, and skip or
        take the step apart from the others; a captured step replays without it."""
        if scaler is None or not scaler.is_enabled():
            return None
        if self.rank is not None or graph:
            where = "under torchrun (each rank's scaler would skip steps on its own stages' gradients alone)" \
                if self.rank is not None else "with cuda_graph=True (the captured step replays unscaled)"
            raise RuntimeConfigError(f"train_step(scaler=...) {where} is not supported; use "
                                     "mixed_precision='bf16' in compile_parallel (fp32 weights, bf16 compute, no "
                                     "loss scale needed).")
        last = self.executor.stage_device[len(self.stages) - 1]
        return scaler.scale(torch.ones((), device=last))

    def _check_process_group(self, what: str) -> None:
        if self.rank is not None and not dist.is_initialized():
            raise RuntimeConfigError(f"{what} on rank {self.rank}: the process group is gone "
                                     "(dist.destroy_process_group() was called); destroy it after the last step, "
                                     "or call compile_parallel again in a new process group.")

    def _share_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The mean loss over the global batch on every rank: each replica's last rank holds its
        share's mean, the others add zero."""
        if self.rank is None:
            return loss.detach().float()
        device = self.devices[self.rank] if dist.get_backend() == "nccl" else torch.device("cpu")
        t = loss.detach().float().to(device) if loss is not None else torch.zeros((), device=device)
        self.store.peer_waits.all_reduce(t, "the all-reduce of the step's loss")
        return t / self.dp if self.dp > 1 else t

    # ------------------------------------------------------------------ modes and clipping

    def train(self, mode: bool = True) -> "ParallelModel":
        """Run every stage in training mode (dropout on) or, with mode=False, in eval mode.

        The captured graph has the mode baked in, so the first switch to the mode the model was not
        compiled in captures the model again in that mode (once; see partitioner/modes.py); both
        modes' stages share the same parameter tensors. Under torchrun every rank must switch
        together (the first switch creates process groups)."""
        mode = bool(mode)
        if mode != self.training:
            self._modes.setdefault(self.training, ModeGraphs(self.captured, self.stages, self.executor))
            if mode not in self._modes:
                self._modes[mode] = build_mode(self, mode)
            graphs = self._modes[mode]
            self.captured, self.stages, self.executor = graphs.captured, graphs.stages, graphs.executor
            self.training = mode
        return self

    def eval(self) -> "ParallelModel":
        """pm.train(False): deterministic inference (dropout off)."""
        return self.train(False)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> torch.Tensor:
        """Clip the gradients of the whole model (every rank) as torch.nn.utils.clip_grad_norm_ on the
        unsplit model; returns the total norm on every rank. Under torchrun every rank must call it."""
        return clip_grad_norm_(self, max_norm, norm_type, error_if_nonfinite, foreach)

    # ------------------------------------------------------------------ devices and dtypes

    def to(self, *args: Any, **kwargs: Any) -> "ParallelModel":
        """As Module.to where it changes nothing (a script's model.to(device) with the stages already
        there, in that dtype): returns self. The stages were placed by compile_parallel and planned for
        their dtype, so moving or casting them is refused, naming the fix."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        call = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
        mine = [self.devices[r] for r in (range(len(self.devices)) if self.rank is None else [self.rank])]
        if device is not None and any(d.type != device.type or (device.index is not None and d.index != device.index)
                                      for d in mine):
            raise RuntimeConfigError(f"pm.to({call}): the stages are on {sorted({str(d) for d in mine})}, placed by "
                                     "compile_parallel(devices=...); a ParallelModel does not move. Pass the devices "
                                     f"to compile_parallel, e.g. devices=['{device.type}:0', '{device.type}:1'] "
                                     "(one per pipeline rank), and move only the batch: x.to(device).")
        floats = {t.dtype for _, t in [*self.named_parameters(), *self.named_buffers()] if t.is_floating_point()}
        if dtype is not None and floats and floats != {dtype}:
            raise RuntimeConfigError(f"pm.to({call}): the stages' weights are {sorted(map(str, floats))}, and the plan "
                                     "was costed in that dtype; a ParallelModel does not cast. Cast the model before "
                                     "compile_parallel (model.to(dtype)), or keep fp32 weights and compute in bf16 "
                                     "with compile_parallel(mixed_precision='bf16').")
        return self

    def cuda(self, device: int | str | torch.device | None = None) -> "ParallelModel":
        """pm.to('cuda'): self where the stages are on CUDA already, else refused (see to)."""
        return self.to("cuda" if device is None else f"cuda:{device}" if isinstance(device, int) else device)

    def cpu(self) -> "ParallelModel":
        """pm.to('cpu'): self where the stages are on the CPU already, else refused (see to)."""
        return self.to("cpu")

    def float(self) -> "ParallelModel":
        return self.to(torch.float32)

    def half(self) -> "ParallelModel":
        return self.to(torch.float16)

    def bfloat16(self) -> "ParallelModel":
        return self.to(torch.bfloat16)

    def double(self) -> "ParallelModel":
        return self.to(torch.float64)

    def __getattr__(self, name: str) -> Any:
        """An nn.Module attribute a ParallelModel lacks is named with what it offers instead of Python's
        bare 'no attribute'."""
        model = self.__dict__.get("model")  # the compiled model's skeleton (fake weights)
        if not name.startswith("_") and not hasattr(torch.nn.Module, name) and model is not None and (
                hasattr(type(model), name) or name in vars(model)):
            kind = type(model).__name__  # HF's save_pretrained, generate, config: the model's, not the stages'
            raise AttributeError(f"ParallelModel has no '{name}': it is {kind}'s, and a ParallelModel is the model's "
                                 f"stages, not the model. Use it on the {kind} you compiled, after loading pm's "
                                 "trained weights into it: model.load_state_dict(pm.full_state_dict()) (under "
                                 f"torchrun on global rank 0, where it is gathered), then model.{name}.")
        if name.startswith("_") or not hasattr(torch.nn.Module, name):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        raise AttributeError(f"ParallelModel has no nn.Module.{name}: it is not one module but the model's stages "
                             "on their devices. It offers train_step, __call__ (inference), parameters / "
                             "named_parameters / buffers / named_buffers / requires_grad_, zero_grad, train / eval, "
                             "clip_grad_norm_, state_dict / load_state_dict / full_state_dict, save / load and to "
                             "(where it moves nothing); for the model's modules, use the model you compiled (its "
                             "weights are not the trained ones: load pm.full_state_dict() into it).")

    # ------------------------------------------------------------------ parameters and state

    def named_parameters(self, prefix: str = "", recurse: bool = True
                         ) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters (every stage's in one process) under the original FQNs, each once;
        prefix and recurse as Module.named_parameters (recurse=False: the top module's own only)."""
        return _named(self.store.named_parameters(), prefix, recurse)

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        """This rank's trainable parameters (each tied weight once). Empty on a rank whose stages hold
        no parameters (e.g. only pooling): build its optimizer only if there is something to step."""
        return (p for _, p in self.named_parameters(recurse=recurse))

    def named_buffers(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """This rank's buffers under the original FQNs (prefix and recurse as Module.named_buffers)."""
        return _named(self.store.named_buffers(), prefix, recurse)

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        """This rank's buffers."""
        return (t for _, t in self.named_buffers(recurse=recurse))

    def requires_grad_(self, requires_grad: bool = True) -> "ParallelModel":
        """Freeze (False) or unfreeze every parameter of this rank, as Module.requires_grad_; one
        parameter or layer: p.requires_grad_(False) for those of pm.named_parameters() it names."""
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of this rank's parameters (tied replicas included), as Module.zero_grad."""
        self.store.zero_grad(set_to_none)

    def state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """This rank's parameters and buffers under every FQN the original model's state_dict uses;
        detached (sharing memory) as Module.state_dict's, the Parameters themselves with keep_vars."""
        state = self.store.state_dict()
        return state if keep_vars else {k: v.detach() for k, v in state.items()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank's state gathered on global rank 0 (CPU tensors); loads into the original model.
        Other ranks get {}. In one process it is the whole state_dict on CPU."""
        own = {k: full_tensor(v.detach()).cpu() for k, v in self.state_dict().items()}  # DTensors gathered over dp
        if self.rank is None:
            return own
        if self.dp > 1 and self.layout.dp_rank != 0:
            own = {}  # replica 0 sends it
        first = dist.get_rank() == 0
        gathered = [None] * dist.get_world_size() if first else None
        dist.gather_object(own, gathered, dst=0)
        if not first:
            return {}
        full: dict[str, torch.Tensor] = {}
        for part in gathered:
            full.update(part)
        return full

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any:
        """Load this rank's entries of a (full or this rank's) state dict; strict: all of them must be there.
        Returns (missing_keys, unexpected_keys) as Module.load_state_dict (this rank's missing ones)."""
        return self.store.load_state_dict(state_dict, strict)

    def save(self, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
             extra: dict | None = None) -> None:
        """Write a DCP checkpoint of the weights, the optimizer's state and `extra`, keyed by the model's
        FQNs: it loads under any plan and into the unpartitioned model (partitioner/checkpoint.py).
        Under torchrun every rank calls it."""
        save_checkpoint(self, path, optimizer, extra)

    def load(self, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Load a checkpoint written by save (under any plan), by checkpoint.save_model, or a Hugging Face
        safetensors directory; returns the saved `extra`. On error nothing changes (partitioner/checkpoint.py)."""
        return load_checkpoint(self, path, optimizer)


def _named(items: Any, prefix: str, recurse: bool) -> Iterator[tuple[str, Any]]:
    return ((f"{prefix}.{name}" if prefix else name, t) for name, t in items if recurse or "." not in name)


class _NoBackward(torch.autograd.Function):
    """The outputs of pm(...) as they are, requiring grad as a module's outputs do where gradients are
    enabled, with a backward that says how to train: the pipeline's forward keeps no autograd graph
    (train_step runs forward and backward of every microbatch), so loss_fn(pm(x), y).backward() would
    otherwise fail with autograd's 'element 0 of tensors does not require grad'."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, *outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(o.detach() for o in outputs)  # the same memory, no copy

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> None:
        raise RuntimeConfigError("backward through the output of pm(...): ParallelModel.forward is inference and "
                                 "keeps no autograd graph. Train with loss = pm.train_step(*inputs, target=target) "
                                 "(forward and backward of every microbatch, gradients in .grad), then "
                                 "optimizer.step(); run pm(...) under torch.no_grad().")


class _BackwardDone(torch.autograd.Function):
    """train_step's loss as it is, requiring grad as a module's loss does, with a backward that says
    train_step ran it: a script's habitual loss.backward() (or GradScaler's scaler.scale(loss).backward())
    would otherwise fail with autograd's 'element 0 of tensors does not require grad'."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return loss.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> None:
        raise RuntimeConfigError("backward through the loss train_step returned: train_step already ran the forward "
                                 "and backward of every microbatch, and the gradients are in .grad; drop "
                                 "loss.backward() and call optimizer.step(). With a torch.amp.GradScaler, instead of "
                                 "scaler.scale(loss).backward() pass it to train_step: loss = pm.train_step(*inputs, "
                                 "target=y, scaler=scaler), then scaler.step(optimizer) and scaler.update().")


def _backward_done(loss: torch.Tensor) -> torch.Tensor:
    """`loss` passed through _BackwardDone where gradients are enabled."""
    if not torch.is_grad_enabled():
        return loss
    return _BackwardDone.apply(torch.zeros((), requires_grad=True), loss)


def _inference_only(out: Any) -> Any:
    """`out` with its floating-point tensors passed through _NoBackward."""
    leaves, spec = pytree.tree_flatten(out)
    floats = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not floats:
        return out
    anchor = torch.zeros((), requires_grad=True)
    for i, o in zip(floats, _NoBackward.apply(anchor, *(leaves[i] for i in floats))):
        leaves[i] = o
    return pytree.tree_unflatten(leaves, spec)

