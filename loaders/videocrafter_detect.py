"""Which VideoCrafter / DynamiCrafter release a checkpoint is, from its keys and shapes.

A release file (Lightning ``model.ckpt``, or safetensors of the same keys) holds several models under
prefixes; ``split_components`` separates them. ``detect_variant`` reads the UNet's keys and shapes
into a ``UNet3DConfig`` and names the release (``VARIANTS``, the flags and sampling settings of the
official configs, ``shared/reference/videocrafter_and_lora.md`` §1-2):

| fingerprint                                            | release                      |
|--------------------------------------------------------|------------------------------|
| ``relative_position_k`` tables, no ``fps_embedding``   | VideoCrafter 1 T2V 512       |
| ``relative_position_k`` tables and ``fps_embedding``   | VideoCrafter 1 T2V 1024      |
| ``temopral_conv``, 4 input channels, no ``to_k_ip``    | VideoCrafter 2               |
| ``to_k_ip``, 4 input channels                          | VideoCrafter 1 I2V 512       |
| 8 input channels and ``attn2.alpha``                   | DynamiCrafter 256            |
| 8 input channels, no ``alpha``                         | DynamiCrafter 512 / 1024     |

DynamiCrafter 512, its interpolation model and 1024 have the same keys; the file name decides
("1024", "interp") unless the caller names the variant.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import VeloxLoadError
from ..models.resampler import ResamplerConfig
from ..models.unet3d import INIT_ATTN_HEADS, UNet3DConfig
from ..sampling.videocrafter_ddim import VideoDiffusionSchedule
from .families import VIDEOCRAFTER, identify, refusal

PREFIXES = {  # component -> key prefix in a release checkpoint
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text": "cond_stage_model.",
    "vision": "embedder.",
    "image_proj": "image_proj_model.",
}
UNET_MARKER = VIDEOCRAFTER.markers[0]
RESAMPLER_HEAD_DIM = 64  # not in the weights (heads x dim_head = to_q width); 12 x 64 in every release
EXPECTED = ("a VideoCrafter 1/2 or DynamiCrafter checkpoint (model.ckpt or .safetensors with "
            "model.diffusion_model.input_blocks.*, first_stage_model.*, cond_stage_model.* keys)")


@dataclass(frozen=True)
class VideoCrafterPreset:
    """Official sampling settings (``scripts/run*.sh`` and the inference configs)."""

    height: int
    width: int
    frames: int = 16
    steps: int = 50
    cfg: float = 12.0
    eta: float = 1.0
    fps: int = 28  # fps (VideoCrafter, DynamiCrafter 512/1024) or frame stride (DynamiCrafter 256)
    spacing: str = "uniform"
    guidance_rescale: float = 0.0


@dataclass(frozen=True)
class VideoCrafterVariant:
    name: str
    key: str  # VARIANTS key
    unet: UNet3DConfig
    schedule: VideoDiffusionSchedule
    preset: VideoCrafterPreset
    resampler: ResamplerConfig | None = None
    concat_image: bool = False  # DynamiCrafter: the image latent is concatenated to the noise

    @property
    def is_i2v(self) -> bool:
        return self.resampler is not None

    def check_frames(self, frames: int, node: str = "VideoCrafter") -> None:
        """DynamiCrafter's Resampler makes image tokens for exactly ``video_length`` frames; the
        VideoCrafter UNets take 1 .. 2 x temporal_length frames (16 trained, longer drifts)."""
        if self.resampler is not None and self.resampler.video_length is not None:
            allowed = (self.resampler.video_length,)
        else:
            allowed = tuple(range(1, 2 * self.unet.temporal_length + 1))
        if frames not in allowed:
            span = str(allowed[0]) if len(allowed) == 1 else f"{allowed[0]}..{allowed[-1]}"
            raise ValueError(f"{node}: {self.name} cannot make {frames} frames; it takes {span} frames")


_VC = VideoDiffusionSchedule(prev_scale_at_end="one")
_DC = VideoDiffusionSchedule(prev_scale_at_end="first")
_DC_V = replace(_DC, prediction="v", zero_terminal_snr=True)
_I2V_RESAMPLER = ResamplerConfig(video_length=None)
_DC_RESAMPLER = ResamplerConfig(video_length=16)
# key -> (name, schedule, preset, resampler, concat_image, default fps the UNet embeds)
VARIANTS: dict[str, tuple] = {
    "vc1_512": ("VideoCrafter 1 T2V 512", _VC, VideoCrafterPreset(320, 512), None, False, 16),
    "vc1_1024": ("VideoCrafter 1 T2V 1024", replace(_VC, scale_end=0.3),
                 VideoCrafterPreset(576, 1024), None, False, 16),
    "vc2": ("VideoCrafter 2", replace(_VC, scale_end=0.7), VideoCrafterPreset(320, 512), None, False, 16),
    "vc1_i2v": ("VideoCrafter 1 I2V 512", replace(_VC, scale_end=0.7),
                VideoCrafterPreset(320, 512, fps=8), _I2V_RESAMPLER, False, 16),
    "dc256": ("DynamiCrafter 256", _DC, VideoCrafterPreset(256, 256, cfg=7.5, fps=3), _DC_RESAMPLER, True, 3),
    "dc512": ("DynamiCrafter 512", replace(_DC_V, scale_end=0.7),
              VideoCrafterPreset(320, 512, cfg=7.5, fps=24, spacing="uniform_trailing", guidance_rescale=0.7),
              _DC_RESAMPLER, True, 24),
    "dc512_interp": ("DynamiCrafter 512 interpolation", replace(_DC_V, scale_end=0.7),
                     VideoCrafterPreset(320, 512, cfg=7.5, fps=24, spacing="uniform_trailing",
                                        guidance_rescale=0.7), _DC_RESAMPLER, True, 24),
    "dc1024": ("DynamiCrafter 1024", replace(_DC_V, scale_end=0.3),
               VideoCrafterPreset(576, 1024, cfg=7.5, fps=10, spacing="uniform_trailing", guidance_rescale=0.7),
               _DC_RESAMPLER, True, 10),
}


def split_components(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {key without prefix: tensor}} for the PREFIXES present; a bare UNet is ``unet``."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        for component, prefix in PREFIXES.items():
            if key.startswith(prefix):
                parts.setdefault(component, {})[key[len(prefix):]] = tensor
                break
    if "unet" not in parts and UNET_MARKER in state_dict:
        parts["unet"] = {k: v for k, v in state_dict.items() if not k.startswith(tuple(PREFIXES.values()))}
    if "unet" not in parts and "diffusion_model." + UNET_MARKER in state_dict:  # ComfyUI-style save
        parts["unet"] = {k[len("diffusion_model."):]: v for k, v in state_dict.items()
                         if k.startswith("diffusion_model.")}
    return parts


def refuse_foreign(state_dict: Mapping[str, torch.Tensor], path: str | Path | None) -> None:
    keys = list(state_dict)
    found = identify(keys, exclude=(VIDEOCRAFTER.name,))
    if found is not None:
        raise VeloxLoadError(path, refusal(*found, VIDEOCRAFTER), EXPECTED)
    raise VeloxLoadError(path, f"no 3D UNet found (no key ending in {UNET_MARKER}; first keys: {keys[:3]})",
                         EXPECTED)


def sniff_videocrafter(raw_state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None,
                       variant: str = "auto") -> tuple[VideoCrafterVariant, dict[str, dict[str, torch.Tensor]]]:
    """A release checkpoint or a bare UNet -> (variant, {component: state dict without its prefix})."""
    components = split_components(raw_state_dict)
    return detect_variant(components, path, variant), components


def unet_config_from_keys(unet: Mapping[str, torch.Tensor], path=None, num_head_channels: int = 64) -> UNet3DConfig:
    """Structure from keys and shapes, head width included (``head_width_from_keys``)."""
    stem = unet[UNET_MARKER]
    model_channels, in_channels = int(stem.shape[0]), int(stem.shape[1])
    blocks = sorted({int(m.group(1)) for k in unet if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in unet]
    levels = len(downs) + 1
    per_level = (len(blocks) - 1 - len(downs)) // levels
    mult, attention = [], []
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        mult.append(int(unet[f"input_blocks.{first}.0.in_layers.2.weight"].shape[0]) // model_channels)
        if f"input_blocks.{first}.1.proj_in.weight" in unet:
            attention.append(2 ** level)
    table = next((v for k, v in unet.items() if k.endswith("relative_position_k.embeddings_table")), None)
    context = next(v for k, v in unet.items() if k.endswith("attn2.to_k.weight") and ".1.transformer" in k)
    return UNet3DConfig(
        in_channels=in_channels, out_channels=int(unet["out.2.weight"].shape[0]), model_channels=model_channels,
        channel_mult=tuple(mult), num_res_blocks=per_level, attention_resolutions=tuple(sorted(attention)),
        num_head_channels=head_width_from_keys(unet, path, min(num_head_channels, model_channels)),
        transformer_depth=len({k.split(".transformer_blocks.")[1].split(".")[0]
                               for k in unet if k.startswith("input_blocks.1.1.transformer_blocks.")}) or 1,
        context_dim=int(context.shape[1]),
        temporal_conv=any(".temopral_conv." in k for k in unet),
        use_relative_position=table is not None,
        temporal_length=(int(table.shape[0]) - 1) // 2 if table is not None else 16,
        addition_attention=any(k.startswith("init_attn.") for k in unet),
        fps_cond="fps_embedding.0.weight" in unet,
        image_cross_attention=any(k.endswith("attn2.to_k_ip.weight") for k in unet),
        image_cross_attention_scale_learnable=any(k.endswith("attn2.alpha") for k in unet),
    )


def head_width_from_keys(unet: Mapping[str, torch.Tensor], path=None, fallback: int = 64) -> int:
    """The attention head width (lvdm ``num_head_channels``), checked against every attention layer.

    Carried by VideoCrafter 1's relative-position tables, (2L+1, head width), and by ``init_attn``,
    lvdm's TemporalTransformer(model_channels, n_heads=8, d_head=num_head_channels): its 1x1-conv
    ``proj_in`` has 8 x head-width rows. A UNet with neither (no release lacks both) does not show it:
    its attention layers are ``ch // width`` heads of ``width`` channels, which for ``width`` dividing
    every ``ch`` is ``ch`` channels whatever ``width`` is; ``fallback`` (64, the releases' width,
    capped at model_channels) is then taken."""
    table = next((v for k, v in unet.items() if k.endswith("relative_position_k.embeddings_table")), None)
    init_proj = unet.get("init_attn.0.proj_in.weight")
    if table is not None:
        width = int(table.shape[1])
    elif init_proj is not None:
        width = int(init_proj.shape[0]) // INIT_ATTN_HEADS
    else:
        width = fallback
    _check_head_width(unet, width, path)
    return width


def _check_head_width(unet: Mapping[str, torch.Tensor], width: int, path) -> None:
    """lvdm builds ``ch // width`` heads of ``width`` channels at each attention level: every
    transformer's ``proj_in`` must be (heads x width, ch); refuse a UNet that no head width builds."""
    init_proj = unet.get("init_attn.0.proj_in.weight")
    checks = [("init_attn.0.proj_in.weight", (INIT_ATTN_HEADS * width, *init_proj.shape[1:]))] if (
        init_proj is not None) else []
    for key, weight in unet.items():
        if key.endswith(".proj_in.weight") and not key.startswith("init_attn."):
            channels = int(weight.shape[1])
            checks.append((key, ((channels // max(width, 1)) * width, *weight.shape[1:])))
    for key, wanted in checks:
        if width < 1 or tuple(unet[key].shape) != wanted:
            raise VeloxLoadError(path, f"tensor {key} has shape {list(unet[key].shape)}, a UNet of {width}-channel "
                                 f"attention heads needs {list(wanted)}", EXPECTED)


def variant_key(config: UNet3DConfig, name_hint: str = "") -> str:
    hint = name_hint.lower()
    if config.in_channels == 8:
        if config.image_cross_attention_scale_learnable:
            return "dc256"
        if "1024" in hint:
            return "dc1024"
        return "dc512_interp" if "interp" in hint else "dc512"
    if config.use_relative_position:
        return "vc1_1024" if config.fps_cond else "vc1_512"
    return "vc1_i2v" if config.image_cross_attention else "vc2"


def resampler_config_from_keys(proj: Mapping[str, torch.Tensor]) -> ResamplerConfig:
    """Resampler sizes from ``image_proj_model.*``; 16 queries per frame and 64-dim heads in every release."""
    latents = proj["latents"]
    depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
    inner = int(proj["layers.0.0.to_q.weight"].shape[0])
    total, dim = int(latents.shape[1]), int(latents.shape[2])
    per_frame = 16
    return ResamplerConfig(
        dim=dim, depth=depth, dim_head=RESAMPLER_HEAD_DIM, heads=inner // RESAMPLER_HEAD_DIM,
        num_queries=per_frame, embedding_dim=int(proj["proj_in.weight"].shape[1]),
        output_dim=int(proj["proj_out.weight"].shape[0]),
        ff_mult=int(proj["layers.0.1.1.weight"].shape[0]) // dim,
        video_length=total // per_frame if total > per_frame else None,
    )


def detect_variant(components: Mapping[str, Mapping[str, torch.Tensor]], path: str | Path | None = None,
                   variant: str = "auto") -> VideoCrafterVariant:
    """The release of a split checkpoint; ``variant`` ("auto" or a VARIANTS key) overrides the file-name hint."""
    unet = components.get("unet")
    if not unet or UNET_MARKER not in unet:
        refuse_foreign({k: v for part in components.values() for k, v in part.items()}, path)
    if not any(k.startswith("input_blocks.1.2.") for k in unet):  # no temporal transformer after the spatial one
        raise VeloxLoadError(path, "this is an image UNet (Stable Diffusion 1.x / 2.x style, no temporal layers), "
                             "not a VideoCrafter / DynamiCrafter 3D UNet", EXPECTED)
    config = unet_config_from_keys(unet, path)
    key = variant_key(config, Path(path).name if path else "") if variant == "auto" else variant
    if key not in VARIANTS:
        raise ValueError(f"VideoCrafter loader: unknown variant {variant!r}; one of auto, {', '.join(VARIANTS)}")
    name, schedule, preset, resampler, concat, default_fps = VARIANTS[key]
    if (config.in_channels == 8) != concat:
        raise VeloxLoadError(path, f"has {config.in_channels} input channels, {name} has {8 if concat else 4}",
                             f"a {name} checkpoint, or variant 'auto'")
    if resampler is not None:
        proj = components.get("image_proj")
        if not proj:
            raise VeloxLoadError(path, f"{name} needs its image projection (image_proj_model.*), absent here",
                                 "the full release checkpoint")
        resampler = resampler_config_from_keys(proj)
    return VideoCrafterVariant(name, key, replace(config, default_fps=default_fps), schedule, preset,
                               resampler, concat)
