"""Time of every node, analytic: a roofline of the kernels it runs (measured times: cost_models/measure.py).

Analytic: a node is costed kernel by kernel, from the aten ops its forward and its
backward dispatched on fake tensors (cost_models.flops.OpKernel): each kernel takes
    flops / (peak_flops[dtype] x efficiency) + bytes_moved / (mem_bw x mem_bw_efficiency)
    + kernel_overhead
(`roofline_time_s`; bytes_moved = what it reads and writes; the efficiency that of a
matmul, of fused attention, or of a misaligned 16-bit matmul: DeviceSpec). SDPA is costed
as the kernel a GPU runs (fused, or its math path's sequence: `math_attention_kernels`),
not as what fake tensors ran. The host's dispatch time is kept apart: cpu_fwd_overhead per
node forward, cpu_bwd_overhead per backward kernel
(`analytic_node_time`). The host queues kernels ahead of the GPU, so a run of nodes takes
max(sum of GPU times, sum of host times) per pass, as in measured mode. On the CPU device
the host overheads are 0 and kernel_overhead holds the per-op cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import torch

from partitioner.cost_models.attention import AttentionCall
from partitioner.units import dtype_name

if TYPE_CHECKING:  # device.py calibrates specs with host_calibration.host_overheads_s, which imports measure, which imports this module
    from partitioner.cost_models.device import DeviceSpec


@dataclass(frozen=True)
class NodeTime:
    """Forward and backward seconds of one node (or one block).

    fwd_s / bwd_s: device time (the GPU busy; on the CPU device, the whole time).
    host_fwd_s / host_bwd_s: host time dispatching it (0 on the CPU device, whose fwd_s /
    bwd_s include it).
    The host queues work ahead of the GPU, so a run of nodes takes max(sum of device
    times, sum of host times) per pass (`pass_time_s`), not the sum of per-node maxima.
    """

    fwd_s: float
    bwd_s: float
    host_fwd_s: float = 0.0
    host_bwd_s: float = 0.0

    @property
    def time_s(self) -> float:
        """Forward + backward seconds, host and device overlapping within each pass."""
        return pass_time_s(self.fwd_s, self.host_fwd_s) + pass_time_s(self.bwd_s, self.host_bwd_s)

    def fwd_pass_s(self, device_s, host_s, stages=1):
        """A forward pass over runs of blocks whose device and host times sum to device_s / host_s,
        held by `stages` stages that each pay this fixed cost once (self as a stage pass's overhead,
        NodeCosts.stage_pass): pass_time_s(device_s + stages * fwd_s, host_s + stages * host_fwd_s).
        Exact for one stage (0 for none: a stage without blocks costs nothing); for several, a lower
        bound on their sum (a sum of maxima is at least the maximum of the sums). Takes numpy arrays."""
        return pass_time_s(device_s + stages * self.fwd_s, host_s + stages * self.host_fwd_s)

    def bwd_pass_s(self, device_s, host_s, stages=1):
        """The backward's `fwd_pass_s`."""
        return pass_time_s(device_s + stages * self.bwd_s, host_s + stages * self.host_bwd_s)

    def device_only(self) -> "NodeTime":
        """These times without their host parts (a step replayed as a CUDA graph launches once)."""
        return NodeTime(self.fwd_s, self.bwd_s)

    @classmethod
    def summed(cls, times: Iterable["NodeTime"]) -> "NodeTime":
        """A run of nodes or blocks: each of the four times summed (its time_s is then the run's)."""
        times = list(times)
        return cls(*(sum(getattr(t, f) for t in times) for f in ("fwd_s", "bwd_s", "host_fwd_s", "host_bwd_s")))


def pass_time_s(device_s: float, host_s: float) -> float:
    """Time of a forward or backward pass over a run of nodes: the device and the host work
    in parallel (the host queues kernels ahead), so the slower of the two sets the pace.
    Elementwise on numpy arrays."""
    if isinstance(device_s, np.ndarray) or isinstance(host_s, np.ndarray):
        return np.maximum(device_s, host_s)
    return max(device_s, host_s)


NO_TIME = NodeTime(0.0, 0.0)


MATMUL_K_TILE = 64  # the reduction a tensor-core GEMM's main loop consumes per stage of its pipeline


NARROW_GEMM_DIM = 64  # a GEMM dimension this narrow (one attention head) caps a CUDA-core kernel's tile


def gemm_efficiency(spec: DeviceSpec, dtype: torch.dtype | str, reduction: int, width: int = 0) -> float:
    """The achieved fraction of the peak of a GEMM with reduction K = `reduction` and output rows
    `width` (N) wide (0: not known): spec.narrow_fp32_matmul_efficiency for an fp32 one (the CUDA
    cores' SIMT kernels) with K or N at most NARROW_GEMM_DIM, where the table gives one; else
    spec.matmul_efficiency."""
    known = [d for d in (reduction, width) if d > 0]
    narrow = bool(known) and min(known) <= NARROW_GEMM_DIM
    if narrow and spec.narrow_fp32_matmul_efficiency and dtype_name(dtype) == "float32":
        return spec.narrow_fp32_matmul_efficiency
    return spec.matmul_efficiency


def roofline_time_s(flops: float, bytes_moved: float, kernels: float, spec: DeviceSpec,
                    dtype: torch.dtype | str = torch.float32, *, flops_efficiency: float | None = None,
                    reduction: int = 0, width: int = 0) -> float:
    """GPU time: compute time and memory time, combined, + launch overhead; 0 when nothing is done.

    A GEMM (reduction > 0: its K) overlaps loading its operands with computing for as many
    stages as its main loop has (K / MATMUL_K_TILE): max(compute, memory) + min(compute, memory)
    / stages. So a batched matmul with K = 64 pays the sum (8x12x1024x1024x64 on an H200:
    measured fp32 0.395 ms, sum 0.376, max 0.267; bf16 0.070, sum 0.072, max 0.054), and a
    linear layer with K in the thousands the max (llama-1b's 2048-wide layers under
    torch.compile on an H200 reached 743 TFLOP/s, 0.75 of the bf16 peak). Other kernels pay the
    sum (one term dominates elementwise kernels anyway). An fp32 GEMM's stages are K /
    spec.fp32_gemm_k_tile where the table gives one (the CUDA cores' SIMT kernels step 8 deep).
    flops_efficiency: achieved fraction of the peak (default gemm_efficiency(spec, dtype, reduction,
    width): spec.matmul_efficiency, or for an fp32 GEMM with K or N (`width`) at most
    NARROW_GEMM_DIM spec.narrow_fp32_matmul_efficiency).
    """
    if kernels <= 0 and flops <= 0 and bytes_moved <= 0:
        return 0.0
    eff = gemm_efficiency(spec, dtype, reduction, width) if flops_efficiency is None else flops_efficiency
    compute = flops / (spec.flops_per_s(dtype) * eff) if flops > 0 else 0.0
    memory = bytes_moved / (spec.mem_bw_bytes_per_s * spec.mem_bw_efficiency)
    if reduction > 0:
        k_tile = spec.fp32_gemm_k_tile if spec.fp32_gemm_k_tile and dtype_name(dtype) == "float32" else MATMUL_K_TILE
        combined = max(compute, memory) + min(compute, memory) / math.ceil(reduction / k_tile)
    else:
        combined = compute + memory
    return combined + kernels * spec.per_kernel_s


def is_compute_bound(flops: float, bytes_moved: float, spec: DeviceSpec, dtype: torch.dtype | str = torch.float32) -> bool:
    """True when the roofline's compute term exceeds its memory term (arithmetic intensity above the ridge)."""
    return (flops / (spec.flops_per_s(dtype) * spec.matmul_efficiency)
            > bytes_moved / (spec.mem_bw_bytes_per_s * spec.mem_bw_efficiency))


@dataclass(frozen=True)
class Kernel:
    """One GPU kernel (or a few launched for one op): FLOPs, bytes read + written, dtype.

    flops_efficiency: achieved fraction of the peak for its FLOPs (default: the
    matmul efficiency when `matmul`, else 1); launches: kernels it stands for.
    """

    flops: float
    bytes_moved: float
    dtype: torch.dtype = torch.float32
    matmul: bool = False
    flops_efficiency: float | None = None
    launches: int = 1
    reduction: int = 0  # a GEMM's K (roofline_time_s); 0: not a GEMM
    width: int = 0  # a GEMM's output row width N (gemm_efficiency); 0: not known


def kernels_time_s(kernels: Sequence[Kernel], spec: DeviceSpec) -> float:
    """GPU time of kernels run one after another: the sum of their rooflines."""
    return sum(roofline_time_s(k.flops, k.bytes_moved, k.launches, spec, k.dtype,
                               flops_efficiency=k.flops_efficiency if k.flops_efficiency is not None
                               else None if k.matmul else 1.0, reduction=k.reduction, width=k.width)
               for k in kernels)


def analytic_node_time(fwd: Sequence[Kernel], bwd: Sequence[Kernel], spec: DeviceSpec, *,
                       dispatched: bool = False) -> NodeTime:
    """Device and host time of one node whose forward launches `fwd` and backward `bwd`.

    Device: the kernels' rooflines, one after another. Host, kept apart (a run of nodes takes
    max(sum of device, sum of host) per pass): dispatched (an eager op call, views included)
    pays spec.cpu_fwd_overhead_s; its backward spec.cpu_bwd_overhead_s per kernel.
    """
    host_fwd = spec.cpu_fwd_overhead_s if dispatched else 0.0
    host_bwd = spec.cpu_bwd_overhead_s * len(bwd)
    return NodeTime(kernels_time_s(fwd, spec), kernels_time_s(bwd, spec), host_fwd, host_bwd)


def math_attention_kernels(call: AttentionCall, dtype: torch.dtype | None = None) -> tuple[list[Kernel], list[Kernel]]:
    """Forward and backward kernels of SDPA's math path (aten _scaled_dot_product_attention_math).

    dtype: the dtype the inputs have in training (default call.dtype). 16-bit inputs are
    upcast to fp32 first (allow_fp16_bf16_reduction_math_sdp is off by default), so the
    matmuls run at the fp32 rate and the (B, H, L, S) passes move 4-byte elements.
    Forward: [upcast q, k, v], q * s, k^T * s, S = q k^T, [S + mask], P = softmax(S),
    [dropout], O = P v, [O cast back]. Backward: [cast dO], dP = dO v^T, dv = P^T dO,
    softmax backward, [mask gradient: cast / broadcast reduction], dq = dS k, dk = dS^T q,
    two scale multiplies, [three casts down] (the ops torch 2.13 dispatches, views aside).
    """
    dtype = dtype or call.dtype
    half = dtype.itemsize < 4
    acc = torch.float32 if half else dtype
    a, io = acc.itemsize, dtype.itemsize
    n = call.scores
    q = call.batch_heads * call.q_len * call.qk_dim
    k = call.batch_heads * call.kv_len * call.qk_dim
    v = call.batch_heads * call.kv_len * call.v_dim
    o = call.batch_heads * call.q_len * call.v_dim
    # a bool mask is converted to q's dtype; a float mask of q's dtype trains in `dtype`
    same = call.mask_dtype in (None, torch.bool, call.dtype)
    mask_bytes = call.mask_numel * (io if same else call.mask_dtype.itemsize)

    def pointwise(numel: int, read: int, write: int) -> Kernel:
        return Kernel(0.0, numel * (read + write), acc)

    def bmm(m: int, kk: int, nn: int, read: float, write: float) -> Kernel:
        return Kernel(2.0 * call.batch_heads * m * kk * nn, read + write, acc, matmul=True, reduction=kk, width=nn)

    L, S, E, Ev = call.q_len, call.kv_len, call.qk_dim, call.v_dim
    fwd = [pointwise(x, io, a) for x in (q, k, v)] if half else []
    fwd += [pointwise(q, a, a), pointwise(k, a, a)]
    fwd.append(bmm(L, E, S, (q + k) * a, n * a))
    if call.mask_numel:
        fwd.append(Kernel(0.0, 2 * n * a + mask_bytes, acc))
    fwd.append(pointwise(n, a, a))
    if call.dropout_p > 0:
        fwd.append(Kernel(0.0, n * (a + a + 1), acc))
    fwd.append(bmm(L, S, Ev, (n + v) * a, o * a))
    if half:
        fwd.append(pointwise(o, a, io))

    bwd = [pointwise(o, io, a)] if half else []
    bwd.append(bmm(L, Ev, S, (o + v) * a, n * a))  # dP = dO v^T
    bwd.append(bmm(S, L, Ev, (n + o) * a, v * a))  # dv = P^T dO
    if call.dropout_p > 0:
        bwd.append(Kernel(0.0, n * (a + a + 1), acc))
    bwd.append(Kernel(0.0, 3 * n * a, acc))  # dS = P * (dP - sum(dP * P))
    if call.mask_requires_grad and (half or call.mask_numel < n):
        bwd.append(Kernel(0.0, n * a + mask_bytes, acc))
    bwd.append(bmm(L, S, E, (n + k) * a, q * a))  # dq = dS k
    bwd.append(bmm(S, L, E, (n + q) * a, k * a))  # dk = dS^T q
    bwd += [pointwise(q, a, a), pointwise(k, a, a)]
    if half:
        bwd += [pointwise(x, a, io) for x in (q, k, v)]
    return fwd, bwd
