"""Fused GGUF Q8_0 / Q4_K dequantize + GEMM in Triton: ``x @ dequant(W).T`` without writing the bf16 weight.

Where it can pay: small token counts (Sana at 1024² has 1024 tokens per image), where dequantizing a
weight to bf16 and reading it back costs as much as the GEMM itself. Each program computes a
BLOCK_M x BLOCK_N output tile; per K step it gathers the int8 codes and fp16 block scales of its
BLOCK_N weight rows straight from the packed blocks (Q8_0: 34 bytes per 32 weights, ``d`` fp16 + 32 int8;
Q4_K: 144 bytes per 256, ``d``, ``dmin``, 8 six-bit scales and mins, 4-bit codes), computes them in
fp32 as gguf-py does (``d * q``; ``(d * scale) * q - dmin * min``), rounds to the activation dtype, feeds
``tl.dot`` with an fp32 accumulator (fp32 inputs multiply in IEEE fp32, not TF32).

The reference is ``kernels/gguf_dequant_gemm_torch.py`` (dequantize, then ``F.linear``): the same
weights bit for bit, a different summation order, so results agree to fp32 / bf16 rounding, not
bit-exactly. Only core builtins inside the kernel, so the unit tests can run a copy decorated under
``TRITON_INTERPRET=1`` (see ``int8_gemm_triton.py``). BLOCK_K = 64 stays inside one 256-block.
"""

from __future__ import annotations

import os

import torch
from gguf import GGMLQuantizationType

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:
    AVAILABLE = False

Q8_0 = int(GGMLQuantizationType.Q8_0)
Q4_K = int(GGMLQuantizationType.Q4_K)
Q8_0_BLOCK, Q8_0_BYTES = 32, 34
Q4_K_BLOCK, Q4_K_BYTES = 256, 144
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K is a multiple of the 32-weight block
CONFIG = (64, 128, 64, 4, 3)
INTERPRET_CONFIG = (16, 16, 64, 1, 1)

if AVAILABLE:
    _BLOCK = tl.constexpr(Q8_0_BLOCK)
    _BLOCK_BYTES = tl.constexpr(Q8_0_BYTES)
    _K_BLOCK = tl.constexpr(Q4_K_BLOCK)
    _K_BLOCK_BYTES = tl.constexpr(Q4_K_BYTES)

    @triton.jit
    def _byte(w_ptr, offset, mask):
        return tl.load(w_ptr + offset, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _f16(w_ptr, offset, mask):
        bits = _byte(w_ptr, offset, mask) | (_byte(w_ptr, offset + 1, mask) << 8)
        return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _q4_k_tile(w_ptr, cols, k, stride_wn, N, K):
        """The (BLOCK_K, BLOCK_N) fp32 weights W[cols, k].T of Q4_K rows, in gguf-py's arithmetic:
        ``(d * scale) * q - dmin * min`` per 32-weight sub-block j of each 256-weight block."""
        mask = (k[:, None] < K) & (cols[None, :] < N)
        base = cols[None, :] * stride_wn + (k[:, None] // _K_BLOCK) * _K_BLOCK_BYTES
        e = k[:, None] % _K_BLOCK
        j, i = e // 32, e % 32
        sd = _byte(w_ptr, base + 4 + j % 4, mask)
        sm = _byte(w_ptr, base + 8 + j % 4, mask)
        smd = _byte(w_ptr, base + 12 + j % 4, mask)
        scale = tl.where(j < 4, sd & 63, (smd & 15) | ((sd >> 6) << 4))
        minimum = tl.where(j < 4, sm & 63, (smd >> 4) | ((sm >> 6) << 4))
        q = (_byte(w_ptr, base + 16 + (j // 2) * 32 + i, mask) >> ((j % 2) * 4)) & 15
        d = _f16(w_ptr, base, mask) * scale.to(tl.float32)
        dm = _f16(w_ptr, base + 2, mask) * minimum.to(tl.float32)
        return d * q.to(tl.float32) - dm

    @triton.jit
    def _q8_0_tile(w_ptr, cols, k, stride_wn, N, K):
        """The (BLOCK_K, BLOCK_N) fp32 weights W[cols, k].T of Q8_0 rows: ``d * q`` per 32-weight block."""
        mask = (k[:, None] < K) & (cols[None, :] < N)
        base = cols[None, :] * stride_wn + (k[:, None] // _BLOCK) * _BLOCK_BYTES
        q = tl.load(w_ptr + base + 2 + k[:, None] % _BLOCK, mask=mask, other=0)
        return _f16(w_ptr, base, mask) * q.to(tl.int8, bitcast=True).to(tl.float32)

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, Q4K: tl.constexpr):
        """out = x @ dequant(W).T (+ bias) for Q8_0 rows, or Q4_K rows when ``Q4K`` (a compile-time pick)."""
        tiles_n = (N + BLOCK_N - 1) // BLOCK_N
        tile_m = tl.program_id(0) // tiles_n
        tile_n = tl.program_id(0) % tiles_n
        rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :],
                        mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
            if Q4K:
                w = _q4_k_tile(w_ptr, cols, k, stride_wn, N, K).to(x.dtype)
            else:
                w = _q8_0_tile(w_ptr, cols, k, stride_wn, N, K).to(x.dtype)
            acc += tl.dot(x, w, out_dtype=tl.float32, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def q8_0_linear_triton(x: torch.Tensor, blocks: torch.Tensor, shape: tuple[int, int],
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize(blocks, Q8_0, shape).to(x.dtype), bias)`` in one kernel.

    x: (..., K) fp32 / fp16 / bf16; blocks: (N, K / 32 * 34) uint8 Q8_0 rows; shape: (N, K).
    """
    return _launch(x, blocks, shape, bias, q4_k=False)


def q4_k_linear_triton(x: torch.Tensor, blocks: torch.Tensor, shape: tuple[int, int],
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize(blocks, Q4_K, shape).to(x.dtype), bias)`` in one kernel.

    x: (..., K); blocks: (N, K / 256 * 144) uint8 Q4_K rows; shape: (N, K).
    """
    return _launch(x, blocks, shape, bias, q4_k=True)


FUSED_LINEARS = {Q8_0: q8_0_linear_triton, Q4_K: q4_k_linear_triton}


def _launch(x: torch.Tensor, blocks: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None,
            q4_k: bool):
    N, K = shape
    rows = x.reshape(-1, K).contiguous()
    blocks = blocks.reshape(N, -1).contiguous()
    out = torch.empty((rows.shape[0], N), dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, warps, stages = INTERPRET_CONFIG if INTERPRETED else CONFIG
    grid = (triton.cdiv(rows.shape[0], block_m) * triton.cdiv(N, block_n),)
    _gemm_kernel[grid](rows, blocks, bias if bias is not None else out, out, rows.shape[0], N, K,
                 rows.stride(0), blocks.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                 PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps,
                 Q4K=q4_k, num_stages=stages, enable_fp_fusion=False)
    return out.reshape(*x.shape[:-1], N)
