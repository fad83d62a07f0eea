"""The two loader inputs that pick how a model's Linear weights are stored and computed.

Shared by every model loader node (Sana, Wan); appended at the end of their inputs and optional,
so workflows saved before they existed still validate and load as they did (``none`` / ``dequant``).
"""

from __future__ import annotations

from comfy_api.latest import io

from .quant_loading import QUANT_COMPUTES, QUANTIZATIONS


def quantization_inputs() -> list:
    return [
        io.Combo.Input("quantization", options=list(QUANTIZATIONS), default="none", optional=True,
                       tooltip="Store Linear weights as fp8 e4m3 or int8 with one scale per output channel "
                       "(about half of bf16's memory), or as nvfp4 (ComfyUI core's 4-bit format, about 0.28 of "
                       "bf16's memory; FP4 tensor cores on capability 10+ GPUs, Velox's Triton dequant-GEMM on "
                       "others); embeddings, modulation, norms and heads stay in high "
                       "precision. GGUF, scaled-fp8 and comfy_quant files load as stored, whatever this says."),
        io.Combo.Input("quant_compute", options=list(QUANT_COMPUTES), default="dequant", optional=True,
                       tooltip="'dequant': dequantize each weight to the compute dtype, then a normal matmul "
                       "(any GPU). 'lowp': fp8 / int8 weights multiply in 8 bits with per-token activation "
                       "scales (FP8 on SM 9.0+ GPUs, INT8 through Velox's Triton kernel); faster on large "
                       "inputs, slightly less exact. GGUF and nvfp4 weights ignore this."),
    ]
