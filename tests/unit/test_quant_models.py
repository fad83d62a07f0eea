"""Quantized Sana and Wan models: GGUF, ComfyUI scaled-fp8 and comfy_quant files, and float files
quantized at load, each give the outputs of the same weights dequantized and loaded from
safetensors (relative L2 <= 1e-6, fp32; issue #4 acceptance 3).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file

from velox.tiny import sana as tiny_sana
from velox.tiny import wan as tiny_wan

PARITY = 1e-6  # relative L2, fp32
TIMESTEPS = torch.tensor([412.75, 873.5])
SANA_CONFIG = tiny_sana.TINY_SANA_CONFIGS["sana_1600m_style"]  # hidden 96: Q8_0 rows, mlp inner 240
WAN_CONFIG = dataclasses.replace(tiny_wan.TINY_WAN_CONFIGS["t2v"], text_dim=64)


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(scope="module")
def host(comfy_host):
    import demo_models_gguf

    from velox.host import quant_loading, quant_tensor, sana_loading, wan_loading

    return dataclasses.make_dataclass("Host", ["gguf", "loading", "tensor", "sana", "wan"])(
        demo_models_gguf, quant_loading, quant_tensor, sana_loading, wan_loading)


def sana_weights() -> dict[str, torch.Tensor]:
    weights = tiny_sana.tiny_sana_state_dict(SANA_CONFIG, seed=0)
    weights.pop("pos_embed", None)
    return {k: v.flatten(1) if k.endswith(("inverted_conv.conv.weight", "point_conv.conv.weight")) else v
            for k, v in weights.items()}


def run_sana(patcher) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, SANA_CONFIG.in_channels, 6, 10, generator=generator)
    context = torch.randn(2, 7, SANA_CONFIG.caption_channels, generator=generator)
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0
    with torch.no_grad():
        return patcher.model.diffusion_model(x, TIMESTEPS, context, context_mask=mask)


def run_wan(patcher, config=WAN_CONFIG) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, config.in_dim, 2, 4, 6, generator=generator)
    context = torch.randn(2, 16, config.text_dim, generator=generator)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, TIMESTEPS, context)


def mixed_types(host, family: str):
    """Q8_0 for most matrices, Q4_0 for attention V and FFN-down (two block types in one file)."""
    choose = host.gguf.type_for(family, Q.Q8_0)

    def pick(name, tensor):
        qtype = choose(name, tensor)
        if qtype == Q.Q8_0 and (".v." in name or "ffn.2" in name or "point_conv" in name):
            return Q.Q4_0
        return qtype

    return pick


def dequantized_twin(host, gguf_path, tmp_path):
    path = tmp_path / "dequantized.safetensors"
    save_file({k: v.contiguous() for k, v in host.gguf.dequantized_state_dict(gguf_path).items()}, str(path))
    return path


def packed_kinds(patcher) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for module in patcher.model.diffusion_model.modules():
        if hasattr(module, "weight_kind"):
            kinds[module.weight_kind] = kinds.get(module.weight_kind, 0) + 1
    return kinds


# ----------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------


def test_sana_gguf_matches_the_same_weights_from_safetensors(host, tmp_path):
    path = host.gguf.write_gguf_state_dict(tmp_path / "sana-Q8_0.gguf", sana_weights(), mixed_types(host, "sana"),
                                           "sana")
    gguf_model = host.sana.load_sana_model(path, dtype=torch.float32)
    # qkv, proj, q, kv, proj, inverted per block; point_conv (rows of 240, not whole Q8_0 blocks) stays F32
    assert packed_kinds(gguf_model)["gguf"] == 3 * 6
    float_model = host.sana.load_sana_model(dequantized_twin(host, path, tmp_path), dtype=torch.float32)
    assert "gguf" not in packed_kinds(float_model)
    assert relative_l2(run_sana(gguf_model), run_sana(float_model)) <= PARITY


def test_wan_gguf_matches_the_same_weights_from_safetensors_with_5d_patch_embedding(host, tmp_path):
    weights = tiny_wan.tiny_wan_state_dict(WAN_CONFIG, seed=0)
    assert weights["patch_embedding.weight"].ndim == 5
    path = host.gguf.write_gguf_state_dict(tmp_path / "wan-Q4_K_M.gguf", weights, host.gguf.type_for("wan", Q.Q4_K),
                                           "wan")
    gguf_model = host.wan.load_wan_model(path, dtype=torch.float32)
    assert packed_kinds(gguf_model)["gguf"] == 2 * 10  # q k v o, cross q k v o, ffn.0, ffn.2 per block
    qtypes = {m.gguf_qtype for m in gguf_model.model.diffusion_model.modules() if getattr(m, "gguf_qtype", None)}
    assert qtypes == {Q.Q4_K, Q.Q6_K}  # Q4_K_M: V and FFN-down bumped to Q6_K
    float_model = host.wan.load_wan_model(dequantized_twin(host, path, tmp_path), dtype=torch.float32)
    assert relative_l2(run_wan(gguf_model), run_wan(float_model)) <= PARITY


def test_wan_vace_demo_gguf_loads_as_vace_with_packed_layers(host, tmp_path):
    host.gguf.write_wan21_vace_gguf(tmp_path)
    patcher = host.wan.load_wan_model(tmp_path / host.gguf.WAN21_VACE_GGUF_FILE, dtype=torch.float32)
    assert type(patcher.model.diffusion_model).__name__ == "VaceWanModel"
    assert packed_kinds(patcher)["gguf"] >= 4 * 10
    packed_bytes = patcher.model_size()
    dense_bytes = sum(4 * p.numel() for p in host.gguf.dequantized_state_dict(
        tmp_path / host.gguf.WAN21_VACE_GGUF_FILE).values())
    assert packed_bytes < 0.6 * dense_bytes  # memory is accounted at the packed size


# ----------------------------------------------------------------------------------------------
# ComfyUI fp8 formats
# ----------------------------------------------------------------------------------------------


def to_scaled_fp8(weights, per_row: bool, comfy_quant: bool, quantizable):
    """Every quantizable 2-D weight as fp8 e4m3 with a scale; legacy ``scale_weight`` + ``scaled_fp8``
    marker, or ``comfy_quant`` JSON + ``weight_scale``. Also returns the weights it stands for."""
    out, real = {}, {}
    for key, value in weights.items():
        layer = key[: -len(".weight")]
        if not (key.endswith(".weight") and value.ndim == 2 and quantizable(layer)):
            out[key] = real[key] = value
            continue
        amax = value.abs().amax(dim=1, keepdim=True) if per_row else value.abs().amax()
        scale = (amax / 448.0).float()
        codes = (value / scale).to(torch.float8_e4m3fn)
        out[key] = codes
        real[key] = codes.float() * scale
        if comfy_quant:
            out[layer + ".weight_scale"] = scale.reshape(-1)
            out[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                       dtype=torch.uint8)
        else:
            out[layer + ".scale_weight"] = scale.reshape(())
            out[layer + ".scale_input"] = torch.ones(())
    if not comfy_quant:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out, real


@pytest.mark.parametrize("comfy_quant", [False, True], ids=["scaled_fp8", "comfy_quant"])
def test_wan_comfy_fp8_file_matches_its_dequantized_weights(host, tmp_path, comfy_quant):
    weights = tiny_wan.tiny_wan_state_dict(WAN_CONFIG, seed=1)
    quantized, real = to_scaled_fp8(weights, per_row=comfy_quant, comfy_quant=comfy_quant,
                                    quantizable=lambda layer: layer.startswith("blocks."))
    save_file(quantized, str(tmp_path / "wan_fp8.safetensors"))
    save_file(real, str(tmp_path / "wan_real.safetensors"))
    fp8_model = host.wan.load_wan_model(tmp_path / "wan_fp8.safetensors", dtype=torch.float32)
    assert packed_kinds(fp8_model)["fp8"] == 2 * 10
    float_model = host.wan.load_wan_model(tmp_path / "wan_real.safetensors", dtype=torch.float32)
    assert relative_l2(run_wan(fp8_model), run_wan(float_model)) <= PARITY


def test_sana_comfy_quant_file_matches_its_dequantized_weights(host, tmp_path):
    quantized, real = to_scaled_fp8(sana_weights(), per_row=True, comfy_quant=True,
                                    quantizable=lambda layer: layer.startswith("blocks.") and "norm" not in layer)
    save_file(quantized, str(tmp_path / "sana_fp8.safetensors"))
    save_file(real, str(tmp_path / "sana_real.safetensors"))
    fp8_model = host.sana.load_sana_model(tmp_path / "sana_fp8.safetensors", dtype=torch.float32)
    assert packed_kinds(fp8_model)["fp8"] == 3 * 7
    float_model = host.sana.load_sana_model(tmp_path / "sana_real.safetensors", dtype=torch.float32)
    assert relative_l2(run_sana(fp8_model), run_sana(float_model)) <= PARITY


def test_unsupported_comfy_quant_format_is_refused_by_name(host, tmp_path):
    from velox.errors import VeloxLoadError

    weights = tiny_wan.tiny_wan_state_dict(WAN_CONFIG, seed=1)
    weights["blocks.0.ffn.0.weight"] = weights["blocks.0.ffn.0.weight"].to(torch.uint8)
    weights["blocks.0.ffn.0.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_file(weights, str(tmp_path / "wan_nvfp4.safetensors"))
    with pytest.raises(VeloxLoadError, match="nvfp4"):
        host.wan.load_wan_model(tmp_path / "wan_nvfp4.safetensors", dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# load-time quantization of float files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization, kind", [("fp8_e4m3", "fp8"), ("int8", "int8")])
def test_wan_quantized_at_load_equals_float_model_of_the_quantized_weights(host, tmp_path, quantization, kind):
    weights = tiny_wan.tiny_wan_state_dict(WAN_CONFIG, seed=2)
    save_file(weights, str(tmp_path / "wan.safetensors"))
    model = host.wan.load_wan_model(tmp_path / "wan.safetensors", dtype=torch.float32, quantization=quantization)
    kinds = packed_kinds(model)
    assert kinds[kind] == 2 * 10 and kinds["dense"] == 5 + 1  # text (2), time (2), projection, head stay dense
    real = dict(weights)
    for name, module in model.model.diffusion_model.named_modules():
        if getattr(module, "weight_kind", "dense") == kind:
            real[name + ".weight"] = module.weight.float() * module.weight_scale[:, None]
    save_file(real, str(tmp_path / "wan_real.safetensors"))
    float_model = host.wan.load_wan_model(tmp_path / "wan_real.safetensors", dtype=torch.float32)
    assert relative_l2(run_wan(model), run_wan(float_model)) <= PARITY
    plain = host.wan.load_wan_model(tmp_path / "wan.safetensors", dtype=torch.float32)
    assert relative_l2(run_wan(model), run_wan(plain)) <= 5e-2  # the quantization error itself


def test_sana_lowp_int8_runs_the_w8a8_path_close_to_float(host, tmp_path):
    path = tiny_sana.write_safetensors(tmp_path / "sana.safetensors", sana_weights())
    lowp = host.sana.load_sana_model(path, dtype=torch.float32, quantization="int8", quant_compute="lowp")
    dequant = host.sana.load_sana_model(path, dtype=torch.float32, quantization="int8")
    plain = host.sana.load_sana_model(path, dtype=torch.float32)
    assert packed_kinds(lowp)["int8"] == 3 * 7
    assert relative_l2(run_sana(lowp), run_sana(plain)) <= 5e-2
    assert relative_l2(run_sana(lowp), run_sana(dequant)) > 0  # activations were quantized too


def test_loader_dropdowns_list_gguf_files_and_the_chosen_one_resolves(host, tmp_path, monkeypatch):
    import folder_paths

    from velox.host.model_paths import model_choices, resolve_model_choice

    models = tmp_path / "diffusion_models"
    (models / "sub").mkdir(parents=True)
    for name in ("Sana_1600M_1024px_BF16-Q8_0.gguf", "sub/Wan2.1_14B_VACE-Q4_K_M.gguf", "notes.txt"):
        (models / name).write_bytes(b"GGUF")
    save_file({"x": torch.zeros(1)}, str(models / "plain.safetensors"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(models)], folder_paths.supported_pt_extensions))
    folder_paths.filename_list_cache.clear()
    try:
        plain = model_choices("diffusion_models", lambda path: False)
        with_gguf = model_choices("diffusion_models", lambda path: False, (".gguf",))
    finally:
        folder_paths.filename_list_cache.clear()
    assert plain == ["plain.safetensors"]
    assert with_gguf == ["Sana_1600M_1024px_BF16-Q8_0.gguf", "plain.safetensors", "sub/Wan2.1_14B_VACE-Q4_K_M.gguf"]
    assert resolve_model_choice("diffusion_models", with_gguf[-1]) == models / "sub" / "Wan2.1_14B_VACE-Q4_K_M.gguf"


def test_a_quantized_tensor_outside_a_linear_is_dequantized_at_load(host, tmp_path):
    weights = sana_weights()
    table = weights["blocks.0.scale_shift_table"]  # a bare Parameter of a block, (6, hidden)
    assert table.ndim == 2 and table.shape[1] % 32 == 0

    def choose(name, tensor):
        return Q.Q8_0 if name == "blocks.0.scale_shift_table" else Q.F32

    path = host.gguf.write_gguf_state_dict(tmp_path / "sana.gguf", weights, choose, "sana")
    model = host.sana.load_sana_model(path, dtype=torch.float32)
    loaded = model.model.diffusion_model.blocks[0].scale_shift_table
    assert loaded.dtype == torch.float32 and (loaded - table).abs().max() < 0.02 * table.abs().max()


def test_sana_4k_gguf_keeps_its_position_embedding_from_the_converter_metadata(comfy_host, tmp_path):
    """Shapes cannot show Sana's 2K / 4K sincos PE; our converter records the config, the loader reads it."""
    from velox.host.sana_loading import load_sana_model
    from velox.loaders.gguf_convert import convert_to_gguf
    from velox.tiny.sana import TINY_SANA_CONFIGS, tiny_sana_state_dict, write_official_pth

    config = TINY_SANA_CONFIGS["sana_4k_pe"]
    source = write_official_pth(tmp_path / "Sana_1600M_4Kpx_BF16.pth", tiny_sana_state_dict(config, seed=1))
    convert_to_gguf(source, tmp_path / "sana_4k-Q8_0.gguf", "Q8_0")
    net = load_sana_model(tmp_path / "sana_4k-Q8_0.gguf").model.diffusion_model
    reference = load_sana_model(source).model.diffusion_model
    assert net.use_pe and reference.use_pe
    assert net.pe_interpolation == reference.pe_interpolation == config.pe_interpolation
