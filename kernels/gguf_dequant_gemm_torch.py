"""Reference of ``kernels/gguf_dequant_gemm_triton.py``: dequantize the GGUF weight, then ``F.linear``.

This is also what ``quant_compute=dequant`` does for GGUF weights on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gguf_dequant import dequantize


def gguf_linear_torch(x: torch.Tensor, blocks: torch.Tensor, qtype: int, shape: tuple[int, int],
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ dequant(blocks).T (+ bias): the weight dequantized to x's dtype first."""
    return F.linear(x, dequantize(blocks, qtype, tuple(shape), x.dtype), bias)
