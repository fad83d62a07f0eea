"""INT8 W8A8 linear in Triton: per-token activation quantization + an int8 tensor-core GEMM.

Why ours: ``torch._int_mm`` measured 5.5x slower than bf16 on an H100 (shared/reference/baselines.md),
so INT8 compute on Hopper needs its own kernel. Two kernels:

- ``_quantize_rows_kernel``: one program per row of x (M, K); pass 1 finds amax, pass 2 writes
  ``trunc(x / scale ± 0.5)`` as int8 and the fp32 scale ``max(amax, 1e-12) / 127``.
- ``_int8_gemm_kernel``: (M, K) int8 x (N, K) int8 -> int32 accumulator in BLOCK_M x BLOCK_N tiles
  (grouped launch order for L2 reuse), epilogue ``acc * a_scale[m] * w_scale[n] (+ bias)`` in fp32,
  stored in the output dtype.

Same bits as ``kernels/int8_gemm_torch.py`` (tested under ``TRITON_INTERPRET=1``); kernels launch
with ``enable_fp_fusion=False`` so the epilogue is never contracted into an FMA.
Importing without Triton is fine: ``AVAILABLE`` is False and callers use the twin.
"""

from __future__ import annotations

import os

import torch

from .int8_gemm_torch import INT8_MAX, MIN_SCALE_AMAX
from .triton_launch import row_launch_shape

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # the pack still works, on the PyTorch twin
    AVAILABLE = False

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): H100-sized tiles for diffusion token
# counts (thousands of rows); the interpreter gets one small tile so CPU tests stay fast.
GEMM_CONFIGS = ((128, 256, 128, 8, 8, 3), (128, 128, 128, 8, 4, 4), (64, 128, 128, 8, 4, 4))
INTERPRET_CONFIG = (16, 16, 32, 2, 1, 1)

# Only core builtins and our own jit functions inside the kernels (no tl.zeros / tl.max / tl.cdiv from
# triton.language.standard): a copy of this module decorated under TRITON_INTERPRET=1 then runs on
# CPU even when Triton was imported earlier without it (the unit tests do exactly that).
if AVAILABLE:
    # globals a kernel reads must be constexpr (compiled Triton refuses plain module globals)
    _INT8_MAX = tl.constexpr(INT8_MAX)
    _MIN_SCALE_AMAX = tl.constexpr(MIN_SCALE_AMAX)

    @triton.jit
    def _larger(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        amax = tl.full((BLOCK_K,), 0.0, tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            values = tl.load(x_ptr + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(values))
        scale = tl.maximum(tl.reduce(amax, 0, _larger), _MIN_SCALE_AMAX) / _INT8_MAX
        tl.store(scale_ptr + row, scale)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            # div_rn: IEEE division, as PyTorch divides (Triton's default `/` is approximate on GPUs)
            scaled = tl.math.div_rn(tl.load(x_ptr + row * stride_x + k, mask=k < K, other=0.0).to(tl.float32), scale)
            rounded = tl.where(scaled >= 0, scaled + 0.5, scaled - 0.5).to(tl.int32)
            clamped = tl.minimum(tl.maximum(rounded, -127), 127)
            tl.store(q_ptr + row * stride_q + k, clamped.to(tl.int8), mask=k < K)

    @triton.jit
    def _int8_gemm_kernel(a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, K,
                          stride_am, stride_wn, stride_om, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        tiles_m, tiles_n = (M + BLOCK_M - 1) // BLOCK_M, (N + BLOCK_N - 1) // BLOCK_N
        group = pid // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_size = tl.minimum(tiles_m - first_m, GROUP_M)
        tile_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
        tile_n = (pid % (GROUP_M * tiles_n)) // group_size
        rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :],
                        mask=(rows[:, None] < M) & (k[None, :] < K), other=0)
            w = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None],
                        mask=(cols[None, :] < N) & (k[:, None] < K), other=0)
            acc += tl.dot(a, w, out_dtype=tl.int32)
        a_scale = tl.load(a_scale_ptr + rows, mask=rows < M, other=0.0)
        w_scale = tl.load(w_scale_ptr + cols, mask=cols < N, other=0.0)
        out = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def quantize_int8_rows_triton(x: torch.Tensor, block: int | None = None,
                              warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (M, K) int8, (M,) fp32 scales; same bits as ``quantize_int8_rows``.
    ``block`` / ``warps``: the launch shape (``row_launch_shape(K)`` by default; the tuner sweeps them)."""
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    default_block, default_warps = row_launch_shape(K)
    _quantize_rows_kernel[(M,)](x, q, scale, K, x.stride(0), q.stride(0), BLOCK_K=block or default_block,
                                enable_fp_fusion=False, num_warps=warps or default_warps)
    return q, scale


def _gemm_config(M: int, N: int) -> tuple[int, ...]:
    if INTERPRETED:
        return INTERPRET_CONFIG
    # the largest tile that still gives every SM a few programs
    for config in GEMM_CONFIGS:
        if triton.cdiv(M, config[0]) * triton.cdiv(N, config[1]) >= 264:
            return config
    return GEMM_CONFIGS[-1]


def int8_gemm_triton(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, K) int8 x (N, K) int8 -> (M, N) ``out_dtype``; same bits as ``int8_gemm_torch``."""
    a_q, w_q = a_q.contiguous(), w_q.contiguous()
    M, K = a_q.shape
    N = w_q.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    block_m, block_n, block_k, group_m, warps, stages = _gemm_config(M, N)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _int8_gemm_kernel[grid](
        a_q, w_q, out, a_scale.float().contiguous(), w_scale.float().contiguous(),
        bias if bias is not None else out, M, N, K, a_q.stride(0), w_q.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        num_warps=warps, num_stages=stages, enable_fp_fusion=False,
    )
    return out


def int8_linear_triton(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None = None,
                       activation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """W8A8 ``F.linear``: x (..., K) float, w_q (N, K) int8, w_scale (N,) -> (..., N) in x's dtype;
    ``activation``: x already quantized by ``quantize_int8_rows_triton``."""
    a_q, a_scale = activation if activation is not None else quantize_int8_rows_triton(x.reshape(-1, x.shape[-1]))
    out = int8_gemm_triton(a_q, a_scale, w_q, w_scale, bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], w_q.shape[0])
