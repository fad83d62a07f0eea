"""The public GGUF dequantization entry: Triton on CUDA when it is installed, the PyTorch twin otherwise.

Both paths produce the same bits (see ``tests/unit/test_gguf_dequant.py``), so the choice is
only about speed.
"""

from __future__ import annotations

import torch

from . import gguf_dequant_triton
from .gguf_dequant_torch import dequantize_torch
from .gguf_types import SUPPORTED_TYPES, check_supported

__all__ = ["SUPPORTED_TYPES", "check_supported", "dequantize", "uses_triton"]


def uses_triton(device: torch.device) -> bool:
    return gguf_dequant_triton.AVAILABLE and device.type == "cuda"


def dequantize(data: torch.Tensor, qtype: int, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32, where: str | None = None) -> torch.Tensor:
    """GGUF tensor bytes -> a ``shape`` tensor of ``dtype`` on ``data``'s device.

    ``data``: uint8, the tensor's raw bytes in any shape (GGUFReader's ``(*rows, bytes_per_row)``);
    ``shape``: the logical shape in PyTorch order; ``where``: the tensor's name, for error messages.
    Types outside ``SUPPORTED_TYPES`` raise VeloxLoadError naming the type.
    """
    if uses_triton(data.device):
        return gguf_dequant_triton.dequantize_triton(data, qtype, shape, dtype, where)
    return dequantize_torch(data, qtype, shape, dtype, where)
