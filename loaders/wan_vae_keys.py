"""Wan 2.1 VAE key map: diffusers ``AutoencoderKLWan`` names onto the official names.

The official, ComfyUI and Kijai files share one layout, which is also ComfyUI core's
``comfy.ldm.wan.vae.WanVAE``. The table is the inverse of diffusers' ``convert_wan_vae_to_diffusers``:
residual blocks are ``Sequential``s officially (``residual.{0,2,3,6}``) and named modules in
diffusers (``norm1, conv1, norm2, conv2``); the decoder's flat ``upsamples.i`` list is grouped
into ``up_blocks.b.resnets.r`` + ``up_blocks.b.upsamplers.0`` (num_res_blocks + 2 entries a stage).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import VeloxLoadError

DIFFUSERS_VAE_MARKER = "decoder.conv_in.weight"
OFFICIAL_VAE_MARKER = "decoder.middle.0.residual.0.gamma"

# exact diffusers module paths -> official ones
MODULE_RENAMES: dict[str, str] = {
    "quant_conv": "conv1",
    "post_quant_conv": "conv2",
    "encoder.conv_in": "encoder.conv1",
    "decoder.conv_in": "decoder.conv1",
    "encoder.norm_out": "encoder.head.0",
    "encoder.conv_out": "encoder.head.2",
    "decoder.norm_out": "decoder.head.0",
    "decoder.conv_out": "decoder.head.2",
    "encoder.mid_block.resnets.0": "encoder.middle.0",
    "encoder.mid_block.attentions.0": "encoder.middle.1",
    "encoder.mid_block.resnets.1": "encoder.middle.2",
    "decoder.mid_block.resnets.0": "decoder.middle.0",
    "decoder.mid_block.attentions.0": "decoder.middle.1",
    "decoder.mid_block.resnets.1": "decoder.middle.2",
}
# inside one residual block: diffusers -> official
RESIDUAL_RENAMES: dict[str, str] = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}
_UP_RESNET = re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_UP_SAMPLER = re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$")
_DOWN_BLOCK = re.compile(r"^encoder\.down_blocks\.(\d+)\.(.+)$")
_RESIDUAL_MODULE = re.compile(r"^(?:encoder|decoder)\.middle\.[02]\.|^encoder\.downsamples\.\d+\.|"
                              r"^decoder\.upsamples\.\d+\.")


def _rename_residual(prefix: str, rest: str) -> str:
    module, _, leaf = rest.partition(".")
    return f"{prefix}.{RESIDUAL_RENAMES.get(module, module)}.{leaf}" if leaf else f"{prefix}.{rest}"


def diffusers_vae_key_to_official(key: str, stage_length: int) -> str:
    """One diffusers Wan VAE key under its official name; ``stage_length`` = num_res_blocks + 2."""
    for module, official in MODULE_RENAMES.items():
        if key.startswith(module + "."):
            rest = key[len(module) + 1:]
            return _rename_residual(official, rest) if _RESIDUAL_MODULE.match(official + ".") else f"{official}.{rest}"
    match = _UP_RESNET.match(key)
    if match:
        stage, resnet, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        return _rename_residual(f"decoder.upsamples.{stage * stage_length + resnet}", rest)
    match = _UP_SAMPLER.match(key)
    if match:
        return f"decoder.upsamples.{int(match.group(1)) * stage_length + stage_length - 1}.{match.group(2)}"
    match = _DOWN_BLOCK.match(key)
    if match:
        return _rename_residual(f"encoder.downsamples.{match.group(1)}", match.group(2))
    return key


def canonicalize_wan_vae_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """A Wan 2.1 VAE in official/ComfyUI or diffusers layout -> official names.

    Raises VeloxLoadError for anything else (the 48-channel Wan 2.2 VAE in diffusers layout
    included: its block structure differs; the official 2.2 file passes through to ComfyUI).
    """
    state_dict = {k[len("vae."):] if k.startswith("vae.") else k: v for k, v in state_dict.items()}
    if OFFICIAL_VAE_MARKER in state_dict:
        return dict(state_dict)
    if DIFFUSERS_VAE_MARKER not in state_dict or "decoder.mid_block.resnets.0.norm1.gamma" not in state_dict:
        raise VeloxLoadError(path, f"does not look like a Wan VAE (first keys: {list(state_dict)[:4]})",
                             "a Wan 2.1 VAE: official keys such as decoder.middle.0.residual.0.gamma or "
                             "diffusers AutoencoderKLWan keys such as decoder.mid_block.resnets.0.norm1.gamma")
    if any(".avg_shortcut" in k or ".upsampler." in k for k in state_dict):
        raise VeloxLoadError(path, "is a diffusers Wan 2.2 (48-channel) VAE, which Velox cannot map yet",
                             "the official wan2.2_vae.safetensors, or a Wan 2.1 VAE")
    resnets = {int(m.group(2)) for m in map(_UP_RESNET.match, state_dict) if m}
    stage_length = max(resnets) + 2  # resnets per stage + the upsampler
    return {diffusers_vae_key_to_official(k, stage_length): v for k, v in state_dict.items()}
