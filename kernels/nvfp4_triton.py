"""NVFP4 weights in Triton: a standalone dequantization and a dequant-GEMM (``x @ W.T`` with W's
e2m1 codes and e4m3 block scales decoded inside the GEMM's tiles, never written out as bf16).

For GPUs without FP4 tensor cores (capability < 10): the weight stays packed in VRAM (4.5 bits per
weight), and each K step of the GEMM decodes a (BLOCK_K, BLOCK_N) tile of it from the packed bytes
(``nvfp4_torch.py`` documents the layout: high nibble first, block scales in cuBLAS's swizzled tiles).

Both kernels build each weight exactly as ``nvfp4_torch.dequantize_nvfp4`` (and comfy-kitchen) do in
the output dtype: ``total = round(round(global) * block)``, ``w = round(value * total)``; the products
are exact in fp32 (at most 8 x 8 significant bits), so one rounding to the dtype reproduces PyTorch's
bf16 / fp16 / fp32 multiply. The decoders build e2m1 and e4m3 values from their bits (no fp8 types),
so the kernels run under ``TRITON_INTERPRET=1`` on the CPU, where the unit tests check them.
"""

from __future__ import annotations

import os

import torch

from .nvfp4_torch import BLOCK_SIZE, E4M3

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:
    AVAILABLE = False

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# GEMM tiles: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_K a multiple of the 16-weight block
GEMM_CONFIG = (128, 128, 64, 8, 3)
GEMM_INTERPRET_CONFIG = (16, 16, 32, 1, 1)
# dequantization tiles: (rows, columns, num_warps)
DEQUANT_CONFIG = (32, 256, 4)
DEQUANT_INTERPRET_CONFIG = (16, 32, 1)

if AVAILABLE:
    _BLOCK_SIZE = tl.constexpr(BLOCK_SIZE)

    @triton.jit
    def _e2m1_value(code):
        """int32 e2m1 codes -> fp32: ``2^(e-1) * (1 + m/2)``, ``m / 2`` when e = 0, sign in bit 3."""
        exponent = (code >> 1) & 3
        mantissa = code & 1
        normal = (((exponent + 126) << 23) | (mantissa << 22)).to(tl.float32, bitcast=True)
        value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.5, normal)
        return tl.where((code & 8) != 0, -value, value)

    @triton.jit
    def _e4m3_value(bits):
        """int32 e4m3 bytes -> fp32 (bias 7; subnormals ``m * 2^-9``; scales carry no NaN)."""
        exponent = (bits >> 3) & 15
        mantissa = bits & 7
        normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
        value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)
        return tl.where((bits & 128) != 0, -value, value)

    @triton.jit
    def _swizzled_offset(row, block, blocks_padded):
        """``nvfp4_torch.swizzled_offset``: scale (row, block) in 128 x 4 tiles of 32 x 16 bytes."""
        tile = (row // 128) * (blocks_padded // 4) + block // 4
        return tile * 512 + (row % 32) * 16 + ((row % 128) // 32) * 4 + block % 4

    @triton.jit
    def _round(value, DTYPE: tl.constexpr):
        """fp32 -> ``DTYPE``, to nearest-even. bf16 is rounded on the bits first: the Triton interpreter
        truncates fp32 -> bf16, and an exactly representable value converts the same either way."""
        if DTYPE == tl.bfloat16:
            bits = value.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            value = bits.to(tl.float32, bitcast=True)
        return value.to(DTYPE)

    @triton.jit
    def _weights(w_ptr, s_ptr, global_scale, row, col, mask, stride_w, blocks_padded, DTYPE: tl.constexpr):
        """W[row, col] (broadcast index tensors) in ``DTYPE``, rounded as the PyTorch reference rounds."""
        byte = tl.load(w_ptr + row * stride_w + col // 2, mask=mask, other=0).to(tl.int32)
        code = tl.where(col % 2 == 0, byte >> 4, byte & 15)
        scale_bits = tl.load(s_ptr + _swizzled_offset(row, col // _BLOCK_SIZE, blocks_padded), mask=mask, other=0)
        total = _round(_round(global_scale, DTYPE).to(tl.float32) * _e4m3_value(scale_bits.to(tl.int32)), DTYPE)
        return _round(_e2m1_value(code) * total.to(tl.float32), DTYPE)

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, g_ptr, out_ptr, N, K, stride_w, blocks_padded,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)[None, :]
        mask = (rows < N) & (cols < K)
        weights = _weights(w_ptr, s_ptr, tl.load(g_ptr), rows, cols, mask, stride_w, blocks_padded,
                           out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows * K + cols, weights, mask=mask)

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, s_ptr, g_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_w, stride_om,
                     blocks_padded, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """out = x @ W.T (+ bias); each K step decodes W[cols, k].T, (BLOCK_K, BLOCK_N), in x's dtype.
        ``UPCAST`` (interpreter only, whose bf16 ``tl.dot`` is wrong): the tiles multiply in fp32, where
        products of bf16 / fp16 values are exact, as in the tensor cores' fp32 accumulation."""
        tiles_n = (N + BLOCK_N - 1) // BLOCK_N
        tile_m = tl.program_id(0) // tiles_n
        tile_n = tl.program_id(0) % tiles_n
        rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        global_scale = tl.load(g_ptr)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :],
                        mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
            w = _weights(w_ptr, s_ptr, global_scale, cols[None, :], k[:, None],
                         (k[:, None] < K) & (cols[None, :] < N), stride_w, blocks_padded, x.dtype)
            if UPCAST:
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(x, w, out_dtype=tl.float32, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        out = _round(acc, out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out, mask=mask)


def _plain(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor):
    """The kernels' view of the three tensors: uint8 codes, uint8 scale bytes, fp32 global (1,)."""
    codes = packed.view(torch.uint8).contiguous()
    scales = block_scales.view(E4M3).view(torch.uint8).contiguous()
    return codes, scales, global_scale.to(device=codes.device, dtype=torch.float32).reshape(1)


def dequantize_nvfp4_triton(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                            dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
    """``nvfp4_torch.dequantize_nvfp4(..., dtype, shape)`` in one kernel: (N, K) of ``dtype``.

    packed: (N16, K16 / 2) uint8 / float4_e2m1fn_x2; block_scales: swizzled e4m3 (or its bytes)."""
    codes, scales, scale = _plain(packed, block_scales, global_scale)
    N, K = shape
    out = torch.empty((N, K), dtype=dtype, device=codes.device)
    block_r, block_c, warps = DEQUANT_INTERPRET_CONFIG if INTERPRETED else DEQUANT_CONFIG
    grid = (triton.cdiv(N, block_r), triton.cdiv(K, block_c))
    _dequant_kernel[grid](codes, scales, scale, out, N, K, codes.stride(0), scales.shape[1],
                          BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps, enable_fp_fusion=False)
    return out


def nvfp4_linear_triton(x: torch.Tensor, packed: torch.Tensor, block_scales: torch.Tensor,
                        global_scale: torch.Tensor, shape: tuple[int, int],
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize_nvfp4(...).to(x.dtype), bias)`` in one kernel.

    x: (..., K) fp32 / fp16 / bf16; packed, block_scales, global_scale: as stored; shape: (N, K)."""
    codes, scales, scale = _plain(packed, block_scales, global_scale)
    N, K = shape
    rows = x.reshape(-1, K).contiguous()
    out = torch.empty((rows.shape[0], N), dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, warps, stages = GEMM_INTERPRET_CONFIG if INTERPRETED else GEMM_CONFIG
    grid = (triton.cdiv(rows.shape[0], block_m) * triton.cdiv(N, block_n),)
    _gemm_kernel[grid](rows, codes, scales, scale, bias if bias is not None else out, out, rows.shape[0], N, K,
                       rows.stride(0), codes.stride(0), out.stride(0), scales.shape[1], HAS_BIAS=bias is not None,
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                       PRECISION="ieee" if x.dtype == torch.float32 or INTERPRETED else "tf32",
                       UPCAST=INTERPRETED, num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    return out.reshape(*x.shape[:-1], N)
