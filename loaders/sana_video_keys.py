"""SANA-Video key maps (official <-> diffusers) and the detector that reads a config from weights.

Layouts read: official (``blocks.N.attn.qkv``, ``blocks.N.mlp.t_conv`` ..., the ``SANA_Video_2B_480p.pth``
``{"state_dict": ...}`` release), diffusers ``SanaVideoTransformer3DModel`` (``transformer_blocks.N.attn1.to_q``,
``ff.conv_temp`` ...), either under ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.`` prefix. The
renames follow diffusers' ``scripts/convert_sana_video_to_diffusers.py``: diffusers' separate q/k/v become the
official fused ``qkv`` / ``kv_linear``, and the 4-D 1x1 conv weights of the Mix-FFN become the 2-D weights
of ``models.sana_video``'s Linear layers. The tables are this module's (its blocks' built on Sana's); the
mapping that reads them is ``fused_key_map.FusedKeyMap``, shared with image Sana.

``detect_sana_video`` needs only key names and shapes (a state dict, or safetensors header shapes), so a
file can be recognised before its tensors are read. What the weights cannot show is taken from the
release: linear and cross-attention heads are ``hidden / 112`` (the 2B's 20 x 112), falling back to
32-channel heads for widths 112 does not divide.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import VeloxLoadError
from ..models.sana_video import SANA_VIDEO_PRESETS, SanaVideoConfig
from .checkpoint_files import DIFFUSION_MODEL_PREFIXES, strip_diffusion_model_prefix, unwrap_state_dict
from .families import SANA_VIDEO, refuse_foreign
from .fused_key_map import OFFICIAL_BLOCK_KEY, FusedKeyMap, split_leaf
from .sana_keys import BLOCK_FUSIONS, diffusers_dimensions
from .sana_keys import BLOCK_RENAMES as SANA_BLOCK_RENAMES

# ComfyUI's prefixes, stripped by the one implementation every family uses
SANA_VIDEO_PREFIXES = DIFFUSION_MODEL_PREFIXES
strip_sana_video_prefix = strip_diffusion_model_prefix
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

# inside transformer_blocks.N (diffusers) -> inside blocks.N (official): Sana's block (models/sana_video.py
# reuses its attention modules and spatial Mix-FFN, so their q/k/v fuse alike: BLOCK_FUSIONS is Sana's too)
# plus the temporal conv.
BLOCK_RENAMES: dict[str, str] = {**SANA_BLOCK_RENAMES, "ff.conv_temp": "mlp.t_conv"}

# Keys that make a checkpoint SANA-Video in either layout: the temporal conv no image Sana or Wan has,
# and the 3-D patch embedding.
TEMPORAL_CONV_KEYS = ("mlp.t_conv.weight", "ff.conv_temp.weight")
PATCH_KEYS = ("x_embedder.proj.weight", "patch_embedding.weight")
RELEASE_HEAD_DIM = 112  # linear_head_dim and cross-attention head size of the 2B releases
FALLBACK_HEAD_DIM = 32
# (latent channels, patch) -> (VAE, diffusers sample_size): Wan 2.1 at 480p, LTX-2 at 720p
VAE_BY_INPUT = {(16, (1, 2, 2)): ("wan2.1", 30), (128, (1, 1, 1)): ("ltx2", 22)}


# ----------------------------------------------------------------------------------------------
# any layout -> official
# ----------------------------------------------------------------------------------------------


_OFFICIAL_TOP_LEVEL_KEYS = frozenset(
    [m + leaf for m in TOP_LEVEL_RENAMES.values() if not m.endswith("scale_shift_table") for leaf in (".weight", ".bias")]
    + ["final_layer.scale_shift_table"]
) - {"attention_y_norm.bias"}
_OFFICIAL_BLOCK_MODULES = frozenset(BLOCK_RENAMES.values()) | frozenset(BLOCK_FUSIONS)


def _is_official_key(key: str) -> bool:
    if key in _OFFICIAL_TOP_LEVEL_KEYS:
        return True
    match = OFFICIAL_BLOCK_KEY.match(key)
    return match is not None and split_leaf(match.group(2))[0] in _OFFICIAL_BLOCK_MODULES


SANA_VIDEO_KEY_MAP = FusedKeyMap(
    layout="SANA-Video",
    expected="official (blocks.N.attn.qkv, blocks.N.mlp.t_conv ...) or diffusers "
    "(transformer_blocks.N.attn1.to_q, transformer_blocks.N.ff.conv_temp ...) names",
    top_level_renames=TOP_LEVEL_RENAMES,
    block_renames=BLOCK_RENAMES,
    block_fusions=BLOCK_FUSIONS,
    dropped_keys=DROPPED_KEYS,
    dropped_prefixes=DROPPED_PREFIXES,
    is_official=_is_official_key,
)
is_dropped_key = SANA_VIDEO_KEY_MAP.is_dropped
official_name = SANA_VIDEO_KEY_MAP.official_name
# the registry's ``lora_names`` hook: official module -> the diffusers spellings of a LoRA
lora_diffusers_names = SANA_VIDEO_KEY_MAP.lora_diffusers_names


def canonicalize_sana_video_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """Official or diffusers SANA-Video layout -> official names, 2-D 1x1 Mix-FFN weights, buffers dropped
    (``FusedKeyMap.canonicalize``, which names in a VeloxLoadError what it cannot map)."""
    return SANA_VIDEO_KEY_MAP.canonicalize(strip_sana_video_prefix(state_dict), path)


# ----------------------------------------------------------------------------------------------
# official -> diffusers (for writing test and demo checkpoints)
# ----------------------------------------------------------------------------------------------


def sana_video_official_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names -> diffusers ``SanaVideoTransformer3DModel`` names: fused projections split, 1x1
    Mix-FFN weights 4-D, buffers dropped."""
    return SANA_VIDEO_KEY_MAP.to_diffusers(state_dict)


def diffusers_config(config: SanaVideoConfig) -> dict[str, Any]:
    """``SanaVideoTransformer3DModel`` constructor arguments (its config.json) for ``config``."""
    return {
        "_class_name": DIFFUSERS_CLASS,
        **diffusers_dimensions(config),
        "attention_bias": False,
        "sample_size": config.sample_size,
        "patch_size": list(config.patch_size),
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "qk_norm": "rms_norm_across_heads" if config.qk_norm else None,
        "rope_max_seq_len": 1024,
    }


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
        fused = SANA_VIDEO_KEY_MAP.fusion_part(key)
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
