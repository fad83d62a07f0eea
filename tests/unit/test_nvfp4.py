"""NVFP4 (issue 23): the PyTorch twin against comfy-kitchen's eager reference, bit for bit; the
Triton kernels (interpreted) against the twin; core's ``comfy_quant`` NVFP4 files through the
quantized loaders; the compute-path choice per GPU.
"""

from __future__ import annotations

import pytest
import torch

from velox.kernels import nvfp4_torch as nv

# (N, K): whole tiles, rows / columns not multiples of 16 (zero-padded), more than one 128-row
# and 4-block scale tile, a single block
SHAPES = [(64, 128), (33, 50), (130, 272), (16, 16), (200, 48), (7, 100)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(INT_VIEW.get(tensor.dtype, torch.uint8))


def random_weight(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * 0.05
    weight[0, :16] = 0  # an all-zero block: the 0 / 0 guard
    weight[-1, -1] = -0.0
    weight[1, 3] = 0.4  # an outlier that sets the global scale
    return weight.to(dtype)


@pytest.fixture(scope="module")
def kitchen():
    ck = pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.tensor import TensorCoreNVFP4Layout

    return ck, TensorCoreNVFP4Layout


# ----------------------------------------------------------------------------------------------
# the twin against comfy-kitchen
# ----------------------------------------------------------------------------------------------


def test_e2m1_rounding_matches_kitchen_on_every_midpoint(kitchen):
    from comfy_kitchen.float_utils import _f32_to_floatx_unpacked

    grid = torch.linspace(-6, 6, 96001)
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    values = torch.cat([grid, midpoints, -midpoints, torch.tensor([0.0, -0.0, -1e-9, 1e-9, 5.99, -6.0])])
    assert torch.equal(nv.round_to_e2m1(values), _f32_to_floatx_unpacked(values.clone(), 2, 1))


def test_swizzle_round_trips_and_matches_kitchen_to_blocked(kitchen):
    from comfy_kitchen.float_utils import to_blocked

    scales = torch.arange(200 * 7, dtype=torch.float32).reshape(200, 7)
    swizzled = nv.swizzle_block_scales(scales)
    assert torch.equal(swizzled, to_blocked(scales, flatten=False))
    assert torch.equal(nv.unswizzle_block_scales(swizzled, 200, 7), scales)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_nvfp4_matches_kitchen_byte_for_byte(kitchen, shape, dtype):
    _, layout = kitchen
    weight = random_weight(shape, dtype)
    want_codes, params = layout.quantize(weight)
    codes, block_scales, global_scale = nv.quantize_nvfp4(weight)
    assert codes.shape == nv.packed_shape(shape) and block_scales.shape == nv.block_scale_shape(shape)
    assert torch.equal(codes, want_codes)
    assert torch.equal(bits(block_scales), bits(params.block_scale))
    assert torch.equal(bits(global_scale), bits(params.scale))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_nvfp4_matches_kitchen_bit_for_bit(kitchen, shape, dtype):
    ck, layout = kitchen
    codes, params = layout.quantize(random_weight(shape, seed=1))
    want = ck.dequantize_nvfp4(codes, params.scale, params.block_scale, dtype)
    got = nv.dequantize_nvfp4(codes, params.block_scale, params.scale, dtype)
    assert got.dtype == dtype and torch.equal(bits(got), bits(want))
    cropped = nv.dequantize_nvfp4(codes.view(nv.STORAGE), params.block_scale, params.scale, dtype, shape)
    assert cropped.shape == shape and torch.equal(bits(cropped), bits(want[: shape[0], : shape[1]].contiguous()))


def test_dequantize_reads_a_one_element_global_scale_and_uint8_scale_bytes(kitchen):
    ck, layout = kitchen
    codes, params = layout.quantize(random_weight((48, 64), seed=2))
    want = ck.dequantize_nvfp4(codes, params.scale, params.block_scale, torch.float32)
    got = nv.dequantize_nvfp4(codes, params.block_scale.view(torch.uint8), params.scale.reshape(1), torch.float32)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# Triton, interpreted, against the twin
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_nvfp4(interpreted_kernel):
    return interpreted_kernel("nvfp4_triton")


@pytest.mark.parametrize("shape", [(33, 50), (130, 96), (16, 16)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_dequantize_equals_the_twin_bit_for_bit(triton_nvfp4, shape, dtype):
    codes, block_scales, global_scale = nv.quantize_nvfp4(random_weight(shape, seed=3))
    want = nv.dequantize_nvfp4(codes, block_scales, global_scale, dtype, shape)
    got = triton_nvfp4.dequantize_nvfp4_triton(codes.view(nv.STORAGE), block_scales, global_scale, dtype, shape)
    assert got.shape == shape and torch.equal(bits(got), bits(want))


# relative L2 against dequantize-then-F.linear: the same weights bit for bit, another summation order
GEMM_TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("shape", [(40, 96), (33, 50), (20, 160)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_dequant_gemm_matches_dequantize_then_linear(triton_nvfp4, shape, dtype):
    generator = torch.Generator().manual_seed(4)
    codes, block_scales, global_scale = nv.quantize_nvfp4(random_weight(shape, seed=4))
    x = torch.randn(2, 9, shape[1], generator=generator).to(dtype)
    bias = torch.randn(shape[0], generator=generator).to(dtype)
    want = nv.nvfp4_linear_torch(x, codes, block_scales, global_scale, shape, bias)
    got = triton_nvfp4.nvfp4_linear_triton(x, codes, block_scales, global_scale, shape, bias)
    assert got.shape == (2, 9, shape[0]) and got.dtype == dtype
    error = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert error <= GEMM_TOLERANCE[dtype]


# ----------------------------------------------------------------------------------------------
# the compute path per device
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("device", "capability", "kitchen", "triton", "path"), [
    ("cuda", (10, 0), True, True, "kitchen"),  # Blackwell with comfy-kitchen: core's FP4 GEMM
    ("cuda", (12, 0), True, False, "kitchen"),
    ("cuda", (12, 0), False, True, "fused"),  # no comfy-kitchen: our dequant-GEMM
    ("cuda", (9, 0), True, True, "fused"),  # Hopper: core disables nvfp4 there; Velox does not
    ("cuda", (8, 6), True, False, "dequant"),
    ("cpu", None, True, True, "dequant"),
])
def test_compute_path_hands_fp4_gpus_to_kitchen_and_others_to_triton(device, capability, kitchen, triton, path):
    from velox.host.nvfp4_compute import nvfp4_compute_path

    assert nvfp4_compute_path(torch.device(device), capability, kitchen, triton) == path


@pytest.mark.parametrize(("tokens", "path"), [(1, "fused"), (64, "fused"), (65, "tiles"), (32760, "tiles")])
def test_many_rows_per_call_dequantize_once_then_gemm_on_gpus_without_fp4(tokens, path):
    """Wan-14B's 32 760 rows ran the fused kernel at 5.85x bf16 (H100): large calls decode the weight
    once and use cuBLAS; few rows keep the packed weight inside the GEMM."""
    from velox.host.nvfp4_compute import nvfp4_compute_path

    assert nvfp4_compute_path(torch.device("cuda"), (9, 0), False, True, tokens=tokens) == path
    assert nvfp4_compute_path(torch.device("cuda"), (10, 0), True, True, tokens=tokens) == "kitchen"


def test_dequant_then_gemm_equals_the_reference_linear(triton_nvfp4, monkeypatch):
    """The ``tiles`` path, Triton dequant (interpreted) + F.linear, equals the PyTorch twin bit for bit."""
    from velox.host import nvfp4_compute

    monkeypatch.setattr(nvfp4_compute, "nvfp4_triton", triton_nvfp4)
    generator = torch.Generator().manual_seed(4)
    codes, block_scales, global_scale = nv.quantize_nvfp4(random_weight((48, 64), seed=4))
    x, bias = torch.randn(3, 5, 64, generator=generator), torch.randn(48, generator=generator)
    got = nvfp4_compute._dequant_then_gemm(x, codes.view(nv.STORAGE), block_scales, global_scale, (48, 64), bias)
    want = nv.nvfp4_linear_torch(x, codes, block_scales, global_scale, (48, 64), bias)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# core's NVFP4 files through the loaders
# ----------------------------------------------------------------------------------------------

PARITY = 1e-5  # relative L2, fp32 compute (issue 23 acceptance 2)


@pytest.fixture(scope="module")
def host(comfy_host):
    """(test_quant_models: its tiny configs, inputs and helpers; sana_loading; wan_loading)."""
    import importlib.util
    from pathlib import Path

    from velox.host import sana_loading, wan_loading

    spec = importlib.util.spec_from_file_location("velox_test_quant_models",
                                                  Path(__file__).with_name("test_quant_models.py"))
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    return models, sana_loading, wan_loading


def to_core_nvfp4(weights, kitchen, quantizable, fp8=lambda layer: False, header=False):
    """(file tensors, file metadata, the weights they stand for): comfy-kitchen's NVFP4 for
    ``quantizable`` 2-D weights (fp8 e4m3 for ``fp8`` ones), as core 0.8.0 writes them: format in a
    ``<layer>.comfy_quant`` tensor or, with ``header``, in the ``_quantization_metadata`` header."""
    import json

    ck, layout = kitchen
    out, real, formats = {}, {}, {}
    for key, value in weights.items():
        layer = key[: -len(".weight")]
        if not (key.endswith(".weight") and value.ndim == 2 and quantizable(layer)):
            out[key] = real[key] = value
            continue
        if fp8(layer):
            scale = (value.abs().amax() / 448.0).float()
            out[key], out[layer + ".weight_scale"] = (value / scale).to(torch.float8_e4m3fn), scale
            real[key], formats[layer] = out[key].float() * scale, "float8_e4m3fn"
            continue
        codes, params = layout.quantize(value)
        out[key], out[layer + ".weight_scale"], out[layer + ".weight_scale_2"] = codes, params.block_scale, params.scale
        real[key] = ck.dequantize_nvfp4(codes, params.scale, params.block_scale, torch.float32)[: value.shape[0],
                                                                                                 : value.shape[1]]
        formats[layer] = "nvfp4"
    if header:
        return out, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": {
            layer: {"format": fmt} for layer, fmt in formats.items()}})}, real
    for layer, fmt in formats.items():
        out[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    return out, None, real


def save(tensors, path, metadata=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def in_blocks(layer: str) -> bool:
    return layer.startswith("blocks.") and "norm" not in layer


@pytest.mark.parametrize("header", [False, True], ids=["comfy_quant_tensors", "metadata_header"])
def test_wan_nvfp4_file_matches_kitchen_dequantized_weights(host, kitchen, tmp_path, header):
    models, _, wan = host
    weights = models.tiny_wan.tiny_wan_state_dict(models.WAN_CONFIG, seed=1)
    quantized, metadata, real = to_core_nvfp4(weights, kitchen, in_blocks, header=header)
    nvfp4_model = wan.load_wan_model(save(quantized, tmp_path / "wan.safetensors", metadata), dtype=torch.float32)
    assert models.packed_kinds(nvfp4_model)["nvfp4"] == 2 * 10
    float_model = wan.load_wan_model(save(real, tmp_path / "wan_real.safetensors"), dtype=torch.float32)
    assert models.relative_l2(models.run_wan(nvfp4_model), models.run_wan(float_model)) <= PARITY


def test_sana_nvfp4_file_matches_kitchen_dequantized_weights(host, kitchen, tmp_path):
    models, sana, _ = host
    quantized, metadata, real = to_core_nvfp4(models.sana_weights(), kitchen, in_blocks, header=True)
    nvfp4_model = sana.load_sana_model(save(quantized, tmp_path / "sana.safetensors", metadata), dtype=torch.float32)
    assert models.packed_kinds(nvfp4_model)["nvfp4"] == 3 * 7
    float_model = sana.load_sana_model(save(real, tmp_path / "sana_real.safetensors"), dtype=torch.float32)
    assert models.relative_l2(models.run_sana(nvfp4_model), models.run_sana(float_model)) <= PARITY


def test_mixed_nvfp4_fp8_and_float_layers_load_as_written(host, kitchen, tmp_path):
    models, _, wan = host
    weights = models.tiny_wan.tiny_wan_state_dict(models.WAN_CONFIG, seed=2)
    quantized, metadata, real = to_core_nvfp4(weights, kitchen, lambda layer: in_blocks(layer) and "cross" not in layer,
                                              fp8=lambda layer: ".ffn." in layer)
    mixed = wan.load_wan_model(save(quantized, tmp_path / "wan_mixed.safetensors", metadata), dtype=torch.float32)
    kinds = models.packed_kinds(mixed)
    assert (kinds["nvfp4"], kinds["fp8"]) == (2 * 4, 2 * 2)  # self-attention q k v o; ffn.0, ffn.2
    assert kinds["dense"] >= 2 * 4  # cross-attention stays as written
    float_model = wan.load_wan_model(save(real, tmp_path / "wan_real.safetensors"), dtype=torch.float32)
    assert models.relative_l2(models.run_wan(mixed), models.run_wan(float_model)) <= PARITY


def test_nvfp4_selector_quantizes_float_weights_as_kitchen_does(host, kitchen, tmp_path):
    models, _, wan = host
    weights = models.tiny_wan.tiny_wan_state_dict(models.WAN_CONFIG, seed=3)
    quantized, metadata, _ = to_core_nvfp4(weights, kitchen, in_blocks)
    from_file = wan.load_wan_model(save(quantized, tmp_path / "wan.safetensors", metadata), dtype=torch.float32)
    at_load = wan.load_wan_model(save(weights, tmp_path / "wan_float.safetensors"), dtype=torch.float32,
                                 quantization="nvfp4")
    assert models.packed_kinds(at_load)["nvfp4"] == 2 * 10
    assert torch.equal(models.run_wan(at_load), models.run_wan(from_file))


def break_layer(tensors, how: str):
    layer = "blocks.1.ffn.2"
    if how == "missing weight_scale_2":
        tensors.pop(layer + ".weight_scale_2")
    elif how == "block-scale shape":
        tensors[layer + ".weight_scale"] = tensors[layer + ".weight_scale"][:, :4].contiguous()
    else:
        tensors[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "mxfp9"}'), dtype=torch.uint8)
    return tensors


@pytest.mark.parametrize(("how", "message"), [
    ("missing weight_scale_2", "weight_scale_2 is missing"),
    ("block-scale shape", r"weight_scale \(256, 4\) does not fit"),
    ("unknown format", "quantized as 'mxfp9'"),
])
def test_bad_nvfp4_file_is_refused_naming_file_and_layer(host, kitchen, tmp_path, how, message):
    from velox.errors import VeloxLoadError

    models, _, wan = host
    weights = models.tiny_wan.tiny_wan_state_dict(models.WAN_CONFIG, seed=4)
    quantized, metadata, _ = to_core_nvfp4(weights, kitchen, in_blocks)
    path = save(break_layer(quantized, how), tmp_path / "wan_bad.safetensors", metadata)
    with pytest.raises(VeloxLoadError, match=rf"^wan_bad\.safetensors: .*blocks\.1\.ffn\.2.*{message}"):
        wan.load_wan_model(path, dtype=torch.float32)


def test_linear_takes_zero_padded_codes_of_an_odd_shape_and_matches_kitchen(comfy_host, kitchen):
    import dataclasses

    from velox.host.quant_ops import make_quant_operations
    from velox.host.quant_tensor import quantize_weight_nvfp4

    ck, layout = kitchen
    weight = random_weight((40, 50), seed=5)
    packed = quantize_weight_nvfp4(weight)
    from_file = dataclasses.replace(packed, shape=nv.padded_shape((40, 50)))  # a file keeps only (48, 64)
    linear, errors = make_quant_operations().Linear(50, 40, bias=False), []
    linear._load_from_state_dict({"weight": from_file}, "", {}, True, [], [], errors)
    assert not errors and linear.weight_kind == "nvfp4"
    codes, params = layout.quantize(weight)
    want_weight = ck.dequantize_nvfp4(codes, params.scale, params.block_scale, torch.float32)[:40, :50]
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(5))
    assert torch.equal(linear(x), torch.nn.functional.linear(x, want_weight))
