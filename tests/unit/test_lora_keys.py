"""LoRA key dialects onto canonical module names (no ComfyUI): splitting, aliases per family, the
VideoX-Fun double underscore, diffusers' Wan / Sana names, lvdm names, family detection."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from velox.errors import VeloxLoadError
from velox.loaders.lora_detect import lora_family, model_family
from velox.loaders.lora_keys import (
    LoraTarget,
    describe_unmatched,
    module_aliases,
    read_lora_file,
    resolve_lora_keys,
    split_lora_key,
)

WAN_SHAPES = {f"diffusion_model.{k}": s for k, s in {
    "blocks.0.self_attn.q.weight": (8, 8), "blocks.0.cross_attn.o.weight": (8, 8), "blocks.0.norm3.weight": (8,),
    "blocks.0.ffn.0.weight": (16, 8), "blocks.0.ffn.2.weight": (8, 16), "head.head.weight": (4, 8),
    "head.modulation": (1, 2, 8), "blocks.0.self_attn.q.bias": (8,)}.items()}
SANA_SHAPES = {"diffusion_model.blocks.0.attn.qkv.weight": (24, 8), "diffusion_model.blocks.0.cross_attn.kv_linear.weight":
               (16, 8), "diffusion_model.blocks.0.mlp.inverted_conv.conv.weight": (32, 8), "diffusion_model.t_block.1.weight":
               (48, 8)}
LVDM_SHAPES = {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
               "diffusion_model.input_blocks.1.2.temopral_conv.weight": (8, 8),
               "diffusion_model.output_blocks.3.1.proj_in.weight": (8, 8)}


@pytest.mark.parametrize("key, expected", [
    ("lora_unet__blocks_0_self_attn_q.lora_down.weight", ("lora_unet__blocks_0_self_attn_q", "lora_down.weight")),
    ("transformer.blocks.0.attn1.to_q.lora_B.default.weight", ("transformer.blocks.0.attn1.to_q", "lora_B.default.weight")),
    ("diffusion_model.blocks.0.self_attn.q.alpha", ("diffusion_model.blocks.0.self_attn.q", "alpha")),
    ("lycoris_blocks_0_ffn_0.hada_w1_a", ("lycoris_blocks_0_ffn_0", "hada_w1_a")),
    ("diffusion_model.blocks.0.self_attn.q.diff_b", ("diffusion_model.blocks.0.self_attn.q", "diff_b")),
    ("unet.down.to_q_lora.up.weight", ("unet.down.to_q", "lora.up.weight")),
    ("diffusion_model.blocks.3.diff_m", ("diffusion_model.blocks.3.modulation", "diff")),  # LightX2V
    ("blocks.0.self_attn.q.some_unknown", None),
])
def test_split_lora_key_finds_the_adapter_suffix(key, expected):
    assert split_lora_key(key) == expected


WAN_DIALECTS = {
    "official": "diffusion_model.blocks.0.self_attn.q", "comfy": "model.diffusion_model.blocks.0.self_attn.q",
    "bare": "blocks.0.self_attn.q", "kohya": "lora_unet_blocks_0_self_attn_q",
    "fun": "lora_unet__blocks_0_self_attn_q", "mixed": "lora_unet_blocks_0.self_attn.q",
    "diffusers": "transformer.blocks.0.attn1.to_q", "peft": "base_model.model.blocks.0.attn1.to_q",
    "onetrainer": "lora_transformer_blocks_0_attn1_to_q", "lycoris": "lycoris_blocks_0_self_attn_q",
}


@pytest.mark.parametrize("dialect", WAN_DIALECTS)
def test_every_wan_dialect_lands_on_the_official_weight(dialect):
    aliases = module_aliases(WAN_SHAPES, "wan")
    resolved = resolve_lora_keys({f"{WAN_DIALECTS[dialect]}.lora_up.weight": torch.zeros(8, 2)}, aliases)
    assert resolved.unmatched == []
    assert list(resolved.modules.values()) == [LoraTarget("diffusion_model.blocks.0.self_attn.q.weight")]


@pytest.mark.parametrize("diffusers, official", [
    ("blocks.0.attn2.to_out.0", "blocks.0.cross_attn.o"), ("blocks.0.ffn.net.0.proj", "blocks.0.ffn.0"),
    ("blocks.0.ffn.net.2", "blocks.0.ffn.2"), ("blocks.0.norm2", "blocks.0.norm3"), ("proj_out", "head.head"),
])
def test_diffusers_wan_modules_map_to_the_right_original_modules(diffusers, official):
    """attn1 is self-attention, attn2 cross-attention (kijai's mirror maps both to cross_attn), and
    diffusers' norm2 is the original norm3."""
    aliases = module_aliases(WAN_SHAPES, "wan")
    resolved = resolve_lora_keys({f"transformer.{diffusers}.lora_A.weight": torch.zeros(2, 8)}, aliases)
    assert [t.weight_key for t in resolved.modules.values()] == [f"diffusion_model.{official}.weight"]


def test_sana_diffusers_q_k_v_land_on_rows_of_the_fused_projections():
    aliases = module_aliases(SANA_SHAPES, "sana")
    keys = {f"transformer.transformer_blocks.0.{m}.lora_A.weight": torch.zeros(2, 8)
            for m in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v", "ff.conv_inverted")}
    targets = sorted((t.weight_key.split(".")[3], t.offset) for t in resolve_lora_keys(keys, aliases).modules.values())
    assert targets == [("attn", (0, 0, 8)), ("attn", (0, 8, 8)), ("attn", (0, 16, 8)),
                       ("cross_attn", (0, 0, 8)), ("cross_attn", (0, 8, 8)), ("mlp", None)]


def test_lvdm_names_resolve_in_official_and_kohya_forms():
    aliases = module_aliases(LVDM_SHAPES, "videocrafter")
    keys = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight": 0,
            "lora_unet_input_blocks_1_2_temopral_conv.lora_up.weight": 0,
            "diffusion_model.output_blocks.3.1.proj_in.lora_up.weight": 0}
    resolved = resolve_lora_keys(keys, aliases)
    assert resolved.unmatched == [] and sorted(t.weight_key for t in resolved.modules.values()) == sorted(LVDM_SHAPES)


def test_unmatched_and_text_encoder_keys_are_kept_apart():
    aliases = module_aliases(WAN_SHAPES, "wan")
    lora = {"lora_unet_blocks_9_self_attn_q.lora_up.weight": 0, "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": 0,
            "blocks.0.self_attn.q.weird": 0, "diffusion_model.head.modulation.diff": 0}
    resolved = resolve_lora_keys(lora, aliases)
    assert sorted(resolved.unmatched) == ["blocks.0.self_attn.q.weird", "lora_unet_blocks_9_self_attn_q.lora_up.weight"]
    assert list(resolved.text_encoder) == ["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"]
    assert list(resolved.modules.values()) == [LoraTarget("diffusion_model.head.modulation")]
    assert describe_unmatched(resolved.unmatched).startswith("2 LoRA key(s) match no module of this model: blocks.0")
    assert "(+3 more)" in describe_unmatched([f"k{i}" for i in range(7)])


@pytest.mark.parametrize("keys, family", [
    (["lora_unet__blocks_0_cross_attn_k.lora_down.weight", "lora_unet__time_projection_1.alpha"], "wan"),
    (["transformer.blocks.3.attn1.to_q.lora_A.weight"], "wan"),
    (["diffusion_model.blocks.0.attn.qkv.lora_up.weight", "diffusion_model.blocks.0.cross_attn.q_linear.alpha"], "sana"),
    (["transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"], "sana"),
    (["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight"], "videocrafter"),
    (["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"], None),
])
def test_lora_family_is_read_from_key_names(keys, family):
    assert lora_family(keys) == family


def test_model_family_from_canonical_keys():
    assert model_family(WAN_SHAPES) == "wan" and model_family(SANA_SHAPES) == "sana"
    assert model_family(LVDM_SHAPES) == "videocrafter"


def test_read_lora_file_takes_safetensors_only(tmp_path):
    save_file({"a.lora_up.weight": torch.zeros(2, 2)}, str(tmp_path / "ok.safetensors"))
    assert list(read_lora_file(tmp_path / "ok.safetensors")) == ["a.lora_up.weight"]
    (tmp_path / "x.pt").write_bytes(b"pickle")
    with pytest.raises(VeloxLoadError, match=r"x.pt: is a .pt file; Velox reads LoRAs only as safetensors"):
        read_lora_file(tmp_path / "x.pt")
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(VeloxLoadError, match="empty.safetensors: holds no tensors"):
        read_lora_file(tmp_path / "empty.safetensors")
