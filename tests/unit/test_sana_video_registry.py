"""SANA-Video through the family registry (``loaders/families.py``): detection and the other
families' refusals, the loaders' folder lists, the demo writer, GGUF conversion and loading, FP8 /
INT8 at load, and LoRAs through VeloxLoraStack and core's LoraLoaderModelOnly."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from velox.errors import VeloxLoadError
from velox.loaders.families import FAMILIES, SANA, SANA_VIDEO, WAN, family_by_markers, lora_fits
from velox.loaders.lora_formats import lora_state_dict, random_lora_factors
from velox.loaders.sana_video_keys import sana_video_official_to_diffusers
from velox.tiny import sana_video as tiny

ROOT = Path(__file__).resolve().parents[2]
Q8_0_RTOL = 2e-2  # relative L2 of one forward, Q8_0 / int8 weights against fp32 (8-bit codes)
FP8_RTOL = 6e-2  # e4m3 keeps 3 mantissa bits: up to 1/16 relative per weight
LORA_TARGETS = ("blocks.0.attn.qkv", "blocks.1.cross_attn.kv_linear", "blocks.0.cross_attn.q_linear",
                "blocks.1.attn.proj", "blocks.0.mlp.inverted_conv.conv", "blocks.1.mlp.point_conv.conv", "t_block.1")


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.fixture(scope="module")
def weights():
    config = tiny.tiny_sana_video_config(32)
    return config, tiny.tiny_sana_video_state_dict(config, seed=3)


def layouts(state_dict) -> dict[str, dict[str, torch.Tensor]]:
    return {"official": state_dict, "diffusers": sana_video_official_to_diffusers(state_dict),
            "comfyui": {"model.diffusion_model." + k: v for k, v in state_dict.items()}}


# ----------------------------------------------------------------------------------------------
# detection and refusals
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["official", "diffusers", "comfyui"])
def test_sana_video_is_marked_by_its_own_family_alone_though_it_carries_sanas_markers(weights, layout):
    keys = list(layouts(weights[1])[layout])
    assert any(k.endswith(SANA.markers) for k in keys)  # the Mix-FFN Sana's markers name
    assert family_by_markers(keys) is SANA_VIDEO
    assert [f.name for f in FAMILIES.values() if f.marks(keys)] == ["sana_video"]


@pytest.mark.parametrize("layout", ["official", "diffusers"])
@pytest.mark.parametrize("check", ["velox.loaders.sana_detect:sniff_sana", "velox.loaders.wan_detect:sniff_wan"])
def test_image_sana_and_wan_loaders_refuse_a_sana_video_file_naming_its_loader(weights, layout, check):
    import importlib

    module, _, function = check.partition(":")
    wanted = SANA if "sana_detect" in module else WAN
    with pytest.raises(VeloxLoadError) as error:
        getattr(importlib.import_module(module), function)(layouts(weights[1])[layout], "SANA_Video_2B_480p.pth")
    message = str(error.value)
    assert message.startswith("SANA_Video_2B_480p.pth: looks like a SANA-Video transformer")
    assert f", not {wanted.noun}; load it with 'Load SANA-Video Model (Velox)'" in message


def test_sana_loras_fit_sana_video_models_but_not_the_other_way():
    assert lora_fits("sana", "sana_video") and lora_fits("sana_video", "sana_video")
    assert not lora_fits("sana_video", "sana") and not lora_fits("wan", "sana_video")


def test_converter_and_gguf_tables_know_the_family():
    from velox.loaders import gguf_detect, gguf_families

    assert gguf_families.detect_family(list(sana_video_official_to_diffusers(
        tiny.tiny_sana_video_state_dict(tiny.tiny_sana_video_config(32))))).name == "sana_video"
    assert gguf_detect.ARCHITECTURES["sana_video"] == "sana_video"
    assert SANA_VIDEO.keeps_float("blocks.0.mlp.t_conv") and SANA_VIDEO.keeps_f32("blocks.0.scale_shift_table")
    assert not SANA_VIDEO.keeps_float("blocks.0.attn.qkv") and not SANA_VIDEO.keeps_float("blocks.0.mlp.point_conv.conv")


# ----------------------------------------------------------------------------------------------
# folder lists and the demo writer
# ----------------------------------------------------------------------------------------------


def test_sana_dropdown_skips_sana_video_folders_which_the_sana_video_dropdown_lists(comfy_host, weights, tmp_path):
    from velox.models.sana import SanaConfig
    from velox.nodes.sana_nodes import _is_sana_folder
    from velox.nodes.sana_video_nodes import _is_sana_video_folder
    from velox.tiny.sana import tiny_sana_state_dict, write_diffusers_folder

    video = tiny.write_diffusers_folder(tmp_path / "SANA-Video_2B_480p_diffusers", weights[0], weights[1])
    sana_config = SanaConfig(hidden_size=64, depth=1, num_heads=2, caption_channels=32)
    image = write_diffusers_folder(tmp_path / "Sana_diffusers", sana_config, tiny_sana_state_dict(sana_config))
    assert (_is_sana_folder(video), _is_sana_video_folder(video)) == (False, True)
    assert (_is_sana_folder(image), _is_sana_video_folder(image)) == (True, False)


def test_make_demo_models_finds_the_sana_video_writer_in_the_registry(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_demo_models
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert make_demo_models.WRITERS["SANA-Video demo"] is tiny.write_demo_models
    assert not (ROOT / "scripts" / "demo_models_sana_video.py").exists()
    tiny.write_demo_models(tmp_path)
    assert (tmp_path / tiny.DEMO_FILE).is_file()
    assert (tmp_path / tiny.DEMO_FOLDER / "transformer" / "config.json").is_file()


# ----------------------------------------------------------------------------------------------
# GGUF, FP8, INT8
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float_model(comfy_host, weights):
    from velox.host.sana_video_model import build_sana_video_model

    return build_sana_video_model(weights[1], dtype=torch.float32)


def forward(patcher, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 4, 6, generator=generator)
    context = torch.randn(1, 5, 32, generator=generator)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, torch.tensor([500.0]), context, context_mask=torch.ones(1, 5))


@pytest.mark.parametrize("source", ["official", "diffusers_folder"])
def test_converter_writes_a_sana_video_gguf_that_loads_through_the_node(comfy_host, weights, float_model, tmp_path,
                                                                       monkeypatch, source):
    import folder_paths
    from gguf import GGMLQuantizationType as Q

    from velox.host.quant_ops import QuantLinear
    from velox.loaders.gguf_convert import convert_to_gguf
    from velox.loaders.gguf_detect import detect_gguf
    from velox.loaders.gguf_reader import read_gguf
    from velox.nodes.sana_video_nodes import SanaVideoLoader

    config, state_dict = weights
    if source == "official":
        path = tiny.write_official(tmp_path / "sana_video.safetensors", state_dict)
    else:
        path = tiny.write_diffusers_folder(tmp_path / "SANA-Video_diffusers", config, state_dict)
    models = tmp_path / "diffusion_models"
    models.mkdir()
    report = convert_to_gguf(path, models / "SANA_Video_tiny-Q8_0.gguf", "Q8_0")
    assert report.family == "sana_video"
    types = {choice.name: Q(choice.qtype) for choice in report.tensors}
    assert types["blocks.0.attn.qkv.weight"] == Q.Q8_0 and types["blocks.0.mlp.inverted_conv.conv.weight"] == Q.Q8_0
    assert types["blocks.0.mlp.t_conv.weight"] in (Q.F32, Q.BF16, Q.F16)  # never quantized
    assert types["blocks.0.scale_shift_table"] == Q.F32
    assert detect_gguf(read_gguf(report.path)).family == "sana_video"

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(models)], folder_paths.supported_pt_extensions))
    folder_paths.filename_list_cache.clear()
    try:
        assert "SANA_Video_tiny-Q8_0.gguf" in SanaVideoLoader.define_schema().inputs[0].options
        patcher = SanaVideoLoader.execute("SANA_Video_tiny-Q8_0.gguf", "fp32").result[0]
    finally:
        folder_paths.filename_list_cache.clear()
    layers = dict(patcher.model.diffusion_model.named_modules())
    assert isinstance(layers["blocks.0.attn.qkv"], QuantLinear) and layers["blocks.0.attn.qkv"].gguf_qtype == Q.Q8_0
    assert relative_l2(forward(patcher), forward(float_model)) <= Q8_0_RTOL


@pytest.mark.parametrize("quantization,storage,rtol", [("fp8_e4m3", torch.float8_e4m3fn, FP8_RTOL),
                                                       ("int8", torch.int8, Q8_0_RTOL)])
def test_fp8_and_int8_at_load_quantize_the_linears_and_keep_the_registrys_float_layers(
        comfy_host, weights, float_model, tmp_path, quantization, storage, rtol):
    from velox.host.sana_video_model import load_sana_video_model

    path = tiny.write_official(tmp_path / "SANA_Video_2B_480p.pth", weights[1])
    patcher = load_sana_video_model(path, dtype=torch.float32, quantization=quantization)
    layers = dict(patcher.model.diffusion_model.named_modules())
    assert layers["blocks.1.attn.qkv"].weight.dtype == storage
    assert layers["blocks.0.cross_attn.kv_linear"].weight.dtype == storage
    for kept in ("t_block.1", "final_layer.linear", "y_embedder.y_proj.fc1", "blocks.0.mlp.t_conv"):
        assert layers[kept].weight.dtype == torch.float32, kept
    assert relative_l2(forward(patcher), forward(float_model)) <= rtol


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_model(comfy_host, weights):
    from velox.host.sana_video_model import build_sana_video_model

    return build_sana_video_model(weights[1], dtype=torch.bfloat16)


def lora_shapes(patcher) -> dict[str, tuple[int, int]]:
    state = patcher.model.diffusion_model.state_dict()
    return {m: tuple(state[m + ".weight"].shape[:2]) for m in LORA_TARGETS}


def write_lora(tmp_path, name: str, tensors: dict) -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def stack(patcher, *items):
    from velox.host.lora_stack import StackItem, apply_lora_stack

    model, _, reports = apply_lora_stack(patcher, None, [StackItem(path, strength) for path, strength in items])
    return model, reports


def core_chain(patcher, items):
    """Chained core ``LoraLoaderModelOnly`` nodes (their body: load_torch_file + load_lora_for_models)."""
    import comfy.sd
    import comfy.utils

    for path, strength in items:
        patcher = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(path), True),
                                                strength, 0)[0]
    return patcher


def loaded_weights(patcher) -> dict[str, torch.Tensor]:
    patcher.patch_model(device_to=torch.device("cpu"))
    try:
        return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    finally:
        patcher.unpatch_model(device_to=torch.device("cpu"))


def test_lora_stack_equals_chained_core_lora_loaders_exactly_in_bf16(bf16_model, tmp_path):
    shapes = lora_shapes(bf16_model)
    items = [(write_lora(tmp_path, f"sana_video_{fmt}.safetensors",
                         lora_state_dict(random_lora_factors(shapes, rank=4, alpha=2.0, seed=20 + i), fmt)), strength)
             for i, (fmt, strength) in enumerate([("official", 0.8), ("kohya", -1.1)])]
    ours, reports = stack(bf16_model, *items)
    assert [r.unmatched for r in reports] == [[], []] and [r.merged for r in reports] == [len(LORA_TARGETS)] * 2
    ours_weights, core_weights = loaded_weights(ours), loaded_weights(core_chain(bf16_model, items))
    base = loaded_weights(bf16_model)
    assert {k for k in base if not torch.equal(base[k], ours_weights[k])} == {
        f"{m}.weight" for m in LORA_TARGETS}
    assert [k for k in ours_weights if not torch.equal(ours_weights[k], core_weights[k])] == []


def test_diffusers_peft_lora_lands_on_the_fused_projections(bf16_model, tmp_path):
    import comfy.lora

    factors = random_lora_factors(lora_shapes(bf16_model), rank=4, alpha=8.0, seed=30)
    tensors = lora_state_dict(factors, "peft", family="sana_video")
    assert "transformer.transformer_blocks.0.attn1.to_k.lora_B.weight" in tensors
    assert "transformer.time_embed.linear.lora_A.weight" in tensors
    model, (report,) = stack(bf16_model, (write_lora(tmp_path, "peft.safetensors", tensors), 0.5))
    # no temporal-conv module: the names read as Sana's, which fit a SANA-Video model (``lora_fits``)
    assert report.unmatched == [] and report.family == "sana"
    for module, pair in factors.items():
        key = f"diffusion_model.{module}.weight"
        zero = torch.zeros(model.model.state_dict()[key].shape, dtype=torch.float32)
        got = comfy.lora.calculate_weight(model.patches[key], zero, key)
        want = 0.5 * pair.delta().reshape(got.shape)
        assert relative_l2(got, want) <= 1e-5, module


def test_lora_on_an_int8_model_stays_unmerged_and_a_temporal_lora_is_refused_on_image_sana(
        comfy_host, weights, bf16_model, tmp_path):
    from velox.host.sana_model import build_sana_model
    from velox.host.sana_video_model import build_sana_video_model
    from velox.models.sana import SanaConfig
    from velox.tiny.sana import tiny_sana_state_dict

    path = write_lora(tmp_path, "attention.safetensors",
                      lora_state_dict(random_lora_factors(lora_shapes(bf16_model), rank=4, alpha=4.0, seed=40)))
    quantized = build_sana_video_model(weights[1], dtype=torch.bfloat16, quantization="int8")
    _, (report,) = stack(quantized, (path, 1.0))
    assert report.unmerged >= 4 and report.unmatched == []

    temporal = write_lora(tmp_path, "temporal.safetensors", {
        "lora_unet_blocks_0_mlp_t_conv.lora_down.weight": torch.zeros(2, 64, 3, 1),
        "lora_unet_blocks_0_mlp_t_conv.lora_up.weight": torch.zeros(64, 2, 1, 1)})
    sana = build_sana_model(tiny_sana_state_dict(SanaConfig(hidden_size=64, depth=2, num_heads=2, caption_channels=32)),
                            dtype=torch.bfloat16)
    with pytest.raises(VeloxLoadError, match=re.escape("temporal.safetensors: is a SANA-Video LoRA (from its key "
                                                       "names) but the model is Sana")):
        stack(sana, (temporal, 1.0))
