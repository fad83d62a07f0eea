"""8-bit attention in Triton (issue #16), and its public entry point ``attention(q, k, v, accurate=False)``.

Same numbers as ``kernels/attention_8bit_torch.py`` (its docstring gives the design; tested under
``TRITON_INTERPRET=1``). Three kernels per call:

- ``_quantize_int8_kernel``: Q per token (softmax scale and log2(e) folded into the scale) and the
  smoothed K per block of BLOCK_N tokens, into zero-padded int8 copies (B*H, L_pad, D), so the
  attention loop loads whole tiles without masks.
- ``_quantize_values_kernel`` (fast mode): V to e4m3 with per-channel scales, stored transposed
  (B*H, D, Lk_pad): Hopper's FP8 tensor cores take only K-major operands, and in P.V the keys are K.
- ``attention_kernel``: one program per BLOCK_M queries of one head; INT8 Q.Kᵀ into int32, online
  softmax in fp32 with ``exp2``, P.V in FP8 (fast) or in V's dtype (accurate), fp32 accumulator.
  Only the tail key block is masked.

Fast mode needs FP8 tensor cores (compute capability 8.9+); below that ``attention`` runs the
accurate mode and logs it once. Without Triton or CUDA it runs the PyTorch twin.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from .attention_8bit_torch import (
    P_LOG2_SCALE,
    attention_8bit_torch,
    key_means,
    softmax_log2_scale,
    value_scales,
)
from .fp8_linear import FP8_DTYPE, FP8_MAX
from .int8_gemm_torch import INT8_MAX, MIN_SCALE_AMAX

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # the pack still works, on the PyTorch twin
    AVAILABLE = False

LOG = logging.getLogger(__name__)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
FP8_CAPABILITY = (8, 9)  # Ada; Hopper and Blackwell too
HEAD_DIMS = (64, 128)
# mode -> (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_N is also the K quantization block.
# The interpreter gets small tiles so CPU tests walk several key blocks in seconds.
CONFIGS = {"fast": (128, 128, 8, 3), "accurate": (128, 128, 8, 3)}
INTERPRET_CONFIG = (16, 16, 1, 1)
# kernel switches (comments at their use), kept as options for the tuner's on/off comparison.
# PREFETCH_SCORES on: 30.1 vs 33.7 ms fast, 39.0 vs 39.5 ms accurate at Wan-14B's shape (H100, 2026-12-07,
# bench_attention.py --sweep; bench/RESULTS.md)
KERNEL_OPTIONS = {"EXACT_INT_TO_FLOAT": True, "PV_PROMOTE": True, "PREFETCH_SCORES": True}

# Only core builtins and our own jit functions inside the kernels (no tl.zeros / tl.max / tl.sum from
# triton.language.standard): a copy of this module decorated under TRITON_INTERPRET=1 then runs on
# CPU even when Triton was imported earlier without it (the unit tests do exactly that).
if AVAILABLE:
    _INT8_MAX = tl.constexpr(INT8_MAX)
    _FP8_MAX = tl.constexpr(FP8_MAX)
    _MIN_SCALE_AMAX = tl.constexpr(MIN_SCALE_AMAX)

    @triton.jit
    def _larger(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _add(a, b):
        return a + b

    # The interpreter's fp32 -> fp8 / bf16 / fp16 casts truncate (and its fp8 cast drops the mantissa
    # carry: 127.9 becomes 64, not 128), and its dot multiplies the raw bits of 16-bit floats. Under it
    # (INTERPRETER) the kernels round to nearest even themselves, so the casts are exact, and multiply
    # 16-bit operands as fp32 (the same values). GPUs round in the cast and need none of this.
    @triton.jit
    def _round_mantissa(x, DROP: tl.constexpr):
        """fp32 -> the nearest fp32 with the low DROP mantissa bits zero (ties to even), normal range."""
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & -(1 << DROP)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _round_to_e4m3(x):
        """fp32 within +-448 -> the nearest e4m3 value, still fp32."""
        subnormal = ((x * 512.0 + 12582912.0) - 12582912.0) / 512.0  # e4m3 spacing below 2^-6 is 2^-9
        return tl.where(tl.abs(x) < 0.015625, subnormal, _round_mantissa(x, 20))

    @triton.jit
    def _quantize_int8_kernel(x_ptr, mean_ptr, codes_ptr, scale_ptr, L, L_pad, H, stride_xb, stride_xh,
                              stride_xl, scale_factor, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                              PER_TOKEN: tl.constexpr, SMOOTH: tl.constexpr):
        block, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rows = block * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, HEAD_DIM)
        inside = rows[:, None] < L
        x = tl.load(x_ptr + (bh // H) * stride_xb + (bh % H) * stride_xh + rows[:, None] * stride_xl + d[None, :],
                    mask=inside, other=0.0).to(tl.float32)
        if SMOOTH:  # padded rows stay zero, so they do not widen the block's range
            x = tl.where(inside, x - tl.load(mean_ptr + bh * HEAD_DIM + d)[None, :], 0.0)
        amax = tl.reduce(tl.abs(x), 1, _larger)
        if PER_TOKEN:
            scale = tl.maximum(amax, _MIN_SCALE_AMAX) / _INT8_MAX
            scaled = tl.math.div_rn(x, scale[:, None])
            tl.store(scale_ptr + bh * L_pad + rows, scale * scale_factor)
        else:
            scale = tl.maximum(tl.reduce(amax, 0, _larger), _MIN_SCALE_AMAX) / _INT8_MAX
            scaled = tl.math.div_rn(x, scale)
            tl.store(scale_ptr + bh * (L_pad // BLOCK) + block, scale * scale_factor)
        rounded = tl.where(scaled >= 0, scaled + 0.5, scaled - 0.5).to(tl.int32)
        codes = tl.minimum(tl.maximum(rounded, -127), 127).to(tl.int8)
        tl.store(codes_ptr + bh * L_pad * HEAD_DIM + rows[:, None] * HEAD_DIM + d[None, :], codes)

    @triton.jit
    def _quantize_values_kernel(v_ptr, scale_ptr, codes_ptr, L, L_pad, H, stride_vb, stride_vh, stride_vl,
                                HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, INTERPRETER: tl.constexpr):
        block, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        rows = block * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, HEAD_DIM)
        v = tl.load(v_ptr + (bh // H) * stride_vb + (bh % H) * stride_vh + rows[:, None] * stride_vl + d[None, :],
                    mask=rows[:, None] < L, other=0.0).to(tl.float32)
        scaled = tl.math.div_rn(v, tl.load(scale_ptr + bh * HEAD_DIM + d)[None, :])
        scaled = tl.minimum(tl.maximum(scaled, -_FP8_MAX), _FP8_MAX)
        if INTERPRETER:
            scaled = _round_to_e4m3(scaled)
        # transposed (keys contiguous): the K-major B operand of the FP8 P.V product
        tl.store(codes_ptr + bh * HEAD_DIM * L_pad + d[None, :] * L_pad + rows[:, None], scaled.to(tl.float8e4nv))

    @triton.jit
    def _scores(q, k_ptrs, start, HEAD_DIM: tl.constexpr, EXACT_INT_TO_FLOAT: tl.constexpr):
        """(BLOCK_M, BLOCK_N) int32 Q.Kᵀ of the codes for the keys from ``start`` (offset by 0x4B400000
        with EXACT_INT_TO_FLOAT, see ``_attend``); an async MMA on Hopper until its result is read."""
        scores = tl.dot(q, tl.load(k_ptrs + start * HEAD_DIM), out_dtype=tl.int32)
        if EXACT_INT_TO_FLOAT:
            scores = scores + 0x4B400000
        return scores

    @triton.jit
    def _attend(acc, m_i, l_i, scores, c, v_ptrs, k_scale, start, Lk, stride_vn,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, FP8_PV: tl.constexpr,
                P_LOG2: tl.constexpr, DROP_BITS: tl.constexpr, EXACT_INT_TO_FLOAT: tl.constexpr,
                PV_PROMOTE: tl.constexpr, INTERPRETER: tl.constexpr):
        """One key block of the online softmax, from its ``_scores``; returns the updated (acc, m_i, l_i)."""
        if EXACT_INT_TO_FLOAT:
            # |score| <= 127 * 127 * 128 < 2^22, so the bits of 1.5 * 2^23 + score are 0x4B400000 + score:
            # one float add instead of an I2F conversion, which issues at the exp2 rate
            scores = scores.to(tl.float32, bitcast=True) - 12582912.0
        else:
            scores = scores.to(tl.float32)
        cols = start + tl.arange(0, BLOCK_N)
        if MASKED:
            scores = tl.where(cols[None, :] < Lk, scores, float("-inf"))
        c_block = c * k_scale
        m_new = tl.maximum(m_i, tl.reduce(scores, 1, _larger) * c_block)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores * c_block[:, None] - (m_new - P_LOG2)[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _add)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs + start * stride_vn, mask=cols[:, None] < Lk, other=0.0)
        else:
            v = tl.load(v_ptrs + start * stride_vn)
        if FP8_PV:
            if INTERPRETER:
                p = _round_to_e4m3(p)
            # PV_PROMOTE: Hopper's FP8 MMA adds into its accumulator with ~22-bit precision; a fresh
            # accumulator per key block, added in fp32, keeps 256 blocks of sums exact enough
            acc = tl.dot(p.to(tl.float8e4nv), v, acc, out_dtype=tl.float32,
                         max_num_imprecise_acc=BLOCK_N if PV_PROMOTE else None)
        elif INTERPRETER:
            acc = tl.dot(_round_mantissa(p, DROP_BITS), v.to(tl.float32), acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, out_dtype=tl.float32)
        return acc, m_new, l_i

    @triton.jit
    def attention_kernel(q_ptr, q_scale_ptr, k_ptr, k_scale_ptr, v_ptr, v_scale_ptr, out_ptr,
                          Lq, Lk, H, Lq_pad, Lk_pad, stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_ob, stride_oh, stride_ol,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          FP8_PV: tl.constexpr, P_LOG2: tl.constexpr, DROP_BITS: tl.constexpr,
                          EXACT_INT_TO_FLOAT: tl.constexpr, PV_PROMOTE: tl.constexpr,
                          PREFETCH_SCORES: tl.constexpr, INTERPRETER: tl.constexpr):
        block_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        n = tl.arange(0, BLOCK_N)
        q = tl.load(q_ptr + bh * Lq_pad * HEAD_DIM + rows[:, None] * HEAD_DIM + d[None, :])
        c = tl.load(q_scale_ptr + bh * Lq_pad + rows)
        k_ptrs = k_ptr + bh * Lk_pad * HEAD_DIM + n[None, :] * HEAD_DIM + d[:, None]  # (D, BLOCK_N): Kᵀ
        v_ptrs = v_ptr + b * stride_vb + h * stride_vh + n[:, None] * stride_vn + d[None, :] * stride_vd
        k_scale_ptrs = k_scale_ptr + bh * (Lk_pad // BLOCK_N)
        acc = tl.full((BLOCK_M, HEAD_DIM), 0.0, tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
        full_end = (Lk // BLOCK_N) * BLOCK_N
        if PREFETCH_SCORES:
            # the next block's Q.Kᵀ is issued before this block's softmax, so the tensor cores work
            # on it while the softmax runs (FA3's intra-warpgroup overlap, written out by hand)
            if full_end > 0:
                scores = _scores(q, k_ptrs, 0, HEAD_DIM, EXACT_INT_TO_FLOAT)
                for start in range(0, full_end - BLOCK_N, BLOCK_N):
                    next_scores = _scores(q, k_ptrs, start + BLOCK_N, HEAD_DIM, EXACT_INT_TO_FLOAT)
                    acc, m_i, l_i = _attend(acc, m_i, l_i, scores, c, v_ptrs, tl.load(k_scale_ptrs + start // BLOCK_N),
                                            start, Lk, stride_vn, BLOCK_N, False, FP8_PV, P_LOG2, DROP_BITS,
                                            EXACT_INT_TO_FLOAT, PV_PROMOTE, INTERPRETER)
                    scores = next_scores
                last = full_end - BLOCK_N
                acc, m_i, l_i = _attend(acc, m_i, l_i, scores, c, v_ptrs, tl.load(k_scale_ptrs + last // BLOCK_N),
                                        last, Lk, stride_vn, BLOCK_N, False, FP8_PV, P_LOG2, DROP_BITS,
                                        EXACT_INT_TO_FLOAT, PV_PROMOTE, INTERPRETER)
        else:
            for start in range(0, full_end, BLOCK_N):
                acc, m_i, l_i = _attend(acc, m_i, l_i, _scores(q, k_ptrs, start, HEAD_DIM, EXACT_INT_TO_FLOAT), c,
                                        v_ptrs, tl.load(k_scale_ptrs + start // BLOCK_N), start, Lk, stride_vn,
                                        BLOCK_N, False, FP8_PV, P_LOG2, DROP_BITS, EXACT_INT_TO_FLOAT, PV_PROMOTE,
                                        INTERPRETER)
        if full_end < Lk:
            acc, m_i, l_i = _attend(acc, m_i, l_i, _scores(q, k_ptrs, full_end, HEAD_DIM, EXACT_INT_TO_FLOAT), c,
                                    v_ptrs, tl.load(k_scale_ptrs + full_end // BLOCK_N), full_end, Lk, stride_vn,
                                    BLOCK_N, True, FP8_PV, P_LOG2, DROP_BITS, EXACT_INT_TO_FLOAT, PV_PROMOTE,
                                    INTERPRETER)
        out = acc / l_i[:, None]
        if FP8_PV:
            out = out * tl.load(v_scale_ptr + bh * HEAD_DIM + d)[None, :]
        if INTERPRETER:
            out = _round_mantissa(out, DROP_BITS)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_ol + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rows[:, None] < Lq)


_DROPPED_BITS = {torch.bfloat16: 16, torch.float16: 13}  # fp32 mantissa bits each 16-bit float lacks


def _padded(length: int, block: int) -> int:
    return math.ceil(length / block) * block


def _quantize_int8(x: torch.Tensor, block: int, per_token: bool, mean: torch.Tensor | None,
                   scale_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, D) -> int8 codes (B*H, L_pad, D) and fp32 scales: (B*H, L_pad) per token or
    (B*H, L_pad / block) per block (L_pad: L rounded up to a whole block); ``mean`` (B, H, D) is
    subtracted first (K smoothing)."""
    B, H, L, D = x.shape
    L_pad = _padded(L, block)
    codes = torch.empty((B * H, L_pad, D), dtype=torch.int8, device=x.device)
    scale = torch.empty((B * H, L_pad if per_token else L_pad // block), dtype=torch.float32, device=x.device)
    _quantize_int8_kernel[(L_pad // block, B * H)](
        x, mean if mean is not None else scale, codes, scale, L, L_pad, H, x.stride(0), x.stride(1), x.stride(2),
        scale_factor, HEAD_DIM=D, BLOCK=block, PER_TOKEN=per_token, SMOOTH=mean is not None)
    return codes, scale


def _quantize_values(v: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, Lk, D) -> e4m3 codes (B*H, D, Lk_pad), zero past Lk, and (B, H, D) fp32 channel scales."""
    B, H, L, D = v.shape
    L_pad = _padded(L, block)
    scale = value_scales(v).contiguous()
    codes = torch.empty((B * H, D, L_pad), dtype=FP8_DTYPE, device=v.device)
    _quantize_values_kernel[(L_pad // block, B * H)](
        v, scale, codes, L, L_pad, H, v.stride(0), v.stride(1), v.stride(2), HEAD_DIM=D, BLOCK=block,
        INTERPRETER=INTERPRETED)
    return codes, scale


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, accurate: bool = False,
                     config: tuple[int, int, int, int] | None = None, **options: bool) -> torch.Tensor:
    """The Triton path of ``attention`` (no fallbacks). ``config``: (BLOCK_M, BLOCK_N, num_warps,
    num_stages), ``CONFIGS`` by default; BLOCK_N is also K's quantization block (the twin's ``block_n``).
    ``options``: overrides of ``KERNEL_OPTIONS`` (for the tuner)."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    block_m, block_n, warps, stages = config or (INTERPRET_CONFIG if INTERPRETED else
                                                 CONFIGS["accurate" if accurate else "fast"])
    q_codes, q_scale = _quantize_int8(q, block_m, True, None, softmax_log2_scale(D))
    k_codes, k_scale = _quantize_int8(k, block_n, False, key_means(k).contiguous(), 1.0)
    if accurate:
        values, v_scale, v_strides = v, q_scale, (v.stride(0), v.stride(1), v.stride(2), 1)
    else:
        values, v_scale = _quantize_values(v, block_n)
        v_strides = (H * D * values.shape[2], D * values.shape[2], 1, values.shape[2])
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    attention_kernel[(q_codes.shape[1] // block_m, B * H)](
        q_codes, q_scale, k_codes, k_scale, values, v_scale, out, Lq, Lk, H, q_codes.shape[1], k_codes.shape[1],
        *v_strides, out.stride(0), out.stride(1), out.stride(2), HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        FP8_PV=not accurate, P_LOG2=0.0 if accurate else P_LOG2_SCALE, DROP_BITS=_DROPPED_BITS[q.dtype],
        INTERPRETER=INTERPRETED, **{**KERNEL_OPTIONS, **options},
        num_warps=warps, num_stages=stages)
    return out


def fp8_supported(device: torch.device) -> bool:
    """Whether ``device`` has FP8 tensor cores (fast mode); the interpreter emulates them anywhere."""
    return INTERPRETED or torch.cuda.get_device_capability(device) >= FP8_CAPABILITY


_warned_no_fp8 = set()


def _fast_or_accurate(device: torch.device, accurate: bool) -> bool:
    """``accurate``, or True with a one-time log line where the GPU cannot run fast mode."""
    if accurate or fp8_supported(device):
        return accurate
    name = torch.cuda.get_device_name(device)
    if name not in _warned_no_fp8:
        _warned_no_fp8.add(name)
        LOG.warning("Velox 8-bit attention: %s has no FP8 tensor cores (compute capability %s < 8.9); "
                    "using the accurate mode (INT8 Q.K, 16-bit P.V)", name, torch.cuda.get_device_capability(device))
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, accurate: bool = False) -> torch.Tensor:
    """Scaled dot-product attention (no mask) with 8-bit Q.Kᵀ: q (B, H, Lq, D), k and v (B, H, Lk, D),
    bf16 or fp16, D in (64, 128) -> (B, H, Lq, D) in q's dtype.

    ``accurate=False``: FP8 P.V (about 4e-2 relative L2 vs fp32 attention); ``accurate=True``: 16-bit
    P.V (about 1.5e-2), which also runs on GPUs without FP8. CPU tensors or no Triton: the PyTorch twin.
    """
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"8-bit attention takes bf16 or fp16 q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in HEAD_DIMS or k.shape[-1] != q.shape[-1] or v.shape != k.shape or k.shape[:2] != q.shape[:2]:
        raise ValueError(f"8-bit attention takes q (B, H, Lq, D), k and v (B, H, Lk, D) with D in {HEAD_DIMS}; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (AVAILABLE and (q.is_cuda or INTERPRETED)):
        return attention_8bit_torch(q, k, v, accurate)
    return attention_triton(q, k, v, _fast_or_accurate(q.device, accurate))
