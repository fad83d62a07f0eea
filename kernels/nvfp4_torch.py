"""NVFP4 weights in PyTorch: ComfyUI core's 4-bit format (comfy-kitchen's ``TensorCoreNVFP4Layout``).

A weight W (N, K) is stored as

| tensor (file key)          | dtype / shape                                         | holds                              |
|----------------------------|-------------------------------------------------------|------------------------------------|
| ``weight``                 | uint8 (N16, K16 / 2)                                  | e2m1 codes, two per byte, the even |
|                            |                                                       | column in the high nibble          |
| ``weight_scale``           | float8_e4m3fn (roundup(N16, 128), roundup(K16/16, 4)) | one scale per 16 weights of a row, |
|                            |                                                       | in cuBLAS's swizzled tile layout   |
| ``weight_scale_2``         | float32, one element                                  | the global scale                   |

where N16, K16 are N, K rounded up to 16 (zero padding). ``W[n, k] = e2m1[code] * (global * block[n, k // 16])``.

This file is the reference: ``dequantize_nvfp4`` equals comfy-kitchen's eager ``dequantize_nvfp4`` bit
for bit in every output dtype (same operation order: ``total = global.to(dtype) * block.to(dtype)``,
then ``value.to(dtype) * total``), and ``quantize_nvfp4`` writes the same bytes as
``TensorCoreNVFP4Layout.quantize`` (global scale ``amax / (448 * 6)`` computed in the input's dtype,
block scales rounded through e4m3, codes rounded to nearest-even). ``nvfp4_triton.py`` is checked
against it; ``tests/unit/test_nvfp4.py`` checks it against comfy-kitchen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_SIZE = 16  # weights per e4m3 block scale
PAD = 16  # rows and columns are zero-padded to a multiple of this
SCALE_TILE = (128, 4)  # (rows, block columns) of one swizzled scale tile
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3 = torch.float8_e4m3fn
STORAGE = torch.float4_e2m1fn_x2  # Velox's in-memory dtype for the packed codes (a view of the uint8 bytes)
# code (sign bit 3, magnitude bits 0-2) -> value
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Round to nearest, ties to even: the magnitude code is the count of thresholds a |value| passes.
# (threshold, a tie rounds up): ties go to the code whose mantissa bit is 0.
E2M1_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True),
                   (5.0, False))


def roundup(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def padded_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Logical (N, K) -> the (N16, K16) the codes cover."""
    return roundup(shape[0], PAD), roundup(shape[1], PAD)


def packed_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Logical (N, K) -> the uint8 storage shape (N16, K16 / 2)."""
    rows, cols = padded_shape(shape)
    return rows, cols // 2


def block_scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """Logical (N, K) -> the swizzled block-scale shape (roundup(N16, 128), roundup(K16 / 16, 4))."""
    rows, cols = padded_shape(shape)
    return roundup(rows, SCALE_TILE[0]), roundup(cols // BLOCK_SIZE, SCALE_TILE[1])


# ----------------------------------------------------------------------------------------------
# the swizzled (cuBLAS block-scaling) layout of the block scales
# ----------------------------------------------------------------------------------------------


def swizzled_offset(row: torch.Tensor, block: torch.Tensor, blocks_padded: int) -> torch.Tensor:
    """Flat offset of scale (row, block) in the swizzled layout: 128 x 4 tiles in row-major tile order,
    each stored as 32 rows of (4 row groups x 4 blocks). ``blocks_padded``: roundup(K16 / 16, 4)."""
    tile = (row // 128) * (blocks_padded // 4) + block // 4
    return tile * 512 + (row % 32) * 16 + ((row % 128) // 32) * 4 + block % 4


def swizzle_block_scales(scales: torch.Tensor) -> torch.Tensor:
    """(R, C) row-major scales -> the (roundup(R, 128), roundup(C, 4)) swizzled tensor, zero-padded."""
    rows, cols = scales.shape
    out = torch.zeros(roundup(rows, 128) * roundup(cols, 4), dtype=scales.dtype, device=scales.device)
    row = torch.arange(rows, device=scales.device)[:, None]
    block = torch.arange(cols, device=scales.device)[None, :]
    out[swizzled_offset(row, block, roundup(cols, 4)).reshape(-1)] = scales.reshape(-1)
    return out.reshape(roundup(rows, 128), roundup(cols, 4))


def unswizzle_block_scales(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The swizzled tensor -> its (rows, cols) row-major scales."""
    row = torch.arange(rows, device=swizzled.device)[:, None]
    block = torch.arange(cols, device=swizzled.device)[None, :]
    return swizzled.reshape(-1)[swizzled_offset(row, block, swizzled.shape[1])]


# ----------------------------------------------------------------------------------------------
# e2m1 codes
# ----------------------------------------------------------------------------------------------


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """(R, C / 2) uint8 (or float4_e2m1fn_x2) -> (R, C) uint8 codes, high nibble first."""
    packed = packed.view(torch.uint8)
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(packed.shape[0], -1)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """(R, C) uint8 codes -> (R, C / 2) uint8, the even column in the high nibble."""
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def round_to_e2m1(values: torch.Tensor) -> torch.Tensor:
    """fp32 values in [-6, 6] -> e2m1 codes (uint8), nearest-even; the sign of -0.0 and of small
    negatives is kept, as comfy-kitchen's bit-level conversion keeps it."""
    magnitude = values.abs()
    code = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    for threshold, tie_up in E2M1_THRESHOLDS:
        code += (magnitude >= threshold if tie_up else magnitude > threshold).to(torch.uint8)
    return code | (torch.signbit(values).to(torch.uint8) << 3)


# ----------------------------------------------------------------------------------------------
# quantize / dequantize
# ----------------------------------------------------------------------------------------------


def global_scale_for(weight: torch.Tensor) -> torch.Tensor:
    """comfy-kitchen's default global scale: ``amax(|W|) / (448 * 6)`` in W's dtype, then fp32."""
    return (torch.amax(weight.abs()) / (E4M3_MAX * E2M1_MAX)).to(torch.float32)


def quantize_nvfp4(weight: torch.Tensor, global_scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float (N, K) weight -> (codes uint8 (N16, K16 / 2), block scales e4m3 swizzled, global fp32 0-d).

    The bytes equal comfy-kitchen's ``TensorCoreNVFP4Layout.quantize`` (eager backend)."""
    if weight.ndim != 2:
        raise ValueError(f"NVFP4 quantizes 2-D weights, got shape {tuple(weight.shape)}")
    scale = global_scale_for(weight) if global_scale is None else global_scale.to(torch.float32)
    rows, cols = padded_shape(tuple(weight.shape))
    x = F.pad(weight, (0, cols - weight.shape[1], 0, rows - weight.shape[0])).reshape(rows, -1, BLOCK_SIZE)
    block = torch.clamp(torch.amax(x.abs(), dim=-1).to(torch.float32) / E2M1_MAX / scale, max=E4M3_MAX)
    total = scale * block.to(E4M3).to(torch.float32)
    empty = total == 0  # zero blocks (padding): 0 / 0 would be NaN
    scaled = x.float() / torch.where(empty, torch.ones_like(total), total).unsqueeze(-1)
    scaled = torch.where(empty.unsqueeze(-1), torch.zeros_like(scaled), scaled)
    codes = round_to_e2m1(torch.clamp(scaled, -E2M1_MAX, E2M1_MAX).reshape(rows, cols))
    return pack_codes(codes), swizzle_block_scales(block.to(E4M3)), scale


def dequantize_nvfp4(packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype = torch.bfloat16, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """codes (N16, K16 / 2) uint8 or float4_e2m1fn_x2, block scales (swizzled e4m3), global scale ->
    the (N, K) weight of ``dtype`` (``shape`` crops the padding; default: the padded shape)."""
    codes = unpack_codes(packed)
    rows, cols = codes.shape
    values = torch.tensor(E2M1_VALUES, dtype=dtype, device=codes.device)[codes.long()]
    block = unswizzle_block_scales(block_scales.view(E4M3), rows, cols // BLOCK_SIZE)
    total = global_scale.to(device=codes.device, dtype=dtype) * block.to(dtype)
    weight = (values.reshape(rows, -1, BLOCK_SIZE) * total.unsqueeze(-1)).reshape(rows, cols)
    return weight if shape is None else weight[: shape[0], : shape[1]]


def nvfp4_linear_torch(x: torch.Tensor, packed: torch.Tensor, block_scales: torch.Tensor,
                       global_scale: torch.Tensor, shape: tuple[int, int],
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W.T (+ bias), W (N, K) dequantized to x's dtype first (reference of the Triton GEMM)."""
    return F.linear(x, dequantize_nvfp4(packed, block_scales, global_scale, x.dtype, shape), bias)
