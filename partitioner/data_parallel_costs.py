"""Data parallel x pipeline: what `dp` replicas of one pipeline plan cost each rank.

What runs (compile_parallel(mesh=...)): every replica runs the same plan on its 1/dp of the
global batch. "fsdp": each rank's stages are one module under torch FSDP2's fully_shard(dp mesh,
reshard_after_forward=False), with gradient sync off for every backward of the step but the
last. "replicate" (runtime/replicated_gradients.py): whole parameters on every replica, each
stage group's gradients packed into one flat buffer and all-reduced after its last backward.
Per rank, with W its parameter bytes, T those of its trainable parameters (= its gradient bytes
G), O its optimizer bytes (its states, cost_models.memory.param_state_bytes) and s the shard
count (dp for fsdp, 1 for replicate):

- during the step: W whole (all-gathered at the first forward, kept to the end) + the rank's own
  shard T/s (FSDP2 keeps the sharded parameter beside the unsharded one; replicate, s = 1: the
  flat buffers the all-reduce runs on, a second whole copy, held from a stage's last backward to
  the end of the step) + G whole (accumulated over the microbatches) + O/s, and the activations
  as without dp. `shard_block_graph` writes this into each block's param_state_bytes, so the
  solver's memory cap, the baselines and the simulator's peak all see it (for replicate an upper
  bound: the buffers and the first microbatches' activations are not held at once).
- after the last backward FSDP2 reshards first (frees the whole W), then copies the gradients
  into one flat buffer and reduces it (torch's post_backward / foreach_reduce): G + G + T/s + O/s
  at most, below the step's W + G + T/s + O/s, with no activations left. So the step's is the peak.
Measured by benchmarks/dp_memory.py (torch 2.13, 2 gloo ranks, fp32 AdamW): held during the step
3.5 W (fsdp), 4 W without dp, as this model says; replicate 4 W, and 5 W from the last backward
with its flat buffers (the model's 5 W).

Time per step, ring collectives over the dp group at `bw`: fsdp, reduce-scatter of G then
all-gather of T at the next step's first forward, (dp-1)/dp x bytes / bw each; replicate,
all-reduce of G, 2 (dp-1)/dp x G / bw. Counted as not overlapping the rank's compute, so the step
is the largest over ranks of (its last action's end in the simulated schedule + its collectives);
with interleaving the runtime starts a stage's reduction at that stage's last backward, so for
those plans this is an upper bound. The
solver balances the pipeline without them; they are added to the plan it returns.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from partitioner.errors import PlanError
from partitioner.plan import plan_timeline

DP_MODES = ("fsdp", "replicate")
GPUS_PER_HOST = 8  # an HGX/DGX host


@dataclass(frozen=True)
class DataParallel:
    """dp replicas of the pipeline, sharded ("fsdp") or not ("replicate"), their collectives at bw."""

    size: int = 1
    mode: str = "fsdp"
    bw_bytes_per_s: float = 0.0

    @property
    def shards(self) -> int:
        """How many ways the trainable parameters, gradients after the step and optimizer state split."""
        return self.size if self.mode == "fsdp" else 1


@dataclass(frozen=True)
class ParamBytes:
    """Training state of some parameters, split as data parallelism treats it."""

    weight: int  # every parameter and buffer
    trainable: int  # parameters an optimizer updates; their gradients take as much
    optimizer: int  # optimizer states

    def static_bytes(self, dp: DataParallel) -> int:
        """Held by one rank during a step (module docstring); weight + grad + optimizer at dp = 1."""
        if dp.size == 1:
            return self.weight + self.trainable + self.optimizer
        return self.weight + self.trainable + -(-self.optimizer // dp.shards) + -(-self.trainable // dp.shards)


def check_data_parallel(size: object, mode: object) -> None:
    """PlanError unless `size` is an int >= 1 and `mode` one of DP_MODES."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise PlanError(f"--data-parallel is {size!r}: give the number of pipeline replicas, an integer >= 1 "
                        "(data_parallel= in Python)")
    if mode not in DP_MODES:
        raise PlanError(f"unknown data-parallel mode {mode!r}: use fsdp (shard parameters, gradients and optimizer "
                        "state over the replicas) or replicate (keep them whole, all-reduce the gradients)")


def dp_bandwidth(spec, size: int, num_ranks: int, gpus_per_host: int = GPUS_PER_HOST,
                 bw_bytes_per_s: float | None = None) -> float:
    """Bandwidth of the dp collectives: `bw_bytes_per_s` when given; else the device's intra-node
    bandwidth when all size x num_ranks GPUs fit in one host, its inter-node bandwidth otherwise
    (a DeviceMesh (dp, pp) puts a pipeline's ranks next to each other, so the replicas of one
    stage sit num_ranks apart and a ring over them crosses hosts as soon as they do not fit in one)."""
    if bw_bytes_per_s is not None:
        if not bw_bytes_per_s > 0:
            raise PlanError(f"--dp-bandwidth is {bw_bytes_per_s:g} bytes/s: give a positive bandwidth, e.g. 50GB/s")
        return float(bw_bytes_per_s)
    if gpus_per_host < 1:
        raise PlanError(f"--gpus-per-host is {gpus_per_host}: give at least 1")
    one_host = size * num_ranks <= gpus_per_host
    return spec.intra_node_bw_bytes_per_s if one_host else spec.inter_node_bw_bytes_per_s


def param_bytes(bg, param_bytes_by_fqn: dict[str, int], state_bytes_by_fqn: dict[str, int]
                ) -> tuple[list[ParamBytes], list[ParamBytes]]:
    """ParamBytes of every block's own parameters and of every shared (tied) parameter of `bg`.

    param_bytes_by_fqn: AnnotatedGraph.param_bytes (the weights, as Block.param_bytes counts them);
    state_bytes_by_fqn: NodeCosts.param_state_bytes. A parameter whose state is larger than its
    weight trains: its gradient is as large as its weight, the rest is optimizer state.
    """
    def split(fqns) -> ParamBytes:
        weight = trainable = optimizer = 0
        for f in fqns:
            w = int(param_bytes_by_fqn.get(f, 0))
            state = int(state_bytes_by_fqn.get(f, w))
            weight += w
            if state > w:
                trainable += w
                optimizer += max(0, state - 2 * w)
        return ParamBytes(weight, trainable, optimizer)

    shared = {sp.fqn for sp in bg.shared_params}
    return ([split(f for f in blk.params if f not in shared) for blk in bg.blocks],
            [split([sp.fqn]) for sp in bg.shared_params])


def shard_block_graph(bg, blocks: list[ParamBytes], shared: list[ParamBytes], dp: DataParallel):
    """`bg` with each block's and shared parameter's param_state_bytes as one rank holds them during
    a step under `dp` (the module docstring); `bg` itself when dp.size is 1."""
    if dp.size == 1:
        return bg
    new_blocks = [dataclasses.replace(blk, param_state_bytes=pb.static_bytes(dp)) for blk, pb in zip(bg.blocks, blocks)]
    new_shared = [dataclasses.replace(sp, state_bytes=pb.static_bytes(dp)) for sp, pb in zip(bg.shared_params, shared)]
    return dataclasses.replace(bg, blocks=new_blocks, shared_params=new_shared)


def rank_param_bytes(plan, bg, blocks: list[ParamBytes], shared: list[ParamBytes]) -> list[ParamBytes]:
    """Per rank of `plan`: the ParamBytes of the blocks it holds, a tied parameter once per rank using it."""
    p = plan.num_ranks
    sums = [[0, 0, 0] for _ in range(p)]

    def add(r: int, pb: ParamBytes) -> None:
        sums[r][0] += pb.weight
        sums[r][1] += pb.trainable
        sums[r][2] += pb.optimizer

    rank_of_block = [plan.stage_rank[k] for k in plan.block_stage]
    for b, pb in enumerate(blocks):
        add(rank_of_block[b], pb)
    for sp, pb in zip(bg.shared_params, shared):
        for r in sorted({rank_of_block[b] for b in sp.blocks}):
            add(r, pb)
    return [ParamBytes(*s) for s in sums]


def reduce_time_s(pb: ParamBytes, dp: DataParallel) -> float:
    """Seconds of one rank's dp collectives per step on a ring: fsdp, reduce-scatter of the gradients
    + all-gather of the trainable parameters, (dp-1)/dp x bytes / bw each; replicate, all-reduce of
    the gradients, 2 (dp-1)/dp x bytes / bw (a ring all-reduce is a reduce-scatter + an all-gather,
    so both modes move the same bytes; fsdp splits them across two steps' boundary)."""
    if dp.size == 1 or pb.trainable == 0:
        return 0.0
    return 2 * (dp.size - 1) / dp.size * pb.trainable / dp.bw_bytes_per_s


def apply_data_parallel(plan, bg, blocks: list[ParamBytes], shared: list[ParamBytes], dp: DataParallel):
    """`plan` (scored on shard_block_graph's graph `bg`, so its memory is already per GPU) with dp
    added: the replicas, each rank's collectives (rank_dp_reduce_time_s) and what they add to the
    step (dp_reduce_time_s, included in step_time_s and model_step_time_s). A new Plan."""
    if dp.size == 1:
        return plan
    ranks = rank_param_bytes(plan, bg, blocks, shared)
    reduce = [reduce_time_s(pb, dp) for pb in ranks]
    if plan.simulated:
        tl = plan_timeline(plan, bg)
        end = [max((tl.end_s[a] for a in row), default=0.0) for row in tl.schedule.actions]
        extra = max(0.0, max(e + t for e, t in zip(end, reduce)) - tl.step_time_s)
    else:
        extra = max(reduce)
    return plan.replace(data_parallel=dp.size, data_parallel_mode=dp.mode, dp_bw_bytes_per_s=dp.bw_bytes_per_s,
                        rank_dp_reduce_time_s=reduce, dp_reduce_time_s=extra, step_time_s=plan.step_time_s + extra,
                        model_step_time_s=plan.model_step_time_s + extra)


def microbatch_size(batch: int, dp: int, microbatches: int) -> int:
    """Samples per microbatch of one replica: batch / (dp x microbatches); PlanError when it does not divide."""
    if batch % (dp * microbatches):
        fit = dp * microbatches * max(1, math.ceil(batch / (dp * microbatches)))
        raise PlanError(f"the global batch {batch} does not split into {dp} replicas x {microbatches} microbatches "
                        f"({dp * microbatches} equal parts): use --batch {fit}, or a --data-parallel and "
                        f"--microbatches whose product divides {batch}")
    return batch // (dp * microbatches)

