"""Wan 2.1 I2V 14B end to end on core's nodes: our loader, core CLIP vision + WanImageToVideo, our sampler.

The CLIP vision model is core's own ``ClipVisionModel`` at a tiny ViT-H-shaped config (1280 wide, as
Wan's ``img_emb`` expects, 2 layers); the Wan model is the tiny Wan 2.1 I2V with ``img_emb`` and the
``k_img`` / ``v_img`` projections, built by ``VeloxWanLoader``'s code.
"""

from __future__ import annotations

import json

import pytest
import torch

from velox.tiny.wan import TINY_WAN_CONFIGS, tiny_wan_state_dict, tiny_wan_vae_state_dict

TINY_CLIP_VISION = {"hidden_act": "gelu", "hidden_size": 1280, "image_size": 224, "intermediate_size": 256,
                    "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 16,
                    "num_channels": 3, "num_hidden_layers": 2, "patch_size": 14, "projection_dim": 64}


@pytest.fixture(scope="module")
def parts(comfy_host, tmp_path_factory):
    import comfy.clip_vision
    import comfy.sd

    from velox.host.wan_loading import build_wan_model
    from velox.loaders.wan_detect import sniff_wan

    variant, weights = sniff_wan(tiny_wan_state_dict(TINY_WAN_CONFIGS["i2v"], seed=3))
    model = build_wan_model(weights, variant, dtype=torch.float32)
    vae = comfy.sd.VAE(sd=tiny_wan_vae_state_dict())
    config = tmp_path_factory.mktemp("clip_vision") / "config.json"
    config.write_text(json.dumps(TINY_CLIP_VISION))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(config))
    generator = torch.Generator().manual_seed(0)
    clip_vision.load_sd({k: torch.randn(v.shape, generator=generator) * 0.02
                         for k, v in clip_vision.get_sd().items()})
    return variant, model, vae, clip_vision


def conditioning(text_dim: int) -> tuple[list, list]:
    generator = torch.Generator().manual_seed(1)
    return ([[torch.randn(1, 8, text_dim, generator=generator), {}]],
            [[torch.randn(1, 8, text_dim, generator=generator), {}]])


def image_to_video(parts, seed: int, with_clip_vision: bool = True):
    from comfy_extras.nodes_wan import WanImageToVideo

    variant, model, vae, clip_vision = parts
    start = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(seed))
    clip_output = clip_vision.encode_image(start, crop=False) if with_clip_vision else None
    positive, negative = conditioning(TINY_WAN_CONFIGS["i2v"].text_dim)
    return WanImageToVideo.execute(positive, negative, vae, 32, 32, 5, 1, start_image=start,
                                   clip_vision_output=clip_output).result


def sample(model, positive, negative, latent) -> torch.Tensor:
    from velox.nodes.wan_sampling_nodes import WanExpertSampler

    return WanExpertSampler.execute(model, positive, negative, latent, preset="custom", seed=2, steps=2,
                                    cfg_high_noise=3.0, cfg_low_noise=3.0, sampler_name="euler",
                                    scheduler="simple", shift=5.0, switch="step", boundary=0.9,
                                    switch_step=2).result[0]["samples"]


def test_the_variant_is_wan21_i2v_with_the_image_embedding(parts):
    variant, model, _, _ = parts
    assert variant.kind == "i2v"
    assert model.model.model_config.unet_config["model_type"] == "i2v"
    assert model.model.diffusion_model.img_emb is not None


def test_the_clip_vision_embedding_reaches_the_model(parts):
    _, model, _, _ = parts
    positive, negative, latent = image_to_video(parts, seed=4)
    assert positive[0][1]["clip_vision_output"].penultimate_hidden_states.shape == (1, 257, 1280)
    first = sample(model, positive, negative, latent)
    assert first.shape == latent["samples"].shape and torch.isfinite(first).all()
    other_clip = image_to_video(parts, seed=5)[0][0][1]["clip_vision_output"]
    swapped = [[positive[0][0], {**positive[0][1], "clip_vision_output": other_clip}]]
    assert not torch.allclose(first, sample(model, swapped, negative, latent))


def test_wan21_i2v_without_clip_vision_is_refused_naming_the_nodes(parts):
    _, model, _, _ = parts
    positive, negative, latent = image_to_video(parts, seed=4, with_clip_vision=False)
    with pytest.raises(ValueError, match=r"Wan 2.1 I2V needs .*CLIP vision.*CLIPVisionEncode.*WanImageToVideo"):
        sample(model, positive, negative, latent)
