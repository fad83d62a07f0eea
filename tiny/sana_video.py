"""Tiny SANA-Video transformers of the real architecture, deterministic random weights, every layout.

Weights are made under the official names with what the official release also carries (4-D 1x1
Mix-FFN convs, the ``pos_embed`` buffer and the null caption, which loaders drop). Layouts written:
the official ``.pth`` (``{"state_dict": ...}``, as ``SANA_Video_2B_480p.pth``), official or
ComfyUI-prefixed safetensors, the diffusers single file and the diffusers pipeline folder
(``SANA-Video_2B_480p_diffusers``: model_index.json + transformer/, single or sharded). No diffusers
import: the diffusers names come from ``loaders.sana_video_keys``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..loaders.sana_video_keys import diffusers_config, sana_video_official_to_diffusers
from ..models.sana_video import SanaVideoConfig, SanaVideoTransformer
from .sana import random_sana_tensor, write_official_pth, write_safetensors

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
NULL_CAPTION_TOKENS = 4
PIPELINE_INDEX = {"_class_name": "SanaVideoPipeline", "_diffusers_version": "0.42.1",
                  "transformer": ["diffusers", "SanaVideoTransformer3DModel"]}


def tiny_sana_video_config(caption_channels: int, name: str = "tiny_sana_video") -> SanaVideoConfig:
    """480p-style (16-channel latent, 2x2 patches) at hidden 64: two 32-channel heads, two blocks."""
    return SanaVideoConfig(hidden_size=64, depth=2, num_heads=2, linear_head_dim=32,
                           caption_channels=caption_channels, name=name)


def tiny_sana_video_720p_config(caption_channels: int, name: str = "tiny_sana_video_720p") -> SanaVideoConfig:
    """720p-style (128-channel LTX-2 latent, 1x1x1 patches) at hidden 64: two 32-channel heads, two blocks."""
    return SanaVideoConfig(hidden_size=64, depth=2, num_heads=2, linear_head_dim=32, in_channels=128,
                           out_channels=128, patch_size=(1, 1, 1), caption_channels=caption_channels,
                           sample_size=22, vae="ltx2", name=name)


def tiny_sana_video_state_dict(config: SanaVideoConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights under official names, as the official checkpoint holds them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in SanaVideoTransformer.from_config(config).state_dict().items()}
    state_dict = {key: random_sana_tensor(key, shapes[key], generator) for key in sorted(shapes)}
    for name in [k for k in state_dict if k.endswith(("inverted_conv.conv.weight", "point_conv.conv.weight"))]:
        state_dict[name] = state_dict[name][:, :, None, None].contiguous()  # official 1x1 convs are 4-D
    state_dict["pos_embed"] = torch.zeros(1, 4, config.hidden_size)
    state_dict["y_embedder.y_embedding"] = torch.randn(NULL_CAPTION_TOKENS, config.caption_channels,
                                                       generator=generator)
    return state_dict


# ----------------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------------


def write_official(path: str | Path, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """``.pth`` as released (``{"state_dict": ...}``), or official-name safetensors."""
    if str(path).endswith(".safetensors"):
        return write_safetensors(path, {k: v for k, v in state_dict.items()})
    return write_official_pth(path, state_dict)


def write_diffusers_file(path: str | Path, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """diffusers ``SanaVideoTransformer3DModel`` names in one safetensors file."""
    return write_safetensors(path, sana_video_official_to_diffusers(state_dict))


def write_diffusers_folder(folder: str | Path, config: SanaVideoConfig, state_dict: Mapping[str, torch.Tensor],
                           shards: int = 1) -> Path:
    """A diffusers pipeline folder: model_index.json + transformer/{config.json, weights}; with
    ``shards`` > 1 the weights are split and ``*.safetensors.index.json`` names them."""
    folder = Path(folder)
    component = folder / "transformer"
    component.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(PIPELINE_INDEX, indent=1))
    (component / "config.json").write_text(json.dumps(
        {**diffusers_config(config), "_diffusers_version": "0.42.1"}, indent=1))
    weights = sana_video_official_to_diffusers(state_dict)
    if shards <= 1:
        write_safetensors(component / DIFFUSERS_WEIGHTS, weights)
        return folder
    names, weight_map = sorted(weights), {}
    for index in range(shards):
        shard = f"diffusion_pytorch_model-{index + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(component / shard, {k: weights[k] for k in names[index::shards]})
        weight_map.update(dict.fromkeys(names[index::shards], shard))
    index_json = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (component / f"{DIFFUSERS_WEIGHTS}.index.json").write_text(json.dumps(index_json, indent=1))
    return folder


# ----------------------------------------------------------------------------------------------
# demo checkpoints (the registry's ``demo`` hook, run by scripts/make_demo_models.py)
# ----------------------------------------------------------------------------------------------

# Under the real release names: the official file (Efficient-Large-Model/SANA-Video_2B_480p,
# checkpoints/SANA_Video_2B_480p.pth), which the text-to-video workflow loads, and the diffusers
# repository's layout, which the image-to-video workflow loads.
DEMO_FILE = "diffusion_models/SANA_Video_2B_480p.pth"
DEMO_FOLDER = "diffusion_models/SANA-Video_2B_480p_diffusers"


def write_demo_models(models: str | Path) -> None:
    """The tiny 480p-style transformer, reading the tiny Gemma's width (so it runs with the demo Gemma
    and Wan VAE), in both layouts under ``models`` (a ComfyUI models folder)."""
    from .gemma import TINY_GEMMA_HIDDEN

    models = Path(models)
    config = tiny_sana_video_config(TINY_GEMMA_HIDDEN, name="demo_tiny_sana_video")
    state_dict = tiny_sana_video_state_dict(config, seed=0)
    write_official(models / DEMO_FILE, state_dict)
    write_diffusers_folder(models / DEMO_FOLDER, config, state_dict)
