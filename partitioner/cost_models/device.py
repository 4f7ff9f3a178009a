"""DeviceSpec: what the roofline time model and the planner know about an accelerator.

The table holds vendor datasheet numbers (dense, no sparsity; SXM parts for
H100/H200/A100). Links are per GPU and per direction. `cpu` is not in the
datasheet table: it is calibrated once per process by a quick matmul and copy
benchmark on this machine. Users describe other hardware in a JSON file with
the same fields (`DeviceSpec.to_json` writes one to start from).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from partitioner.cost_models.host_calibration import host_overheads_s
from partitioner.errors import CostModelError
from partitioner.units import dtype_name

GiB = 1024 ** 3
DTYPE_KEYS = ("float32", "tf32", "bfloat16", "float16")


@dataclass(frozen=True)
class DeviceSpec:
    """Peak rates of one device.

    peak_flops: FLOP/s by dtype key ("float32", "tf32", "bfloat16", "float16").
    mem_bw_bytes_per_s: device memory bandwidth.
    mem_bytes: device memory capacity.
    intra_node_bw_bytes_per_s: point-to-point bandwidth to a GPU of the same host (NVLink/PCIe).
    inter_node_bw_bytes_per_s: bandwidth to another host (InfiniBand/Ethernet), per GPU.
    kernel_overhead_s: fixed GPU-side cost of one kernel (the tail of a small kernel): part of
        its duration in a profile.
    kernel_gap_s: the device's idle time from one kernel's end to the next one's start when the
        next is already queued (a CUDA graph, a stream the host keeps ahead of): in no kernel's
        duration, but in every step's wall time. `per_kernel_s` is the two together.
    matmul_efficiency: achieved fraction of peak_flops by large dense matmuls (cuBLAS).
    attention_efficiency: achieved fraction of peak_flops by fused attention (flash /
        memory-efficient SDPA), relative to FlopCounterMode's (non-causal) count.
    masked_attention_efficiency: the same for 16-bit fused attention with an attn_mask
        (memory-efficient / cuDNN kernels, about half the flash rate).
    grad_mask_attention_efficiency: the same for 16-bit fused attention whose attn_mask requires
        grad (a learned bias: T5's position bias), which only the memory-efficient kernel takes (it
        writes the mask's gradient; cuDNN does not). 0: masked_attention_efficiency.
    causal_attention_speedup: how many times faster fused causal attention (is_causal, no
        attn_mask) runs than attention_efficiency says of its non-causal count: the kernel
        skips the masked tiles, and pays for the diagonal ones. 1.0: not modelled.
    misaligned_matmul_efficiency: fraction of peak reached by a 16-bit matmul one of whose
        tensors has an innermost dimension that is not a multiple of 16 bytes (e.g. GPT-2's
        vocabulary of 50257): cuBLAS falls back to unaligned (align1) tensor-core kernels.
    mem_bw_efficiency: achieved fraction of mem_bw_bytes_per_s by large elementwise kernels.
    foreach_bw_efficiency: the same for a foreach add over many tensors (multi_tensor_apply: the
        compiled stages' gradient accumulation). 0: mem_bw_efficiency.
    narrow_fp32_matmul_efficiency: achieved fraction of the float32 peak by an fp32 GEMM (TF32 off:
        the CUDA cores' FFMA, not the tensor cores) whose reduction K or output width N is at most
        NARROW_GEMM_DIM (64, one attention head: SDPA's math path upcasts 16-bit inputs): cuBLAS's
        SIMT kernels then run 64-wide tiles, or 8 k-steps per tile. 0: matmul_efficiency.
    fp32_gemm_k_tile: the reduction an fp32 GEMM's main loop consumes per pipeline stage (roofline_time_s
        overlaps loads with compute over K / this many stages): 8 for the CUDA cores' SIMT kernels
        (`..._tilesize64x64x8_...`, `simt_sgemm_256x128_8x4`). 0: MATMUL_K_TILE, as a tensor-core GEMM.
    cpu_fwd_overhead_s / cpu_bwd_overhead_s: host time eager PyTorch spends dispatching one
        graph node's forward (views included) / each kernel its backward runs. A GPU runs
        asynchronously, so a run of nodes takes max(GPU time, host time) per pass; 0 on the
        CPU itself, where that time is in kernel_overhead_s.
    compiled_launch_overhead_s: host time per kernel a torch.compile'd graph launches (its
        generated code's call of each kernel, the autograd engine's work per gradient
        accumulated); 0 on the CPU itself. spec_for_torch_device(compiled=True) times this host's.
    contended_atomic_s: device time per atomic add serialised on one cache line, the chain a
        compiled embedding backward runs when many indices hit one row
        (cost_models/contention.py); 0: not modelled.
    stage_pass_s: fixed time of every stage pass (one forward or one backward of one stage for
        one microbatch) beyond its nodes, eager or compiled: the executor's action and the
        autograd.backward call (NodeCosts.stage_pass). Host time on a GPU; device time on the
        CPU device, whose host time is 0 by convention.
    compiled_stage_pass_s: what a compiled stage's pass adds to that (host time): torch.compile's
        per-call machinery (dynamo's guards, AOTAutograd's wrappers, the autograd Function): 0.3 ms
        in the GPU tables (measured with the executor's part included, which stage_pass_s leaves
        at 0 there); spec_for_torch_device(compiled=True) times it on this host with the launch
        cost (cost_models/compiled_host.py). On the CPU device profile() measures it instead
        (cost_models.measure.compiled_call_overhead).
    waiting_send_slowdown: how many times slower a GPU computes 16-bit math while an NCCL send of its
        waits for the receiving rank (its kernel holds SMs until the peer posts the receive): the
        simulator stretches the sender's compute in those windows (runtime/simulator.py). 1.0: sends
        cost the sender nothing (gloo's threads, or stages in one process).
    fp32_waiting_send_slowdown: the same for fp32 compute, whose GEMMs run on the CUDA cores in many
        small waves and barely feel a few held SMs (waiting_send_slowdown_for picks by dtype).
    """

    name: str
    peak_flops: dict[str, float]
    mem_bw_bytes_per_s: float
    mem_bytes: int
    intra_node_bw_bytes_per_s: float
    inter_node_bw_bytes_per_s: float
    kernel_overhead_s: float = 5e-6
    notes: str = field(default="", compare=False)
    kernel_gap_s: float = 0.0
    matmul_efficiency: float = 1.0
    attention_efficiency: float = 1.0
    masked_attention_efficiency: float = 1.0
    grad_mask_attention_efficiency: float = 0.0
    causal_attention_speedup: float = 1.0
    misaligned_matmul_efficiency: float = 1.0
    mem_bw_efficiency: float = 1.0
    foreach_bw_efficiency: float = 0.0
    narrow_fp32_matmul_efficiency: float = 0.0
    fp32_gemm_k_tile: int = 0
    cpu_fwd_overhead_s: float = 0.0
    cpu_bwd_overhead_s: float = 0.0
    compiled_launch_overhead_s: float = 0.0
    contended_atomic_s: float = 0.0
    stage_pass_s: float = 0.0
    compiled_stage_pass_s: float = 0.0
    waiting_send_slowdown: float = 1.0
    fp32_waiting_send_slowdown: float = 1.0

    @property
    def per_kernel_s(self) -> float:
        """Device time every kernel costs beyond its bytes and FLOPs: its fixed part and the gap before the next."""
        return self.kernel_overhead_s + self.kernel_gap_s

    def flops_per_s(self, dtype: torch.dtype | str, *, tf32: bool = False) -> float:
        """Peak FLOP/s for matmuls in `dtype`; fp32 uses the TF32 rate when `tf32` is on."""
        key = dtype_name(dtype)
        if key == "float32" and tf32 and "tf32" in self.peak_flops:
            key = "tf32"
        if key not in self.peak_flops:
            key = "float32"  # ints, fp64, fp8: no datasheet entry; fp32 rate as a stand-in
        return self.peak_flops[key]

    def waiting_send_slowdown_for(self, dtype: torch.dtype | str) -> float:
        """waiting_send_slowdown for compute in `dtype`: fp32's (CUDA cores) or the 16-bit one (tensor cores)."""
        return self.fp32_waiting_send_slowdown if dtype_name(dtype) == "float32" else self.waiting_send_slowdown

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "DeviceSpec":
        d = json.loads(text)
        try:
            spec = cls(**d)
        except TypeError as e:
            raise CostModelError(f"invalid device spec JSON: {e}. Expected fields: "
                                 f"{', '.join(DeviceSpec.__dataclass_fields__)}") from e
        if "float32" not in spec.peak_flops:
            raise CostModelError(f"device spec '{spec.name}': peak_flops needs at least a 'float32' entry "
                                 f"(keys: {', '.join(DTYPE_KEYS)})")
        return spec


# Achieved fractions of the datasheet peaks and eager-mode overheads, measured on one H200
# (the matmul fraction refitted from the kernels of compiled gpt2-xl and llama-1b steps,
# `python -m benchmarks.host_overhead`, 8 microbatches of 2 x 1024 tokens: cuBLAS reached 681 and
# 743 TFLOP/s over all their matmuls, 0.78 under roofline_time_s's overlap of a GEMM's loads with
# its compute; in the same steps cuDNN's attention ran 477-497 TFLOP/s of the non-causal count
# causal (our stages, masks folded) and 185-235 with the plain HF models' explicit masks; the rest
# as first measured)
# (torch 2.11, CUDA 13, TF32 off as torch defaults) with
#     python -m benchmarks.cost_model_accuracy --calibrate       (its "calib" rows)
#     python -m benchmarks.cost_model_accuracy --per-node        (every node alone: host times)
# nn.functional.linear fwd+bwd of (M, K, N) from (1024, 768, 768) to (16384, 4096, 4096): fp32
# 46-52 of 67 TFLOP/s, bf16 570-770 of 989 (big shapes; 0.72); with N = 50257, bf16 95 TFLOP/s
# forward (0.10); SDPA flash fwd+bwd bf16 270-500 TFLOP/s of the non-causal count (0.40), fp32
# 28-55 of 67; bf16 SDPA with an additive mask 205-225 TFLOP/s (0.22); copy/add of 256 MiB-1 GiB
# 4.2 of 4.8 TB/s (0.87). Host, in context (whole-graph dispatch), least squares over the layers
# of gpt2, llama-1b and t5-base that are not GPU-bound: 21 us per node forward (further aten ops
# of a node add nothing measurable), 31 us per backward kernel. Compiled (torch 2.11, inductor's
# default mode, 8 microbatches of 2 x 1024 tokens, `python -m benchmarks.host_overhead`): the
# plain gpt2-xl and t5-base models, host-bound, took 28 us of step per kernel launched (65 ms per
# microbatch for 2,314 kernels; 43 ms for 1,555), gradient accumulations included; on an H100
# host whose eager dispatch calibrated 1.5x slower than the table, compiled t5-base stages and
# the plain compiled model took 25.6 us of host time per launch: the compiled launch cost is
# not scaled by the eager calibration. Contended atomics: compiled t5-base (2 x 1024 tokens, bf16,
# H100) spent 14.1 ms a microbatch in its encoder's relative-position-bias backward, 435,711 hits
# on the hottest of 32 rows x 12 columns: 2.7 ns per atomic on one line (its decoder's, 32,896
# hits, took 0.59 ms against 1.07 ms so costed).
# Hosts differ in the compiled launch cost too (21 us on another H100 machine); spec_for_torch_device
# (compiled=True) times this host's (cost_models/compiled_host.py), with compiled_stage_pass_s, the
# compiled call's own cost. Not the default: on one H100 host it read 20-34 us a launch and 350-570
# us a call within minutes, and its plans' predictions missed by -27% and +57%.
# A compiled stage pass's own host time, compiled_stage_pass_s (the executor's action and torch.compile's
# per-call machinery together; stage_pass_s, the eager executor's part, is not measured on GPUs and
# left at 0): t5-base's compiled stages, bf16, 8 microbatches of 2 x 1024 tokens, host-bound on one
# H100, took 408.5 ms a step with 1 stage and 422.9 ms with 4 (48 more passes: 0.30 ms each;
# `python -m benchmarks.host_overhead --model t5-base --stages 1,4 --rounds 4 --warmup 2 --time-limit 3`).
# They are properties of the host CPU and PyTorch's eager dispatch, not of the GPU: the same
# values are assumed for every GPU below (H100/A100/L4 use the H200's fractions; re-measure
# there and write a JSON spec when it matters).
# Causal attention (our stages fold the models' causal masks into is_causal): the cuDNN kernels of
# compiled llama-1b (H200) and gpt2-xl (H100) stages, bf16, 2 x 1024 tokens, forward and backward of
# both stages, took 1.53-1.62x less than the non-causal count at attention_efficiency
# (`python -m benchmarks.kernels_vs_plan` on the committed *.kernels.json files): 1.55.
# fp32 GEMMs with a head-wide dimension (TF32 off, CUDA cores): the 6 matmuls of SDPA's math path in
# t5-base's 12 encoder layers (bf16 inputs upcast; 24 x 1024 x 1024 x 64, 3.2 GFLOP each) took 104, 83
# (forward), 84, 84, 121, 89 us (backward) on an H100 and 98, 83, 84, 84, 117, 89 us on an H200, whose
# memory is 1.43x faster: compute-bound, 0.40-0.58 of the 67 TFLOP/s FP32 peak, 0.54 over the six under
# roofline_time_s with SIMT's 8-deep k-tile (python -m benchmarks.kernels_vs_plan on
# host_overhead_t5base_{passes_ours-1-stages,h200_ours-2-stages,h100_plain,h200_plain}.kernels.json);
# the fp32 bmm of 8x12x1024x1024x64 on an H200 (roofline_time_s's docstring: 0.395 ms) reads 0.374 ms so
# costed. Large fp32 linear layers keep matmul_efficiency (46-52 of 67 TFLOP/s, above).
# Attention with a mask that requires grad (T5's position bias, bf16, (2 x 12) x 1024 x 1024 x 64, H100):
# the memory-efficient kernels (fmha_cutlassF/B, sm80 code) took 91 us forward and 203 us backward a call,
# 0.115 of the bf16 peak over both under roofline_time_s (cuDNN's masked kernels, without a mask grad,
# reach 0.22; benchmarks/results/host_overhead_t5base_ro2_ours-2-stages-reduce-overhead.kernels.json).
# Kernel-to-kernel gaps: with nothing waiting on the host (t5-base's whole step as one CUDA graph, the
# plain models under mode="reduce-overhead", H100), the device idled 0.65-1.22 us between consecutive
# kernels (benchmarks/results/host_overhead_{t5base_h100_graph,t5base_ro,gpt2_cg}.json: idle_ms / idle_gaps):
# 8.5 ms of t5-base's 274 ms step as one graph, 13,065 kernels.
# The foreach add of a compiled stage's gradients (multi_tensor_apply's BinaryOpListAlphaFunctor, bf16,
# read two, write one) moved 3.1 TB/s on an H200 (gpt2-xl's stages, 0.64 of the peak) and 2.45 TB/s on an
# H100 (t5-base's, 0.73) (host_overhead_{gpt2xl_foreach,t5base_foreach}_ours-2-stages-reduce-overhead.kernels.json).
# A kernel resident on a few SMs (an NCCL send waiting for its receiver) slows the GEMMs beside it far more
# than the SMs it takes: with 1, 2 and 4 of an H100's 132 SMs held by spinning blocks, gpt2-xl's forward
# GEMMs as one layer (bf16, 2 x 1024 tokens) ran 1.09x, 1.14x and 1.16x their time, the 2048x1600x6400
# GEMM alone 1.26-1.31x (`python -m benchmarks.resident_kernels`, results/resident_kernels_h100.json).
# fp32 GEMMs (CUDA cores, TF32 off) barely feel them: 0.99-1.03x as one layer and 1.00x for the fp32 chain
# block of benchmarks/executor_vs_torch (`... --dtype float32`, results/resident_kernels_fp32_h100.json).
# With 1.14 for 16-bit compute (two SMs held: NCCL's P2P channels per peer) the simulator turns gpt2-xl's
# bf16 interleaved step on 2 H200s from 5% faster than 1F1B to 1.3% slower (measured: 4-7% slower) and
# leaves the fp32 chain's interleaved step on NCCL (predicted within 1.1%) as it was.
GPU_EFFICIENCY = dict(matmul_efficiency=0.78, attention_efficiency=0.40, masked_attention_efficiency=0.22,
                      grad_mask_attention_efficiency=0.115, kernel_gap_s=0.9e-6, causal_attention_speedup=1.55,
                      compiled_stage_pass_s=0.3e-3,
                      narrow_fp32_matmul_efficiency=0.54, fp32_gemm_k_tile=8,
                      misaligned_matmul_efficiency=0.10, mem_bw_efficiency=0.87, foreach_bw_efficiency=0.68,
                      cpu_fwd_overhead_s=21e-6,
                      cpu_bwd_overhead_s=31e-6, compiled_launch_overhead_s=28e-6, contended_atomic_s=2.7e-9,
                      waiting_send_slowdown=1.14, fp32_waiting_send_slowdown=1.0)


def _gpu(name: str, fp32: float, tf32: float, bf16: float, mem_bw: float, mem: int, intra: float,
         inter: float, notes: str) -> DeviceSpec:
    return DeviceSpec(name, {"float32": fp32, "tf32": tf32, "bfloat16": bf16, "float16": bf16},
                      mem_bw, mem, intra, inter, 3e-6, notes, **GPU_EFFICIENCY)


T = 1e12
DEVICE_SPECS: dict[str, DeviceSpec] = {
    "h100": _gpu("h100", 67 * T, 494.7 * T, 989.4 * T, 3.35e12, 80 * GiB, 450e9, 50e9,
                 "H100 SXM5 80GB; NVLink4 900 GB/s bidirectional; NDR InfiniBand 400 Gb/s per GPU"),
    "h200": _gpu("h200", 67 * T, 494.7 * T, 989.4 * T, 4.8e12, 141 * 10 ** 9, 450e9, 50e9,
                 "H200 SXM 141GB; NVLink4; NDR InfiniBand 400 Gb/s per GPU"),
    "a100-40gb": _gpu("a100-40gb", 19.5 * T, 156 * T, 312 * T, 1.555e12, 40 * GiB, 300e9, 25e9,
                      "A100 SXM4 40GB; NVLink3 600 GB/s bidirectional; HDR InfiniBand 200 Gb/s"),
    "a100-80gb": _gpu("a100-80gb", 19.5 * T, 156 * T, 312 * T, 2.039e12, 80 * GiB, 300e9, 25e9,
                      "A100 SXM4 80GB; NVLink3; HDR InfiniBand 200 Gb/s"),
    "l4": _gpu("l4", 30.3 * T, 60 * T, 121 * T, 300e9, 24 * GiB, 32e9, 12.5e9,
               "L4 24GB; PCIe Gen4 x16; 100 Gb/s Ethernet between hosts"),
}


def known_device_names() -> list[str]:
    return [*DEVICE_SPECS, "cpu"]


def _time_it(fn, min_time_s: float = 0.05) -> float:
    """Median-ish seconds per call: repeat until min_time_s has passed."""
    fn()
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time_s:
            return elapsed / runs


# the executor's action around a stage pass: about 20 us of Python on the 2-core CPU; a constant,
# not calibrated per machine
CPU_STAGE_PASS_S = 20e-6


@functools.lru_cache(maxsize=1)
def calibrate_cpu() -> DeviceSpec:
    """Measure this CPU: fp32/bf16 matmul FLOP/s, copy bandwidth and per-op overhead (~0.5 s, once per process)."""
    n = 512
    rates = {}
    for key, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        try:
            rates[key] = 2 * n ** 3 / _time_it(lambda: torch.mm(a, b))
        except RuntimeError:  # a CPU build without this dtype's matmul
            rates[key] = rates["float32"]
    rates["tf32"] = rates["float32"]
    x = torch.empty(16 * 2 ** 20 // 4, dtype=torch.float32)  # 16 MiB: out of most L2s
    y = torch.empty_like(x)
    bw = 2 * x.nbytes / _time_it(lambda: y.copy_(x))
    # a few tiny layers as a GraphModule, forward and backward: what one kernel of a real graph
    # costs beyond its data movement (Python and dispatch per node, autograd bookkeeping)
    block = torch.fx.symbolic_trace(torch.nn.Sequential(
        *[m for _ in range(4) for m in (torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.GELU())]))
    x, params = torch.randn(2, 3, 8), list(block.parameters())
    # per layer: addmm, layer_norm, gelu forward; mm, mm, sum, layer_norm and gelu backward; + the sum
    kernels = 4 * (3 + 5) + 1
    overhead = _time_it(lambda: torch.autograd.grad(block(x).sum(), params), min_time_s=0.05) / kernels
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = 16 * GiB
    return DeviceSpec("cpu", rates, bw, int(mem), 5e9, 1.25e9, overhead,
                      f"calibrated on this machine ({torch.get_num_threads()} threads); "
                      "links: shared memory within a host, 10 GbE between hosts", stage_pass_s=CPU_STAGE_PASS_S)


def get_device_spec(name_or_path: str | DeviceSpec) -> DeviceSpec:
    """A DeviceSpec by table name (h100, h200, a100-40gb, a100-80gb, l4, cpu) or from a JSON file."""
    if isinstance(name_or_path, DeviceSpec):
        return name_or_path
    key = str(name_or_path).strip()
    if key.lower() in DEVICE_SPECS:
        return DEVICE_SPECS[key.lower()]
    if key.lower() == "cpu":
        return calibrate_cpu()
    path = Path(key).expanduser()
    if key.endswith(".json") or path.is_file():
        if not path.is_file():
            raise CostModelError(f"device spec file '{key}' does not exist")
        return DeviceSpec.from_json(path.read_text())
    raise CostModelError(f"unknown device type '{key}': use one of {', '.join(known_device_names())} "
                         "or the path of a JSON file with a DeviceSpec (see DeviceSpec.to_json)")


def spec_for_torch_device(device: torch.device | str, calibrate_host: bool = True, compiled: bool = False) -> DeviceSpec:
    """The table entry closest to a real torch device (by CUDA device name), else the calibrated CPU.

    calibrate_host: on CUDA, replace the table's eager dispatch constants (fitted on one
    machine; hosts differ by 1.5-3x) with this machine's (cost_models.host_calibration.host_overheads_s,
    a few seconds once per process).
    compiled: with calibrate_host, also time this host's compiled launches and calls
    (cost_models.compiled_host: compiles a small model once per process); eager dispatch speed
    does not predict them (see GPU_EFFICIENCY's comment).
    """
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        spec = spec_for_gpu_name(torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).total_memory)
        if calibrate_host:
            fwd, bwd = host_overheads_s(device)
            spec = dataclasses.replace(spec, cpu_fwd_overhead_s=fwd, cpu_bwd_overhead_s=bwd,
                                       notes=f"{spec.notes}; host dispatch calibrated on this machine".lstrip("; "))
            if compiled:
                from partitioner.cost_models.compiled_host import compiled_host_overheads_s  # it profiles: imports us
                try:
                    launch, call = compiled_host_overheads_s(device)
                except Exception as err:  # noqa: BLE001 - inductor failed on this host: the stages will say so too
                    warnings.warn(f"timing this host's compiled launches failed ({type(err).__name__}: {str(err)[:200]}); "
                                  f"planning with the {spec.name} table's compiled launch cost.", RuntimeWarning, stacklevel=2)
                else:
                    spec = dataclasses.replace(spec, compiled_launch_overhead_s=launch, compiled_stage_pass_s=call)
        return spec
    return calibrate_cpu()


def spec_for_gpu_name(name: str, total_memory: int | None = None) -> DeviceSpec:
    """The table entry for a CUDA device name ("NVIDIA H100 80GB HBM3"); total_memory tells A100s apart."""
    gpu = name.lower()
    if "h200" in gpu:
        return DEVICE_SPECS["h200"]
    if "h100" in gpu:
        return DEVICE_SPECS["h100"]
    if "a100" in gpu:
        big = total_memory > 50 * GiB if total_memory is not None else "80" in gpu
        return DEVICE_SPECS["a100-80gb" if big else "a100-40gb"]
    if "l4" in gpu:
        return DEVICE_SPECS["l4"]
    raise CostModelError(f"no DeviceSpec for GPU '{name}': write one as JSON and pass its path")
