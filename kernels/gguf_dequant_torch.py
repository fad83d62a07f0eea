"""GGUF dequantization in vectorized PyTorch: the fallback and the oracle of the Triton kernels.

Written from the block layouts of gguf-py (``gguf/quants.py``), and bit-exact with its numpy
``dequantize`` in fp32: every product is rounded in the same order (``(d * scale) * q - dmin * m``),
with no fused multiply-add, so the two agree to the last bit.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from gguf import GGMLQuantizationType

from ..errors import VeloxLoadError
from .gguf_types import IQ4_NL_VALUES, block_layout, check_supported

Q = GGMLQuantizationType


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte ``start`` of every block, as fp32: (n, type_size) uint8 -> (n, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _unpack(packed: torch.Tensor, chunk: int, width: int) -> torch.Tensor:
    """Split bytes into ``width``-bit fields, chunk by chunk: (n, k) uint8 -> (n, k * 8 / width) int32.

    Within each run of ``chunk`` bytes, all lowest fields come first, then the next ones up; this is
    how every GGUF type lays out its nibbles, 2-bit crumbs and high-bit masks.
    """
    n = packed.shape[0]
    shifts = torch.arange(0, 8, width, dtype=torch.int32, device=packed.device).view(1, 1, -1, 1)
    fields = (packed.to(torch.int32).view(n, -1, 1, chunk) >> shifts) & ((1 << width) - 1)
    return fields.view(n, -1)


def _qh32(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The 32 fifth bits of Q5_0 / Q5_1, little-endian u32 at ``start``: (n, type_size) -> (n, 32)."""
    return _unpack(blocks[:, start:start + 4], chunk=1, width=1)


@functools.lru_cache(maxsize=None)
def iq4_code_book(device: torch.device) -> torch.Tensor:
    """The 16 IQ4 values as fp32 on ``device``, made once per device (no copy per call: every Triton
    dequantization takes it, and a per-call host-to-device copy costs more than a small kernel)."""
    return _code_book(torch.device(device))


@functools.lru_cache(maxsize=None)
def _code_book(device: torch.device) -> torch.Tensor:
    return torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=device)


def dequantize_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def dequantize_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).float()


def dequantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    # A shift of the bits, not a conversion, so NaN payloads survive as gguf-py keeps them.
    return (blocks.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8).float() * _f16(blocks, 0)


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * (_unpack(blocks[:, 2:], 16, 4) - 8).float()


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * _unpack(blocks[:, 4:], 16, 4).float() + _f16(blocks, 2)


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _unpack(blocks[:, 6:], 16, 4) | (_qh32(blocks, 2) << 4)
    return _f16(blocks, 0) * (q - 16).float()


def dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    q = _unpack(blocks[:, 8:], 16, 4) | (_qh32(blocks, 4) << 4)
    return _f16(blocks, 0) * q.float() + _f16(blocks, 2)


def dequantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """Layout: scales[16] (low nibble scale, high nibble min) · qs[64] 2-bit · d · dmin."""
    n = blocks.shape[0]
    scales = blocks[:, :16].to(torch.int32)
    dl = (_f16(blocks, 80) * (scales & 15).float()).view(n, 16, 1)
    ml = (_f16(blocks, 82) * (scales >> 4).float()).view(n, 16, 1)
    q = _unpack(blocks[:, 16:80], 32, 2).view(n, 16, 16).float()
    return (dl * q - ml).view(n, 256)


def dequantize_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """Layout: hmask[32] · qs[64] 2-bit · scales[12] (16 × 6-bit, offset 32) · d."""
    n = blocks.shape[0]
    low = _unpack(blocks[:, 96:104], 8, 4)
    high = _unpack(blocks[:, 104:108], 4, 2)
    scales = ((low | (high << 4)) - 32).float()
    dl = (_f16(blocks, 108) * scales).view(n, 16, 1)
    # A set mask bit means no offset; a clear one subtracts 4.
    q = _unpack(blocks[:, 32:96], 32, 2) - ((1 - _unpack(blocks[:, :32], 32, 1)) << 2)
    return (dl * q.view(n, 16, 16).float()).view(n, 256)


def _k_scales_mins(blocks: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins of Q4_K / Q5_K, packed in 12 bytes: -> two (n, 8) int32."""
    packed = blocks[:, start:start + 12].to(torch.int32)
    d, m, md = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([d & 63, (md & 15) | ((d >> 6) << 4)], dim=1)
    mins = torch.cat([m & 63, (md >> 4) | ((m >> 6) << 4)], dim=1)
    return scales, mins


def _k_affine(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``d * scale * q - dmin * min`` over 8 sub-blocks of 32: q (n, 256) int32 -> (n, 256)."""
    n = blocks.shape[0]
    scales, mins = _k_scales_mins(blocks, 4)
    d = (_f16(blocks, 0) * scales.float()).view(n, 8, 1)
    dm = (_f16(blocks, 2) * mins.float()).view(n, 8, 1)
    return (d * q.view(n, 8, 32).float() - dm).view(n, 256)


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """Layout: d · dmin · scales[12] · qs[128] 4-bit."""
    return _k_affine(blocks, _unpack(blocks[:, 16:], 32, 4))


def dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """Layout: d · dmin · scales[12] · qh[32] (fifth bits) · qs[128] 4-bit."""
    return _k_affine(blocks, _unpack(blocks[:, 48:], 32, 4) | (_unpack(blocks[:, 16:48], 32, 1) << 4))


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Layout: ql[128] 4-bit · qh[64] 2-bit · scales int8[16] · d (last)."""
    n = blocks.shape[0]
    q = (_unpack(blocks[:, :128], 64, 4) | (_unpack(blocks[:, 128:192], 32, 2) << 4)) - 32
    d = (_f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    return (d * q.view(n, 16, 16).float()).view(n, 256)


def dequantize_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    """Layout: d · qs[16] 4-bit indices into the IQ4 code book."""
    return _f16(blocks, 0) * iq4_code_book(blocks.device)[_unpack(blocks[:, 2:], 16, 4)]


def dequantize_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    """Layout: d · scales_h u16 (8 × 2 bits) · scales_l[4] (8 × 4 bits) · qs[128] code-book indices."""
    n = blocks.shape[0]
    low = _unpack(blocks[:, 4:8], 1, 4)  # chunk 1: the two nibbles of each byte are adjacent scales
    high = _unpack(blocks[:, 2:4], 1, 2)
    dl = (_f16(blocks, 0) * ((low | (high << 4)) - 32).float()).view(n, 8, 1)
    values = iq4_code_book(blocks.device)[_unpack(blocks[:, 8:], 16, 4)]
    return (dl * values.view(n, 8, 32)).view(n, 256)


DEQUANTIZE_TORCH: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.F32: dequantize_f32, Q.F16: dequantize_f16, Q.BF16: dequantize_bf16,
    Q.Q8_0: dequantize_q8_0, Q.Q4_0: dequantize_q4_0, Q.Q4_1: dequantize_q4_1,
    Q.Q5_0: dequantize_q5_0, Q.Q5_1: dequantize_q5_1,
    Q.Q2_K: dequantize_q2_k, Q.Q3_K: dequantize_q3_k, Q.Q4_K: dequantize_q4_k,
    Q.Q5_K: dequantize_q5_k, Q.Q6_K: dequantize_q6_k,
    Q.IQ4_NL: dequantize_iq4_nl, Q.IQ4_XS: dequantize_iq4_xs,
}


def as_blocks(data: torch.Tensor, qtype: int, shape: tuple[int, ...], where: str | None = None) -> torch.Tensor:
    """Raw tensor bytes (any shape, uint8) -> (n_blocks, type_size), checked against ``shape``."""
    check_supported(qtype, where)
    block_size, type_size = block_layout(qtype)
    numel = 1
    for size in shape:
        numel *= size
    if data.dtype != torch.uint8 or numel % block_size or data.numel() != numel // block_size * type_size:
        raise VeloxLoadError(None, f"tensor {where or ''} of type {Q(int(qtype)).name} and shape {tuple(shape)} "
                             f"has {data.numel()} bytes of {data.dtype}",
                             f"{numel // block_size * type_size} uint8 bytes ({block_size} elements per "
                             f"{type_size}-byte block)")
    return data.reshape(-1, type_size)


def dequantize_torch(data: torch.Tensor, qtype: int, shape: tuple[int, ...],
                     dtype: torch.dtype = torch.float32, where: str | None = None) -> torch.Tensor:
    """GGUF tensor bytes -> a ``shape`` tensor of ``dtype`` (math in fp32, cast last).

    ``data``: uint8, the tensor's raw bytes (e.g. GGUFReader's ``(*rows, bytes_per_row)`` view).
    """
    blocks = as_blocks(data, qtype, shape, where)
    return DEQUANTIZE_TORCH[Q(int(qtype))](blocks).reshape(shape).to(dtype)
