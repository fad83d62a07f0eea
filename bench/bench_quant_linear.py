"""Quantized Linear layers at Wan-14B 480p token counts vs bf16 ``F.linear``, time and relative error.

Shapes (tokens x in -> out): the FFN up-projection 32760 x 5120 -> 13824 and an attention projection
32760 x 5120 -> 5120 (480x832, 81 frames = 32 760 tokens); ``--tokens`` adds others (Sana 1024² = 1024).
Paths, each with its relative L2 error against the bf16 output of the same float weights:

- ``fp8_w8a8``: per-token FP8 activations x per-channel FP8 weights, ``torch._scaled_mm`` (SM 9.0+);
- ``int8_w8a8``: per-token INT8 activations x per-channel INT8 weights, Velox's Triton kernel
  (also timed: its GEMM alone, and ``torch._int_mm`` for the same product, the anchor that measured
  5.5x slower than bf16);
- ``fp8_dequant`` / ``int8_dequant`` / ``q8_0_dequant`` / ``q4_k_dequant``: dequantize the weight
  to bf16 (Triton), then the bf16 GEMM: what ``quant_compute=dequant`` does per call
  (``fp8_dequant_torch_ops``: the same with PyTorch's three-pass dequantization);
- ``nvfp4_fused_<BMxBNxBKxWARPSxSTAGES>`` / ``nvfp4_dequant``: core's NVFP4 layout, the fused dequant-GEMM
  (``kernels/nvfp4_triton.py``) at each launch config, or the standalone dequant + bf16 GEMM;
- ``q8_0_fused`` / ``q4_k_fused``: the fused dequant-GEMM kernels (``kernels/gguf_dequant_gemm_triton.py``);
  where they beat ``*_dequant`` sets ``host/quant_ops.FUSED_DEQUANT_GEMM_MAX_TOKENS`` (try ``--tokens 2048 1024``).

Weights are random at the real shapes, created and quantized on the GPU. Targets (issue #4): FP8 W8A8
>= 1.5x faster than bf16 per layer; report whether INT8 beats FP8.

    python bench/bench_quant_linear.py [--tokens 32760 4096 1024] [--repeat 10]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import cuda_time, emit, register_pack, relative_l2

LAYERS = {"ffn_up": (5120, 13824), "attn_proj": (5120, 5120)}  # (in, out) of Wan-14B Linears
WAN_480P_TOKENS = 32760


def quantized_paths(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict:
    """name -> (callable, bytes of the stored weight)."""
    from gguf import GGMLQuantizationType as Q

    from velox.kernels.fp8_int8_dequant_triton import dequantize_rows_triton
    from velox.kernels.fp8_linear import (
        dequantize_rows,
        fp8_linear_scaled_mm,
        quantize_fp8_rows,
        scaled_mm_supported,
    )
    from velox.kernels.gguf_dequant import dequantize
    from velox.kernels.gguf_dequant_gemm_triton import FUSED_LINEARS
    from velox.kernels.gguf_quantize_torch import quantize
    from velox.kernels.int8_gemm_torch import quantize_int8_rows
    from velox.kernels.int8_gemm_triton import int8_gemm_triton, int8_linear_triton, quantize_int8_rows_triton

    out_features, in_features = weight.shape
    fp8_w, fp8_s = quantize_fp8_rows(weight)
    int8_w, int8_s = quantize_int8_rows(weight)
    a_q, a_s = quantize_int8_rows_triton(x.reshape(-1, in_features))
    paths = {
        "int8_w8a8": (lambda: int8_linear_triton(x, int8_w, int8_s, bias), int8_w.numel()),
        "int8_gemm_only": (lambda: int8_gemm_triton(a_q, a_s, int8_w, int8_s, bias, torch.bfloat16), int8_w.numel()),
        "int8_act_quant_only": (lambda: quantize_int8_rows_triton(x.reshape(-1, in_features)), 0),
        "torch_int_mm": (lambda: torch._int_mm(a_q, int8_w.t()), int8_w.numel()),
        "fp8_dequant": (lambda: F.linear(x, dequantize_rows_triton(fp8_w, fp8_s, x.dtype), bias), fp8_w.numel()),
        "int8_dequant": (lambda: F.linear(x, dequantize_rows_triton(int8_w, int8_s, x.dtype), bias), int8_w.numel()),
        "fp8_dequant_torch_ops": (lambda: F.linear(x, dequantize_rows(fp8_w, fp8_s, x.dtype), bias), fp8_w.numel()),
    }
    if scaled_mm_supported(x.device, in_features, out_features):
        from velox.kernels.fp8_quant_triton import quantize_fp8_rows_triton

        a8, a8_s = quantize_fp8_rows_triton(x.reshape(-1, in_features))
        for fast in (False, True):
            suffix = "_fast_accum" if fast else ""
            paths[f"fp8_w8a8{suffix}"] = (
                lambda fast=fast: fp8_linear_scaled_mm(x, fp8_w, fp8_s, bias, fast_accum=fast), fp8_w.numel())
            paths[f"fp8_scaled_mm_only{suffix}"] = (lambda fast=fast: torch._scaled_mm(
                a8, fp8_w.t(), scale_a=a8_s[:, None], scale_b=fp8_s[None, :], bias=bias, out_dtype=torch.bfloat16,
                use_fast_accum=fast), fp8_w.numel())
        paths["fp8_act_quant_only"] = (lambda: quantize_fp8_rows_triton(x.reshape(-1, in_features)), 0)
    shape = tuple(weight.shape)
    for qtype in (Q.Q8_0, Q.Q4_K):
        blocks = quantize(weight.float(), qtype)
        paths[f"{qtype.name.lower()}_dequant"] = (
            lambda blocks=blocks, qtype=qtype: F.linear(x, dequantize(blocks, qtype, shape, x.dtype), bias),
            blocks.numel())
        paths[f"{qtype.name.lower()}_fused"] = (
            lambda blocks=blocks, qtype=qtype: FUSED_LINEARS[int(qtype)](x, blocks, shape, bias), blocks.numel())
    paths.update(nvfp4_paths(x, weight, bias))
    return paths


NVFP4_GEMM_CONFIGS = ((128, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                      (128, 128, 64, 4, 4), (64, 256, 64, 4, 4), (128, 256, 128, 8, 3), (128, 64, 128, 4, 4))


def nvfp4_paths(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict:
    """NVFP4 (issue #23): the fused dequant-GEMM at each launch config, and dequantize + bf16 GEMM."""
    from velox.kernels import nvfp4_triton
    from velox.kernels.nvfp4_torch import quantize_nvfp4

    packed, scales, scale = quantize_nvfp4(weight)
    shape, stored = tuple(weight.shape), packed.numel() + scales.numel() + 4

    def fused(config):
        def run():
            nvfp4_triton.GEMM_CONFIG = config
            return nvfp4_triton.nvfp4_linear_triton(x, packed, scales, scale, shape, bias)
        return run

    paths = {"nvfp4_dequant": (lambda: F.linear(x, nvfp4_triton.dequantize_nvfp4_triton(
        packed, scales, scale, x.dtype, shape), bias), stored),
             "nvfp4_dequant_only": (lambda: nvfp4_triton.dequantize_nvfp4_triton(
                 packed, scales, scale, x.dtype, shape), stored)}
    for config in NVFP4_GEMM_CONFIGS:
        paths["nvfp4_fused_" + "x".join(map(str, config))] = (fused(config), stored)
    return paths


def bench_layer(name: str, tokens: int, in_features: int, out_features: int, repeat: int) -> None:
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, tokens, in_features, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = (torch.randn(out_features, in_features, device="cuda", generator=g) / in_features**0.5).bfloat16()
    bias = (torch.randn(out_features, device="cuda", generator=g) * 0.01).bfloat16()
    with torch.inference_mode():
        reference = F.linear(x, weight, bias)
        bf16_s = cuda_time(lambda: F.linear(x, weight, bias), repeat=repeat)
        emit({"bench": "quant_linear", "layer": name, "tokens": tokens, "in": in_features, "out": out_features,
              "path": "bf16", "s": round(bf16_s, 6), "tflops": round(2 * tokens * in_features * out_features
                                                                     / bf16_s / 1e12, 1),
              "weight_mb": round(weight.numel() * 2 / 1e6, 1), "device": torch.cuda.get_device_name()})
        for path, (run, weight_bytes) in quantized_paths(x, weight, bias).items():
            try:
                seconds = cuda_time(run, repeat=repeat)
                out = run()
            except Exception as error:  # one path failing (an old GPU, a missing op) must not hide the rest
                emit({"bench": "quant_linear", "layer": name, "tokens": tokens, "path": path,
                      "error": f"{type(error).__name__}: {str(error)[:200]}"})
                continue
            record = {"bench": "quant_linear", "layer": name, "tokens": tokens, "in": in_features,
                      "out": out_features, "path": path, "s": round(seconds, 6),
                      "speedup_vs_bf16": round(bf16_s / seconds, 3), "weight_mb": round(weight_bytes / 1e6, 1)}
            if path not in ("int8_act_quant_only", "torch_int_mm", "int8_gemm_only", "fp8_act_quant_only",
                            "nvfp4_dequant_only"):
                record["rel_err_vs_bf16"] = round(relative_l2(out, reference), 5)
            emit(record)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[WAN_480P_TOKENS])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    register_pack()
    for tokens in args.tokens:
        for name, (in_features, out_features) in LAYERS.items():
            bench_layer(name, tokens, in_features, out_features, args.repeat)


if __name__ == "__main__":
    main()
