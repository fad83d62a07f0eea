"""Tiny Sana ControlNets of the real architecture, deterministic random weights, both layouts.

The official layout is what a ``Sana_*_ControlNet_HED.pth`` holds: the base transformer's tensors plus
``controlnet.N.{copied_block, before_proj, after_proj}`` (1x1 Mix-FFN convs 4-D). ``before_proj`` and
``after_proj`` are random, not zero as at the start of training, so that the control shows in a test.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..loaders.sana_controlnet_keys import official_controlnet_to_diffusers
from ..models.sana import SanaConfig
from ..models.sana_controlnet import SanaControlNet
from .sana import random_sana_tensor, tiny_sana_state_dict, write_official_pth, write_safetensors

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def tiny_sana_controlnet_state_dict(config: SanaConfig, copied_blocks: int = 2, seed: int = 0,
                                    with_base: bool = True) -> dict[str, torch.Tensor]:
    """Official names; ``with_base`` adds the base transformer (``config``'s depth) as the release does."""
    generator = torch.Generator().manual_seed(seed)
    control_config = dataclasses.replace(config, depth=copied_blocks)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in SanaControlNet(**control_config.model_kwargs()).state_dict().items()}
    base = tiny_sana_state_dict(config, seed=seed + 1000) if with_base else {}
    state_dict = {**base}
    for key in sorted(shapes):
        state_dict[key] = random_sana_tensor(key, shapes[key], generator)
        if key.endswith(("mlp.inverted_conv.conv.weight", "mlp.point_conv.conv.weight")):
            state_dict[key] = state_dict[key][:, :, None, None].contiguous()  # official 1x1 convs are 4-D
    return state_dict


def diffusers_controlnet_config(config: SanaConfig, copied_blocks: int) -> dict:
    """The ``config.json`` diffusers writes for a ``SanaControlNetModel`` of this config."""
    return {
        "_class_name": "SanaControlNetModel",
        "_diffusers_version": "0.42.1",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_attention_heads": config.hidden_size // config.linear_head_dim,
        "attention_head_dim": config.linear_head_dim,
        "num_layers": copied_blocks,
        "num_cross_attention_heads": config.num_heads,
        "cross_attention_head_dim": config.hidden_size // config.num_heads,
        "cross_attention_dim": config.hidden_size,
        "caption_channels": config.caption_channels,
        "mlp_ratio": config.mlp_ratio,
        "sample_size": config.sample_size,
        "patch_size": config.patch_size,
        "interpolation_scale": config.pe_interpolation if config.use_pe else None,
    }


def controlnet_only(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official file's ControlNet half (embedders + controlnet.*), without the base blocks."""
    from ..loaders.sana_controlnet_keys import canonicalize_sana_controlnet

    return canonicalize_sana_controlnet(state_dict)


def write_official_controlnet(path: str | Path, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """``torch.save({"state_dict": ...})`` as the official release."""
    return write_official_pth(path, state_dict)


def write_diffusers_controlnet(folder: str | Path, config: SanaConfig, state_dict: Mapping[str, torch.Tensor],
                               copied_blocks: int) -> Path:
    """A diffusers ``SanaControlNetModel`` folder: config.json + diffusion_pytorch_model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(diffusers_controlnet_config(config, copied_blocks), indent=2))
    write_safetensors(folder / DIFFUSERS_WEIGHTS, official_controlnet_to_diffusers(controlnet_only(state_dict)))
    return folder
