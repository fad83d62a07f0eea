"""W8A8 kernels and the fused Q8_0 dequant-GEMM: the INT8 Triton kernels (under ``TRITON_INTERPRET=1``) give the PyTorch twin's bits;
FP8 / INT8 per-channel quantization and the W8A8 products match references built by hand.

Tolerances: fp32 outputs of Triton vs twin are bit-exact (int32 accumulation, the same fp32 epilogue
order, no FMA). bf16 outputs may differ by one bf16 ulp under the interpreter, whose fp32 -> bf16 cast
does not round to nearest even (on the GPU it does). Quantization error vs the float product, on
Gaussian data: INT8 W8A8 relative L2 <= 1.5e-2, FP8 W8A8 <= 6e-2 (measured 0.9e-2 / 4.1e-2). The fused
Q8_0 / Q4_K kernels use the same weights as dequantize-then-linear, summed in another order: <= 1e-6 in fp32.
"""

from __future__ import annotations

import pytest
import torch

from velox.kernels.fp8_linear import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_rows,
    fp8_linear_emulated,
    fp8_linear_scaled_mm,
    quantize_fp8_rows,
    scaled_mm_supported,
)
from velox.kernels.int8_gemm_torch import int8_gemm_torch, int8_linear_torch, quantize_int8_rows

SHAPES = [(37, 24, 80), (5, 48, 200), (64, 32, 64)]  # (M, N, K): odd rows, K not a tile multiple


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.fixture(scope="module")
def interpreted(interpreted_kernel):
    return interpreted_kernel("int8_gemm_triton")


@pytest.fixture(scope="module")
def fused_interpreted(interpreted_kernel):
    return interpreted_kernel("gguf_dequant_gemm_triton")


@pytest.fixture(scope="module")
def fp8_quant_interpreted(interpreted_kernel):
    return interpreted_kernel("fp8_quant_triton")


@pytest.fixture(scope="module")
def dequant_interpreted(interpreted_kernel):
    return interpreted_kernel("fp8_int8_dequant_triton")


def operands(M: int, N: int, K: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=generator) * 3
    x[M // 2] = 0  # an all-zero token row
    w = torch.randn(N, K, generator=generator) / K**0.5
    bias = torch.randn(N, generator=generator) * 0.1
    return x, w, bias


@pytest.mark.parametrize("M, N, K", SHAPES)
def test_int8_triton_row_quantization_is_bit_exact_with_twin(interpreted, M, N, K):
    x, _, _ = operands(M, N, K)
    q_triton, s_triton = interpreted.quantize_int8_rows_triton(x)
    q_torch, s_torch = quantize_int8_rows(x)
    assert torch.equal(q_triton, q_torch) and torch.equal(s_triton, s_torch)
    assert q_torch[M // 2].abs().max() == 0 and torch.isfinite(s_torch).all()


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("M, N, K", SHAPES)
def test_int8_triton_gemm_fp32_is_bit_exact_with_twin(interpreted, M, N, K, with_bias):
    x, w, bias = operands(M, N, K)
    a_q, a_s = quantize_int8_rows(x)
    w_q, w_s = quantize_int8_rows(w)
    bias = bias if with_bias else None
    got = interpreted.int8_gemm_triton(a_q, a_s, w_q, w_s, bias, out_dtype=torch.float32)
    assert torch.equal(got, int8_gemm_torch(a_q, a_s, w_q, w_s, bias, out_dtype=torch.float32))


def test_int8_triton_linear_bf16_within_one_ulp_of_twin(interpreted):
    x, w, bias = operands(33, 40, 96)
    w_q, w_s = quantize_int8_rows(w)
    got = interpreted.int8_linear_triton(x.bfloat16().reshape(3, 11, 96), w_q, w_s, bias)
    want = int8_linear_torch(x.bfloat16().reshape(3, 11, 96), w_q, w_s, bias)
    assert got.shape == want.shape == (3, 11, 40) and got.dtype == torch.bfloat16
    ulp = want.float().abs().clamp(min=2**-126) * 2**-7
    assert ((got.float() - want.float()).abs() <= ulp).all()


def test_int8_gemm_twin_equals_integer_product_by_hand():
    x, w, bias = operands(9, 16, 64, seed=1)
    a_q, a_s = quantize_int8_rows(x)
    w_q, w_s = quantize_int8_rows(w)
    exact = torch.tensor([[sum(int(a) * int(b) for a, b in zip(row, col)) for col in w_q] for row in a_q])
    want = exact.float() * a_s[:, None] * w_s[None, :] + bias[None, :]
    assert torch.equal(int8_gemm_torch(a_q, a_s, w_q, w_s, bias), want)


def test_int8_rows_round_half_away_from_zero_and_clamp():
    x = torch.tensor([[127.0, 0.5, -0.5, 1.5, -1.5, 2.49, -127.0]])
    q, scale = quantize_int8_rows(x)
    assert scale.item() == 1.0
    assert q.tolist() == [[127, 1, -1, 2, -2, 2, -127]]


@pytest.mark.parametrize("M, N, K", SHAPES)
def test_w8a8_error_against_the_float_product(M, N, K):
    x, w, bias = operands(M, N, K, seed=2)
    want = x @ w.t() + bias
    int8_w, int8_s = quantize_int8_rows(w)
    fp8_w, fp8_s = quantize_fp8_rows(w)
    assert relative_l2(int8_linear_torch(x, int8_w, int8_s, bias), want) <= 1.5e-2
    assert relative_l2(fp8_linear_emulated(x, fp8_w, fp8_s, bias), want) <= 6e-2


def test_fp8_rows_match_a_hand_built_reference():
    _, w, _ = operands(1, 24, 80, seed=4)
    q, scale = quantize_fp8_rows(w)
    amax = w.abs().amax(dim=1)
    assert torch.equal(scale, amax / FP8_MAX)
    assert q.dtype == FP8_DTYPE and torch.equal(q, (w / (amax / FP8_MAX)[:, None]).to(FP8_DTYPE))
    assert q.float().abs().amax(dim=1).eq(FP8_MAX).all()  # each row's largest value maps to e4m3's max
    assert torch.equal(dequantize_rows(q, scale, torch.float32), q.float() * scale[:, None])


def test_fp8_emulated_linear_is_the_quantized_product_by_hand():
    x, w, bias = operands(7, 16, 48, seed=5)
    w_q, w_s = quantize_fp8_rows(w)
    a_q, a_s = quantize_fp8_rows(x)
    want = (a_q.float() @ w_q.float().t()) * a_s[:, None] * w_s[None, :] + bias
    assert torch.equal(fp8_linear_emulated(x, w_q, w_s, bias), want)


def test_fp8_triton_row_scales_are_bit_exact_with_twin(fp8_quant_interpreted):
    # codes are compared on the GPU only: the interpreter's fp32 -> e4m3 cast mis-rounds values just
    # below a power of two (127.4 -> 64), the hardware conversion does not
    x, _, _ = operands(37, 8, 200, seed=8)
    _, scale = fp8_quant_interpreted.quantize_fp8_rows_triton(x)
    assert torch.equal(scale, quantize_fp8_rows(x)[1])


@pytest.mark.parametrize("quantize", [quantize_fp8_rows, quantize_int8_rows], ids=["fp8", "int8"])
def test_triton_row_dequantization_is_bit_exact_with_twin_in_fp32(dequant_interpreted, quantize):
    _, w, _ = operands(1, 37, 200, seed=10)
    q, scale = quantize(w)
    got = dequant_interpreted.dequantize_rows_triton(q, scale, torch.float32)
    assert torch.equal(got, dequantize_rows(q, scale, torch.float32))


def test_scaled_mm_is_not_claimed_on_cpu_or_odd_shapes():
    assert not scaled_mm_supported(torch.device("cpu"), 64, 64)


def gguf_blocks(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType as Q

    from velox.kernels.gguf_quantize_torch import quantize

    return quantize(weight, Q[qtype])


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("qtype, M, N, K", [("Q8_0", 37, 24, 96), ("Q8_0", 5, 40, 160), ("Q8_0", 64, 32, 64),
                                            ("Q4_K", 37, 24, 512), ("Q4_K", 5, 40, 256)])
def test_fused_gguf_gemm_matches_dequantize_then_linear(fused_interpreted, qtype, M, N, K, with_bias):
    from gguf import GGMLQuantizationType as Q

    from velox.kernels.gguf_dequant_gemm_torch import gguf_linear_torch

    x, w, bias = operands(M, N, K, seed=6)
    blocks = gguf_blocks(w, qtype)
    bias = bias if with_bias else None
    got = fused_interpreted.FUSED_LINEARS[int(Q[qtype])](x.reshape(1, M, K), blocks, (N, K), bias)
    want = gguf_linear_torch(x.reshape(1, M, K), blocks, Q[qtype], (N, K), bias)
    assert got.shape == want.shape == (1, M, N)
    assert relative_l2(got, want) <= 1e-6  # same weights, fp32, only the summation order differs


# ----------------------------------------------------------------------------------------------
# GPU tier
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M, N, K", [(37, 48, 80), (4096, 512, 1024), (1000, 768, 640)])
def test_int8_triton_on_gpu_is_bit_exact_with_twin_in_fp32(M, N, K):
    from velox.kernels.int8_gemm_triton import int8_gemm_triton, quantize_int8_rows_triton

    x, w, bias = (t.cuda() for t in operands(M, N, K))
    a_q, a_s = quantize_int8_rows_triton(x)
    ref_q, ref_s = quantize_int8_rows(x)
    assert torch.equal(a_q, ref_q) and torch.equal(a_s, ref_s)
    w_q, w_s = quantize_int8_rows(w)
    got = int8_gemm_triton(a_q, a_s, w_q, w_s, bias, out_dtype=torch.float32)
    assert torch.equal(got, int8_gemm_torch(a_q, a_s, w_q, w_s, bias, out_dtype=torch.float32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_scaled_mm_matches_emulation_on_gpu():
    if not scaled_mm_supported(torch.device("cuda"), 512, 256):
        pytest.skip("row-wise _scaled_mm needs SM 9.0+")
    x, w, bias = (t.cuda() for t in operands(300, 256, 512))
    w_q, w_s = quantize_fp8_rows(w)
    got = fp8_linear_scaled_mm(x.bfloat16(), w_q, w_s, bias.bfloat16())
    want = fp8_linear_emulated(x.bfloat16().float(), w_q, w_s, bias.bfloat16().float())
    assert relative_l2(got, want) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype, M, N, K", [("Q8_0", 37, 48, 96), ("Q8_0", 2048, 2240, 2240),
                                            ("Q4_K", 1000, 640, 5632), ("Q4_K", 2048, 2304, 2304)])
def test_fused_gguf_gemm_on_gpu_matches_dequantize_then_linear(qtype, M, N, K):
    from gguf import GGMLQuantizationType as Q

    from velox.kernels.gguf_dequant_gemm_torch import gguf_linear_torch
    from velox.kernels.gguf_dequant_gemm_triton import FUSED_LINEARS

    x, w, bias = (t.cuda() for t in operands(M, N, K, seed=7))
    blocks = gguf_blocks(w, qtype)
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        got = FUSED_LINEARS[int(Q[qtype])](x.to(dtype), blocks, (N, K), bias.to(dtype))
        want = gguf_linear_torch(x.to(dtype), blocks, Q[qtype], (N, K), bias.to(dtype))
        assert relative_l2(got, want) <= bound


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_triton_row_quantization_on_gpu_equals_twin():
    from velox.kernels.fp8_quant_triton import quantize_fp8_rows_triton

    x = operands(4099, 8, 5120, seed=9)[0].cuda().bfloat16()
    q, scale = quantize_fp8_rows_triton(x)
    q_ref, scale_ref = quantize_fp8_rows(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantize", [quantize_fp8_rows, quantize_int8_rows], ids=["fp8", "int8"])
def test_triton_row_dequantization_on_gpu_is_bit_exact_with_twin(quantize):
    from velox.kernels import fp8_int8_dequant_triton as kernels
    from velox.kernels.fp8_int8_dequant_triton import dequantize_rows_triton
    from velox.kernels.triton_launch import DirectLaunch

    q, scale = quantize(operands(1, 1037, 5120, seed=11)[1].cuda())
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for _ in range(3):  # the first through Triton's launcher, the repeats launched directly
            assert torch.equal(dequantize_rows_triton(q, scale, dtype), dequantize_rows(q, scale, dtype))
        key = (q.dtype, dtype, tuple(q.shape), q.device, True, True)
        assert isinstance(kernels._DIRECT_LAUNCHES.get(key), DirectLaunch)
