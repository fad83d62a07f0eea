"""Is this a Sana transformer, which one, and its canonical state dict (from keys and shapes).

``sniff_sana(raw)`` is the entry point: it refuses other families with a message that names
what the file looks like, reads the official ``pos_embed`` buffer (2K/4K) before canonical
names drop it, maps the keys (``sana_keys``) and detects the ``SanaConfig``. A diffusers
config.json, when there is one, is used for what shapes cannot tell (cross-attention heads, PE).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import VeloxLoadError
from ..models.sana import SANA_PRESETS, SanaConfig
from .checkpoint_files import diffusion_model_weights, read_component
from .families import SANA, foreign_signs
from .sana_keys import canonicalize_sana_state_dict

DIFFUSERS_CLASS = SANA.diffusers_class
SANA_MARKERS = SANA.markers
# (a key fragment, what a file holding it is) of everything that is not Sana, for loaders of
# Sana-like families (the registry's signs of the other families, then of other models)
FOREIGN_FAMILIES = foreign_signs(SANA.name)
SANA_EXPECTED = (
    "a Sana transformer: official keys such as x_embedder.proj.weight, blocks.0.attn.qkv.weight, "
    "blocks.0.mlp.inverted_conv.conv.weight, or diffusers keys such as patch_embed.proj.weight, "
    "transformer_blocks.0.attn1.to_q.weight, transformer_blocks.0.ff.conv_inverted.weight"
)
CROSS_HEADS_BY_WIDTH = {1152: 16, 2240: 20}  # widths of the releases; others get 32-channel heads
FALLBACK_CROSS_HEAD_DIM = 32
INTERPOLATION_BY_PE_SIZE = {64: 1.0, 128: 2.0}  # 2K, 4K (diffusers' conversion script)
# diffusers computes the PE at run time and saves no buffer: its weights of a 1K, 2K and 4K 1.6B model
# are alike, and only config.json (interpolation_scale, sample_size) tells them apart.
PE_UNKNOWN_WARNING = (
    "Velox: %s is a Sana transformer in diffusers layout without its config.json, so whether it uses a "
    "position embedding (the 2K / 4K releases do) is not known; it loads without one. For a 2K / 4K "
    "model keep the file next to its config.json (the diffusers transformer/ folder) or load the folder."
)
_POINT_CONV = re.compile(r"^blocks\.(\d+)\.mlp\.point_conv\.conv\.weight$")


def sniff_sana(
    raw_state_dict: Mapping[str, torch.Tensor],
    path: str | Path | None = None,
    diffusers_config: Mapping | None = None,
    config: SanaConfig | None = None,
) -> tuple[SanaConfig, dict[str, torch.Tensor]]:
    """Any Sana layout -> (config, state dict under official names).

    raw_state_dict may still carry a ComfyUI prefix or a ``state_dict`` wrapper. The config is
    detected from shapes unless a diffusers ``config.json`` dict or an explicit ``config`` (a
    user's preset choice) is given: those win on what shapes cannot show (cross-attention heads,
    PE of a diffusers file) and must agree with what they do show.
    """
    raw = diffusion_model_weights(raw_state_dict, path)
    check_is_sana(raw, path)
    state_dict = canonicalize_sana_state_dict(raw, path)
    return sana_config(state_dict, raw.get("pos_embed"), path, diffusers_config, config), state_dict


def sana_config(
    canonical: Mapping[str, torch.Tensor],
    pos_embed: torch.Tensor | None = None,
    path: str | Path | None = None,
    diffusers_config: Mapping | None = None,
    config: SanaConfig | None = None,
) -> SanaConfig:
    """The config step of a load: the config of canonical weights, from their shapes and the official
    ``pos_embed`` buffer (None when the file had none), unless a diffusers ``config.json`` dict or an
    explicit ``config`` is given (see ``sniff_sana``)."""
    detected = detect_sana_config(canonical, pos_embed=pos_embed, path=path)
    diffusers_config = _sana_config_only(diffusers_config)
    if config is None and diffusers_config is not None:
        config = config_from_diffusers(diffusers_config)
    if config is None and pos_embed is None:
        logging.warning(PE_UNKNOWN_WARNING, Path(path).name if path else "<state dict>")
    return detected if config is None else _reconcile(config, detected, path)


def _sana_config_only(diffusers_config: Mapping | None) -> Mapping | None:
    """A config.json of another model class says nothing about these weights (which are Sana's)."""
    if diffusers_config is None or diffusers_config.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        return None
    return diffusers_config


def check_is_sana(state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None) -> None:
    """Raise VeloxLoadError naming what the checkpoint looks like when it is not a Sana transformer."""
    SANA.check(state_dict, path, SANA_EXPECTED)


def detect_sana_config(
    state_dict: Mapping[str, torch.Tensor],
    pos_embed: torch.Tensor | None = None,
    path: str | Path | None = None,
) -> SanaConfig:
    """Config of a canonical (official-name) state dict from its shapes; a preset when one matches.

    pos_embed: the official [1, N, C] buffer, if the raw checkpoint had one (2K/4K).
    """
    _require(state_dict, ("x_embedder.proj.weight", "final_layer.linear.weight",
                          "y_embedder.y_proj.fc1.weight", "blocks.0.mlp.inverted_conv.conv.weight"), path)
    patch_weight = state_dict["x_embedder.proj.weight"]  # (C, in, p, p)
    hidden, in_channels, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[-1]
    inner = state_dict["blocks.0.mlp.inverted_conv.conv.weight"].shape[0] // 2
    architecture = SanaConfig(
        hidden_size=hidden,
        depth=len({m.group(1) for m in map(_POINT_CONV.match, state_dict) if m}),
        num_heads=CROSS_HEADS_BY_WIDTH.get(hidden, max(1, hidden // FALLBACK_CROSS_HEAD_DIM)),
        in_channels=in_channels,
        out_channels=state_dict["final_layer.linear.weight"].shape[0] // patch**2,
        caption_channels=state_dict["y_embedder.y_proj.fc1.weight"].shape[1],
        mlp_ratio=mlp_ratio_from_widths(inner, hidden),
        patch_size=patch,
        qk_norm="blocks.0.attn.q_norm.weight" in state_dict,
        guidance_embeds="cfg_embedder.mlp.0.weight" in state_dict,
        timestep_norm_scale=1000.0 if "cfg_embedder.mlp.0.weight" in state_dict else 1.0,
        **pe_from_buffer(pos_embed, patch),
    )
    return match_sana_preset(architecture)


def match_sana_preset(config: SanaConfig) -> SanaConfig:
    """The preset with exactly this architecture, else the config named "custom" with its shift."""
    for preset in SANA_PRESETS.values():
        if preset.model_kwargs() == config.model_kwargs():
            return preset
    shift = 6.0 if config.use_pe and config.pe_interpolation >= 2.0 else 3.0  # 4K-style PE: shift 6
    return dataclasses.replace(config, name="custom", flow_shift=shift)


def config_from_diffusers(config: Mapping) -> SanaConfig:
    """diffusers ``SanaTransformer2DModel`` config.json -> SanaConfig (preset when one matches)."""
    qk_norm = config.get("qk_norm")
    if qk_norm not in (None, "rms_norm_across_heads"):
        raise VeloxLoadError("config.json", f"qk_norm '{qk_norm}' is not Sana's",
                             "null or rms_norm_across_heads")
    heads, head_dim = config.get("num_attention_heads", 70), config.get("attention_head_dim", 32)
    interpolation = config.get("interpolation_scale")
    guidance = bool(config.get("guidance_embeds", False))
    pe = {} if interpolation is None else dict(
        use_pe=True, sample_size=config.get("sample_size", 32), pe_interpolation=float(interpolation))
    return match_sana_preset(SanaConfig(
        hidden_size=heads * head_dim,
        depth=config.get("num_layers", 20),
        num_heads=config.get("num_cross_attention_heads", 20),
        linear_head_dim=head_dim,
        in_channels=config.get("in_channels", 32),
        out_channels=config.get("out_channels") or config.get("in_channels", 32),
        caption_channels=config.get("caption_channels", 2304),
        mlp_ratio=float(config.get("mlp_ratio", 2.5)),
        patch_size=config.get("patch_size", 1),
        qk_norm=qk_norm is not None,
        guidance_embeds=guidance,
        guidance_embeds_scale=float(config.get("guidance_embeds_scale", 0.1)),
        timestep_norm_scale=1000.0 if guidance else 1.0,
        **pe,
    ))


def _reconcile(from_config: SanaConfig, from_shapes: SanaConfig, path) -> SanaConfig:
    """A given config (config.json, a chosen preset) wins on what shapes cannot show; it must agree
    with what they do show."""
    shown = ("hidden_size", "depth", "in_channels", "out_channels", "caption_channels", "patch_size",
             "qk_norm", "guidance_embeds")
    clashes = [f"{f} {getattr(from_config, f)} vs {getattr(from_shapes, f)}" for f in shown
               if getattr(from_config, f) != getattr(from_shapes, f)]
    if clashes:
        raise VeloxLoadError(
            path, f"its config (config.json or the chosen preset) disagrees with the tensors "
            f"({'; '.join(clashes)})", "a config written for these weights")
    return from_config


def pe_from_buffer(pos_embed: torch.Tensor | None, patch: int) -> dict:
    """use_pe / sample_size / pe_interpolation from the official [1, N, C] ``pos_embed`` buffer.

    Every official checkpoint has that buffer; it stays all zeros when ``use_pe`` is off (512/1K),
    so only a filled one means PE. A meta tensor (shapes only) is judged by its size: 64 (2K) or
    128 (4K) tokens a side.
    """
    if pos_embed is None or pos_embed.ndim < 2 or pos_embed.shape[-2] < 2:
        return {}
    side = math.isqrt(pos_embed.shape[-2])
    if pos_embed.is_meta:
        if side not in INTERPOLATION_BY_PE_SIZE:
            return {}
        interpolation = INTERPOLATION_BY_PE_SIZE[side]
    elif not bool(pos_embed.any()):
        return {}
    else:
        interpolation = _interpolation(pos_embed, side)
    return dict(use_pe=True, sample_size=side * patch, pe_interpolation=interpolation)


def _interpolation(pos_embed: torch.Tensor, side: int) -> float:
    """Token 1 sits at column 1 / interpolation: channel 0 is its sine, channel C/4 its cosine."""
    token = pos_embed.reshape(-1, pos_embed.shape[-1])[1].float()
    angle = math.atan2(token[0].item(), token[pos_embed.shape[-1] // 4].item())
    return round(1.0 / angle, 4) if angle > 0 else INTERPOLATION_BY_PE_SIZE.get(side, 1.0)


def mlp_ratio_from_widths(inner: int, hidden: int) -> float:
    """A ratio with int(hidden * ratio) == inner, as the model computes its FFN width."""
    ratio = inner / hidden
    return ratio if int(hidden * ratio) == inner else (inner + 0.5) / hidden


def _require(state_dict: Mapping, keys: tuple[str, ...], path) -> None:
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise VeloxLoadError(path, f"Sana tensors missing: {', '.join(missing)}", SANA_EXPECTED)


# ----------------------------------------------------------------------------------------------
# files -> (config, state dict): what the host bridge calls
# ----------------------------------------------------------------------------------------------


def load_sana_checkpoint(
    path: str | Path, config: SanaConfig | None = None
) -> tuple[SanaConfig, dict[str, torch.Tensor]]:
    """Load any Sana checkpoint file or diffusers folder, detect it, return official names.

    ``config`` (e.g. a preset picked by the user) overrides detection where shapes are silent.
    """
    raw, diffusers_config = read_component(path, "transformer")
    return sniff_sana(raw, path, diffusers_config, config)


def is_sana_diffusers_folder(folder: str | Path) -> bool:
    """True for a diffusers folder (pipeline or transformer) whose transformer is a Sana one."""
    folder = Path(folder)
    for config_path in (folder / "transformer" / "config.json", folder / "config.json"):
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
                return config.get("_class_name") == DIFFUSERS_CLASS
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                return False
    return False
