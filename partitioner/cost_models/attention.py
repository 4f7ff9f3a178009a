"""scaled_dot_product_attention as the cost model sees it: the kernel eager PyTorch picks on a GPU
(`sdpa_backend`, following torch's backend selection) and the sizes that kernel's time and FLOPs
follow (`AttentionCall`), read off an aten call's arguments (`attention_call`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from partitioner.passes.attention_mask_layout import strided_last_dim

HALF = (torch.float16, torch.bfloat16)


def sdpa_backend(query_shape: tuple[int, ...], key_shape: tuple[int, ...], value_shape: tuple[int, ...],
                 dtype: torch.dtype, *, has_mask: bool = False, mask_strided: bool = False,
                 is_causal: bool = False) -> str:
    """The kernel eager scaled_dot_product_attention runs on a CUDA GPU (sm80-sm90, every
    backend enabled): "flash", "efficient" (memory-efficient or cuDNN: same costs) or "math".

    Follows torch's select_sdp_backend (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp),
    priority cuDNN > flash > memory-efficient > math:
    - a mask whose last dim is strided (stride != 1, e.g. T5's bias looked up as (L, S, H) and
      permuted to (H, L, S)): math; every fused kernel needs stride 1 there
      (check_last_dim_stride_equals_1_dense). A mask that requires grad (T5's trainable bias)
      is taken by memory-efficient attention, which writes its gradient;
    - flash: fp16/bf16, no mask, equal head dims <= 256, is_causal only with L == S;
    - memory-efficient / cuDNN: fp32 too, additive or bool masks; q and k head dims equal,
      q and v head dims a multiple of 8 (16-bit) or 4 (fp32) (minimum_gemm_alignment);
    - anything else: math.
    The CPU's fused kernel also rejects a mask that requires grad; the costs follow the GPU.
    """
    e_q, e_k, e_v = query_shape[-1], key_shape[-1], value_shape[-1]
    if has_mask and mask_strided:
        return "math"
    if dtype in HALF and not has_mask and e_q == e_k == e_v <= 256 and not (
            is_causal and query_shape[-2] != key_shape[-2]):
        return "flash"
    align = 8 if dtype in HALF else 4 if dtype == torch.float32 else 0
    if align and e_q == e_k and e_q % align == 0 and e_v % align == 0:
        return "efficient"
    return "math"


@dataclass(frozen=True)
class AttentionCall:
    """One scaled_dot_product_attention node as costed: its backend and sizes.

    batch_heads: B x H of the query (key/value heads are broadcast to it under GQA);
    q_len / kv_len: L and S; qk_dim / v_dim: E and Ev; dtype: the inputs' dtype;
    mask_numel: elements of the attn_mask as passed, broadcast dims included (0 = none);
    mask_requires_grad: the mask depends on a trainable parameter; dropout_p: dropout;
    is_causal: the causal mask is the kernel's own (no attn_mask): fused kernels skip the
    masked tiles (DeviceSpec.causal_attention_speedup).
    """

    backend: str
    batch_heads: int
    q_len: int
    kv_len: int
    qk_dim: int
    v_dim: int
    dtype: torch.dtype
    mask_numel: int = 0
    mask_dtype: torch.dtype | None = None
    mask_requires_grad: bool = False
    dropout_p: float = 0.0
    is_causal: bool = False

    def io_numel(self) -> int:
        """Elements a fused kernel reads and writes: q, k, v, the output and the mask."""
        return (self.batch_heads * (self.q_len * (self.qk_dim + self.v_dim) + self.kv_len * (self.qk_dim + self.v_dim))
                + self.mask_numel)

    @property
    def scores(self) -> int:
        """Elements of the (B, H, L, S) score matrix."""
        return self.batch_heads * self.q_len * self.kv_len

    def fwd_flops(self) -> int:
        """Matmul FLOPs of the forward: Q K^T and P V (the same count for every backend)."""
        return 2 * self.scores * (self.qk_dim + self.v_dim)

    def bwd_flops(self) -> int:
        """Backward FLOPs: fused kernels recompute Q K^T (torch's flash formula, 2.5x the
        forward); math runs the four gradient matmuls of its two bmm's (2x the forward)."""
        if self.backend == "math":
            return 2 * self.fwd_flops()
        return 2 * self.scores * (3 * self.qk_dim + 2 * self.v_dim)


def sdpa_arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    """aten.scaled_dot_product_attention's arguments by name (query, key, value, attn_mask,
    dropout_p, is_causal), positional or keyword; absent ones left out."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    return bound


def attention_call(args: tuple, kwargs: dict) -> AttentionCall:
    """The AttentionCall of aten.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, ...)."""
    bound = sdpa_arguments(args, kwargs)
    q, k, v = bound["query"], bound["key"], bound["value"]
    mask = bound.get("attn_mask")
    mask = mask if isinstance(mask, torch.Tensor) else None
    mask_grad = bool(mask is not None and mask.requires_grad and torch.is_grad_enabled())
    mask_strided = strided_last_dim(mask)
    is_causal = bool(bound.get("is_causal", False))
    backend = sdpa_backend(tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, has_mask=mask is not None,
                           mask_strided=mask_strided, is_causal=is_causal)
    batch_heads = q.numel() // (q.shape[-2] * q.shape[-1]) if q.dim() >= 2 else 1
    return AttentionCall(backend, batch_heads, q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], q.dtype,
                         mask_numel=mask.numel() if mask is not None else 0,
                         mask_dtype=mask.dtype if mask is not None else None, mask_requires_grad=mask_grad,
                         dropout_p=float(bound.get("dropout_p", 0.0) or 0.0), is_causal=is_causal)
