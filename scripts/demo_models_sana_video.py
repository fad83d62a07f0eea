"""Tiny demo SANA-Video checkpoints under the real release names, in both layouts users have.

- ``diffusion_models/SANA_Video_2B_480p.pth``: the official release file
  (``Efficient-Large-Model/SANA-Video_2B_480p``, ``checkpoints/SANA_Video_2B_480p.pth``),
  ``{"state_dict": ...}`` under official names; the text-to-video workflow loads it;
- ``diffusion_models/SANA-Video_2B_480p_diffusers/``: the diffusers repository's layout
  (model_index.json + transformer/config.json + weights); the image-to-video workflow loads it.

Both hold the same tiny 480p-style transformer (16-channel Wan 2.1 latent, 2x2 patches) that reads the
tiny Gemma's width, so it runs with ``make_demo_models``' Gemma and Wan VAE.
"""

from __future__ import annotations

from pathlib import Path

SANA_VIDEO_FILE = "diffusion_models/SANA_Video_2B_480p.pth"
SANA_VIDEO_FOLDER = "diffusion_models/SANA-Video_2B_480p_diffusers"


def write_sana_video(models: Path) -> None:
    from velox.tiny.gemma import TINY_GEMMA_HIDDEN
    from velox.tiny.sana_video import (
        tiny_sana_video_config,
        tiny_sana_video_state_dict,
        write_diffusers_folder,
        write_official,
    )

    config = tiny_sana_video_config(TINY_GEMMA_HIDDEN, name="demo_tiny_sana_video")
    state_dict = tiny_sana_video_state_dict(config, seed=0)
    write_official(models / SANA_VIDEO_FILE, state_dict)
    write_diffusers_folder(models / SANA_VIDEO_FOLDER, config, state_dict)


SANA_VIDEO_WRITERS = {"sana-video 2b 480p": write_sana_video}
