"""LTX-2 video VAE: diffusers ``AutoencoderKLLTX2Video`` names onto the official names, and the config
ComfyUI core's ``VideoVAE`` (``comfy/ldm/lightricks/vae/causal_video_autoencoder.py``) needs, read
from the weights.

The official names (Lightricks' release; ``vae.``-prefixed inside a whole LTX-2 checkpoint) are core's:
flat ``encoder.down_blocks.k`` / ``decoder.up_blocks.k`` lists in which a group of ResNets
(``res_blocks.j``) and a resampler (``conv.conv``) each take one index, and the latent statistics in
``per_channel_statistics.{mean,std}-of-means``. diffusers nests the same modules
(``down_blocks.i.resnets.j`` + ``down_blocks.i.downsamplers.0``, ``mid_block.resnets.j``,
``up_blocks.i.upsamplers.0`` + ``up_blocks.i.resnets.j``) and calls the statistics ``latents_mean`` /
``latents_std``. The renames are the inverse of diffusers' ``convert_ltx2_vae_to_diffusers``, for any
block count (the table there is the release's).

Shapes of the LTX-2.0 release (128 latent channels, 3 x 4 x 4 patches, 8 x 32 x 32 compression):
``encoder.conv_in.conv.weight`` (128, 48, 3, 3, 3), ``encoder.conv_out.conv.weight`` (129, 2048, 3, 3, 3)
(128 means + one shared log-variance), ``decoder.conv_in.conv.weight`` (1024, 128, 3, 3, 3),
``decoder.conv_out.conv.weight`` (48, 128, 3, 3, 3), ``per_channel_statistics.*-of-means`` (128,).

What shapes cannot show (which axes a resampler strides, causality, padding) comes from a diffusers
config.json when there is one, else from the LTX-2.0 release (``LTX2_RELEASE``). The result is a config
in core's own format (``encoder_blocks`` / ``decoder_blocks``, as Lightricks' safetensors metadata
carries it), or a VeloxLoadError saying what core's VideoVAE cannot express.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import VeloxLoadError

DIFFUSERS_CLASS = "AutoencoderKLLTX2Video"
LTX2_VAE_PREFIX = "vae."
LTX2_VAE_EXPECTED = (
    "the LTX-2 video VAE: a diffusers AutoencoderKLLTX2Video folder (vae/config.json + "
    "diffusion_pytorch_model.safetensors) or file, or the official / ComfyUI LTX-2 VAE safetensors "
    "(encoder.conv_in.conv.weight, decoder.up_blocks.0.res_blocks.0.conv1.conv.weight, "
    "per_channel_statistics.mean-of-means)"
)
LATENT_CHANNELS = 128  # core's per_channel_statistics buffers are 128 wide
# The LTX-2.0 release as diffusers' scripts/convert_ltx2_to_diffusers.py writes it: what the weights
# cannot show. (LTX-2.3 changes the decoder's resamplers to ones core's VideoVAE does not have.)
LTX2_RELEASE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    "upsample_type": ("spatiotemporal", "spatiotemporal", "spatiotemporal"),
    "upsample_residual": (True, True, True),
    "timestep_conditioning": False,
    "patch_size_t": 1,
    "encoder_causal": True,
    "decoder_causal": False,
    "encoder_spatial_padding_mode": "zeros",
    "decoder_spatial_padding_mode": "reflect",
}
# diffusers resampler type -> (core encoder block, stride); "conv" is a plain strided causal conv
DOWNSAMPLERS = {
    "spatial": ("compress_space_res", (1, 2, 2)),
    "temporal": ("compress_time_res", (2, 1, 1)),
    "spatiotemporal": ("compress_all_res", (2, 2, 2)),
    "conv": ("compress_all", (2, 2, 2)),
}
UPSAMPLERS = {"spatial": ("compress_space", (1, 2, 2)), "temporal": ("compress_time", (2, 1, 1)),
              "spatiotemporal": ("compress_all", (2, 2, 2))}
# core's padding defaults when the config names none: the encoder pads with zeros, the decoder reflects
CORE_PADDING_DEFAULTS = ("zeros", "reflect")
# diffusers name -> official name of the latent statistics; core's other three buffers go unused
STATISTICS = {"latents_mean": "per_channel_statistics.mean-of-means",
              "latents_std": "per_channel_statistics.std-of-means"}
UNUSED_STATISTICS = ("per_channel_statistics.mean-of-stds",
                     "per_channel_statistics.mean-of-stds_over_std-of-means", "per_channel_statistics.channel")
TIMESTEP_MARKERS = ("time_embedder.", "timestep_scale_multiplier", "scale_shift_table")

_DIFFUSERS_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.")
_DIFFUSERS_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers|conv_in)\.")
_OFFICIAL_BLOCK = re.compile(r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------------


def strip_ltx2_vae_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The ``vae.`` entries of a whole LTX-2 checkpoint, unprefixed; else all, unchanged."""
    selected = {k[len(LTX2_VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(LTX2_VAE_PREFIX)}
    return selected or dict(state_dict)


def is_diffusers_layout(keys: Any) -> bool:
    return any(k in STATISTICS or k.startswith(("encoder.mid_block.", "decoder.mid_block.")) for k in keys)


def is_ltx_video_vae(keys: Any) -> bool:
    """Both halves of an LTX-family video VAE in either layout (LTX-Video 0.9.x included)."""
    keys = set(keys)
    statistics = "latents_mean" in keys or STATISTICS["latents_mean"] in keys
    return statistics and {"encoder.conv_in.conv.weight", "decoder.conv_in.conv.weight"} <= keys


def diffusers_to_official_prefixes(keys: Any, path: str | Path | None = None) -> dict[str, str]:
    """diffusers module prefix -> official prefix, numbered from the blocks the keys show.

    The encoder's down block i gives ``down_blocks.k.res_blocks.`` and, when it has one, its downsampler
    ``down_blocks.(k+1).``; the mid block comes last. The decoder's mid block is ``up_blocks.0``, then
    each up block gives its upsampler, then its ResNets. An up block's ``conv_in`` (a channel-changing
    ResNet) has no place in core's decoder and is refused."""
    keys = list(keys)
    down = _block_parts(keys, _DIFFUSERS_DOWN)
    up = _block_parts(keys, _DIFFUSERS_UP)
    if any("conv_in" in parts for parts in up.values()):
        raise VeloxLoadError(path, "an up block changes width with a conv_in ResNet, which ComfyUI core's "
                             "LTX decoder has no place for", LTX2_VAE_EXPECTED)
    prefixes: dict[str, str] = {}
    index = 0
    for block in range(max(down, default=-1) + 1):
        prefixes[f"encoder.down_blocks.{block}.resnets."] = f"encoder.down_blocks.{index}.res_blocks."
        index += 1
        if "downsamplers" in down.get(block, ()):
            prefixes[f"encoder.down_blocks.{block}.downsamplers.0."] = f"encoder.down_blocks.{index}."
            index += 1
    prefixes["encoder.mid_block.resnets."] = f"encoder.down_blocks.{index}.res_blocks."
    prefixes["decoder.mid_block.resnets."] = "decoder.up_blocks.0.res_blocks."
    index = 1
    for block in range(max(up, default=-1) + 1):
        if "upsamplers" in up.get(block, ()):
            prefixes[f"decoder.up_blocks.{block}.upsamplers.0."] = f"decoder.up_blocks.{index}."
            index += 1
        prefixes[f"decoder.up_blocks.{block}.resnets."] = f"decoder.up_blocks.{index}.res_blocks."
        index += 1
    return prefixes


def _block_parts(keys: list[str], pattern: re.Pattern) -> dict[int, set[str]]:
    parts: dict[int, set[str]] = {}
    for key in keys:
        match = pattern.match(key)
        if match is not None:
            parts.setdefault(int(match.group(1)), set()).add(match.group(2))
    return parts


def canonicalize_ltx2_vae_state_dict(state_dict: Mapping[str, Any],
                                     path: str | Path | None = None) -> dict[str, Any]:
    """Official, ComfyUI (``vae.``-prefixed) or diffusers LTX-2 VAE -> official names.

    Raises VeloxLoadError for anything that is not an LTX video VAE, naming its first keys."""
    raw = strip_ltx2_vae_prefix(state_dict)
    if not is_ltx_video_vae(raw):
        raise VeloxLoadError(path, f"is not an LTX video VAE (first keys: {', '.join(list(raw)[:4]) or 'none'})",
                             LTX2_VAE_EXPECTED)
    if not is_diffusers_layout(raw):
        return raw
    prefixes = sorted(diffusers_to_official_prefixes(raw, path).items(), key=lambda item: -len(item[0]))
    out = {}
    for key, tensor in raw.items():
        if key in STATISTICS:
            out[STATISTICS[key]] = tensor
            continue
        source = next((p for p, _ in prefixes if key.startswith(p)), None)
        out[key if source is None else dict(prefixes)[source] + key[len(source):]] = tensor
    return out


# ----------------------------------------------------------------------------------------------
# core's config from the official shapes
# ----------------------------------------------------------------------------------------------


def core_vae_config(shapes: Mapping[str, tuple[int, ...]], diffusers_config: Mapping[str, Any] | None = None,
                    path: str | Path | None = None) -> dict[str, Any]:
    """Core's ``VideoVAE`` config for official-named ``shapes`` (key -> shape).

    Block counts, widths, the patch size and noise injection come from the shapes; resampler axes,
    causality and padding from ``diffusers_config`` (its config.json), else the LTX-2.0 release.
    Refuses what core's module cannot compute as diffusers does: a timestep-conditioned decoder
    (LTX-Video 0.9.x: core adds random noise before decoding), a non-causal encoder, temporal
    patches, per-side padding other than core's, widening spatial- or temporal-only upsamplers."""
    options = {**LTX2_RELEASE, **(diffusers_config or {})}
    _refuse_inexpressible(shapes, options, path)
    in_channels, out_channels = int(options["in_channels"]), int(options["out_channels"])
    config: dict[str, Any] = {
        "_class_name": "CausalVideoAutoencoder",
        "dims": 3,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "latent_channels": shapes["decoder.conv_in.conv.weight"][1],
        "encoder_blocks": _encoder_blocks(shapes, options["downsample_type"], path),
        "decoder_blocks": _decoder_blocks(shapes, options, path),
        "patch_size": _patch_size(shapes["encoder.conv_in.conv.weight"][1], in_channels, path),
        "norm_layer": "pixel_norm",
        "latent_log_var": "uniform",
        "causal_decoder": bool(options["decoder_causal"]),
        "timestep_conditioning": False,
    }
    padding = (options["encoder_spatial_padding_mode"], options["decoder_spatial_padding_mode"])
    if padding != CORE_PADDING_DEFAULTS:
        config["spatial_padding_mode"] = padding[0]
    return config


def _refuse_inexpressible(shapes: Mapping[str, tuple[int, ...]], options: Mapping[str, Any], path) -> None:
    problem = None
    if options["timestep_conditioning"] or any(m in k for k in shapes for m in TIMESTEP_MARKERS):
        problem = ("has a timestep-conditioned decoder (LTX-Video 0.9.x, not LTX-2; ComfyUI core decodes "
                   "it with added noise)")
    elif not options["encoder_causal"]:
        problem = "has a non-causal encoder (ComfyUI core's LTX encoder is always causal)"
    elif int(options["patch_size_t"]) != 1:
        problem = f"patches {options['patch_size_t']} frames together (ComfyUI core's LTX VAE patches 1)"
    else:
        padding = (options["encoder_spatial_padding_mode"], options["decoder_spatial_padding_mode"])
        if padding != CORE_PADDING_DEFAULTS and padding[0] != padding[1]:
            problem = (f"pads the encoder with '{padding[0]}' and the decoder with '{padding[1]}' (ComfyUI "
                       "core takes one mode for both, or zeros / reflect)")
    if problem is not None:
        raise VeloxLoadError(path, problem, LTX2_VAE_EXPECTED)


def _official_blocks(shapes: Mapping[str, tuple[int, ...]], stack: str) -> list[dict[str, tuple[int, ...]]]:
    """The entries of ``encoder.down_blocks`` / ``decoder.up_blocks`` in order: each a dict of the
    block's own key suffixes -> shape (an index with no keys is a group of zero ResNets)."""
    blocks: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        match = _OFFICIAL_BLOCK.match(key)
        if match is not None and match.group(1) == stack:
            blocks.setdefault(int(match.group(2)), {})[match.group(3)] = tuple(shape)
    return [blocks.get(i, {}) for i in range(max(blocks, default=-1) + 1)]


def _res_layers(block: Mapping[str, tuple[int, ...]]) -> int:
    return len({k.split(".")[1] for k in block if k.startswith("res_blocks.")})


def _encoder_blocks(shapes, downsample_type, path) -> list:
    blocks, group = [], -1
    for block in _official_blocks(shapes, "encoder.down_blocks"):
        if "conv.conv.weight" not in block:
            group += 1
            blocks.append(["res_x", {"num_layers": _res_layers(block)}])
            continue
        kind = _nth(downsample_type, group, "downsample_type", path)
        name, stride = DOWNSAMPLERS[kind]
        out_channels, in_channels = block["conv.conv.weight"][:2]
        if name == "compress_all":
            blocks.append([name, {}])
        else:
            blocks.append([name, {"multiplier": _ratio(out_channels * math.prod(stride), in_channels, path)}])
    return blocks


def _decoder_blocks(shapes, options, path) -> list:
    """Core's ``decoder_blocks`` (listed encoder-side first, as core reverses them)."""
    residual = tuple(reversed(_as_tuple(options["upsample_residual"])))
    blocks, up_block = [], 0
    for index, block in enumerate(_official_blocks(shapes, "decoder.up_blocks")):
        if "conv.conv.weight" not in block:
            noise = "res_blocks.0.per_channel_scale1" in block
            blocks.append(["res_x", {"num_layers": _res_layers(block), "inject_noise": noise}])
            up_block += index > 0
            continue
        kind = _nth(options["upsample_type"], up_block, "upsample_type", path)
        name, stride = UPSAMPLERS[kind]
        out_channels, in_channels = block["conv.conv.weight"][:2]
        multiplier = _ratio(in_channels * math.prod(stride), out_channels, path)
        is_residual = bool(_nth(residual, up_block, "upsample_residual", path))
        if name != "compress_all" and (multiplier != 1 or is_residual):
            raise VeloxLoadError(path, f"up block {up_block} is a {kind} upsampler with a residual or a width "
                                 "change, which ComfyUI core's LTX decoder cannot compute (LTX-2.3?)", LTX2_VAE_EXPECTED)
        blocks.append([name, {"residual": is_residual, "multiplier": multiplier} if name == "compress_all" else {}])
    return blocks[::-1]


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * 8


def _nth(values, index: int, name: str, path):
    values = _as_tuple(values)
    if not 0 <= index < len(values):
        raise VeloxLoadError(path, f"has more resamplers than its config's {name} lists", LTX2_VAE_EXPECTED)
    return values[index]


def _ratio(numerator: int, denominator: int, path) -> int:
    if numerator % denominator:
        raise VeloxLoadError(path, f"a resampler maps {denominator} channels to a non-integer multiple",
                             LTX2_VAE_EXPECTED)
    return numerator // denominator


def _patch_size(conv_in_channels: int, in_channels: int, path) -> int:
    patch = math.isqrt(conv_in_channels // in_channels)
    if patch * patch * in_channels != conv_in_channels:
        raise VeloxLoadError(path, f"encoder.conv_in takes {conv_in_channels} channels, not {in_channels} x a "
                             "square patch", LTX2_VAE_EXPECTED)
    return patch
