"""FP8 / INT8 per-channel weights -> the compute dtype in one Triton pass (``quant_compute=dequant``).

PyTorch's ``(q.float() * scale[:, None]).to(dtype)`` makes three passes through an fp32 copy (about
1.3 GB of traffic for one 13824 x 5120 Wan-14B FFN weight); this kernel reads the codes once and
writes the result once, with the same fp32 product and one rounding, so the bits are the twin's
(``fp8_linear.dequantize_rows``) wherever the fp32 -> output cast rounds to nearest even (the GPU;
the interpreter truncates bf16, so CPU tests compare fp32).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:
    AVAILABLE = False

BLOCK = 2048  # elements per program

if AVAILABLE:

    @triton.jit
    def _dequantize_rows_kernel(q_ptr, scale_ptr, out_ptr, numel, K, BLOCK: tl.constexpr):
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = index < numel
        codes = tl.load(q_ptr + index, mask=mask).to(tl.float32)  # masked lanes are never stored
        scale = tl.load(scale_ptr + index // K, mask=mask, other=0.0)
        tl.store(out_ptr + index, (codes * scale).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_rows_triton(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) fp8 e4m3 or int8 codes, (N,) fp32 scales -> (N, K) ``dtype``."""
    q = q.contiguous()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    numel = q.numel()
    K = q.shape[-1] if q.ndim else 1
    grid = (triton.cdiv(numel, BLOCK),)
    _dequantize_rows_kernel[grid](q, scale.to(device=q.device, dtype=torch.float32).contiguous(), out, numel, K,
                                  BLOCK=BLOCK, enable_fp_fusion=False)
    return out
