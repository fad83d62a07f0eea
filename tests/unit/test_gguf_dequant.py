"""GGUF dequantization: the PyTorch twin and the Triton kernels are bit-exact with gguf-py.

Issue #4, acceptance point 1. The oracle is ``gguf.quants.dequantize`` (numpy, fp32). Blocks are
valid by construction: quantized from random floats where gguf-py has a quantizer, and random
bytes with finite fp16 scales for every block type (every bit pattern of the packed fields is a
valid block; only a NaN/inf scale is not). Triton runs under ``TRITON_INTERPRET=1`` on CPU tensors
in a copy of the kernel module loaded with the variable set (it is read when ``@triton.jit``
decorates), so the real module stays compiled for the gpu test.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from velox.errors import VeloxLoadError
from velox.kernels import gguf_dequant_torch
from velox.kernels.gguf_dequant import dequantize, uses_triton
from velox.kernels.gguf_dequant_torch import dequantize_torch
from velox.kernels.gguf_types import FP16_FIELDS, SUPPORTED_TYPES, check_supported

KERNELS = Path(gguf_dequant_torch.__file__).parent
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
BLOCK_TYPES = tuple(t for t in SUPPORTED_TYPES if t not in FLOAT_TYPES)
# gguf-py 0.19 quantizes these in numpy; the K-quants and IQ4 have a dequantizer only.
QUANTIZABLE = (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
LOW_PRECISION = [torch.bfloat16, torch.float16]
SHAPES = [(3, 256), (5, 768), (7, 512)]  # odd row counts, one to three K-quant blocks per row


def random_fp16_bits(rng: np.random.Generator, size: int) -> np.ndarray:
    """Any finite fp16 (normal, subnormal, ±0), as raw uint16."""
    bits = rng.integers(0, 1 << 16, size=size, dtype=np.uint16)
    exponent_all_ones = (bits & 0x7C00) == 0x7C00
    return np.where(exponent_all_ones, bits & 0x83FF, bits).astype(np.uint16)


def random_blocks(qtype: Q, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Random valid raw bytes of a ``shape`` tensor of ``qtype``: (rows, bytes_per_row) uint8."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    if qtype == Q.F32:
        return rng.standard_normal(shape, dtype=np.float32).view(np.uint8)
    if qtype == Q.F16:
        return random_fp16_bits(rng, rows * cols).reshape(shape).view(np.uint8)
    if qtype == Q.BF16:  # any finite bf16: random bits with the exponent below all-ones
        bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
        return np.where((bits & 0x7F80) == 0x7F80, bits & 0x807F, bits).astype(np.uint16).view(np.uint8)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        blocks[:, offset:offset + 2] = random_fp16_bits(rng, len(blocks)).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def quantized_blocks(qtype: Q, shape: tuple[int, int], seed: int) -> np.ndarray:
    """Raw bytes of random normal weights quantized by gguf-py (the blocks a real converter writes)."""
    weights = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * 0.05
    return gguf.quants.quantize(weights, qtype)


def reference(raw: np.ndarray, qtype: Q) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow here would mean an invalid test block
        values = gguf.quants.dequantize(raw, qtype)
    out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    assert not out.isnan().any()
    return out


def cases() -> list:
    return list(_cases())


def _cases():
    for qtype in SUPPORTED_TYPES:
        for shape in SHAPES:
            yield pytest.param(qtype, shape, "random", id=f"{qtype.name}-random-{shape[0]}x{shape[1]}")
        if qtype in QUANTIZABLE:
            yield pytest.param(qtype, (5, 768), "quantized", id=f"{qtype.name}-quantized-5x768")


def blocks_for(qtype: Q, shape: tuple[int, int], source: str) -> np.ndarray:
    seed = int(qtype) * 1000 + shape[0] * 10 + shape[1]
    return random_blocks(qtype, shape, seed) if source == "random" else quantized_blocks(qtype, shape, seed)


def test_every_supported_type_has_a_case():
    assert [t.name for t in SUPPORTED_TYPES] == [
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
    assert set(FP16_FIELDS) == set(BLOCK_TYPES)


# ---- the PyTorch twin -------------------------------------------------------------------------


@pytest.mark.parametrize("qtype, shape, source", cases())
def test_torch_twin_is_bit_exact_with_gguf_py(qtype, shape, source):
    raw = blocks_for(qtype, shape, source)
    ours = dequantize_torch(torch.from_numpy(raw), qtype, shape)
    assert ours.dtype == torch.float32 and ours.shape == shape
    assert torch.equal(ours, reference(raw, qtype))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.IQ4_XS, Q.BF16], ids=lambda t: t.name)
def test_torch_twin_low_precision_output_is_the_fp32_reference_cast(qtype, dtype):
    raw = blocks_for(qtype, (3, 256), "random")
    ours = dequantize_torch(torch.from_numpy(raw), qtype, (3, 256), dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, reference(raw, qtype).to(dtype))


def test_torch_twin_accepts_reader_byte_views_and_nd_shapes():
    raw = blocks_for(Q.Q6_K, (6, 512), "random")
    ours = dequantize_torch(torch.from_numpy(raw).reshape(-1), Q.Q6_K, (2, 3, 512))
    assert torch.equal(ours, reference(raw, Q.Q6_K).reshape(2, 3, 512))


def test_public_entry_uses_the_twin_on_cpu():
    raw = blocks_for(Q.Q5_K, (3, 256), "random")
    assert not uses_triton(torch.device("cpu"))
    assert torch.equal(dequantize(torch.from_numpy(raw), Q.Q5_K, (3, 256)), reference(raw, Q.Q5_K))


# ---- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.IQ1_M, Q.TQ1_0, Q.IQ2_XXS, Q.MXFP4, Q.Q8_K])
def test_unsupported_types_are_refused_by_name(qtype):
    with pytest.raises(VeloxLoadError) as error:
        check_supported(qtype, "blocks.3.ffn.0.weight", path="/models/wan_t2v.gguf")
    message = str(error.value)
    assert message.startswith(f"wan_t2v.gguf: tensor blocks.3.ffn.0.weight has type {qtype.name}, ")
    assert "Q4_K" in message and "IQ4_XS" in message
    with pytest.raises(VeloxLoadError, match=qtype.name):
        dequantize(torch.zeros(64, dtype=torch.uint8), qtype, (1, 256))


def test_unknown_type_number_is_refused():
    with pytest.raises(VeloxLoadError, match="type 250"):
        check_supported(250, "x.weight")


def test_byte_count_that_does_not_match_the_shape_is_refused():
    with pytest.raises(VeloxLoadError, match="expected 288 uint8 bytes"):
        dequantize(torch.zeros(144, dtype=torch.uint8), Q.Q4_K, (2, 256), where="x.weight")


def test_pack_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    module = load_kernel_module("velox.kernels._gguf_dequant_triton_without_triton")
    assert module.AVAILABLE is False


# ---- Triton under the interpreter -----------------------------------------------------------------


def load_kernel_module(name: str):
    """A fresh copy of kernels/gguf_dequant_triton.py (decorated under the current environment)."""
    spec = importlib.util.spec_from_file_location(name, KERNELS / "gguf_dequant_triton.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def interpreted(interpreted_kernel):
    """The Triton kernels, decorated with TRITON_INTERPRET=1 so they run on CPU tensors."""
    return interpreted_kernel("gguf_dequant_triton")


@pytest.mark.parametrize("qtype, shape, source", cases())
def test_triton_kernel_is_bit_exact_with_gguf_py(interpreted, qtype, shape, source):
    raw = blocks_for(qtype, shape, source)
    ours = interpreted.dequantize_triton(torch.from_numpy(raw), qtype, shape)
    assert ours.dtype == torch.float32 and ours.shape == shape
    assert torch.equal(ours, reference(raw, qtype))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.IQ4_XS, Q.BF16], ids=lambda t: t.name)
# Random fp16 scales reach values beyond fp16's range: both sides must give the same inf.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_triton_low_precision_output_is_the_fp32_reference_cast(interpreted, qtype, dtype):
    raw = blocks_for(qtype, (3, 256), "random")
    ours = interpreted.dequantize_triton(torch.from_numpy(raw), qtype, (3, 256), dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, reference(raw, qtype).to(dtype))


def test_triton_covers_partial_tiles(interpreted):
    """More blocks than one program holds, and a last tile that is mostly masked."""
    shape = (37, 1024)  # 148 Q4_K blocks: 9 full tiles of 16 and one of 4
    raw = blocks_for(Q.Q4_K, shape, "random")
    assert torch.equal(interpreted.dequantize_triton(torch.from_numpy(raw), Q.Q4_K, shape), reference(raw, Q.Q4_K))


# ---- the device -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_triton_and_twin_are_bit_exact_on_cuda_at_a_real_shape(qtype):
    from velox.kernels.gguf_dequant_triton import AVAILABLE, dequantize_triton

    if not AVAILABLE:
        pytest.skip("Triton is not installed")
    shape = (13824, 5120)  # Wan 14B's FFN up-projection
    raw = blocks_for(qtype, shape, "random")
    expected = reference(raw, qtype).cuda()
    data = torch.from_numpy(raw).cuda()
    timings = {}
    for name, fn in (("triton", dequantize_triton), ("torch", dequantize_torch)):
        out = fn(data, qtype, shape, torch.float32)
        assert torch.equal(out, expected), name
        assert torch.equal(fn(data, qtype, shape, torch.bfloat16), expected.to(torch.bfloat16)), name
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            fn(data, qtype, shape, torch.bfloat16)
        torch.cuda.synchronize()
        timings[name] = (time.perf_counter() - start) / 10
    print(f"{qtype.name}: triton {timings['triton'] * 1e3:.3f} ms, torch {timings['torch'] * 1e3:.3f} ms")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.Q4_0, Q.IQ4_XS], ids=lambda t: t.name)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_direct_launch_repeats_tritons_launch_bit_for_bit(qtype, aligned):
    """The second call for a key takes ``DequantizeLaunch`` (registered only once it matched); a source at
    an odd address is its own key, since Triton specializes kernels on pointer alignment."""
    from velox.kernels import gguf_dequant_triton as kernels

    if not kernels.AVAILABLE:
        pytest.skip("Triton is not installed")
    shape = (96, 2304)
    raw = blocks_for(qtype, shape, "random")
    source = torch.from_numpy(raw).cuda().reshape(-1)
    if not aligned:  # the same bytes one past a 16-byte boundary
        buffer = torch.empty(source.numel() + 1, dtype=torch.uint8, device="cuda")
        buffer[1:].copy_(source)
        source = buffer[1:]
    expected = reference(raw, qtype).cuda().to(torch.bfloat16)
    key = (int(qtype), torch.bfloat16, shape, source.device, aligned)
    kernels._DIRECT_LAUNCHES.pop(key, None)
    first = kernels.dequantize_triton(source, qtype, shape, torch.bfloat16)
    assert isinstance(kernels._DIRECT_LAUNCHES.get(key), kernels.DequantizeLaunch)
    for _ in range(3):
        assert torch.equal(kernels.dequantize_triton(source, qtype, shape, torch.bfloat16), expected)
    assert torch.equal(first, expected)
