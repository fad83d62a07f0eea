"""Sana ControlNet checkpoints: is it one, its canonical (official) state dict, and its config.

Layouts read:
- official (``Sana_600M_1024px_ControlNet_HED`` / ``Sana_1600M_1024px_BF16_ControlNet_HED`` ``.pth``):
  the whole SanaMSControlNet, i.e. the base transformer (``blocks.N``, ``final_layer``) plus
  ``controlnet.N.{copied_block, before_proj, after_proj}``; only the embedders and ``controlnet.*`` are
  kept (the base loads through 'Load Sana Model' from the same file);
- diffusers ``SanaControlNetModel``: ``patch_embed``, ``time_embed``, ``caption_projection``,
  ``caption_norm``, ``transformer_blocks.N``, ``input_block``, ``controlnet_blocks.N``;
- either under ComfyUI's ``model.diffusion_model.`` / ``diffusion_model.`` prefix.

The copied blocks and embedders are Sana's own modules, so their keys go through ``sana_keys``' map; only
the block nesting and the two projections are specific to the ControlNet.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import VeloxLoadError
from ..models.sana import SanaConfig
from .checkpoint_files import unwrap_state_dict
from .families import SANA, SANA_CONTROLNET, identify, refusal
from .sana_detect import CROSS_HEADS_BY_WIDTH, FALLBACK_CROSS_HEAD_DIM, mlp_ratio_from_widths, pe_from_buffer
from .sana_keys import canonicalize_sana_state_dict, strip_sana_prefix

DIFFUSERS_CLASS = SANA_CONTROLNET.diffusers_class
OFFICIAL_MARKER = SANA_CONTROLNET.markers[0]
DIFFUSERS_MARKER = "input_block.weight"
EXPECTED = (
    "a Sana ControlNet: the official Sana_*_ControlNet_HED checkpoint (controlnet.0.before_proj.weight, "
    "controlnet.N.copied_block.*) or a diffusers SanaControlNetModel (input_block.weight, controlnet_blocks.N.*, "
    "transformer_blocks.N.ff.conv_inverted.weight)"
)
# (a key fragment, what a checkpoint holding it is), checked before the other families
FOREIGN_CONTROLNETS = (
    ("input_hint_block.", "a Stable Diffusion (UNet) ControlNet"),
    ("controlnet_cond_embedding.", "a diffusers UNet ControlNet (SD 1.5 / SDXL)"),
    ("controlnet_x_embedder.", "a Flux ControlNet"),
    ("pos_embed_input.", "an SD3 / Flux ControlNet"),
    ("vace_blocks.", "a Wan VACE model"),
    ("lllite", "a ControlNet-LLLite"),
)
# adapters of the diffusers layout -> official names (leaf .weight / .bias follows)
_DIFFUSERS_ADAPTER = re.compile(r"^(?:input_block|controlnet_blocks\.(\d+))\.(weight|bias)$")
_OFFICIAL_NESTED = re.compile(r"^controlnet\.(\d+)\.copied_block\.(.+)$")
_OFFICIAL_ADAPTER = re.compile(r"^controlnet\.(\d+)\.(before_proj|after_proj)\.(weight|bias)$")
_CANONICAL_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BASE_ONLY = ("blocks.", "final_layer.", "cfg_embedder.")  # the base transformer inside an official file


def sniff_sana_controlnet(
    raw_state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None,
    diffusers_config: Mapping | None = None,
) -> tuple[SanaConfig, dict[str, torch.Tensor]]:
    """Any Sana ControlNet layout -> (config, state dict under official names); other files refused.

    ``config.depth`` is the number of copied blocks. A diffusers config.json, when there is one,
    supplies the position embedding that a diffusers file cannot show.
    """
    raw = strip_sana_prefix(unwrap_state_dict(raw_state_dict, path))
    check_is_sana_controlnet(raw, path)
    state_dict = canonicalize_sana_controlnet(raw, path)
    config = detect_sana_controlnet_config(state_dict, pos_embed=raw.get("pos_embed"), path=path)
    return _with_diffusers_pe(config, diffusers_config), state_dict


def check_is_sana_controlnet(state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None) -> None:
    """Raise VeloxLoadError naming what the checkpoint looks like when it is not a Sana ControlNet."""
    keys = list(state_dict)
    if OFFICIAL_MARKER in state_dict or (DIFFUSERS_MARKER in state_dict and SANA.marks(keys)):
        return
    found = identify(keys, exclude=(SANA.name, SANA_CONTROLNET.name), first=FOREIGN_CONTROLNETS)
    if found is None and SANA.marks(keys):
        found = ("a Sana transformer without ControlNet blocks", SANA)
    if found is None:
        found = (f"an unknown model (first keys: {', '.join(keys[:4]) or 'none'})", None)
    raise VeloxLoadError(path, refusal(*found, SANA_CONTROLNET), EXPECTED)


def canonicalize_sana_controlnet(
    state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """Official or diffusers Sana ControlNet (unprefixed) -> official names, 2-D 1x1 Mix-FFN weights."""
    adapters, sana_shaped = _split_layout(state_dict)
    canonical = canonicalize_sana_state_dict(sana_shaped, path)
    out = dict(adapters)
    for key, tensor in canonical.items():
        match = _CANONICAL_BLOCK.match(key)
        out[f"controlnet.{match.group(1)}.copied_block.{match.group(2)}" if match else key] = tensor
    return out


def _split_layout(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(before/after projections under official names, the rest shaped like a Sana transformer whose
    ``blocks.N`` are the copied blocks). An official file's base blocks and final layer are dropped."""
    adapters, sana_shaped = {}, {}
    official = OFFICIAL_MARKER in state_dict
    for key, tensor in state_dict.items():
        if official:
            nested, adapter = _OFFICIAL_NESTED.match(key), _OFFICIAL_ADAPTER.match(key)
            if adapter:
                adapters[key] = tensor
            elif nested:
                sana_shaped[f"blocks.{nested.group(1)}.{nested.group(2)}"] = tensor
            elif not key.startswith(_BASE_ONLY):
                sana_shaped[key] = tensor
            continue
        adapter = _DIFFUSERS_ADAPTER.match(key)
        if adapter is None:
            sana_shaped[key] = tensor
        elif adapter.group(1) is None:
            adapters[f"controlnet.0.before_proj.{adapter.group(2)}"] = tensor
        else:
            adapters[f"controlnet.{adapter.group(1)}.after_proj.{adapter.group(2)}"] = tensor
    return adapters, sana_shaped


def detect_sana_controlnet_config(
    state_dict: Mapping[str, torch.Tensor], pos_embed: torch.Tensor | None = None,
    path: str | Path | None = None,
) -> SanaConfig:
    """The ControlNet's config from a canonical state dict's shapes (depth = copied blocks)."""
    needed = ("x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight", "controlnet.0.before_proj.weight",
              "controlnet.0.copied_block.mlp.inverted_conv.conv.weight")
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise VeloxLoadError(path, f"Sana ControlNet tensors missing: {', '.join(missing)}", EXPECTED)
    patch_weight = state_dict["x_embedder.proj.weight"]  # (C, in, p, p)
    hidden, patch = patch_weight.shape[0], patch_weight.shape[-1]
    depth = len({m.group(1) for m in map(_OFFICIAL_ADAPTER.match, state_dict) if m and m.group(2) == "after_proj"})
    inner = state_dict["controlnet.0.copied_block.mlp.inverted_conv.conv.weight"].shape[0] // 2
    return SanaConfig(
        name="sana_controlnet",
        hidden_size=hidden,
        depth=depth,
        num_heads=CROSS_HEADS_BY_WIDTH.get(hidden, max(1, hidden // FALLBACK_CROSS_HEAD_DIM)),
        in_channels=patch_weight.shape[1],
        out_channels=patch_weight.shape[1],
        caption_channels=state_dict["y_embedder.y_proj.fc1.weight"].shape[1],
        mlp_ratio=mlp_ratio_from_widths(inner, hidden),
        patch_size=patch,
        qk_norm="controlnet.0.copied_block.attn.q_norm.weight" in state_dict,
        **pe_from_buffer(pos_embed, patch),
    )


def _with_diffusers_pe(config: SanaConfig, diffusers_config: Mapping | None) -> SanaConfig:
    """A SanaControlNetModel config.json states the cross-attention heads and the PE that shapes cannot."""
    if not diffusers_config or diffusers_config.get("_class_name") != DIFFUSERS_CLASS:
        return config
    changes = {"num_heads": diffusers_config.get("num_cross_attention_heads", config.num_heads)}
    interpolation = diffusers_config.get("interpolation_scale")
    if interpolation is not None:
        changes.update(use_pe=True, sample_size=diffusers_config.get("sample_size", config.sample_size),
                       pe_interpolation=float(interpolation))
    return dataclasses.replace(config, **changes)


# ----------------------------------------------------------------------------------------------
# official -> diffusers (for writing test and demo checkpoints)
# ----------------------------------------------------------------------------------------------


def official_controlnet_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical (official) ControlNet names -> diffusers ``SanaControlNetModel`` names."""
    from .sana_keys import official_to_diffusers

    adapters, sana_shaped = _split_layout({k: v for k, v in state_dict.items()})
    out = official_to_diffusers(sana_shaped)
    for key, tensor in adapters.items():
        index, kind, leaf = _OFFICIAL_ADAPTER.match(key).groups()
        out[("input_block" if kind == "before_proj" else f"controlnet_blocks.{index}") + "." + leaf] = tensor
    return out
