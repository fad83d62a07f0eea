"""Sana's DC-AE as a native ComfyUI VAE: detection, key layouts, parity with diffusers, tiling, errors.

The tiny DC-AE has Sana's block structure (6 stages, ResBlock x3 + EfficientViTBlock x3, 5x5 multiscale
attention, 32 latent channels, factor 32) with small widths and seeded random weights. The reference is
diffusers 0.42.1 `AutoencoderDC` holding the same tensors; the original efficientvit layout is checked
against diffusers' own converter (`convert_autoencoder_dc_checkpoint_to_diffusers`).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderDC
from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers
from safetensors.torch import load_file

from velox.errors import VeloxLoadError
from velox.loaders.dcae_keys import SANA_DCAE_CONFIG, detect_dcae_config, prepare_dcae_state_dict
from velox.tiny.dcae import (
    TINY_DCAE_CONFIG,
    dcae_parameter_shapes,
    diffusers_dcae_to_original,
    make_dcae_state_dict,
    write_dcae_diffusers_folder,
    write_dcae_safetensors,
)

PARITY_RTOL = 1e-5  # relative L2, fp32


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return make_dcae_state_dict(TINY_DCAE_CONFIG, seed=0)


@pytest.fixture(scope="module")
def reference(tiny_sd) -> AutoencoderDC:
    model = AutoencoderDC(**TINY_DCAE_CONFIG.autoencoder_kwargs()).eval()
    model.load_state_dict(tiny_sd, strict=True)
    return model


@pytest.fixture(scope="module")
def tiny_vae(comfy_host, tiny_sd):
    from velox.host.dcae_vae import load_dcae_vae

    return load_dcae_vae(tiny_sd, path="tiny_dcae.safetensors", dtype=torch.float32)


# --- key layouts and detection (no comfy) -----------------------------------------------------------------


def test_tiny_parameter_shapes_are_exactly_diffusers_autoencoder_dc(tiny_sd):
    model = AutoencoderDC(**TINY_DCAE_CONFIG.autoencoder_kwargs())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == dcae_parameter_shapes(TINY_DCAE_CONFIG)
    model.load_state_dict(tiny_sd, strict=True)


def test_tiny_weights_are_deterministic_per_seed():
    a, b, c = make_dcae_state_dict(seed=0), make_dcae_state_dict(seed=0), make_dcae_state_dict(seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["decoder.conv_in.weight"], c["decoder.conv_in.weight"])


def test_original_layout_writer_agrees_with_diffusers_converter(tiny_sd):
    original = diffusers_dcae_to_original(tiny_sd)
    assert "encoder.stages.0.op_list.0.main.conv1.conv.weight" in original
    assert "decoder.stages.3.op_list.1.context_module.main.qkv.conv.weight" in original
    assert "decoder.stages.0.op_list.1.local_module.main.inverted_conv.conv.weight" not in original  # stage 0: ResBlocks
    assert "decoder.stages.4.op_list.1.local_module.main.inverted_conv.conv.weight" in original
    converted = convert_autoencoder_dc_checkpoint_to_diffusers(dict(original))
    assert converted.keys() == tiny_sd.keys()
    assert all(torch.equal(converted[k], tiny_sd[k]) for k in tiny_sd)


@pytest.mark.parametrize("prefix", ["", "vae.", "first_stage_model."])
@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_any_layout_and_prefix_maps_to_diffusers_keys_and_config(tiny_sd, layout, prefix):
    tensors = tiny_sd if layout == "diffusers" else diffusers_dcae_to_original(tiny_sd)
    wrapped = {prefix + k: v for k, v in tensors.items()}
    wrapped["model.diffusion_model.final_layer.linear.weight"] = torch.zeros(1)  # a full checkpoint's other parts
    config, mapped = prepare_dcae_state_dict(wrapped)
    assert config == TINY_DCAE_CONFIG
    assert mapped.keys() == tiny_sd.keys()
    assert all(torch.equal(mapped[k], tiny_sd[k]) for k in tiny_sd)


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_detects_the_released_sana_config_from_real_size_shapes(layout):
    with torch.device("meta"):
        real = AutoencoderDC(**SANA_DCAE_CONFIG.autoencoder_kwargs()).state_dict()
    tensors = real if layout == "diffusers" else diffusers_dcae_to_original(real)
    config, _ = prepare_dcae_state_dict(tensors)
    assert config == SANA_DCAE_CONFIG
    assert (config.spatial_compression, config.latent_channels, config.attention_head_dim) == (32, 32, 32)
    assert config.downsample_block_type == "Conv" and config.upsample_block_type == "interpolate"


# dc-ae-f32c32-in/mix-1.0 style: no blocks in stage 0 (strided conv_in / pixel-shuffle conv_out),
# BatchNorm + ReLU in the first decoder stages, no multi-scale attention (diffusers' converter configs)
IN_STYLE_KWARGS = {
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_block_out_channels": [8, 16, 16, 32, 32, 32],
    "decoder_block_out_channels": [8, 16, 16, 32, 32, 32],
    "encoder_layers_per_block": [0, 2, 2, 1, 1, 1],
    "decoder_layers_per_block": [0, 2, 2, 1, 1, 1],
    "encoder_qkv_multiscales": [[]] * 6,
    "decoder_qkv_multiscales": [[]] * 6,
    "downsample_block_type": "pixel_unshuffle",
    "upsample_block_type": "pixel_shuffle",
    "decoder_norm_types": ["batch_norm"] * 3 + ["rms_norm"] * 3,
    "decoder_act_fns": ["relu"] * 3 + ["silu"] * 3,
}


def test_detects_an_in_style_dcae_and_core_builds_the_same_tensors(comfy_host):
    from comfy.ldm.ace.vae.autoencoder_dc import AutoencoderDC as CoreAutoencoderDC

    with torch.device("meta"):
        tensors = AutoencoderDC(**IN_STYLE_KWARGS).state_dict()
    config = detect_dcae_config(tensors)
    assert config.autoencoder_kwargs() == {"in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
                                           **IN_STYLE_KWARGS}
    with torch.device("meta"):
        core = CoreAutoencoderDC(**config.autoencoder_kwargs()).state_dict()
    assert {k: v.shape for k, v in core.items()} == {k: v.shape for k, v in tensors.items()}


def test_decoder_only_file_is_detected_without_encoder(tiny_sd):
    decoder_only = {k: v for k, v in tiny_sd.items() if k.startswith("decoder.")}
    config = detect_dcae_config(decoder_only)
    assert not config.has_encoder
    assert config.decoder_block_out_channels == TINY_DCAE_CONFIG.decoder_block_out_channels
    assert config.in_channels == 3


# --- the native VAE against diffusers ---------------------------------------------------------------------


def _load_written(tmp_path, tiny_sd, layout):
    if layout == "diffusers-folder":
        folder = write_dcae_diffusers_folder(tmp_path / "sana_pipeline", tiny_sd)
        return folder / "diffusion_pytorch_model.safetensors", AutoencoderDC.from_pretrained(folder).eval()
    path = write_dcae_safetensors(tmp_path / f"dcae_{layout}.safetensors", tiny_sd, layout=layout)
    return path, None


@pytest.mark.parametrize("layout", ["diffusers", "original", "diffusers-folder"])
def test_native_vae_decode_and_encode_match_diffusers(comfy_host, tmp_path, tiny_sd, reference, layout):
    from velox.host.dcae_vae import load_dcae_vae

    path, folder_reference = _load_written(tmp_path, tiny_sd, layout)
    reference = folder_reference or reference
    vae = load_dcae_vae(load_file(str(path)), path=path, dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(2, 32, 4, 6, generator=generator)
    pixels = torch.rand(1, 128, 160, 3, generator=generator)
    with torch.inference_mode():
        want_decoded = reference.decode(z).sample
        want_latent = reference.encode(pixels.movedim(-1, 1) * 2 - 1).latent
        # the module itself: unscaled, bit-for-bit the same computation
        assert relative_l2(vae.first_stage_model.decode(z), want_decoded) <= PARITY_RTOL
        assert relative_l2(vae.first_stage_model.encode(pixels.movedim(-1, 1) * 2 - 1), want_latent) <= PARITY_RTOL
        # the VAE object: [-1, 1] <-> [0, 1] and channels-last like every ComfyUI VAE
        image = vae.decode(z)
        latent = vae.encode(pixels)
    assert image.shape == (2, 128, 192, 3)
    assert relative_l2(image, ((want_decoded + 1) / 2).clamp(0, 1).movedim(1, -1)) <= PARITY_RTOL
    assert relative_l2(latent, want_latent) <= PARITY_RTOL


def test_vae_exposes_what_core_reads(tiny_vae, tiny_sd):
    import comfy.sd

    assert isinstance(tiny_vae, comfy.sd.VAE)
    assert tiny_vae.spacial_compression_decode() == tiny_vae.spacial_compression_encode() == 32
    assert tiny_vae.temporal_compression_decode() is None
    assert (tiny_vae.latent_channels, tiny_vae.latent_dim, tiny_vae.output_channels) == (32, 2, 3)
    assert tiny_vae.first_stage_model.scaling_factor == 1.0  # 0.41407 lives in the latent format
    assert tiny_vae.get_sd().keys() == tiny_sd.keys()
    assert tiny_vae.memory_used_decode((1, 32, 128, 128), torch.bfloat16) == 750 * 4096 * 4096 * 2
    assert tiny_vae.model_size() > 0 and tiny_vae.patcher.model is tiny_vae.first_stage_model


def test_core_vae_nodes_accept_the_native_vae(tiny_vae):
    import nodes

    z = torch.randn(1, 32, 3, 5, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        (image,) = nodes.VAEDecode().decode(tiny_vae, {"samples": z})
        (tiled,) = nodes.VAEDecodeTiled().decode(tiny_vae, {"samples": z}, tile_size=512, overlap=64)
        (latent,) = nodes.VAEEncode().encode(tiny_vae, image[:, :90, :150])  # cropped to multiples of 32
    assert image.shape == (1, 96, 160, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
    assert torch.equal(tiled, image)  # 512 px asked, raised to 1024 px: one tile covers it
    assert latent["samples"].shape == (1, 32, 2, 4)


def test_decoder_only_vae_decodes_and_refuses_to_encode(comfy_host, tiny_sd, reference):
    from velox.host.dcae_vae import load_dcae_vae

    vae = load_dcae_vae({k: v for k, v in tiny_sd.items() if k.startswith("decoder.")}, path="dcae_decoder.safetensors",
                        dtype=torch.float32)
    z = torch.randn(1, 32, 2, 2, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert relative_l2(vae.first_stage_model.decode(z), reference.decode(z).sample) <= PARITY_RTOL
        with pytest.raises(VeloxLoadError, match=r"^dcae_decoder\.safetensors: .*only the decoder"):
            vae.encode(torch.rand(1, 64, 64, 3))


# --- tiled decode -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 31, 32, 33, 40, 60, 61, 100, 128])
def test_tile_starts_cover_evenly_with_at_least_the_overlap(comfy_host, length):
    from velox.host.dcae_vae import tile_starts

    starts = tile_starts(length, 32, 4)
    assert starts[0] == 0 and starts[-1] + min(32, length) == length
    assert all(later - earlier <= 32 - 4 for earlier, later in zip(starts, starts[1:]))


def test_tiled_decode_blends_without_a_seam(tiny_vae):
    """1024 x 1920 px from a 32 x 60 latent: two 1024 px tiles sharing exactly the minimum 128 px.

    DC-AE's linear attention is global per tile, so tiles differ from the full decode (random weights
    exaggerate this): measured max |tiled - full| 1.0 (saturated pixels), mean 0.069. A seam would be a
    column where the tiled image changes faster than the full decode does. Measured: blended, the ratio of
    the two column gradients peaks at 1.24 inside the overlap and 1.30 outside it; stitching the same two
    tiles with a hard cut gives 2.64 at the cut.
    """
    import comfy.utils

    from velox.host.dcae_vae import decode_tiled_dcae, tile_starts

    z = torch.randn(1, 32, 32, 60, generator=torch.Generator().manual_seed(1))
    tiles, ticks = [], []
    decode = tiny_vae.first_stage_model.decode
    tiny_vae.first_stage_model.decode = lambda latent: tiles.append(decode(latent).float()) or tiles[-1]
    previous_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: ticks.append((value, total)))
    try:
        with torch.inference_mode():
            tiled = decode_tiled_dcae(tiny_vae, z, tile_px=1024, overlap_px=128)
    finally:
        del tiny_vae.first_stage_model.decode
        comfy.utils.set_progress_bar_global_hook(previous_hook)
    with torch.inference_mode():
        full = tiny_vae.decode(z)

    starts = [s * 32 for s in tile_starts(60, 32, 4)]
    assert starts == [0, 896] and len(tiles) == 2 and ticks == [(1, 2), (2, 2)]
    difference = (tiled - full).abs()
    print(f"tiled vs full: max {difference.max():.4f}, mean {difference.mean():.4f}")
    assert tiled.shape == full.shape == (1, 1024, 1920, 3)
    assert difference.mean() <= 0.08

    def column_gradient(image):
        return (image[:, :, 1:] - image[:, :, :-1]).abs().mean(dim=(0, 1, 3))

    cut = (starts[1] + 1024) // 2
    hard_cut = torch.cat([tiles[0][..., :cut], tiles[1][..., cut - starts[1]:]], dim=-1)
    hard_cut = ((hard_cut + 1) / 2).clamp(0, 1).movedim(1, -1)
    ratio = column_gradient(tiled) / column_gradient(full)
    overlap = slice(starts[1], 1024)
    inside, outside = ratio[overlap].max(), torch.cat([ratio[: starts[1]], ratio[1024:]]).max()
    hard_at_cut = (column_gradient(hard_cut) / column_gradient(full))[cut - 1]
    print(f"gradient ratio: blended overlap {inside:.3f}, elsewhere {outside:.3f}, hard cut {hard_at_cut:.3f}")
    assert hard_at_cut >= 2.0  # the measure sees a seam when there is one
    assert inside <= outside  # and with blending the tile boundary is no rougher than the rest


def test_tiled_decode_stops_between_tiles_when_interrupted(tiny_vae):
    import comfy.model_management

    from velox.host.dcae_vae import decode_tiled_dcae

    comfy.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        decode_tiled_dcae(tiny_vae, torch.zeros(1, 32, 40, 40))
    assert not comfy.model_management.processing_interrupted()


# --- files that are not a DC-AE ---------------------------------------------------------------------------

NOT_DCAE = {
    "sd_vae.safetensors": (["decoder.up.0.block.0.conv1.weight", "encoder.down.0.block.0.conv1.weight",
                            "post_quant_conv.weight"], "KL autoencoder in the LDM layout"),
    "sdxl_vae_diffusers.safetensors": (["decoder.up_blocks.0.resnets.0.norm1.weight", "decoder.conv_in.weight"],
                                       "KL autoencoder in the diffusers layout"),
    "wan_2.1_vae.safetensors": (["decoder.upsamples.0.residual.0.gamma", "decoder.head.0.gamma",
                                 "encoder.downsamples.0.residual.0.gamma"], "a Wan VAE"),
    "sana_1600M.safetensors": (["blocks.0.attn.qkv.weight", "final_layer.linear.weight"], "a diffusion model"),
    "notes.safetensors": (["hello"], "no DC-AE autoencoder keys"),
}


@pytest.mark.parametrize("name", NOT_DCAE)
def test_wrong_checkpoints_raise_an_error_naming_the_file_and_a_dcae(comfy_host, name):
    from velox.host.dcae_vae import load_dcae_vae

    keys, what = NOT_DCAE[name]
    with pytest.raises(VeloxLoadError) as raised:
        load_dcae_vae({k: torch.zeros(1) for k in keys}, path=f"/models/vae/{name}")
    message = str(raised.value)
    assert message.startswith(f"{name}: ") and what in message
    assert "expected a DC-AE autoencoder" in message


def test_truncated_dcae_raises_instead_of_leaving_random_weights(comfy_host, tiny_sd):
    from velox.host.dcae_vae import load_dcae_vae

    broken = {k: v for k, v in tiny_sd.items() if k != "decoder.up_blocks.3.1.attn.to_k.weight"}
    with pytest.raises(VeloxLoadError, match=r"^dcae_cut\.safetensors: .*missing \['decoder\.up_blocks\.3\.1\.attn"):
        load_dcae_vae(broken, path="dcae_cut.safetensors")


def test_unknown_original_layout_key_raises(tiny_sd):
    original = diffusers_dcae_to_original(tiny_sd)
    original["decoder.stages.0.op_list.1.main.conv3.conv.weight"] = torch.zeros(1)
    with pytest.raises(VeloxLoadError, match=r"^dc_ae\.safetensors: 1 key\(s\) .*conv3"):
        prepare_dcae_state_dict(original, "dc_ae.safetensors")
