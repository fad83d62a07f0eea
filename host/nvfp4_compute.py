"""How an NVFP4 Linear computes on the device it runs on (issue 23).

| path      | where                                           | how                                               |
|-----------|-------------------------------------------------|---------------------------------------------------|
| `kitchen` | CUDA, capability >= 10, comfy-kitchen importable | core's path: the activation quantized to NVFP4,   |
|           |                                                 | FP4 tensor cores (``ck.scaled_mm_nvfp4``)          |
| `fused`   | any other CUDA GPU with Triton, at most          | ``kernels/nvfp4_triton.py``'s dequant-GEMM: the   |
|           | ``FUSED_MAX_TOKENS`` rows per call              | weight stays packed, decoded inside the GEMM tiles |
| `tiles`   | the same GPUs, more rows per call               | the Triton dequant to the input's dtype, then     |
|           |                                                 | cuBLAS (``F.linear``); the copy lives for one call |
| `dequant` | CPU (or no Triton)                              | ``kernels/nvfp4_torch.py``, then ``F.linear``     |

Core 0.8.0 itself turns nvfp4 off below capability 10 (``pick_operations`` → ``supports_nvfp4_compute``);
the `fused` row is what Velox adds there. The `kitchen` row cannot run on the CPU, so the tests pin the
choice (``nvfp4_compute_path``), not its numbers.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from ..kernels import nvfp4_torch, nvfp4_triton

FP4_TENSOR_CORES = (10, 0)  # comfy-kitchen's TensorCoreNVFP4Layout.MIN_SM_VERSION
# Rows per call up to which the fused dequant-GEMM runs. At Wan-14B's 32 760 rows it made the forward
# 5.85x bf16 on an H100 (bench/RESULTS.md, 2026-12-07), where one dequant (a bf16 copy written and read
# once, ~1 % of that layer's GEMM time) + cuBLAS costs a few percent; few rows are weight-bandwidth bound,
# where reading 4.5 bits a weight once wins. The crossover is not measured yet (bench_quant_linear.py).
FUSED_MAX_TOKENS = 64


@functools.cache
def kitchen_importable() -> bool:
    return importlib.util.find_spec("comfy_kitchen") is not None


def nvfp4_compute_path(device: torch.device, capability: tuple[int, int] | None = None,
                       kitchen: bool | None = None, triton: bool | None = None, tokens: int = 1) -> str:
    """``kitchen`` / ``fused`` / ``tiles`` / ``dequant`` for a Linear on ``device`` called on ``tokens`` rows
    (see the module table). capability, kitchen, triton: the facts the choice rests on (default: this
    machine's)."""
    if device.type != "cuda":
        return "dequant"
    capability = torch.cuda.get_device_capability(device) if capability is None else capability
    kitchen = kitchen_importable() if kitchen is None else kitchen
    triton = nvfp4_triton.AVAILABLE if triton is None else triton
    if capability >= FP4_TENSOR_CORES and kitchen:
        return "kitchen"
    if not triton:
        return "dequant"
    return "fused" if tokens <= FUSED_MAX_TOKENS else "tiles"


def nvfp4_linear(x: torch.Tensor, codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                 shape: tuple[int, int], bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ W.T (+ bias) for an NVFP4 W of logical ``shape`` (N, K), on x's device."""
    path = nvfp4_compute_path(x.device, tokens=x.numel() // max(1, x.shape[-1]))
    return LINEARS[path](x, codes, block_scales, global_scale, shape, bias)


def _kitchen_linear(x, codes, block_scales, global_scale, shape, bias):
    """Core's MixedPrecisionOps forward for an nvfp4 layer: both operands as kitchen QuantizedTensors,
    so ``F.linear`` dispatches to the layout's FP4 GEMM (kitchen falls back to dequantizing itself)."""
    from comfy_kitchen.tensor import QuantizedTensor, TensorCoreNVFP4Layout

    params = TensorCoreNVFP4Layout.Params(scale=global_scale, orig_dtype=x.dtype, orig_shape=tuple(shape),
                                          block_scale=block_scales)
    weight = QuantizedTensor(codes.view(torch.uint8), "TensorCoreNVFP4Layout", params)
    rows = QuantizedTensor.from_float(x.reshape(-1, shape[1]), "TensorCoreNVFP4Layout")
    return torch.nn.functional.linear(rows, weight, bias).reshape(*x.shape[:-1], shape[0])


def _dequant_then_gemm(x, codes, block_scales, global_scale, shape, bias):
    """The weight decoded once by the Triton dequant into x's dtype, then cuBLAS; the copy is freed on return."""
    weight = nvfp4_triton.dequantize_nvfp4_triton(codes, block_scales, global_scale, x.dtype, tuple(shape))
    return torch.nn.functional.linear(x, weight, bias)


LINEARS = {"kitchen": _kitchen_linear, "fused": nvfp4_triton.nvfp4_linear_triton, "tiles": _dequant_then_gemm,
           "dequant": nvfp4_torch.nvfp4_linear_torch}
