"""Per-token FP8 e4m3 activation quantization in one Triton kernel (the W8A8 FP8 path's input side).

PyTorch spends five passes on it (fp32 copy, abs, amax, divide, cast: about 2 ms for Wan-14B's
32 760 x 5120 activations on an H100, half the FP8 GEMM it feeds); this kernel reads the row twice
and writes fp8 once. One program per row: pass 1 finds amax, pass 2 writes ``clamp(x / scale)`` as
e4m3 with ``scale = max(amax, 1e-12) / 448``. Same values as ``fp8_linear.quantize_fp8_rows`` (the
scale bit for bit; the codes wherever the interpreter's fp8 cast rounds like the GPU's, which the
gpu test checks on the device).
"""

from __future__ import annotations

import torch

from .fp8_format import FP8_DTYPE, FP8_MAX, MIN_SCALE_AMAX
from .triton_launch import row_launch_shape

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:
    AVAILABLE = False


if AVAILABLE:
    _FP8_MAX = tl.constexpr(FP8_MAX)
    _MIN_SCALE_AMAX = tl.constexpr(MIN_SCALE_AMAX)

    @triton.jit
    def _larger(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _quantize_fp8_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        amax = tl.full((BLOCK,), 0.0, tl.float32)
        for start in range(0, K, BLOCK):
            k = start + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)))
        scale = tl.maximum(tl.reduce(amax, 0, _larger), _MIN_SCALE_AMAX) / _FP8_MAX
        tl.store(scale_ptr + row, scale)
        for start in range(0, K, BLOCK):
            k = start + tl.arange(0, BLOCK)
            # div_rn: IEEE division, as PyTorch divides (Triton's default `/` is approximate on GPUs)
            scaled = tl.math.div_rn(tl.load(x_ptr + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32), scale)
            clamped = tl.minimum(tl.maximum(scaled, -_FP8_MAX), _FP8_MAX)
            tl.store(q_ptr + row * stride_q + k, clamped.to(tl.float8e4nv), mask=k < K)


def quantize_fp8_rows_triton(x: torch.Tensor, block: int | None = None,
                             warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (M, K) e4m3fn codes and (M,) fp32 scales, like ``quantize_fp8_rows``.
    ``block`` / ``warps``: the launch shape (``row_launch_shape(K)`` by default; the tuner sweeps them)."""
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    default_block, default_warps = row_launch_shape(K)
    _quantize_fp8_rows_kernel[(M,)](x, q, scale, K, x.stride(0), q.stride(0), BLOCK=block or default_block,
                                    enable_fp_fusion=False, num_warps=warps or default_warps)
    return q, scale
