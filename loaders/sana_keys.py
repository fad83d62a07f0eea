"""Sana key maps: every known layout onto the official names, and official back to diffusers.

Layouts read: official (``blocks.N.attn.qkv`` ..., `.pth` or safetensors), diffusers current
(``time_embed.*``, ``patch_embed.*``; Sprint's ``time_embed.timestep_embedder`` /
``guidance_embedder``), diffusers legacy (``adaln_single.*``, ``pos_embed.proj.*``), and any of
those under ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.`` prefix. Diffusers'
separate q/k/v become the official fused ``qkv`` / ``kv_linear``; 4-D 1x1 conv weights of the
Mix-FFN become the 2-D weights of ``models.sana``'s Linear layers. The tables are this module's; the
mapping that reads them is ``fused_key_map.FusedKeyMap``, which SANA-Video's key map shares.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint_files import DIFFUSION_MODEL_PREFIXES, strip_diffusion_model_prefix
from .fused_key_map import FusedKeyMap

# ComfyUI's prefixes, stripped by the one implementation every family uses
SANA_PREFIXES = DIFFUSION_MODEL_PREFIXES
strip_sana_prefix = strip_diffusion_model_prefix

# Buffers and training-only tensors that no inference layout needs.
DROPPED_KEYS = frozenset({"pos_embed", "patch_embed.pos_embed", "y_embedder.y_embedding",
                          "caption_projection.y_embedding"})
# logvar_linear: Sprint training only; controlnet.: the ControlNet half of an official *_ControlNet_HED file
# (its base transformer loads as a Sana model; loaders/sana_controlnet_keys.py reads the other half)
DROPPED_PREFIXES = ("logvar_linear.", "controlnet.")

# diffusers module path -> official module path (outside the blocks); weight/bias follow along.
TOP_LEVEL_RENAMES: dict[str, str] = {
    "patch_embed.proj": "x_embedder.proj",
    "pos_embed.proj": "x_embedder.proj",  # legacy
    "time_embed.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_embed.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",  # Sprint
    "time_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_embed.guidance_embedder.linear_1": "cfg_embedder.mlp.0",
    "time_embed.guidance_embedder.linear_2": "cfg_embedder.mlp.2",
    "time_embed.linear": "t_block.1",
    "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",  # legacy
    "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "adaln_single.linear": "t_block.1",
    "caption_projection.linear_1": "y_embedder.y_proj.fc1",
    "caption_projection.linear_2": "y_embedder.y_proj.fc2",
    "caption_norm": "attention_y_norm",
    "proj_out": "final_layer.linear",
    "scale_shift_table": "final_layer.scale_shift_table",
}

# inside transformer_blocks.N (diffusers) -> inside blocks.N (official)
BLOCK_RENAMES: dict[str, str] = {
    "scale_shift_table": "scale_shift_table",
    "attn1.to_out.0": "attn.proj",
    "attn1.norm_q": "attn.q_norm",
    "attn1.norm_k": "attn.k_norm",
    "attn2.to_q": "cross_attn.q_linear",
    "attn2.to_out.0": "cross_attn.proj",
    "attn2.norm_q": "cross_attn.q_norm",
    "attn2.norm_k": "cross_attn.k_norm",
    "ff.conv_inverted": "mlp.inverted_conv.conv",
    "ff.conv_depth": "mlp.depth_conv.conv",
    "ff.conv_point": "mlp.point_conv.conv",
}

# official fused projection <- diffusers parts, concatenated on dim 0 in this order
BLOCK_FUSIONS: dict[str, tuple[str, ...]] = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}

# Every official key, as patterns (blocks' index as \d+).
OFFICIAL_KEY_PATTERNS = (
    r"x_embedder\.proj\.(weight|bias)",
    r"(t_embedder|cfg_embedder)\.mlp\.[02]\.(weight|bias)",
    r"t_block\.1\.(weight|bias)",
    r"y_embedder\.y_proj\.fc[12]\.(weight|bias)",
    r"attention_y_norm\.weight",
    r"final_layer\.linear\.(weight|bias)",
    r"final_layer\.scale_shift_table",
    r"blocks\.\d+\.scale_shift_table",
    r"blocks\.\d+\.attn\.qkv\.weight",
    r"blocks\.\d+\.attn\.proj\.(weight|bias)",
    r"blocks\.\d+\.(attn|cross_attn)\.(q_norm|k_norm)\.weight",
    r"blocks\.\d+\.cross_attn\.(q_linear|kv_linear|proj)\.(weight|bias)",
    r"blocks\.\d+\.mlp\.(inverted_conv|depth_conv)\.conv\.(weight|bias)",
    r"blocks\.\d+\.mlp\.point_conv\.conv\.weight",
)
_OFFICIAL_KEY = re.compile("^(?:" + "|".join(OFFICIAL_KEY_PATTERNS) + ")$")


def is_official_key(key: str) -> bool:
    return _OFFICIAL_KEY.match(key) is not None


SANA_KEY_MAP = FusedKeyMap(
    layout="Sana",
    expected="official (blocks.N.attn.qkv ...) or diffusers (transformer_blocks.N.attn1.to_q ...) names",
    top_level_renames=TOP_LEVEL_RENAMES,
    block_renames=BLOCK_RENAMES,
    block_fusions=BLOCK_FUSIONS,
    dropped_keys=DROPPED_KEYS,
    dropped_prefixes=DROPPED_PREFIXES,
    is_official=is_official_key,
)
is_dropped_key = SANA_KEY_MAP.is_dropped


def canonicalize_sana_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """Any supported Sana layout -> official names, 2-D 1x1 Mix-FFN weights, buffers dropped
    (``FusedKeyMap.canonicalize``, which names in a VeloxLoadError what it cannot map)."""
    return SANA_KEY_MAP.canonicalize(strip_sana_prefix(state_dict), path)


# ----------------------------------------------------------------------------------------------
# official -> diffusers (for writing test and demo checkpoints)
# ----------------------------------------------------------------------------------------------


def diffusers_dimensions(config: Any) -> dict[str, Any]:
    """The config.json entries that diffusers' ``SanaTransformer2DModel`` and ``SanaVideoTransformer3DModel``
    derive alike from a ``SanaConfig`` or ``SanaVideoConfig`` (widths, depth, head counts), in diffusers' order."""
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_attention_heads": config.hidden_size // config.linear_head_dim,
        "attention_head_dim": config.linear_head_dim,
        "num_layers": config.depth,
        "num_cross_attention_heads": config.num_heads,
        "cross_attention_head_dim": config.hidden_size // config.num_heads,
        "cross_attention_dim": config.hidden_size,
        "caption_channels": config.caption_channels,
        "mlp_ratio": config.mlp_ratio,
    }

_LEGACY_TOP_LEVEL = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
}
_SPRINT_TOP_LEVEL = {
    "t_embedder.mlp.0": "time_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_embed.timestep_embedder.linear_2",
}
_CURRENT_TOP_LEVEL = {
    official: diffusers for diffusers, official in TOP_LEVEL_RENAMES.items()
    if not diffusers.startswith(("adaln_single.", "pos_embed.", "time_embed.timestep_embedder."))
}


def official_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], legacy: bool = False
) -> dict[str, torch.Tensor]:
    """Official names -> diffusers ``SanaTransformer2DModel`` names (``legacy``: adaln_single /
    pos_embed.proj). Fused projections are split, 1x1 Mix-FFN weights are 4-D, buffers dropped."""
    top_level = dict(_CURRENT_TOP_LEVEL)
    if any(k.startswith("cfg_embedder.") for k in state_dict):
        top_level.update(_SPRINT_TOP_LEVEL)
    if legacy:
        top_level.update(_LEGACY_TOP_LEVEL)
    return SANA_KEY_MAP.to_diffusers(state_dict, top_level)
