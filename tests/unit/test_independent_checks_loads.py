"""Issue 21, "wrong or failed loads": what the independent checks found, pinned.

1. A weights file picked on its own from a diffusers folder reads the folder's config.json (every
   family, one mechanism: ``checkpoint_files.sibling_config``); a bare diffusers Sana file, whose
   position embedding only a config can state, loads with a warning that names it.
2. Hyperparameters the weights determine are read from them: the VideoCrafter head width
   (``init_attn`` / relative-position tables), Wan's ``freq_dim``; Wan's head count, which the weights
   do not show, from config.json. A tensor that does not fit the model built for it is a
   VeloxLoadError naming the file, the tensor and both shapes, in every family.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from velox.errors import VeloxLoadError
from velox.loaders.checkpoint_files import read_component
from velox.loaders.sana_detect import sniff_sana
from velox.loaders.sana_keys import official_to_diffusers as sana_official_to_diffusers
from velox.loaders.videocrafter_detect import unet_config_from_keys
from velox.loaders.wan_detect import wan_core_config
from velox.models.sana import SanaTransformer
from velox.models.unet3d import UNet3D, UNet3DConfig
from velox.tiny import sana as tiny_sana
from velox.tiny import videocrafter as tiny_vc
from velox.tiny import wan as tiny_wan

PARITY_RTOL = 1e-5  # relative L2, fp32
SANA_4K = tiny_sana.TINY_SANA_CONFIGS["sana_4k_pe"]
WAN_T2V = tiny_wan.TINY_WAN_CONFIGS["t2v"]
VC2_16 = tiny_vc.TINY_UNETS["vc2"]  # 16-channel heads at model_channels 32
TIMESTEPS = torch.tensor([412.75, 873.5])


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def meta_unet(config: UNet3DConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return dict(UNet3D(config).state_dict())


# ----------------------------------------------------------------------------------------------
# 1. a file inside a diffusers folder reads the folder's config.json
# ----------------------------------------------------------------------------------------------


def test_a_weights_file_in_a_component_folder_comes_with_its_config_json(tmp_path):
    sana_folder = tiny_sana.write_diffusers_folder(tmp_path / "sana", SANA_4K, tiny_sana.tiny_sana_state_dict(SANA_4K))
    wan_folder = tiny_wan.write_diffusers_folder(tiny_wan.tiny_wan_state_dict(WAN_T2V), tmp_path / "wan", WAN_T2V)
    for folder in (sana_folder, wan_folder):
        _, from_folder = read_component(folder, "transformer")
        _, from_file = read_component(folder / "transformer" / "diffusion_pytorch_model.safetensors", "transformer")
        assert from_file == from_folder == json.loads((folder / "transformer" / "config.json").read_text())


def test_a_stray_config_json_that_is_no_model_config_is_not_taken(tmp_path):
    weights = tiny_sana.write_safetensors(tmp_path / "sana.safetensors", tiny_sana.tiny_sana_state_dict(SANA_4K))
    (tmp_path / "config.json").write_text(json.dumps({"theme": "dark"}))
    assert read_component(weights, "transformer")[1] is None


def test_sana_file_picked_from_its_diffusers_folder_keeps_the_4k_position_embedding(comfy_host, tmp_path):
    """The node path (host.sana_loading -> quant_loading -> checkpoint_files): output error 1.06 before."""
    from velox.host.sana_loading import load_sana_model

    weights = tiny_sana.tiny_sana_state_dict(SANA_4K, seed=4)
    folder = tiny_sana.write_diffusers_folder(tmp_path / "Sana_4K_diffusers", SANA_4K, weights)
    patcher = load_sana_model(folder / "transformer" / "diffusion_pytorch_model.safetensors", dtype=torch.float32)
    model = patcher.model.diffusion_model
    assert (model.use_pe, model.pe_interpolation) == (True, 2.0)
    reference = SanaTransformer.from_config(SANA_4K).eval()
    reference.load_state_dict(sniff_sana(weights)[1], strict=True)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, SANA_4K.in_channels, 6, 10, generator=generator)  # off the trained 8x8: PE interpolates
    context = torch.randn(2, 5, SANA_4K.caption_channels, generator=generator)
    with torch.no_grad():
        got, want = model(x, TIMESTEPS, context), reference(x, TIMESTEPS, context)
    assert relative_l2(got, want) <= PARITY_RTOL


def test_bare_diffusers_sana_file_warns_that_its_position_embedding_is_unknown(caplog):
    diffusers_weights = sana_official_to_diffusers(tiny_sana.tiny_sana_state_dict(SANA_4K))
    with caplog.at_level(logging.WARNING):
        config, _ = sniff_sana(diffusers_weights, path="/models/sana_4k_transformer.safetensors")
    assert config.use_pe is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("sana_4k_transformer.safetensors" in w and "position embedding" in w for w in warnings)


def test_official_sana_file_and_config_given_do_not_warn(caplog):
    weights = tiny_sana.tiny_sana_state_dict(SANA_4K)
    with caplog.at_level(logging.WARNING):
        assert sniff_sana(weights, path="sana.pth")[0].pe_interpolation == 2.0
        sniff_sana(sana_official_to_diffusers(weights), path="sana.safetensors",
                   diffusers_config=tiny_sana.diffusers_transformer_config(SANA_4K))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ----------------------------------------------------------------------------------------------
# 2. VideoCrafter / DynamiCrafter head width from the weights
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [VC2_16, UNet3DConfig(num_head_channels=40),
                                    dataclasses.replace(tiny_vc.TINY_UNETS["vc1"], num_head_channels=8)],
                         ids=["tiny_16_of_32", "release_size_40", "vc1_tables_8"])
def test_videocrafter_head_width_is_read_from_the_weights(config):
    assert unet_config_from_keys(meta_unet(config)).num_head_channels == config.num_head_channels


def test_videocrafter_unet_no_head_width_builds_is_refused_naming_the_tensor():
    unet = meta_unet(VC2_16)
    unet["init_attn.0.proj_in.weight"] = torch.empty(96, 32, 1, device="meta")  # 8 heads of 12 channels
    message = (r"^vc\.safetensors: tensor input_blocks\.1\.1\.proj_in\.weight has shape \[32, 32\], "
               r"a UNet of 12-channel attention heads needs \[24, 32\]")
    with pytest.raises(VeloxLoadError, match=message):
        unet_config_from_keys(unet, "vc.safetensors")


def _write_vc_unet(tmp_path, config: UNet3DConfig, **replaced: torch.Tensor):
    from safetensors.torch import save_file

    unet = tiny_vc.fill_deterministic(UNet3D(config), seed=2).eval()
    weights = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    weights.update({f"model.diffusion_model.{k}": v for k, v in replaced.items()})
    path = tmp_path / "vc_unet.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    return path, unet


def test_videocrafter_unet_of_16_channel_heads_loads_and_matches_the_reference(comfy_host, tmp_path):
    from velox.host.videocrafter_loading import load_videocrafter_unet

    path, reference = _write_vc_unet(tmp_path, VC2_16)
    patcher, variant = load_videocrafter_unet(path, dtype=torch.float32)
    assert variant.unet.num_head_channels == 16
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, tiny_vc.FRAMES, 8, 8, generator=generator)
    context = torch.randn(1, tiny_vc.TEXT_TOKENS, VC2_16.context_dim, generator=generator)
    timesteps, fps = torch.tensor([501.0]), torch.tensor([8])
    with torch.no_grad():
        got = patcher.model.diffusion_model(x, timesteps, context, fps=fps)
        want = reference(x, timesteps, context, fps=fps)
    assert relative_l2(got, want) <= PARITY_RTOL


def test_videocrafter_tensor_of_the_wrong_shape_is_a_load_error_naming_it(comfy_host, tmp_path):
    from velox.host.videocrafter_loading import load_videocrafter_unet

    path, _ = _write_vc_unet(tmp_path, VC2_16, **{"out.0.weight": torch.ones(16)})
    message = r"^vc_unet\.safetensors: tensor out\.0\.weight has shape \[16\], the detected .* needs \[32\]"
    with pytest.raises(VeloxLoadError, match=message):
        load_videocrafter_unet(path, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# 2. Wan: freq_dim from the weights, heads from config.json
# ----------------------------------------------------------------------------------------------


def test_wan_core_config_reads_freq_dim_from_weights_and_heads_only_from_a_config():
    weights = tiny_wan.tiny_wan_state_dict(WAN_T2V)
    weights["time_embedding.0.weight"] = torch.zeros(WAN_T2V.dim, 64)
    assert wan_core_config(weights) == {"text_dim": 4096, "freq_dim": 64}
    assert wan_core_config(weights, {"num_attention_heads": 4, "attention_head_dim": 64})["num_heads"] == 4
    assert wan_core_config(weights, {"num_heads": 8, "dim": 256})["num_heads"] == 8  # official config.json
    with pytest.raises(VeloxLoadError, match=r"^wan\.safetensors: its config\.json gives 3 heads"):
        wan_core_config(weights, {"num_attention_heads": 3}, "wan.safetensors")


def _wan_diffusers_output(config: dict, weights, x, context) -> torch.Tensor:
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    model = diffusers.WanTransformer3DModel(**kwargs).eval()
    model.load_state_dict(convert_wan_transformer_to_diffusers(dict(weights)), strict=True)
    with torch.no_grad():
        return model(hidden_states=x, timestep=TIMESTEPS, encoder_hidden_states=context, return_dict=False)[0]


def _wan_inputs(seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, WAN_T2V.in_dim, 2, 4, 6, generator=generator),
            torch.randn(2, 512, WAN_T2V.text_dim, generator=generator))


def _run_core(patcher, x, context) -> torch.Tensor:
    with torch.no_grad():
        return patcher.model.diffusion_model(x, TIMESTEPS, context)


def test_wan_with_a_64_wide_timestep_sinusoid_builds_and_matches_diffusers(comfy_host, tmp_path):
    """Core's detection fixes freq_dim at 256: this file failed to build (a raw RuntimeError) before."""
    from velox.host.wan_loading import load_wan_model

    weights = tiny_wan.tiny_wan_state_dict(WAN_T2V, seed=7)
    weights["time_embedding.0.weight"] = torch.randn(WAN_T2V.dim, 64, generator=torch.Generator().manual_seed(1)) / 8
    patcher = load_wan_model(tiny_wan.write_official_file(weights, tmp_path / "wan.safetensors"), dtype=torch.float32)
    assert patcher.model.diffusion_model.freq_dim == 64
    x, context = _wan_inputs()
    want = _wan_diffusers_output(dict(WAN_T2V.diffusers_config(), freq_dim=64), weights, x, context)
    assert relative_l2(_run_core(patcher, x, context), want) <= PARITY_RTOL


@pytest.mark.parametrize("pick", ["folder", "file_in_folder"])
def test_wan_head_count_comes_from_config_json_for_the_folder_and_its_file(comfy_host, tmp_path, pick):
    """Four 64-channel heads (not core's dim // 128 = 2): the attention differs, so parity shows it."""
    from velox.host.wan_loading import load_wan_model

    weights = tiny_wan.tiny_wan_state_dict(WAN_T2V, seed=8)
    folder = tiny_wan.write_diffusers_folder(weights, tmp_path / "wan_4_heads", WAN_T2V)
    config = dict(WAN_T2V.diffusers_config(), num_attention_heads=4, attention_head_dim=64)
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    source = folder if pick == "folder" else folder / "transformer" / "diffusion_pytorch_model.safetensors"
    patcher = load_wan_model(source, dtype=torch.float32)
    assert patcher.model.diffusion_model.num_heads == 4
    x, context = _wan_inputs()
    want = _wan_diffusers_output(config, weights, x, context)
    assert relative_l2(_run_core(patcher, x, context), want) <= PARITY_RTOL


# ----------------------------------------------------------------------------------------------
# 2. a tensor of the wrong shape: VeloxLoadError naming file, tensor and shapes (Sana, Wan)
# ----------------------------------------------------------------------------------------------


def test_sana_tensor_of_the_wrong_shape_is_a_load_error_naming_it(comfy_host, tmp_path):
    from velox.host.sana_loading import load_sana_model

    weights = tiny_sana.tiny_sana_state_dict(SANA_4K)
    weights["blocks.0.attn.proj.weight"] = torch.zeros(64, 32)
    path = tiny_sana.write_safetensors(tmp_path / "sana.safetensors", weights)
    message = r"^sana\.safetensors: tensor blocks\.0\.attn\.proj\.weight has shape \[64, 32\], .* needs \[64, 64\]"
    with pytest.raises(VeloxLoadError, match=message):
        load_sana_model(path, dtype=torch.float32)


def test_wan_tensor_of_the_wrong_shape_is_a_load_error_naming_it(comfy_host, tmp_path):
    from velox.host.wan_loading import load_wan_model

    weights = tiny_wan.tiny_wan_state_dict(WAN_T2V)
    weights["blocks.0.self_attn.o.weight"] = torch.zeros(WAN_T2V.dim, 128)
    path = tiny_wan.write_official_file(weights, tmp_path / "wan.safetensors")
    message = r"^wan\.safetensors: tensor blocks\.0\.self_attn\.o\.weight has shape \[256, 128\], .* needs \[256, 256\]"
    with pytest.raises(VeloxLoadError, match=message):
        load_wan_model(path, dtype=torch.float32)

