"""Wan transformer key maps: every known layout onto the official names, and official to diffusers.

The official names (``Wan-AI`` releases, Kijai's files) are also ComfyUI core's module names, so a
canonical Wan state dict loads straight into ``comfy.ldm.wan.model.WanModel`` / ``VaceWanModel``.
Layouts read: official, ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.`` prefix, and
diffusers ``WanTransformer3DModel`` / ``WanVACETransformer3DModel``. The diffusers table is the
inverse of diffusers' ``convert_wan_transformer_to_diffusers`` (a pure rename, identical shapes).
Note its norm swap: diffusers' ``norm2`` is the official ``norm3`` (the affine cross-attention
pre-norm); the other two norms carry no weights in either layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import VeloxLoadError
from .checkpoint_files import DIFFUSION_MODEL_PREFIXES, strip_diffusion_model_prefix

WAN_PREFIXES = DIFFUSION_MODEL_PREFIXES  # ComfyUI's
strip_wan_prefix = strip_diffusion_model_prefix

# diffusers module path -> official module path, outside the blocks
TOP_LEVEL_RENAMES: dict[str, str] = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos",  # FLF2V
    "scale_shift_table": "head.modulation",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
    "vace_patch_embedding": "vace_patch_embedding",
}

# diffusers module path -> official one, inside ``blocks.N.`` and ``vace_blocks.N.``
BLOCK_RENAMES: dict[str, str] = {
    "scale_shift_table": "modulation",
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",  # Wan 2.1 I2V: the CLIP-image tokens' projections
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "norm2": "norm3",  # the cross-attention pre-norm (diffusers orders the norms differently)
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    "proj_in": "before_proj",  # VACE blocks
    "proj_out": "after_proj",
}

# keys only a diffusers file has / only an official (or ComfyUI) file has
DIFFUSERS_MARKERS = ("condition_embedder.time_proj.weight", "blocks.0.attn1.to_q.weight")
_BLOCK_KEY = re.compile(r"^((?:vace_)?blocks\.\d+)\.(.+)$")


def is_diffusers_wan(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(marker in state_dict for marker in DIFFUSERS_MARKERS)


def _rename_module(key: str, renames: Mapping[str, str]) -> str | None:
    """``key`` with its longest module prefix found in ``renames`` replaced; None when none matches."""
    for module in sorted(renames, key=len, reverse=True):
        if key == module or key.startswith(module + "."):
            return renames[module] + key[len(module):]
    return None


def diffusers_to_official_key(key: str) -> str | None:
    """One diffusers Wan key under its official name; None when no table covers it."""
    block = _BLOCK_KEY.match(key)
    if block:
        inner = _rename_module(block.group(2), BLOCK_RENAMES)
        return None if inner is None else f"{block.group(1)}.{inner}"
    return _rename_module(key, TOP_LEVEL_RENAMES)


def official_to_diffusers_key(key: str) -> str | None:
    """One official Wan key under its diffusers name (what diffusers' converter writes)."""
    block = _BLOCK_KEY.match(key)
    if block:
        inner = _rename_module(block.group(2), {v: k for k, v in BLOCK_RENAMES.items()})
        return None if inner is None else f"{block.group(1)}.{inner}"
    return _rename_module(key, {v: k for k, v in TOP_LEVEL_RENAMES.items()})


def canonicalize_wan_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """Any supported Wan transformer layout -> official names (prefix stripped, diffusers renamed).

    Official keys pass through untouched, fp8 ``scale_weight`` / ``scaled_fp8`` markers included,
    so that ComfyUI's own fp8 handling still sees them. Raises VeloxLoadError naming diffusers
    keys that no table covers.
    """
    state_dict = strip_wan_prefix(state_dict)
    if not is_diffusers_wan(state_dict):
        return dict(state_dict)
    renamed = {key: diffusers_to_official_key(key) for key in state_dict}
    unknown = [key for key, new in renamed.items() if new is None]
    if unknown:
        raise VeloxLoadError(path, f"{len(unknown)} diffusers Wan key(s) match no known layout: {unknown[:4]}",
                             "a diffusers WanTransformer3DModel / WanVACETransformer3DModel checkpoint")
    return {renamed[key]: value for key, value in state_dict.items()}


def official_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official names -> diffusers names (for writers of test checkpoints and for exports)."""
    out = {}
    for key, value in state_dict.items():
        new = official_to_diffusers_key(key)
        if new is None:
            raise VeloxLoadError(None, f"official Wan key {key} has no diffusers name", "an official Wan key")
        out[new] = value
    return out
