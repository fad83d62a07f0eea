"""Sana key maps: every known layout onto the official names, and official back to diffusers.

Layouts read: official (``blocks.N.attn.qkv`` ..., `.pth` or safetensors), diffusers current
(``time_embed.*``, ``patch_embed.*``; Sprint's ``time_embed.timestep_embedder`` /
``guidance_embedder``), diffusers legacy (``adaln_single.*``, ``pos_embed.proj.*``), and any of
those under ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.`` prefix. Diffusers'
separate q/k/v become the official fused ``qkv`` / ``kv_linear``; 4-D 1x1 conv weights of the
Mix-FFN become the 2-D weights of ``models.sana``'s Linear layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import VeloxLoadError
from .checkpoint_files import DIFFUSION_MODEL_PREFIXES, strip_diffusion_model_prefix

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
_DIFFUSERS_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_SQUEEZED_1X1 = re.compile(r"^blocks\.\d+\.mlp\.(inverted_conv|point_conv)\.conv\.weight$")
_LEAVES = ("weight", "bias")


def is_dropped_key(key: str) -> bool:
    """Buffers (``pos_embed``, the null caption) and training-only tensors (``logvar_linear``)."""
    return key in DROPPED_KEYS or key.startswith(DROPPED_PREFIXES)


def is_official_key(key: str) -> bool:
    return _OFFICIAL_KEY.match(key) is not None


def canonicalize_sana_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """Any supported Sana layout -> official names, 2-D 1x1 Mix-FFN weights, buffers dropped.

    Raises VeloxLoadError naming the first keys that match no layout, or a missing q/k/v part.
    """
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in strip_sana_prefix(state_dict).items():
        if is_dropped_key(key):
            continue
        fused = _fusion_part(key)
        if fused is not None:
            index, target, part, leaf = fused
            parts.setdefault((index, target, leaf), {})[part] = tensor
            continue
        official = key if is_official_key(key) else _rename(key)
        if official is None:
            unknown.append(key)
        else:
            out[official] = tensor
    if unknown:
        raise VeloxLoadError(
            path, f"{len(unknown)} tensor(s) match no Sana layout: {', '.join(sorted(unknown)[:6])}",
            "official (blocks.N.attn.qkv ...) or diffusers (transformer_blocks.N.attn1.to_q ...) names",
        )
    out.update(_fuse(parts, path))
    return {k: _squeeze_1x1(k, v) for k, v in out.items()}


def _split_leaf(key: str) -> tuple[str, str]:
    """``attn1.to_out.0.weight`` -> (``attn1.to_out.0``, ``.weight``); a bare parameter keeps ''."""
    module, _, leaf = key.rpartition(".")
    return (module, "." + leaf) if module and leaf in _LEAVES else (key, "")


def _rename(key: str) -> str | None:
    match = _DIFFUSERS_BLOCK_KEY.match(key)
    if match is not None:
        module, leaf = _split_leaf(match.group(2))
        target = BLOCK_RENAMES.get(module)
        return None if target is None else f"blocks.{match.group(1)}.{target}{leaf}"
    module, leaf = _split_leaf(key)
    target = TOP_LEVEL_RENAMES.get(module)
    return None if target is None else target + leaf


_PART_TO_FUSION = {part: target for target, part_names in BLOCK_FUSIONS.items() for part in part_names}


def _fusion_part(key: str) -> tuple[int, str, str, str] | None:
    """``transformer_blocks.3.attn1.to_k.weight`` -> (3, ``attn.qkv``, ``attn1.to_k``, ``.weight``)."""
    match = _DIFFUSERS_BLOCK_KEY.match(key)
    if match is None:
        return None
    module, leaf = _split_leaf(match.group(2))
    target = _PART_TO_FUSION.get(module)
    return None if target is None else (int(match.group(1)), target, module, leaf)


def _fuse(parts: dict[tuple[int, str, str], dict[str, torch.Tensor]], path) -> dict[str, torch.Tensor]:
    fused = {}
    for (index, target, leaf), found in sorted(parts.items()):
        names = BLOCK_FUSIONS[target]
        missing = [n for n in names if n not in found]
        if missing:
            raise VeloxLoadError(
                path, f"transformer_blocks.{index}.{missing[0]}{leaf} is missing",
                f"all of {', '.join(n + leaf for n in names)} for blocks.{index}.{target}",
            )
        fused[f"blocks.{index}.{target}{leaf}"] = torch.cat([found[n] for n in names], dim=0)
    return fused


def _squeeze_1x1(key: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.ndim == 4 and _SQUEEZED_1X1.match(key):
        return tensor.flatten(1)
    return tensor


# ----------------------------------------------------------------------------------------------
# official -> diffusers (for writing test and demo checkpoints)
# ----------------------------------------------------------------------------------------------

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
_BLOCK_REVERSE = {official: diffusers for diffusers, official in BLOCK_RENAMES.items()}
_UNSQUEEZED_1X1 = ("mlp.inverted_conv.conv.weight", "mlp.point_conv.conv.weight")


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
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if is_dropped_key(key):
            continue
        match = re.match(r"^blocks\.(\d+)\.(.+)$", key)
        if match is None:
            module, leaf = _split_leaf(key)
            out[top_level[module] + leaf] = tensor
        else:
            out.update(_block_to_diffusers(int(match.group(1)), match.group(2), tensor))
    return out


def _block_to_diffusers(index: int, rest: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    prefix = f"transformer_blocks.{index}."
    module, leaf = _split_leaf(rest)
    if module in BLOCK_FUSIONS:
        names = BLOCK_FUSIONS[module]
        return {prefix + n + leaf: t.clone() for n, t in zip(names, tensor.chunk(len(names), dim=0))}
    if rest.endswith(_UNSQUEEZED_1X1) and tensor.ndim == 2:
        tensor = tensor[:, :, None, None]
    return {prefix + _BLOCK_REVERSE[module] + leaf: tensor}
