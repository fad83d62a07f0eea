"""Release detection from keys and shapes, on full-size UNets built on the meta device (no memory).

Each release's flags (official inference configs) -> its ``model.diffusion_model.*`` keys (+ a
Resampler's ``image_proj_model.*`` for I2V) -> ``detect_variant`` must name the release and recover
the UNet config; foreign files are refused by name.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from velox.errors import VeloxLoadError
from velox.loaders.videocrafter_detect import VARIANTS, detect_variant, split_components
from velox.models.resampler import Resampler, ResamplerConfig
from velox.models.unet3d import UNet3D, UNet3DConfig

VC2 = UNet3DConfig()
RELEASES = {  # key -> (UNet flags of the official config, file name, resampler)
    "vc1_512": (replace(VC2, temporal_conv=False, use_relative_position=True, fps_cond=False), "model.ckpt", None),
    "vc1_1024": (replace(VC2, temporal_conv=False, use_relative_position=True), "t2v_1024.ckpt", None),
    "vc2": (VC2, "videocrafter2_t2v.ckpt", None),
    "vc1_i2v": (replace(VC2, image_cross_attention=True), "i2v_512.ckpt", ResamplerConfig(video_length=None)),
    "dc256": (replace(VC2, in_channels=8, image_cross_attention=True, image_cross_attention_scale_learnable=True),
              "dynamicrafter_256.ckpt", ResamplerConfig()),
    "dc512": (replace(VC2, in_channels=8, image_cross_attention=True), "dynamicrafter_512.ckpt", ResamplerConfig()),
    "dc512_interp": (replace(VC2, in_channels=8, image_cross_attention=True), "dynamicrafter_512_interp.ckpt",
                     ResamplerConfig()),
    "dc1024": (replace(VC2, in_channels=8, image_cross_attention=True), "dynamicrafter_1024.ckpt", ResamplerConfig()),
}


def release_keys(config: UNet3DConfig, resampler: ResamplerConfig | None) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        keys = {f"model.diffusion_model.{k}": v for k, v in UNet3D(config).state_dict().items()}
        if resampler is not None:
            keys.update({f"image_proj_model.{k}": v for k, v in Resampler(resampler).state_dict().items()})
    keys["first_stage_model.decoder.conv_in.weight"] = torch.empty(512, 4, 3, 3, device="meta")
    return keys


@pytest.mark.parametrize("key", sorted(RELEASES))
def test_release_is_detected_from_its_keys(key):
    config, name, resampler = RELEASES[key]
    found = detect_variant(split_components(release_keys(config, resampler)), name)
    assert found.key == key
    assert found.unet == replace(config, default_fps=VARIANTS[key][5])
    assert found.resampler == resampler


def test_variant_override_and_mismatch():
    config, _, resampler = RELEASES["dc512"]
    parts = split_components(release_keys(config, resampler))
    assert detect_variant(parts, "model.ckpt", variant="dc1024").key == "dc1024"
    with pytest.raises(VeloxLoadError, match="8 input channels"):
        detect_variant(parts, "model.ckpt", variant="vc2")


def test_frame_counts():
    dc = detect_variant(split_components(release_keys(*RELEASES["dc512"][::2])), "dynamicrafter_512.ckpt")
    dc.check_frames(16)
    with pytest.raises(ValueError, match="cannot make 24 frames; it takes 16"):
        dc.check_frames(24)
    vc2 = detect_variant(split_components(release_keys(VC2, None)), "videocrafter2_t2v.ckpt")
    vc2.check_frames(8)
    with pytest.raises(ValueError, match="takes 1..32 frames"):
        vc2.check_frames(40)


def test_i2v_release_without_its_resampler_is_refused():
    parts = split_components(release_keys(RELEASES["dc512"][0], None))
    with pytest.raises(VeloxLoadError, match="image_proj_model"):
        detect_variant(parts, "dynamicrafter_512.ckpt")


def test_image_unet_is_refused():
    keys = {k: v for k, v in release_keys(VC2, None).items()  # drop the first temporal transformer
            if not k.startswith("model.diffusion_model.input_blocks.1.2.")}
    with pytest.raises(VeloxLoadError, match="image UNet"):
        detect_variant(split_components(keys), "v2-1_512-ema-pruned.ckpt")
