"""The LTX-2 video VAE (SANA-Video 720p's) on ComfyUI core's VideoVAE, against diffusers'
``AutoencoderKLLTX2Video``.

A tiny config of the release architecture (four down blocks: spatial, temporal and two spatiotemporal
SpaceToDepth downsamplers; three residual spatiotemporal upsamplers, one of them widening; 3 x 4 x 4
patches, 8 x 32 x 32 compression) with random fp32 weights and random latent statistics, written in
every layout, loads through ``host.ltx2_vae_loading.load_ltx2_vae`` and decodes / encodes as diffusers
does. Core keeps its latent width (128) and first / last block width (128) fixed, so the tiny model keeps
those and shrinks depth. The key map is pinned against diffusers' own ``convert_ltx2_vae_to_diffusers``.
The tiny VAE (``tiny_ltx2_vae``) and the host check (``ltx2_host``) are in ``conftest.py``, shared with
the SANA-Video 720p pipeline tests.
"""

from __future__ import annotations

import json

import pytest
import torch

from velox.errors import VeloxLoadError
from velox.loaders.ltx2_vae_keys import LTX2_RELEASE, canonicalize_ltx2_vae_state_dict, core_vae_config

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLLTX2Video  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ltx2_vae_to_diffusers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

PARITY_RTOL = 1e-4  # relative L2, fp32
WEIGHTS = "diffusion_pytorch_model.safetensors"


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def _diffusers_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def decode_reference(tiny_ltx2_vae):
    """Normalized latents (what SANA-Video 720p samples) and diffusers' decode of them, as
    SanaVideoPipeline decodes: ``vae.decode(z * latents_std + latents_mean)``."""
    latent = torch.randn(1, 128, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        denormalized = (latent * tiny_ltx2_vae.latents_std.view(1, -1, 1, 1, 1)
                        + tiny_ltx2_vae.latents_mean.view(1, -1, 1, 1, 1))
        want = tiny_ltx2_vae.decode(denormalized).sample
    return latent, want


def _write(tiny_ltx2_vae, tmp_path, layout: str):
    weights = _diffusers_state_dict(tiny_ltx2_vae)
    if layout == "diffusers_folder":
        folder = tmp_path / "sana_video_720p" / "vae"
        folder.mkdir(parents=True)
        save_file(weights, str(folder / WEIGHTS))
        tiny_ltx2_vae.save_config(str(folder))  # config.json with its _class_name
        return folder.parent
    if layout == "diffusers_file":
        save_file(weights, str(tmp_path / "ltx2_vae_diffusers.safetensors"))
        return tmp_path / "ltx2_vae_diffusers.safetensors"
    official = canonicalize_ltx2_vae_state_dict(weights)
    if layout == "official_file":
        path = tmp_path / "ltx2_video_vae.safetensors"
        save_file(official, str(path))
    elif layout == "comfyui_checkpoint":  # vae.-prefixed inside a whole checkpoint, with its metadata config
        path = tmp_path / "ltx-2-checkpoint.safetensors"
        config = core_vae_config({k: tuple(v.shape) for k, v in official.items()})
        save_file({"vae." + k: v for k, v in official.items()} | {"model.diffusion_model.x": torch.zeros(2)},
                  str(path), metadata={"config": json.dumps({"vae": config})})
    return path


def test_key_map_is_the_inverse_of_diffusers_converter(tiny_ltx2_vae):
    weights = _diffusers_state_dict(tiny_ltx2_vae)
    official = canonicalize_ltx2_vae_state_dict(weights)
    assert "decoder.up_blocks.0.res_blocks.0.conv1.conv.weight" in official
    assert "encoder.down_blocks.8.res_blocks.0.conv1.conv.weight" in official  # the encoder's mid block
    back = convert_ltx2_vae_to_diffusers({"vae." + k: v for k, v in official.items()})
    assert set(back) == set(weights)
    assert all(torch.equal(back[k], weights[k]) for k in weights)


@pytest.mark.parametrize("layout", ("diffusers_folder", "diffusers_file", "official_file", "comfyui_checkpoint"))
def test_native_ltx2_vae_decode_matches_diffusers(ltx2_host, tiny_ltx2_vae, decode_reference, tmp_path, layout):
    from velox.host.ltx2_vae_loading import load_ltx2_vae

    latent, want = decode_reference
    vae = load_ltx2_vae(_write(tiny_ltx2_vae, tmp_path, layout))
    assert (vae.latent_channels, vae.latent_dim) == (128, 3)
    with torch.no_grad():
        raw = vae.first_stage_model.decode(latent)
        images = vae.decode(latent)  # core's VAEDecode path: frames [B, T, H, W, C] in [0, 1]
    assert raw.shape == want.shape == (1, 3, 9, 64, 64)
    assert relative_l2(raw, want) <= PARITY_RTOL
    frames = ((want + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)
    assert relative_l2(images.reshape(frames.shape).float(), frames) <= PARITY_RTOL
    assert (want.abs() < 0.99).float().mean() > 0.5  # the comparison is not between saturated images


def test_native_ltx2_vae_encode_matches_diffusers(ltx2_host, tiny_ltx2_vae, tmp_path):
    from velox.host.ltx2_vae_loading import load_ltx2_vae

    video = torch.rand(9, 64, 64, 3, generator=torch.Generator().manual_seed(3))  # IMAGE frames in [0, 1]
    with torch.no_grad():
        pixels = (video * 2 - 1).permute(3, 0, 1, 2).unsqueeze(0)
        mode = tiny_ltx2_vae.encode(pixels).latent_dist.mode()
        want = ((mode - tiny_ltx2_vae.latents_mean.view(1, -1, 1, 1, 1))
                / tiny_ltx2_vae.latents_std.view(1, -1, 1, 1, 1))
    vae = load_ltx2_vae(_write(tiny_ltx2_vae, tmp_path, "diffusers_folder"))
    with torch.no_grad():
        got = vae.encode(video)
    assert got.shape == want.shape == (1, 128, 2, 2, 2)
    assert relative_l2(got, want) <= PARITY_RTOL


def test_release_architecture_fills_core_video_vae(ltx2_host):
    """The full LTX-2.0 release (diffusers' conversion config), built on the meta device: every tensor has
    a place in the VideoVAE of the derived config, whose blocks are core's own LTX 'version 2' blocks."""
    import comfy.ldm.lightricks.vae.causal_video_autoencoder as ltx_vae

    from velox.host.ltx2_vae_loading import _check_weights_fill

    with torch.device("meta"):
        release = AutoencoderKLLTX2Video(**LTX2_RELEASE)
    official = canonicalize_ltx2_vae_state_dict(release.state_dict())
    config = core_vae_config({k: tuple(v.shape) for k, v in official.items()})
    _check_weights_fill(official, config, "ltx-2-vae.safetensors")
    version2 = ltx_vae.VideoVAE.guess_config(None, 2)
    assert config["encoder_blocks"] == version2["encoder_blocks"]
    assert config["decoder_blocks"] == version2["decoder_blocks"]
    assert (config["patch_size"], config["causal_decoder"], config["timestep_conditioning"]) == (4, False, False)
    assert "spatial_padding_mode" not in config  # core's defaults: zeros in the encoder, reflect in the decoder


def test_ltx2_vae_loader_refuses_other_files(ltx2_host, tiny_ltx2_vae, tmp_path):
    from velox.host.ltx2_vae_loading import load_ltx2_vae

    wan_like = tmp_path / "wan_2.1_vae.safetensors"
    save_file({"decoder.conv1.weight": torch.zeros(4, 4, 3, 3, 3), "encoder.conv1.weight": torch.zeros(4)},
              str(wan_like))
    with pytest.raises(VeloxLoadError, match=r"wan_2.1_vae.safetensors: is not an LTX video VAE .*expected the LTX-2"):
        load_ltx2_vae(wan_like)

    weights = _diffusers_state_dict(tiny_ltx2_vae)
    conditioned = tmp_path / "ltxv_0.9.5_vae.safetensors"
    save_file({**weights, "decoder.timestep_scale_multiplier": torch.tensor(1000.0)}, str(conditioned))
    with pytest.raises(VeloxLoadError, match="ltxv_0.9.5_vae.safetensors: has a timestep-conditioned decoder"):
        load_ltx2_vae(conditioned)

    weights_only = tmp_path / "ltx2_vae.pth"  # tensors only: read as every loader reads it (pickles are refused)
    torch.save(weights, weights_only)
    assert load_ltx2_vae(weights_only).latent_channels == 128

    truncated = tmp_path / "ltx2_vae_truncated.safetensors"
    save_file({k: v for k, v in weights.items() if k != "decoder.mid_block.resnets.0.conv2.conv.weight"},
              str(truncated))
    with pytest.raises(VeloxLoadError, match="ltx2_vae_truncated.safetensors: .*do not fill .*missing: "
                       "decoder.up_blocks.0.res_blocks.0.conv2.conv.weight"):
        load_ltx2_vae(truncated)


def test_ltx2_vae_node_lists_the_folder_and_returns_core_vae(ltx2_host, tiny_ltx2_vae, decode_reference, tmp_path,
                                                             monkeypatch):
    import comfy.sd
    import folder_paths

    from velox.nodes.sana_video_nodes import SANA_VIDEO_NODES

    node = next(c for c in SANA_VIDEO_NODES if c.define_schema().node_id == "VeloxLTX2VAELoader")
    models = tmp_path / "vae"
    models.mkdir()
    _write(tiny_ltx2_vae, models, "diffusers_folder")  # models/vae/sana_video_720p/vae/
    (models / "wan_vae_folder").mkdir()
    (models / "wan_vae_folder" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "vae", ([str(models)], folder_paths.supported_pt_extensions))
    folder_paths.filename_list_cache.clear()
    try:
        schema = node.define_schema()
        combo = next(i for i in schema.inputs if i.id == "vae_name")
        assert "sana_video_720p/" in combo.options and "wan_vae_folder/" not in combo.options
        vae = node.execute(vae_name="sana_video_720p/").result[0]
    finally:
        folder_paths.filename_list_cache.clear()
    assert schema.display_name == "Load LTX-2 VAE (Velox)"
    assert isinstance(vae, comfy.sd.VAE)
    latent, want = decode_reference
    with torch.no_grad():
        assert relative_l2(vae.first_stage_model.decode(latent), want) <= PARITY_RTOL
