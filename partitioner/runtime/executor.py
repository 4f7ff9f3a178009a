"""Run a schedule's actions on stage modules through a Transport.

F(k, mb): gather inputs (received activations, the local slice of the user
inputs), run the stage, keep its outputs' autograd graph, send the outputs to
every consumer stage. The last stage rebuilds the model's output and applies
loss_fn(output, target); the step's loss is the mean over microbatches (1/m enters
each backward as the loss's gradient).
B(k, mb): the gradients of the stage's outputs (summed over consumers) flow back to its
parameters and received inputs; the inputs' gradients go back to their producers.
Parameter gradients accumulate across microbatches in `.grad`: for compiled stages one
foreach add per backward (runtime/gradients.py), else (eager stages, hooks, data
parallelism) autograd's per-parameter accumulation.

Under torchrun each process runs its rank's action list; in one process the
executor interleaves every rank's list in a dependency-respecting order.
The parameters it trains are the stages' own, kept by runtime/parameter_store.py.
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch.profiler import record_function
from torch.utils import _pytree as pytree

from partitioner.passes.split import USER_INPUT, StageModule
from partitioner.errors import RuntimeConfigError
from partitioner.runtime.comm_plan import CommPlan, build_comm_plan, forward_only
from partitioner.runtime.cudagraph_trees import CudagraphSteps
from partitioner.runtime.gradients import accumulate, plain_leaves
from partitioner.runtime.schedules import Action, Schedule, dependencies
from partitioner.runtime.transport import Transport


def in_process_order(schedule: Schedule) -> list[Action]:
    """All ranks' actions as one list: round-robin over ranks, each rank taking its next
    action once the actions it depends on have run (a valid schedule never stalls)."""
    pos = [0] * schedule.num_ranks
    done: set[Action] = set()
    order: list[Action] = []
    total = sum(len(row) for row in schedule.actions)
    while len(order) < total:
        progressed = False
        for r, row in enumerate(schedule.actions):
            while pos[r] < len(row) and all(d in done for d in dependencies(schedule, row[pos[r]])):
                order.append(row[pos[r]])
                done.add(row[pos[r]])
                pos[r] += 1
                progressed = True
        if not progressed:
            stuck = ", ".join(str(row[pos[r]]) for r, row in enumerate(schedule.actions) if pos[r] < len(row))
            raise RuntimeConfigError(f"schedule {schedule.name!r} deadlocks: every rank waits ({stuck}).")
    return order


def process_order(schedule: Schedule, rank: int | None) -> list[Action]:
    """This process's actions of `schedule`: pipeline rank `rank`'s list under torchrun, every rank's
    (in_process_order) where one process runs them all (rank None)."""
    return in_process_order(schedule) if rank is None else list(schedule.actions[rank])


class Executor:
    """Runs the stages `local` (stage ids held by this process) of a split model.

    stages: every stage (for the communication plan); only `local` ones are run.
    stage_device: device of every local stage.
    rank: this process's pipeline rank, None where it runs every rank (its actions: process_order).
    runners: stage -> the callable that runs it (default: its graph module); loss_fn may be compiled too.
    stage_loss(*last stage's inputs, target) -> loss: the last stage and loss_fn as one call, for
    training (compiled.stage_with_loss); None: runners[last], then loss_fn.
    cudagraph_steps: brackets every step where the runners run under CUDA graphs
    (runtime/cudagraph_trees.py); None otherwise.
    stage_backward_done(stage): called after a training step's last backward of each local stage (its
    gradients are final: data parallelism reduces them there, overlapping the rank's other stages).
    foreach_grads: add each backward's parameter gradients with one foreach add, not autograd's
    per-parameter AccumulateGrad: where the stages' backward hands out every gradient at once
    anyway (StageCallables.gradients_at_once) and no data parallelism's hooks need AccumulateGrad;
    a step whose parameters carry hooks uses it too.
    """

    def __init__(self, stages: list[StageModule], local: list[int], schedule: Schedule, transport: Transport,
                 loss_fn: Callable[[Any, Any], torch.Tensor], unflatten: Callable[[list[Any]], Any],
                 stage_device: dict[int, torch.device], rank: int | None,
                 runners: dict[int, Callable] | None = None,
                 stage_backward_done: Callable[[int], None] | None = None,
                 stage_loss: Callable[..., torch.Tensor] | None = None,
                 cudagraph_steps: CudagraphSteps | None = None, foreach_grads: bool = False,
                 loss_weight: float | None = None):
        self.stages = stages
        # what runs a stage: its graph module, or that compiled (partitioner/runtime/compiled.py)
        self.runners = runners or {st.stage: st.graph_module for st in stages}
        self.local = set(local)
        self.schedule = schedule
        self.transport = transport
        self.loss_fn = loss_fn
        self.stage_loss = stage_loss
        self.cudagraph_steps = cudagraph_steps
        self.unflatten = unflatten
        self.stage_device = stage_device
        self.rank = rank
        self.order = order = process_order(schedule, rank)
        inference = forward_only(schedule)
        self.inference_order = process_order(inference, rank)
        self.train_comm = build_comm_plan(stages, schedule)
        self.inference_comm = build_comm_plan(stages, inference)
        self.last = len(stages) - 1
        self.stage_backward_done = stage_backward_done
        last_b = {a.stage: i for i, a in enumerate(order) if a.kind == "B"}
        self._closes_stage = {order[i] for i in last_b.values()}  # the B after which a stage's gradients are final
        self.foreach_grads = foreach_grads
        self._mean_grads: dict[tuple, torch.Tensor] = {}
        self._inference_plans: dict[int, tuple[list[Action], CommPlan]] = {}  # by microbatch count
        # each microbatch's loss in the step's: None, 1/m (the mean); a number where the model normalised each
        # microbatch's loss by the whole batch already (HF's num_items_in_batch; loss_fn.microbatch_loss_weight)
        self.loss_weight = loss_weight

    # ------------------------------------------------------------------ public

    def compiled_calls(self) -> dict[Any, Callable]:
        """Every callable the executor runs for its stages: the runners, and the last stage with the loss."""
        return {**self.runners, **({"loss": self.stage_loss} if self.stage_loss is not None else {})}

    def train_step(self, mb_inputs: list[list[Any]], mb_targets: list[Any],
                   loss_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """Forward and backward of every microbatch; returns the summed (already 1/m-scaled) loss
        if the last stage is local, else None. Parameter gradients accumulate in .grad, of the loss
        times loss_scale where given (a GradScaler's scale; the loss returned is unscaled)."""
        state = _StepState(mb_inputs, mb_targets, train=True, loss_weight=self.loss_weight)
        state.loss_scale = loss_scale
        if self.foreach_grads:
            state.params = self._plain_parameters()
        if self.cudagraph_steps is not None:
            self.cudagraph_steps.before_step()
        self._run(self.order, self.train_comm, state)
        if self.cudagraph_steps is not None:
            self.cudagraph_steps.after_step()
        return state.loss

    @torch.no_grad()
    def forward(self, mb_inputs: list[list[Any]]) -> list[list[Any]] | None:
        """Forward only; the flat output leaves of every microbatch if the last stage is local, else None.
        Any number of microbatches (inference of a batch other than the training one's size)."""
        state = _StepState(mb_inputs, [None] * len(mb_inputs), train=False)
        if self.cudagraph_steps is not None:
            self.cudagraph_steps.before_inference()
        order, comm = self._inference_plan(len(mb_inputs))
        self._run(order, comm, state)
        if self.last not in self.local:
            return None
        outputs = [state.outputs[mb] for mb in range(len(mb_inputs))]
        return self.cudagraph_steps.hand_out(outputs) if self.cudagraph_steps is not None else outputs

    def _inference_plan(self, microbatches: int) -> tuple[list[Action], CommPlan]:
        """This process's forward-only actions and their communication for `microbatches` microbatches:
        the schedule's own, or the same forward-only order over that many (made once per count)."""
        if microbatches == self.schedule.microbatches:
            return self.inference_order, self.inference_comm
        if microbatches not in self._inference_plans:
            sched = forward_only(dataclasses.replace(self.schedule, microbatches=microbatches))
            self._inference_plans[microbatches] = (process_order(sched, self.rank),
                                                   build_comm_plan(self.stages, sched))
        return self._inference_plans[microbatches]

    def _plain_parameters(self) -> dict[int, list[torch.Tensor]] | None:
        """Each local stage's trainable parameters, or None where one carries a hook (read every step:
        the user may freeze a parameter or add a hook between steps)."""
        out = {}
        for k in self.local:
            params = plain_leaves(self.stages[k].graph_module.parameters())
            if params is None:
                return None
            out[k] = params
        return out

    # ------------------------------------------------------------------ actions

    def _run(self, order: list[Action], comm: CommPlan, state: "_StepState") -> None:
        self.transport.begin(comm)
        profiling = torch._C._autograd._profiler_enabled()  # labels cost ~6 us each: only when a profiler listens
        try:
            for i, action in enumerate(order):
                if i + 1 < len(order):  # gloo posts the next action's receives now, NCCL when needed
                    self.transport.prefetch(comm.recvs[order[i + 1]])
                with record_function(f"partitioner.{action}") if profiling else nullcontext():  # names it in traces
                    try:
                        if action.kind == "F":
                            self._forward(action, comm, state)
                        else:
                            self._backward(action, comm, state)
                            if self.stage_backward_done is not None and action in self._closes_stage:
                                self.stage_backward_done(action.stage)
                    except Exception as err:
                        self._say_where(err, action)
                        raise
        finally:
            state.saved.clear()
        self.transport.finish()

    def _say_where(self, err: Exception, a: Action) -> None:
        """Add to an error raised by an action which stage, pass and microbatch raised it, and what the
        stage holds (a torch error from inside a stage names neither)."""
        if not hasattr(err, "add_note") or any(n.startswith("partitioner: raised by")  # Python 3.11+; once
                                                for n in getattr(err, "__notes__", [])):
            return
        st = self.stages[a.stage]
        holds = f"{st.params[0]} ... {st.params[-1]}" if st.params else "no parameters"
        err.add_note(f"partitioner: raised by {a} ({'forward' if a.kind == 'F' else 'backward'} of stage {a.stage}, "
                     f"microbatch {a.microbatch}; the stage holds {holds}). Each microbatch gets the inputs cut "
                     "along their batch dims (compile_parallel's batch_dims); an input cut that should go whole, "
                     "or not cut that should be, shows up as a shape error here.")

    def _forward(self, a: Action, comm: CommPlan, state: "_StepState") -> None:
        st = self.stages[a.stage]
        device = self.stage_device[a.stage]
        received = {m.value: m for m in comm.recvs[a]}
        args: list[Any] = []
        leaves: dict[str, torch.Tensor] = {}
        for name in st.inputs:
            if st.input_sources[name] == USER_INPUT:
                x = state.inputs[a.microbatch][st.user_inputs[name]]
                x = x.to(device) if isinstance(x, torch.Tensor) else x
            else:
                x = self.transport.recv(received[name])
                if state.train and st.value_meta[name].requires_grad:
                    x = x.detach().requires_grad_(True)
                    leaves[name] = x
            if name in st.mutated_inputs and isinstance(x, torch.Tensor):
                x = x.clone()  # the stage writes it in place: keep the received leaf intact
            args.append(x)
        if st.is_last and state.train:  # training keeps only the loss: logits of every microbatch are large
            target = pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t,
                                     state.targets[a.microbatch])
            if self.stage_loss is not None:
                raw = self.stage_loss(*args, target)
            else:
                raw = self.loss_fn(self.unflatten(list(self.runners[a.stage](*args))), target)
            state.add_loss(raw.detach())
            state.saved[a] = (leaves, [raw])
            if self.cudagraph_steps is not None:
                self.cudagraph_steps.keep(a, [raw])
            return
        outs = self.runners[a.stage](*args)
        if self.cudagraph_steps is not None and state.train:
            self.cudagraph_steps.keep(a, outs)
        if st.is_last:
            state.outputs[a.microbatch] = list(outs)
        else:
            by_name = dict(zip(st.outputs, outs))
            for msg in comm.sends[a]:
                self.transport.send(msg, by_name[msg.value])
            if state.train:
                state.saved[a] = (leaves, [by_name[v] for v in st.outputs])

    def _backward(self, a: Action, comm: CommPlan, state: "_StepState") -> None:
        st = self.stages[a.stage]
        leaves, outs = state.saved.pop(Action(a.stage, "F", a.microbatch))
        tensors: list[torch.Tensor] = []
        grads: list[torch.Tensor | None] = []
        if st.is_last:
            if outs[0].requires_grad:  # the step's loss is the microbatches' mean: 1/m in the gradient
                seed = self._mean_grad(outs[0], len(state.inputs), self.loss_weight)
                if state.loss_scale is not None:
                    seed = seed * state.loss_scale.to(seed.device, seed.dtype)
                tensors, grads = outs, [seed]
        else:
            grad_of: dict[str, torch.Tensor] = {}
            for msg in comm.recvs[a]:  # one gradient per (value, consumer): sum them
                g = self.transport.recv(msg)
                grad_of[msg.value] = g if msg.value not in grad_of else grad_of[msg.value] + g
            for name, out in zip(st.outputs, outs):
                if name in grad_of and out.requires_grad:
                    tensors.append(out)
                    grads.append(grad_of[name])
        leaf_grad: dict[str, torch.Tensor | None] = {}
        if tensors and state.params is None:
            torch.autograd.backward(tensors, grads)
            leaf_grad = {name: x.grad for name, x in leaves.items()}
        elif tensors:
            params = state.params[a.stage]
            names = list(dict.fromkeys(msg.value for msg in comm.sends[a]))
            wrt = [*params, *(leaves[n] for n in names)]
            if wrt:
                got = torch.autograd.grad(tensors, wrt, grads, allow_unused=True)
                accumulate(params, got[:len(params)], others=[*got[len(params):], *grads])
                leaf_grad = dict(zip(names, got[len(params):]))
        if self.cudagraph_steps is not None:
            self.cudagraph_steps.release(Action(a.stage, "F", a.microbatch))
        for msg in comm.sends[a]:
            g = leaf_grad.get(msg.value)
            self.transport.send(msg, g if g is not None else torch.zeros_like(leaves[msg.value]))

    def _mean_grad(self, loss: torch.Tensor, microbatches: int, weight: float | None = None) -> torch.Tensor:
        """The gradient of the step's loss with respect to one microbatch's loss: 1/m for their mean, else
        `weight` (made once)."""
        key = (loss.device, loss.dtype, loss.shape, microbatches, weight)
        if key not in self._mean_grads:
            self._mean_grads[key] = torch.full_like(loss, 1 / microbatches if weight is None else weight)
        return self._mean_grads[key]


class _StepState:
    """What one train_step/forward keeps between actions."""

    def __init__(self, inputs: list[list[Any]], targets: list[Any], train: bool, loss_weight: float | None = None):
        self.inputs = inputs
        self.loss_weight = loss_weight  # of each microbatch's loss in the step's (None: 1/m)
        self.targets = targets
        self.train = train
        self.saved: dict[Action, tuple[dict[str, torch.Tensor], list[torch.Tensor]]] = {}
        self.outputs: dict[int, list[Any]] = {}
        self.params: dict[int, list[torch.Tensor]] | None = None  # per stage, where gradients add by foreach
        self.loss_scale: torch.Tensor | None = None  # the backward's seed is the 1/m mean times this
        self._raw_loss: torch.Tensor | None = None

    def add_loss(self, raw: torch.Tensor) -> None:
        """One microbatch's loss (the loss function's value), summed in float32 (a bf16 loss would round
        at every microbatch)."""
        raw = raw.detach().float()
        self._raw_loss = raw if self._raw_loss is None else self._raw_loss + raw

    @property
    def loss(self) -> torch.Tensor | None:
        """The step's loss: the mean over its microbatches (their sum times loss_weight where given)."""
        if self._raw_loss is None:
            return None
        return self._raw_loss / len(self.inputs) if self.loss_weight is None else self._raw_loss * self.loss_weight
