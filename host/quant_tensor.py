"""Quantized weights as Velox keeps them: the packed bytes plus what it takes to read them back.

Four kinds, told apart by the storage dtype alone (so a layer never disagrees with its tensor,
whatever ModelPatcher swaps in or restores):

| kind       | storage (``data``)                               | also needed                         |
|------------|--------------------------------------------------|-------------------------------------|
| ``gguf``   | uint8 ``(rows, bytes_per_row)``, GGUF blocks     | GGML type number, logical shape     |
| ``fp8``    | float8_e4m3fn ``(N, K)``                          | fp32 scale per output channel (N,)  |
| ``int8``   | int8 ``(N, K)``                                   | fp32 scale per output channel (N,)  |
| ``nvfp4``  | float4_e2m1fn_x2 ``(N16, K16 / 2)``, core's NVFP4 | e4m3 block scales (swizzled), fp32  |
|            | codes (``kernels/nvfp4_torch.py``)                | global scale (``scale_2``)          |

Anything else (bf16 / fp16 / fp32) is ``dense``. Every kind is a plain tensor, so ``.to(device)``,
state dicts, pinning and ModelPatcher's memory accounting (``nelement * element_size``: the packed
size) work unchanged. ``PackedWeight`` is the record that carries one such weight from a file to
a layer (``host/quant_ops.py``), where it becomes the layer's ``weight`` (+ ``weight_scale``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import fp8_int8_dequant_triton, nvfp4_torch, nvfp4_triton
from ..kernels.fp8_linear import FP8_DTYPE, FP8_MAX, dequantize_rows, quantize_fp8_rows
from ..kernels.gguf_dequant import dequantize as dequantize_gguf
from ..kernels.int8_gemm_torch import INT8_MAX, quantize_int8_rows, round_half_away

KIND_BY_STORAGE = {torch.uint8: "gguf", FP8_DTYPE: "fp8", torch.int8: "int8", nvfp4_torch.STORAGE: "nvfp4"}
SCALED_KINDS = ("fp8", "int8")
# the user-facing quantization choice -> the kind a loader quantizes float weights to
QUANTIZE_TO = {"none": None, "fp8_e4m3": "fp8", "int8": "int8", "nvfp4": "nvfp4"}


def kind_of(storage_dtype: torch.dtype) -> str:
    """``gguf`` / ``fp8`` / ``int8`` / ``nvfp4`` for packed storage, ``dense`` for a float weight."""
    return KIND_BY_STORAGE.get(storage_dtype, "dense")


@dataclass(frozen=True)
class PackedWeight:
    """One quantized weight between a file and a layer.

    data: the storage (see the module table); shape: the logical shape in PyTorch order;
    qtype: the GGML type (gguf only); scale: (N,) fp32 (fp8 / int8), the swizzled e4m3 block scales
    (nvfp4); scale_2: the fp32 global scale, 0-d (nvfp4 only).
    """

    data: torch.Tensor
    shape: tuple[int, ...]
    qtype: int | None = None
    scale: torch.Tensor | None = None
    scale_2: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return kind_of(self.data.dtype)

    @property
    def nbytes(self) -> int:
        tensors = (self.data, self.scale, self.scale_2)
        return sum(t.nelement() * t.element_size() for t in tensors if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        moved = self if device is None else self.to(device)
        return dequantize_weight(moved.data, self.shape, dtype, qtype=self.qtype, scale=moved.scale,
                                 scale_2=moved.scale_2)

    def to(self, device: torch.device | str) -> PackedWeight:
        scale, scale_2 = (None if t is None else t.to(device) for t in (self.scale, self.scale_2))
        return PackedWeight(self.data.to(device), self.shape, self.qtype, scale, scale_2)


def dequantize_weight(data: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, qtype: int | None = None,
                      scale: torch.Tensor | None = None, where: str | None = None,
                      scale_2: torch.Tensor | None = None) -> torch.Tensor:
    """Packed storage -> the logical ``shape`` tensor of ``dtype`` on ``data``'s device."""
    kind = kind_of(data.dtype)
    if kind == "nvfp4":
        dequantize = (nvfp4_triton.dequantize_nvfp4_triton if data.is_cuda and nvfp4_triton.AVAILABLE
                      else nvfp4_torch.dequantize_nvfp4)
        return dequantize(data, scale.to(data.device), scale_2.to(data.device), dtype, tuple(shape))
    if kind == "gguf":
        return dequantize_gguf(data, qtype, tuple(shape), dtype, where)
    if kind in SCALED_KINDS:
        rows = data.reshape(shape[0], -1)
        if data.is_cuda and fp8_int8_dequant_triton.AVAILABLE:
            return fp8_int8_dequant_triton.dequantize_rows_triton(rows, scale, dtype).reshape(shape)
        return dequantize_rows(rows, scale, dtype).reshape(shape)
    return data.to(dtype)


def quantize_weight(weight: torch.Tensor, kind: str) -> PackedWeight:
    """A float (N, K) weight -> fp8 e4m3 or int8 with one symmetric scale per output channel, or
    NVFP4 (comfy-kitchen's quantization, byte for byte)."""
    if kind == "nvfp4":
        return quantize_weight_nvfp4(weight)
    rows = weight.reshape(weight.shape[0], -1)
    data, scale = quantize_fp8_rows(rows) if kind == "fp8" else quantize_int8_rows(rows)
    return PackedWeight(data.reshape(weight.shape), tuple(weight.shape), scale=scale)


def requantize_with_scale(weight: torch.Tensor, storage_dtype: torch.dtype, scale: torch.Tensor,
                          seed: int | None = None) -> torch.Tensor:
    """A float weight back into fp8 / int8 storage under an existing per-channel scale (LoRA merges).

    fp8 rounds stochastically when ``seed`` is given, as ComfyUI does for its fp8 weights, so
    many small merges do not all round the same way; int8 rounds to nearest.
    """
    rows = weight.float().reshape(weight.shape[0], -1) / scale.to(weight.device, torch.float32)[:, None]
    if storage_dtype == FP8_DTYPE:
        rows = rows.clamp(-FP8_MAX, FP8_MAX)
        if seed is not None:
            import comfy.float

            return comfy.float.stochastic_rounding(rows, FP8_DTYPE, seed=seed).reshape(weight.shape)
        return rows.to(FP8_DTYPE).reshape(weight.shape)
    return round_half_away(rows).clamp(-INT8_MAX, INT8_MAX).to(torch.int8).reshape(weight.shape)


def per_channel_scale(scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """A file's scale (scalar, (1,), (N,) or (N, 1)) as (N,) fp32."""
    flat = scale.float().reshape(-1)
    return flat.expand(out_features).clone() if flat.numel() == 1 else flat.reshape(out_features)


def quantize_weight_gguf(weight: torch.Tensor, qtype: int) -> PackedWeight:
    """A float weight -> GGUF blocks of ``qtype`` on its device (benchmarks, converters, tests)."""
    from ..kernels.gguf_quantize_torch import quantize

    return PackedWeight(quantize(weight, qtype), tuple(weight.shape), qtype=int(qtype))


def quantize_weight_nvfp4(weight: torch.Tensor) -> PackedWeight:
    """A float (N, K) weight -> NVFP4 codes, swizzled e4m3 block scales and the global scale."""
    codes, block_scales, global_scale = nvfp4_torch.quantize_nvfp4(weight)
    return PackedWeight(codes.view(nvfp4_torch.STORAGE), tuple(weight.shape), scale=block_scales,
                        scale_2=global_scale)
