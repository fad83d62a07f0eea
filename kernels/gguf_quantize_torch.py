"""GGUF quantization in vectorized PyTorch (CPU or GPU): Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K, plus
the float types F32 / F16 / BF16.

gguf-py quantizes only the legacy types; the K-quants follow llama.cpp's reference quantizers
(``ggml/src/ggml-quants.c``: ``quantize_row_q4_K_ref`` / ``q5_K_ref`` with ``make_qkx2_quants``,
``quantize_row_q6_K_ref`` with ``make_qx_quants``), the same math over every block at once
instead of one block at a time, with the C code's arithmetic: ``nearest_int`` is round half to
even (``torch.round``), ``roundf`` (Q8_0) is half away from zero, the ``(int8_t)(x + 8.5f)`` of
Q4_0 / Q5_0 truncates, sums run left to right in fp32, ``c / t`` is a true division and square
roots are correctly rounded. On the CPU the bytes equal llama.cpp's reference quantizers (and
gguf-py's for the legacy types); tests pin digests of them. On a GPU fp32 division and sqrt are
also IEEE, so the bytes should match as well (the gpu tests compare them with the CPU's). What
matters for loading is the round trip through the bit-exact dequantizers at the error bounds of
``test_gguf_quantize.py``.

The block layouts are those of ``gguf_dequant_torch.py``; ``_pack`` is the inverse of its ``_unpack``.
"""

from __future__ import annotations

from typing import Callable

import torch
from gguf import GGMLQuantizationType

from .gguf_types import block_layout

Q = GGMLQuantizationType

QUANTIZE_TYPES: tuple[GGMLQuantizationType, ...] = (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)
# Weights quantized per pass: on the CPU 256 K keeps the ~20 fp32 temporaries in cache (measured
# 0.7 s per 4 M weights for Q4_K on 2 cores, against 2.0 s at 4 M per pass); a GPU wants big passes.
CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}
GROUP_MAX_EPS = 1e-15  # llama.cpp: a group this small is all zeros


# ----------------------------------------------------------------------------------------------
# bit packing and rounding
# ----------------------------------------------------------------------------------------------


def _pack(fields: torch.Tensor, chunk: int, width: int) -> torch.Tensor:
    """Inverse of ``_unpack``: (n, k * 8 / width) small ints -> (n, k) uint8, chunk by chunk."""
    n = fields.shape[0]
    per_byte = 8 // width
    shifts = torch.arange(0, 8, width, dtype=torch.int32, device=fields.device).view(1, 1, -1, 1)
    grouped = (fields.to(torch.int32) & ((1 << width) - 1)).view(n, -1, per_byte, chunk) << shifts
    return grouped.sum(dim=2, dtype=torch.int32).to(torch.uint8).view(n, -1)


def _f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """(n,) or (n, 1) fp32 -> (n, 2) uint8 of the fp16 (round to nearest even, like GGML_FP32_TO_FP16)."""
    return values.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def _round_away(values: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (half away from zero), written as gguf-py's ``np_roundf`` so no fp32 sum rounds up."""
    magnitude = values.abs()
    floored = magnitude.floor()
    return torch.sign(values) * (floored + torch.floor(2 * (magnitude - floored)))


def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude of each row, sign kept (first one on ties): (n, k) -> (n, 1)."""
    return blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))


def _f32_mul(a: float, b: float) -> float:
    """``a * b`` rounded to fp32 as the C code computes grid constants (``rdelta*is``)."""
    return float(torch.tensor(a, dtype=torch.float32) * b)


def _f32_sum(*terms: float) -> float:
    """Left-to-right fp32 sum of the constants (``rmin + rdelta*is + nmax``)."""
    total = torch.tensor(terms[0], dtype=torch.float32)
    for term in terms[1:]:
        total = total + torch.tensor(term, dtype=torch.float32)
    return float(total)


def _row_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim, left to right in fp32: (..., n, k) -> (..., n, 1).

    The order and precision of the C loops, so the K-quants pick the same candidates as llama.cpp
    on every device (``sum`` is pairwise and ``cumsum`` accumulates in fp64 on the CPU; both flip
    near-ties). Stack several sums on a leading dim to pay the k additions once.
    """
    columns = values.movedim(-1, 0).contiguous()
    total = columns[0].clone()
    for column in columns[1:]:
        total += column
    return total.unsqueeze(-1)


def _over(numerator: float, values: torch.Tensor) -> torch.Tensor:
    """``numerator / values`` as a true fp32 division (``2.0 / t`` in torch is ``t.reciprocal() * 2.0``,
    which rounds differently from the C code's division)."""
    return torch.full_like(values, numerator) / values


def _safe_inverse(values: torch.Tensor) -> torch.Tensor:
    return torch.where(values == 0, 0.0, _over(1, torch.where(values == 0, 1, values)))


# ----------------------------------------------------------------------------------------------
# legacy types (32 per block)
# ----------------------------------------------------------------------------------------------


def quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) fp32 -> (n, 34): d = absmax / 127, q = roundf(x / d)."""
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = _round_away(blocks * _safe_inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=1)


def _legacy_symmetric(blocks: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q5_0: d = max / -(levels / 2), q = min(levels - 1, trunc(x / d + levels / 2 + 0.5))."""
    d = _signed_absmax(blocks) / -(levels // 2)
    q = torch.clamp(torch.trunc(blocks * _safe_inverse(d) + (levels // 2 + 0.5)), 0, levels - 1)
    return d, q.to(torch.int32)


def quantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) -> (n, 18): d · 16 bytes of nibbles (elements 0-15 low, 16-31 high)."""
    d, q = _legacy_symmetric(blocks, 16)
    return torch.cat([_f16_bytes(d), _pack(q, 16, 4)], dim=1)


def quantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 32) -> (n, 22): d · qh (u32 of fifth bits) · 16 bytes of low nibbles."""
    d, q = _legacy_symmetric(blocks, 32)
    return torch.cat([_f16_bytes(d), _pack(q >> 4, 1, 1), _pack(q, 16, 4)], dim=1)


# ----------------------------------------------------------------------------------------------
# K-quants with a min (Q4_K, Q5_K): 8 sub-blocks of 32, 6-bit scales and mins
# ----------------------------------------------------------------------------------------------


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's affine fit of each row: x ≈ scale * L - the_min, L in [0, nmax], weighted squares.

    x, weights: (n, k) fp32. Tries ``nstep + 1`` grid stretches and keeps the least weighted error.
    Returns scale (n, 1), the_min (n, 1) (>= 0) and L (n, k) int32.
    """
    low = torch.clamp(x.amin(dim=1, keepdim=True), max=0)
    high = x.amax(dim=1, keepdim=True)
    flat = high == low
    sum_w = _row_sum(weights)
    sum_x = _row_sum(weights * x)

    def levels(stretch: float | int, minimum: torch.Tensor) -> torch.Tensor:
        span = high - minimum
        iscale = _over(stretch, torch.where(span > 0, span, 1))
        return torch.clamp(torch.round(iscale * (x - minimum)), 0, nmax)

    def error(scale: torch.Tensor, minimum: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        return _row_sum(weights * (scale * L + minimum - x) ** 2)

    minimum = low
    scale = _over(1, _over(nmax, torch.where(flat, 1, high - low)))
    L = levels(nmax, minimum)
    best = error(scale, minimum, L)
    for step in range(nstep + 1):
        # As in the C loop, each stretch is taken from the best min found so far, not the first.
        candidate = levels(_f32_sum(rmin, _f32_mul(rdelta, step), nmax), minimum)
        weighted = weights * candidate
        sum_l, sum_l2, sum_xl = _row_sum(torch.stack([weighted, weighted * candidate, weighted * x]))
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe_det = torch.where(ok, det, 1)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0  # the fit wants a positive offset: pin the min at 0 instead
        this_scale = torch.where(positive, sum_xl / torch.where(ok, sum_l2, 1), this_scale)
        this_min = torch.where(positive, 0.0, this_min)
        this_error = error(this_scale, this_min, candidate)
        better = ok & (this_error < best)
        L = torch.where(better, candidate, L)
        best = torch.where(better, this_error, best)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    minimum = torch.where(flat, low, minimum)
    L = torch.where(flat, torch.zeros_like(L), L)
    return scale, -minimum, L.to(torch.int32)


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins -> the 12 bytes ``get_scale_min_k4`` reads: (n, 8) x2 -> (n, 12)."""
    low_s, high_s, low_m, high_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    packed = torch.cat([low_s | ((high_s >> 4) << 6), low_m | ((high_m >> 4) << 6),
                        (high_s & 15) | ((high_m & 15) << 4)], dim=1)
    return packed.to(torch.uint8)


def _quantize_k_affine(blocks: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K shared part: (n, 256) -> header bytes (n, 16: d, dmin, scales) and L (n, 256)."""
    n = blocks.shape[0]
    x = blocks.view(n * 8, 32)
    # sqrt in fp64 then rounded: a correctly rounded fp32 sqrt (torch's CPU fp32 sqrt is not).
    weights = (_row_sum(x * x) / 32).double().sqrt().float() + x.abs()
    scales, mins, L = make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep)
    scales, mins = scales.view(n, 8), mins.view(n, 8)
    max_scale, max_min = scales.amax(dim=1, keepdim=True), mins.amax(dim=1, keepdim=True)
    max_scale = torch.where(max_scale > 0, max_scale, 0.0)  # +0.0, as the C loop starts from (not -0.0)
    max_min = torch.where(max_min > 0, max_min, 0.0)
    ls = torch.clamp(torch.round(scales * torch.where(max_scale > 0, _over(63, max_scale), 0.0)), 0, 63).to(torch.int32)
    lm = torch.clamp(torch.round(mins * torch.where(max_min > 0, _over(63, max_min), 0.0)), 0, 63).to(torch.int32)
    d = (max_scale / 63).to(torch.float16)
    dmin = (max_min / 63).to(torch.float16)
    # Requantize against the scales as the file will hold them (fp16 d times the 6-bit scale).
    sub_d = (d.float() * ls.float()).view(n * 8, 1)
    sub_m = (dmin.float() * lm.float()).view(n * 8, 1)
    requantized = torch.clamp(torch.round((x + sub_m) / torch.where(sub_d == 0, 1, sub_d)), 0, nmax)
    L = torch.where(sub_d == 0, L, requantized.to(torch.int32)).view(n, 256)
    header = torch.cat([d.view(torch.uint8), dmin.view(torch.uint8), _pack_k_scales(ls, lm)], dim=1)
    return header, L


def quantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 256) -> (n, 144): d · dmin · scales[12] · qs[128] (4-bit L)."""
    header, L = _quantize_k_affine(blocks, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    return torch.cat([header, _pack(L, 32, 4)], dim=1)


def quantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 256) -> (n, 176): d · dmin · scales[12] · qh[32] (fifth bits) · qs[128] (low 4 bits)."""
    header, L = _quantize_k_affine(blocks, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
    return torch.cat([header, _pack(L >> 4, 32, 1), _pack(L, 32, 4)], dim=1)


# ----------------------------------------------------------------------------------------------
# Q6_K: 16 sub-blocks of 16, symmetric 6-bit, int8 scales
# ----------------------------------------------------------------------------------------------


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's symmetric fit (``rmse_type`` 1: weights x²): x ≈ scale * (L - nmax), L in [0, 2 nmax).

    x: (n, k) fp32. Tries 19 grid stretches around ``-nmax / max``. Returns scale (n, 1), L (n, k) int32.
    """
    peak = _signed_absmax(x)
    zero = peak.abs() < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    weights = x * x

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = torch.clamp(torch.round(iscale * x), -nmax, nmax - 1)
        sum_lx, sum_l2 = _row_sum(torch.stack([weights * x * levels, weights * levels * levels]))
        return levels, sum_lx, sum_l2

    levels, sum_lx, sum_l2 = fit(_over(-nmax, peak))
    scale = torch.where(sum_l2 != 0, sum_lx / torch.where(sum_l2 != 0, sum_l2, 1), 0.0)
    best = scale * sum_lx
    for step in (*range(-9, 0), *range(1, 10)):
        candidate, cand_lx, cand_l2 = fit(_over(-_f32_sum(nmax, _f32_mul(0.1, step)), peak))
        better = (cand_l2 > 0) & (cand_lx * cand_lx > best * cand_l2)
        levels = torch.where(better, candidate, levels)
        scale = torch.where(better, cand_lx / torch.where(better, cand_l2, 1), scale)
        best = torch.where(better, scale * cand_lx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(levels), levels + nmax)
    return scale, L.to(torch.int32)


def quantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 256) -> (n, 210): ql[128] (low 4 bits) · qh[64] (high 2 bits) · scales int8[16] · d."""
    n = blocks.shape[0]
    x = blocks.view(n * 16, 16)
    scales, L = make_qx_quants(x, nmax=32)
    scales = scales.view(n, 16)
    max_scale = _signed_absmax(scales)
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = _over(-128, torch.where(zero, 1, max_scale))
    d = torch.where(zero, 0.0, _over(1, iscale)).to(torch.float16)
    sc = torch.clamp(torch.round(iscale * scales), -128, 127).to(torch.int8)
    sub_d = (d.float() * sc.float()).view(n * 16, 1)
    requantized = torch.clamp(torch.round(x / torch.where(sub_d == 0, 1, sub_d)), -32, 31) + 32
    L = torch.where(sub_d == 0, L, requantized.to(torch.int32)).view(n, 256)
    block = torch.cat([_pack(L, 64, 4), _pack(L >> 4, 32, 2), sc.view(torch.uint8), d.view(torch.uint8)], dim=1)
    return torch.where(zero, torch.zeros_like(block), block)


# ----------------------------------------------------------------------------------------------
# float types and the public entry
# ----------------------------------------------------------------------------------------------


def quantize_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.uint8)


def quantize_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.to(torch.float16).view(torch.uint8)


def quantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.to(torch.bfloat16).view(torch.uint8)  # round to nearest even, like gguf-py


QUANTIZE_TORCH: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.F32: quantize_f32, Q.F16: quantize_f16, Q.BF16: quantize_bf16,
    Q.Q8_0: quantize_q8_0, Q.Q4_0: quantize_q4_0, Q.Q5_0: quantize_q5_0,
    Q.Q4_K: quantize_q4_k, Q.Q5_K: quantize_q5_k, Q.Q6_K: quantize_q6_k,
}


def quantize(weights: torch.Tensor, qtype: int) -> torch.Tensor:
    """A weight (any shape, last dim a multiple of the block size) -> its GGUF bytes.

    Returns ``(rows, bytes_per_row)`` uint8 on ``weights``' device, rows = product of all but the
    last dim: the layout ``gguf_reader`` gives back. Math is in fp32, ``CHUNK_ELEMENTS`` at a time.
    Raises ValueError for a type without a quantizer, a row that is not whole blocks, or a
    non-finite weight (a block's scale would be inf/NaN).
    """
    qtype = Q(int(qtype))
    if qtype not in QUANTIZE_TORCH:
        raise ValueError(f"no quantizer for {qtype.name}; expected one of "
                         + ", ".join(t.name for t in QUANTIZE_TYPES))
    block_size, type_size = block_layout(qtype)
    row = weights.shape[-1] if weights.dim() else 1
    if row % block_size:
        raise ValueError(f"rows of {row} elements are not whole {qtype.name} blocks of {block_size}")
    rows = weights.numel() // max(row, 1)
    flat = weights.detach().reshape(-1, block_size).to(torch.float32)
    if qtype not in (Q.F32, Q.F16, Q.BF16) and not torch.isfinite(flat).all():
        raise ValueError(f"cannot quantize to {qtype.name}: the weight has inf or NaN values")
    step = max(1, CHUNK_ELEMENTS.get(weights.device.type, 1 << 20) // block_size)
    chunks = [QUANTIZE_TORCH[qtype](flat[i:i + step]) for i in range(0, flat.shape[0], step)]
    out = torch.cat(chunks) if chunks else torch.empty(0, type_size, dtype=torch.uint8, device=weights.device)
    return out.reshape(rows, -1)
