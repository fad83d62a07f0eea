"""SANA-Video key maps (official <-> diffusers) and the detector that reads a config from weights.

Layouts read: official (``blocks.N.attn.qkv``, ``blocks.N.mlp.t_conv`` ..., the ``SANA_Video_2B_480p.pth``
``{"state_dict": ...}`` release), diffusers ``SanaVideoTransformer3DModel`` (``transformer_blocks.N.attn1.to_q``,
``ff.conv_temp`` ...), either under ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.`` prefix. The
renames follow diffusers' ``scripts/convert_sana_video_to_diffusers.py``: diffusers' separate q/k/v become the
official fused ``qkv`` / ``kv_linear``, and the 4-D 1x1 conv weights of the Mix-FFN become the 2-D weights
of ``models.sana_video``'s Linear layers.

``detect_sana_video`` needs only key names and shapes (a state dict, or safetensors header shapes), so a
file can be recognised before its tensors are read. What the weights cannot show is taken from the
release: linear and cross-attention heads are ``hidden / 112`` (the 2B's 20 x 112), falling back to
32-channel heads for widths 112 does not divide.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import VeloxLoadError
from ..models.sana_video import SANA_VIDEO_PRESETS, SanaVideoConfig
from .checkpoint_files import unwrap_state_dict
from .families import SANA_VIDEO, refuse_foreign

SANA_VIDEO_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DIFFUSERS_CLASS = SANA_VIDEO.diffusers_class
SANA_VIDEO_EXPECTED = (
    "a SANA-Video transformer: official keys such as x_embedder.proj.weight (5-D), blocks.0.attn.qkv.weight, "
    "blocks.0.mlp.t_conv.weight (SANA_Video_2B_480p.pth), or diffusers SanaVideoTransformer3DModel keys such "
    "as patch_embedding.weight, transformer_blocks.0.attn1.to_q.weight, transformer_blocks.0.ff.conv_temp.weight"
)
# Training-only tensors and buffers of the official release (the conversion script drops them).
DROPPED_KEYS = frozenset({"pos_embed", "y_embedder.y_embedding"})
DROPPED_PREFIXES = ("logvar_linear.",)

# diffusers module path -> official module path (outside the blocks); weight/bias follow along.
TOP_LEVEL_RENAMES: dict[str, str] = {
    "patch_embedding": "x_embedder.proj",
    "time_embed.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_embed.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_embed.linear": "t_block.1",
    "caption_projection.linear_1": "y_embedder.y_proj.fc1",
    "caption_projection.linear_2": "y_embedder.y_proj.fc2",
    "caption_norm": "attention_y_norm",
    "proj_out": "final_layer.linear",
    "scale_shift_table": "final_layer.scale_shift_table",
}

# inside transformer_blocks.N (diffusers) -> inside blocks.N (official)
BLOCK_RENAMES: dict[str, str] = {
    "scale_shift_table": "scale_shift_table",
    "attn1.norm_q": "attn.q_norm",
    "attn1.norm_k": "attn.k_norm",
    "attn1.to_out.0": "attn.proj",
    "attn2.to_q": "cross_attn.q_linear",
    "attn2.norm_q": "cross_attn.q_norm",
    "attn2.norm_k": "cross_attn.k_norm",
    "attn2.to_out.0": "cross_attn.proj",
    "ff.conv_inverted": "mlp.inverted_conv.conv",
    "ff.conv_depth": "mlp.depth_conv.conv",
    "ff.conv_point": "mlp.point_conv.conv",
    "ff.conv_temp": "mlp.t_conv",
}

# official fused projection <- diffusers parts, concatenated on dim 0 in this order
BLOCK_FUSIONS: dict[str, tuple[str, ...]] = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}

# Keys that make a checkpoint SANA-Video in either layout: the temporal conv no image Sana or Wan has,
# and the 3-D patch embedding.
TEMPORAL_CONV_KEYS = ("mlp.t_conv.weight", "ff.conv_temp.weight")
PATCH_KEYS = ("x_embedder.proj.weight", "patch_embedding.weight")
RELEASE_HEAD_DIM = 112  # linear_head_dim and cross-attention head size of the 2B releases
FALLBACK_HEAD_DIM = 32
# (latent channels, patch) -> (VAE, diffusers sample_size): Wan 2.1 at 480p, LTX-2 at 720p
VAE_BY_INPUT = {(16, (1, 2, 2)): ("wan2.1", 30), (128, (1, 1, 1)): ("ltx2", 22)}

_DIFFUSERS_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_OFFICIAL_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_SQUEEZED_1X1 = ("mlp.inverted_conv.conv.weight", "mlp.point_conv.conv.weight")
_LEAVES = ("weight", "bias")


# ----------------------------------------------------------------------------------------------
# any layout -> official
# ----------------------------------------------------------------------------------------------


def strip_sana_video_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The entries under ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.`` prefix, unprefixed;
    else all, unchanged."""
    for prefix in SANA_VIDEO_PREFIXES:
        selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if selected:
            return selected
    return dict(state_dict)


def is_dropped_key(key: str) -> bool:
    """Buffers (``pos_embed``, the null caption) and training-only tensors (``logvar_linear``)."""
    return key in DROPPED_KEYS or key.startswith(DROPPED_PREFIXES)


def canonicalize_sana_video_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """Official or diffusers SANA-Video layout -> official names, 2-D 1x1 Mix-FFN weights, buffers dropped.

    Raises VeloxLoadError naming the first keys that match no layout, or a missing q/k/v part.
    """
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[int, str, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in strip_sana_video_prefix(state_dict).items():
        if is_dropped_key(key):
            continue
        fused = _fusion_part(key)
        if fused is not None:
            index, target, part, leaf = fused
            parts.setdefault((index, target, leaf), {})[part] = tensor
            continue
        official = official_name(key)
        if official is None:
            unknown.append(key)
        else:
            out[official] = tensor
    if unknown:
        raise VeloxLoadError(
            path, f"{len(unknown)} tensor(s) match no SANA-Video layout: {', '.join(sorted(unknown)[:6])}",
            "official (blocks.N.attn.qkv, blocks.N.mlp.t_conv ...) or diffusers "
            "(transformer_blocks.N.attn1.to_q, transformer_blocks.N.ff.conv_temp ...) names",
        )
    out.update(_fuse(parts, path))
    return {k: _squeeze_1x1(k, v) for k, v in out.items()}


def official_name(key: str) -> str | None:
    """The official name of an official or (non-fused) diffusers key; None for an unknown key."""
    if key in _OFFICIAL_TOP_LEVEL_KEYS or _is_official_block_key(key):
        return key
    match = _DIFFUSERS_BLOCK_KEY.match(key)
    if match is not None:
        module, leaf = _split_leaf(match.group(2))
        target = BLOCK_RENAMES.get(module)
        return None if target is None else f"blocks.{match.group(1)}.{target}{leaf}"
    module, leaf = _split_leaf(key)
    target = TOP_LEVEL_RENAMES.get(module)
    return None if target is None else target + leaf


_OFFICIAL_TOP_LEVEL_KEYS = frozenset(
    [m + leaf for m in TOP_LEVEL_RENAMES.values() if not m.endswith("scale_shift_table") for leaf in (".weight", ".bias")]
    + ["final_layer.scale_shift_table"]
) - {"attention_y_norm.bias"}
_OFFICIAL_BLOCK_MODULES = frozenset(BLOCK_RENAMES.values()) | frozenset(BLOCK_FUSIONS)


def _is_official_block_key(key: str) -> bool:
    match = _OFFICIAL_BLOCK_KEY.match(key)
    return match is not None and _split_leaf(match.group(2))[0] in _OFFICIAL_BLOCK_MODULES


def _split_leaf(key: str) -> tuple[str, str]:
    """``attn1.to_out.0.weight`` -> (``attn1.to_out.0``, ``.weight``); a bare parameter keeps ''."""
    module, _, leaf = key.rpartition(".")
    return (module, "." + leaf) if module and leaf in _LEAVES else (key, "")


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
    if tensor.ndim == 4 and key.endswith(_SQUEEZED_1X1):
        return tensor.flatten(1)
    return tensor


# ----------------------------------------------------------------------------------------------
# official -> diffusers (for writing test and demo checkpoints)
# ----------------------------------------------------------------------------------------------

_TOP_LEVEL_REVERSE = {official: diffusers for diffusers, official in TOP_LEVEL_RENAMES.items()}
_BLOCK_REVERSE = {official: diffusers for diffusers, official in BLOCK_RENAMES.items()}


def sana_video_official_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names -> diffusers ``SanaVideoTransformer3DModel`` names: fused projections split, 1x1
    Mix-FFN weights 4-D, buffers dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if is_dropped_key(key):
            continue
        match = _OFFICIAL_BLOCK_KEY.match(key)
        if match is None:
            module, leaf = _split_leaf(key)
            out[_TOP_LEVEL_REVERSE[module] + leaf] = tensor
            continue
        prefix = f"transformer_blocks.{match.group(1)}."
        module, leaf = _split_leaf(match.group(2))
        if module in BLOCK_FUSIONS:
            names = BLOCK_FUSIONS[module]
            out.update({prefix + n + leaf: t.clone() for n, t in zip(names, tensor.chunk(len(names), dim=0))})
            continue
        if key.endswith(_SQUEEZED_1X1) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[prefix + _BLOCK_REVERSE[module] + leaf] = tensor
    return out


def diffusers_config(config: SanaVideoConfig) -> dict[str, Any]:
    """``SanaVideoTransformer3DModel`` constructor arguments (its config.json) for ``config``."""
    return {
        "_class_name": DIFFUSERS_CLASS,
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
        "attention_bias": False,
        "sample_size": config.sample_size,
        "patch_size": list(config.patch_size),
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "qk_norm": "rms_norm_across_heads" if config.qk_norm else None,
        "rope_max_seq_len": 1024,
    }


# ----------------------------------------------------------------------------------------------
# official module -> the diffusers spellings of a LoRA (the registry's ``lora_names`` hook)
# ----------------------------------------------------------------------------------------------


def lora_diffusers_names(module: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, int, int] | None]]:
    """The diffusers module names a LoRA may use for official ``module`` (weight ``shape``), each with
    the row range ``(dim, start, length)`` it owns of a fused projection (``attn.qkv`` <- to_q / to_k /
    to_v, ``cross_attn.kv_linear`` <- to_k / to_v), else None."""
    block = _OFFICIAL_BLOCK_KEY.match(module)
    if block is None:
        return [(d, None) for d, o in TOP_LEVEL_RENAMES.items() if o == module and d != module]
    index, inner = block.groups()
    names: list[tuple[str, tuple[int, int, int] | None]] = [
        (f"transformer_blocks.{index}.{d}", None) for d, o in BLOCK_RENAMES.items() if o == inner]
    parts = BLOCK_FUSIONS.get(inner, ())
    if parts:
        rows = shape[0] // len(parts)
        names += [(f"transformer_blocks.{index}.{part}", (0, i * rows, rows)) for i, part in enumerate(parts)]
    return names


# ----------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------


def sniff_sana_video(raw_state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None,
                     diffusers_config: Mapping | None = None) -> tuple[SanaVideoConfig, dict[str, torch.Tensor]]:
    """Any SANA-Video layout -> (config, state dict under official names); anything else -> the
    registry's VeloxLoadError naming what the file looks like and the node that loads it.

    Works on shapes alone (meta tensors, ``host/quant_loading.detection_view``): canonicalization
    only renames, fuses q/k/v and flattens 1x1 convs. A diffusers config.json of this class gives the
    head counts the weights cannot show."""
    raw = strip_sana_video_prefix(unwrap_state_dict(raw_state_dict, path))
    if not SANA_VIDEO.marks(raw):
        refuse_foreign(raw, SANA_VIDEO, path, SANA_VIDEO_EXPECTED)
    detected = detect_sana_video(raw)
    if detected is None:
        raise VeloxLoadError(path, "has SANA-Video's temporal convs but not the tensors of a whole transformer "
                             "(patch embedding, first block, final layer, caption projection)", SANA_VIDEO_EXPECTED)
    if diffusers_config is not None and diffusers_config.get("_class_name") == DIFFUSERS_CLASS:
        detected = config_from_diffusers(diffusers_config, detected)
    return detected, canonicalize_sana_video_state_dict(raw, path)


def detect_sana_video(state_dict_keys_or_shapes: Mapping[str, Any] | Iterable[str]) -> SanaVideoConfig | None:
    """The SANA-Video config of a checkpoint in any layout, from key names and shapes; None if it is not one.

    Takes a state dict, or a mapping of key -> shape (``torch.Size`` / tuple, as a safetensors header
    gives); a bare iterable of keys is never enough (widths need shapes) and gives None. Image Sana
    (2-D patches, no temporal conv), Wan (no Mix-FFN) and anything else give None. A config equal to a
    release preset in every architecture field comes back as that preset (its name, VAE, shift).
    """
    if not isinstance(state_dict_keys_or_shapes, Mapping):
        return None
    shapes = {}
    for key, value in strip_sana_video_prefix(state_dict_keys_or_shapes).items():
        fused = _fusion_part(key)
        name = official_name(key) if fused is None else f"blocks.{fused[0]}.{fused[1]}{fused[3]}"
        if name is not None:
            shapes[name] = _shape(value)
    return _config_from_shapes(shapes)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def _config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> SanaVideoConfig | None:
    patch = shapes.get("x_embedder.proj.weight", ())
    temporal = shapes.get("blocks.0.mlp.t_conv.weight", ())
    inverted = shapes.get("blocks.0.mlp.inverted_conv.conv.weight", ())
    final = shapes.get("final_layer.linear.weight", ())
    caption = shapes.get("y_embedder.y_proj.fc1.weight", ())
    if len(patch) != 5 or len(temporal) != 4 or not inverted or not final or len(caption) != 2:
        return None
    hidden, in_channels, patch_size = patch[0], patch[1], tuple(patch[2:])
    head_dim = RELEASE_HEAD_DIM if hidden % RELEASE_HEAD_DIM == 0 else FALLBACK_HEAD_DIM
    mlp_ratio = inverted[0] // 2 / hidden
    if hidden % head_dim or final[0] % math.prod(patch_size) or int(hidden * mlp_ratio) != inverted[0] // 2:
        return None
    vae, sample_size = VAE_BY_INPUT.get((in_channels, patch_size), ("unknown", 30))
    detected = SanaVideoConfig(
        hidden_size=hidden,
        depth=len({k.split(".")[1] for k in shapes if k.endswith(".mlp.t_conv.weight")}),
        num_heads=hidden // head_dim,
        linear_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=final[0] // math.prod(patch_size),
        caption_channels=caption[1],
        mlp_ratio=mlp_ratio,
        patch_size=patch_size,
        qk_norm="blocks.0.attn.q_norm.weight" in shapes,
        cross_norm="blocks.0.cross_attn.q_norm.weight" in shapes,
        t_kernel_size=temporal[2],
        sample_size=sample_size,
        vae=vae,
        name="custom",
    )
    return next((p for p in SANA_VIDEO_PRESETS.values() if p.model_kwargs() == detected.model_kwargs()), detected)


def config_from_diffusers(config: Mapping[str, Any], detected: SanaVideoConfig) -> SanaVideoConfig:
    """``detected`` with the head counts a diffusers config.json states (weights cannot show them)."""
    return dataclasses.replace(
        detected,
        linear_head_dim=int(config.get("attention_head_dim", detected.linear_head_dim)),
        num_heads=int(config.get("num_cross_attention_heads") or detected.num_heads),
        sample_size=int(config.get("sample_size", detected.sample_size)),
    )
