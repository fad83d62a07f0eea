"""INT8 W8A8 linear in PyTorch: the reference (and CPU fallback) of ``kernels/int8_gemm_triton.py``.

Weights are int8 with one fp32 scale per output channel (symmetric, ``w ≈ q * scale[n]``);
activations are quantized per token (per row of the flattened input) at call time, the same way.
The product accumulates exactly (as int32 would), then ``acc * a_scale[m] * w_scale[n] (+ bias)`` in fp32,
in that order, so the Triton kernel (no FMA contraction) gives the same bits.

Rounding is half away from zero (``trunc(v ± 0.5)``), which a Triton float->int cast expresses
exactly; a zero row gets the smallest scale instead of a division by zero.
"""

from __future__ import annotations

import torch

INT8_MAX = 127.0
MIN_SCALE_AMAX = 1e-12  # amax floor: an all-zero row quantizes to zeros with a finite scale


def round_half_away(values: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (what ``(v ± 0.5)`` cast to int does in Triton)."""
    return torch.where(values >= 0, values + 0.5, values - 0.5).trunc()


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (M, K) int8 and (M,) fp32 scales, symmetric per row: ``x ≈ q * scale[:, None]``.

    Used both for weights (rows = output channels) and activations (rows = tokens).
    """
    rows = x.float()
    scale = rows.abs().amax(dim=-1).clamp(min=MIN_SCALE_AMAX) / INT8_MAX
    q = round_half_away(rows / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_gemm_torch(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, K) int8 x (N, K) int8 -> (M, N) ``out_dtype``: exact integer accumulate, then per-row/col rescale.

    The integer sums run as a float64 matmul (BLAS on the CPU, supported on CUDA, where int32 matmul
    is not): every product and partial sum is an integer below 2^53, so the result equals int32
    accumulation exactly, and its rounding to fp32 is the same.
    """
    acc = a_q.to(torch.float64) @ w_q.to(torch.float64).t()
    out = acc.float() * a_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()[None, :]
    return out.to(out_dtype)


def int8_linear_torch(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None = None,
                      activation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """W8A8 ``F.linear``: x (..., K) float, w_q (N, K) int8, w_scale (N,) -> (..., N) in x's dtype;
    ``activation``: x already quantized by ``quantize_int8_rows``."""
    a_q, a_scale = activation if activation is not None else quantize_int8_rows(x.reshape(-1, x.shape[-1]))
    out = int8_gemm_torch(a_q, a_scale, w_q, w_scale, bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], w_q.shape[0])
