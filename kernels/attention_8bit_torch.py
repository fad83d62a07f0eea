"""8-bit attention in PyTorch: the reference (and CPU fallback) of ``kernels/attention_8bit.py``.

The design is SageAttention's (issue #16):

- K is smoothed: its per-head mean over tokens is subtracted, which adds the same number to every
  score of a query row and so leaves softmax unchanged, while it removes the shared offset that
  would otherwise eat the INT8 range.
- Q is quantized to INT8 per token, K per block of ``block_n`` tokens; the softmax scale and
  log2(e) are folded into Q's scale, so scores come out in the base-2 domain (``exp2``).
- Softmax is online (running row max ``m`` and sum ``l`` in fp32), block by block over the keys,
  exactly as the kernel walks them: the FP8 codes of P depend on the running max, so the twin
  must see the same blocks to give the same numbers.
- fast: P is scaled by 448 (folded into the exponent) and rounded to FP8 e4m3; V is FP8 e4m3 with
  one scale per channel; the product accumulates in fp32.
- accurate: P is rounded to V's 16-bit dtype and multiplied with V as given.
"""

from __future__ import annotations

import math

import torch

from .fp8_linear import FP8_DTYPE, FP8_MAX
from .int8_gemm_torch import INT8_MAX, MIN_SCALE_AMAX, round_half_away

LOG2E = 1.4426950408889634
P_LOG2_SCALE = math.log2(FP8_MAX)  # fast mode computes 448 * P as exp2(s - m + log2(448))
KEY_BLOCK = 128  # keys per INT8 scale (and per step of the online softmax) when nobody asks otherwise


def softmax_log2_scale(head_dim: int) -> float:
    """The factor folded into Q's scale: SDPA's 1/sqrt(D), times log2(e) for ``exp2``."""
    return LOG2E / math.sqrt(head_dim)


def key_means(k: torch.Tensor) -> torch.Tensor:
    """(B, H, Lk, D) -> (B, H, D) fp32: the per-head mean over tokens that smoothing subtracts."""
    return k.mean(dim=2, dtype=torch.float32)


def value_scales(v: torch.Tensor) -> torch.Tensor:
    """(B, H, Lk, D) -> (B, H, D) fp32: one FP8 scale per channel, ``amax / 448``.
    ``vector_norm(inf)`` reads V once without an |V| temporary (335 MB at Wan-14B's shape)."""
    amax = torch.linalg.vector_norm(v, float("inf"), dim=2).float()
    return amax.clamp(min=MIN_SCALE_AMAX) / FP8_MAX


def quantize_queries(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, Lq, D) -> int8 codes (B, H, Lq, D) and (B, H, Lq) fp32 scales, one per token,
    with the softmax scale and log2(e) folded in: ``q . k * sm_scale * log2(e) = codes . k * scale``."""
    x = q.float()
    scale = x.abs().amax(dim=-1).clamp(min=MIN_SCALE_AMAX) / INT8_MAX
    codes = round_half_away(x / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale * softmax_log2_scale(q.shape[-1])


def quantize_keys(k: torch.Tensor, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, Lk, D) -> smoothed int8 codes (B, H, Lk_pad, D), zero past Lk, and (B, H, Lk_pad / block_n)
    fp32 scales, one per block of ``block_n`` tokens (Lk_pad: Lk rounded up to a whole block)."""
    B, H, Lk, D = k.shape
    padded = math.ceil(Lk / block_n) * block_n
    x = torch.zeros(B, H, padded, D, dtype=torch.float32, device=k.device)
    x[:, :, :Lk] = k.float() - key_means(k)[:, :, None, :]
    blocks = x.view(B, H, padded // block_n, block_n, D)
    scale = blocks.abs().amax(dim=(-2, -1)).clamp(min=MIN_SCALE_AMAX) / INT8_MAX
    codes = round_half_away(blocks / scale[..., None, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes.view(B, H, padded, D), scale


def quantize_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, Lk, D) -> e4m3 codes (B, H, Lk, D) and (B, H, D) fp32 per-channel scales."""
    scale = value_scales(v)
    codes = (v.float() / scale[:, :, None, :]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


def _attend_block(state, scores_int, c, p_log2_scale, values, accurate):
    """One online-softmax step: scores_int (B, H, Lq, n) fp32 (integer dot products of the codes),
    c (B, H, Lq) the fp32 score scale, values (B, H, n, D) -> updated (acc, m, l)."""
    acc, m, l = state
    m_new = torch.maximum(m, scores_int.amax(dim=-1) * c)
    alpha = torch.exp2(m - m_new)
    p = torch.exp2(scores_int * c[..., None] - (m_new - p_log2_scale)[..., None])
    l = l * alpha + p.sum(dim=-1)
    p_rounded = p.to(values.dtype) if accurate else p.to(FP8_DTYPE)
    acc = acc * alpha[..., None] + p_rounded.float() @ values.float()
    return acc, m_new, l


def attention_8bit_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, accurate: bool = False,
                         block_n: int = KEY_BLOCK) -> torch.Tensor:
    """q (B, H, Lq, D), k and v (B, H, Lk, D), bf16/fp16 -> (B, H, Lq, D) in q's dtype.
    ``block_n``: keys per K scale and per softmax step (the kernel's BLOCK_N)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q_codes, q_scale = quantize_queries(q)
    k_codes, k_scale = quantize_keys(k, block_n)
    values, v_scale = (v, None) if accurate else quantize_values(v)
    p_log2_scale = 0.0 if accurate else P_LOG2_SCALE
    state = (torch.zeros(B, H, Lq, D, device=q.device), torch.full((B, H, Lq), -math.inf, device=q.device),
             torch.zeros(B, H, Lq, device=q.device))
    # float64 products of int8 codes are exact integers, as the kernel's int32 accumulator is
    q64 = q_codes.double()
    for block, start in enumerate(range(0, Lk, block_n)):
        end = min(start + block_n, Lk)
        # the kernel masks the zero-padded keys of the tail block to -inf: the same as leaving them out
        scores = (q64 @ k_codes[:, :, start:end].double().transpose(-1, -2)).float()
        c = q_scale * k_scale[:, :, block, None]
        state = _attend_block(state, scores, c, p_log2_scale, values[:, :, start:end], accurate)
    acc, _, l = state
    out = acc / l[..., None]
    if v_scale is not None:
        out = out * v_scale[:, :, None, :]
    return out.to(q.dtype)
