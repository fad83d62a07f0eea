"""FP8 e4m3 weights with per-channel scales: quantize, dequantize, and the W8A8 linear.

W8A8: activations are quantized per token at call time (``scale = amax / 448``; on the GPU by
``fp8_quant_triton.py`` in one kernel) and multiplied
by ``torch._scaled_mm`` with row-wise scales (A: (M, 1), B: (1, N)), which measured 1.63x faster
than bf16 on an H100 at Wan-14B's FFN shape (shared/reference/baselines.md). Row-wise scaling
needs an SM 9.0+ GPU, bf16 output, and K, N multiples of 16; elsewhere ``fp8_linear_emulated``
computes the same quantized product in fp32 (the CPU path and the test reference).
"""

from __future__ import annotations

import functools

import torch

from .fp8_format import FP8_DTYPE, FP8_MAX, MIN_SCALE_AMAX

ROWWISE_MIN_CAPABILITY = (9, 0)
# Hopper FP8 tensor cores accumulate in reduced precision unless the GEMM promotes partial sums to
# fp32 every few k-steps; ``use_fast_accum`` skips that promotion. On an H100 (bench/RESULTS.md,
# session 3) it made Wan-14B's FFN up-projection 1.39x -> 1.71x faster than bf16 and the whole
# forward 0.922x -> 0.872x of native, with the error against bf16 unchanged (0.0375 per layer,
# 0.0455 -> 0.0455 whole model): the FP8 rounding of the operands dwarfs the accumulation's.
FAST_ACCUM = True


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (M, K) e4m3fn and (M,) fp32 scales: ``x ≈ q.float() * scale[:, None]``."""
    rows = x.float()
    scale = rows.abs().amax(dim=-1).clamp(min=MIN_SCALE_AMAX) / FP8_MAX
    q = (rows / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) fp8 or int8 with (N,) scales -> (N, K) ``dtype``: ``(q.float() * scale[:, None]).to(dtype)``."""
    return (codes_as_float(q) * scale.to(device=q.device, dtype=torch.float32)[:, None]).to(dtype)


def codes_as_float(q: torch.Tensor) -> torch.Tensor:
    """fp8 / int8 codes as fp32. On the CPU, fp8 goes through a 256-entry table: PyTorch's element-wise
    fp8 conversion there is about 100x slower than a gather, and the values are the same."""
    if q.dtype == FP8_DTYPE and q.device.type == "cpu":
        return _fp8_table()[q.view(torch.uint8).long()]
    return q.to(torch.float32)


@functools.lru_cache(maxsize=1)
def _fp8_table() -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE).to(torch.float32)


def scaled_mm_supported(device: torch.device, in_features: int, out_features: int) -> bool:
    """Whether ``torch._scaled_mm`` with row-wise scales runs here for this layer shape."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    if in_features % 16 or out_features % 16:
        return False
    return torch.cuda.get_device_capability(device) >= ROWWISE_MIN_CAPABILITY


def fp8_row_quantizer():
    """The per-token FP8 activation quantizer ``fp8_linear_scaled_mm`` uses: Triton's when installed."""
    from . import fp8_quant_triton  # imported here: Triton loads only when a quantizer is asked for

    return fp8_quant_triton.quantize_fp8_rows_triton if fp8_quant_triton.AVAILABLE else quantize_fp8_rows


def fp8_linear_scaled_mm(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, fast_accum: bool | None = None,
                         activation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """W8A8 ``F.linear`` on tensor cores: x (..., K) bf16/fp16, w_q (N, K) e4m3fn, w_scale (N,);
    ``fast_accum`` None: ``FAST_ACCUM``; ``activation``: x already quantized by ``fp8_row_quantizer()``."""
    a_q, a_scale = activation if activation is not None else fp8_row_quantizer()(x.reshape(-1, x.shape[-1]))
    scales = dict(scale_a=a_scale[:, None], scale_b=w_scale.float()[None, :], out_dtype=torch.bfloat16,
                  use_fast_accum=FAST_ACCUM if fast_accum is None else fast_accum)
    out = None
    if bias is not None and _BIAS_IN_EPILOGUE.get(x.device, True):
        try:  # the bias in the GEMM's epilogue saves a pass over the output
            out = torch._scaled_mm(a_q, w_q.t(), bias=bias.to(torch.bfloat16), **scales)
        except RuntimeError:  # this torch / GPU has no bias with row-wise scales: add it after
            _BIAS_IN_EPILOGUE[x.device] = False
    if out is None:
        out = torch._scaled_mm(a_q, w_q.t(), **scales)
        if bias is not None:
            out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])


_BIAS_IN_EPILOGUE: dict[torch.device, bool] = {}


def fp8_linear_emulated(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None = None,
                        activation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The same W8A8 product in fp32 (any device): quantized activations x quantized weights;
    ``activation``: x already quantized by ``quantize_fp8_rows``."""
    a_q, a_scale = activation if activation is not None else quantize_fp8_rows(x.reshape(-1, x.shape[-1]))
    out = (codes_as_float(a_q) @ codes_as_float(w_q).t()) * a_scale[:, None] * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()[None, :]
    return out.to(x.dtype).reshape(*x.shape[:-1], w_q.shape[0])
