"""A tiny DC-AE with Sana's block structure, deterministic random weights, and writers for its layouts.

Structure as `dc-ae-f32c32-sana-1.0`: six stages (spatial factor 32), ResBlock x3 then EfficientViTBlock x3
with 5x5 multi-scale aggregation, stride-2 conv downsampling, nearest-interpolate upsampling, RMSNorm +
SiLU, 32 latent channels; only the widths are small (8..32) so that it decodes 1-2K pixels on a CPU.

Layouts written: diffusers `AutoencoderDC` (one safetensors file, or a pipeline folder's `vae/`), and the
original mit-han-lab efficientvit layout of the released `model.safetensors`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..loaders.dcae_keys import DCAEConfig

_TYPES = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
_SCALES = ((), (), (), (5,), (5,), (5,))
TINY_DCAE_CONFIG = DCAEConfig(
    encoder_block_out_channels=(8, 16, 16, 32, 32, 32),
    decoder_block_out_channels=(8, 16, 16, 32, 32, 32),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
    decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_block_types=_TYPES,
    decoder_block_types=_TYPES,
    encoder_qkv_multiscales=_SCALES,
    decoder_qkv_multiscales=_SCALES,
    decoder_norm_types=("rms_norm",) * 6,
    decoder_act_fns=("silu",) * 6,
    attention_head_dim=8,
)
SANA_DCAE_SCALING_FACTOR = 0.41407
GLUMBCONV_EXPAND_RATIO = 4
NORM_PARAMETERS = {
    "rms_norm": ("weight", "bias"),
    "batch_norm": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
}


# --- diffusers parameter shapes (AutoencoderDC's constructor, restated as data) -------------------------


def _norm_shapes(prefix: str, norm: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}{name}": (() if name == "num_batches_tracked" else (channels,)) for name in NORM_PARAMETERS[norm]}


def _conv_shapes(prefix: str, out_ch: int, in_ch: int, kernel: int, bias: bool = True) -> dict[str, tuple]:
    shapes = {f"{prefix}weight": (out_ch, in_ch, kernel, kernel)}
    if bias:
        shapes[f"{prefix}bias"] = (out_ch,)
    return shapes


def _res_block_shapes(p: str, channels: int, norm: str, scales, head_dim: int) -> dict[str, tuple]:
    return {
        **_conv_shapes(f"{p}conv1.", channels, channels, 3),
        **_conv_shapes(f"{p}conv2.", channels, channels, 3, bias=False),
        **_norm_shapes(f"{p}norm.", norm, channels),
    }


def _efficientvit_block_shapes(p: str, channels: int, norm: str, scales, head_dim: int) -> dict[str, tuple]:
    inner = channels // head_dim * head_dim
    hidden = GLUMBCONV_EXPAND_RATIO * channels
    shapes = {f"{p}attn.to_{name}.weight": (inner, channels) for name in "qkv"}
    for s, kernel in enumerate(scales):
        shapes[f"{p}attn.to_qkv_multiscale.{s}.proj_in.weight"] = (3 * inner, 1, kernel, kernel)
        shapes[f"{p}attn.to_qkv_multiscale.{s}.proj_out.weight"] = (3 * inner, head_dim, 1, 1)
    shapes[f"{p}attn.to_out.weight"] = (channels, inner * (1 + len(scales)))
    shapes.update(_norm_shapes(f"{p}attn.norm_out.", norm, channels))
    shapes.update(_conv_shapes(f"{p}conv_out.conv_inverted.", 2 * hidden, channels, 1))
    shapes.update(_conv_shapes(f"{p}conv_out.conv_depth.", 2 * hidden, 1, 3))
    shapes.update(_conv_shapes(f"{p}conv_out.conv_point.", channels, hidden, 1, bias=False))
    shapes.update(_norm_shapes(f"{p}conv_out.norm.", "rms_norm", channels))
    return shapes


BLOCK_SHAPES = {"ResBlock": _res_block_shapes, "EfficientViTBlock": _efficientvit_block_shapes}
DOWNSAMPLE_OUT_DIVISOR = {"Conv": 1, "pixel_unshuffle": 4}
UPSAMPLE_OUT_MULTIPLIER = {"interpolate": 1, "pixel_shuffle": 4}


def dcae_parameter_shapes(config: DCAEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of `AutoencoderDC(**config.autoencoder_kwargs())`, diffusers keys -> shapes."""
    c = config
    widths, layers = c.encoder_block_out_channels, c.encoder_layers_per_block
    shapes: dict[str, tuple[int, ...]] = {}
    # 1. encoder
    if layers[0] > 0:
        shapes.update(_conv_shapes("encoder.conv_in.", widths[0], c.in_channels, 3))
    else:
        shapes.update(_conv_shapes("encoder.conv_in.conv.", widths[1] // DOWNSAMPLE_OUT_DIVISOR[c.downsample_block_type],
                                   c.in_channels, 3))
    for i, (width, depth) in enumerate(zip(widths, layers)):
        for j in range(depth):
            shapes.update(BLOCK_SHAPES[c.encoder_block_types[i]](
                f"encoder.down_blocks.{i}.{j}.", width, "rms_norm", c.encoder_qkv_multiscales[i], c.attention_head_dim))
        if i < len(widths) - 1 and depth > 0:
            out = widths[i + 1] // DOWNSAMPLE_OUT_DIVISOR[c.downsample_block_type]
            shapes.update(_conv_shapes(f"encoder.down_blocks.{i}.{depth}.conv.", out, width, 3))
    shapes.update(_conv_shapes("encoder.conv_out.", c.latent_channels, widths[-1], 3))
    # 2. decoder
    widths, layers = c.decoder_block_out_channels, c.decoder_layers_per_block
    shapes.update(_conv_shapes("decoder.conv_in.", widths[-1], c.latent_channels, 3))
    for i, (width, depth) in enumerate(zip(widths, layers)):
        first = 0
        if i < len(widths) - 1 and depth > 0:
            out = width * UPSAMPLE_OUT_MULTIPLIER[c.upsample_block_type]
            shapes.update(_conv_shapes(f"decoder.up_blocks.{i}.0.conv.", out, widths[i + 1], 3))
            first = 1
        for j in range(depth):
            shapes.update(BLOCK_SHAPES[c.decoder_block_types[i]](
                f"decoder.up_blocks.{i}.{first + j}.", width, c.decoder_norm_types[i], c.decoder_qkv_multiscales[i],
                c.attention_head_dim))
    channels = widths[0] if layers[0] > 0 else widths[1]
    shapes.update(_norm_shapes("decoder.norm_out.", "rms_norm", channels))
    if layers[0] > 0:
        shapes.update(_conv_shapes("decoder.conv_out.", c.in_channels, channels, 3))
    else:
        out = c.in_channels * UPSAMPLE_OUT_MULTIPLIER[c.upsample_block_type]
        shapes.update(_conv_shapes("decoder.conv_out.conv.", out, channels, 3))
    return shapes


# --- deterministic random weights ------------------------------------------------------------------------

_NORM_LIKE = re.compile(r"(?:^|\.)(?:norm|norm_out)\.(?:weight|bias|running_mean|running_var|num_batches_tracked)$")


# Norm parameters start near their identity (centre, spread); conv/linear weights are fan-in scaled.
NORM_INIT = {"weight": (1.0, 0.1), "bias": (0.0, 0.05), "running_mean": (0.0, 0.1), "running_var": (1.0, 0.1)}


def _random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    name = key.rsplit(".", 1)[1]
    if name == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.long)
    noise = torch.randn(shape, generator=generator)
    if _NORM_LIKE.search(key):
        centre, spread = NORM_INIT[name]
        return centre + spread * (noise.abs() if name == "running_var" else noise)
    if name == "bias":
        return 0.05 * noise
    return noise / math.sqrt(math.prod(shape[1:]))


def make_dcae_state_dict(config: DCAEConfig = TINY_DCAE_CONFIG, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights for `config` in the diffusers layout; the same seed gives the same tensors."""
    generator = torch.Generator().manual_seed(seed)
    return {key: _random_tensor(key, shape, generator) for key, shape in dcae_parameter_shapes(config).items()}


# --- diffusers layout -> original efficientvit layout ---------------------------------------------------
# Written for Sana's structure ("Conv" downsampling, "interpolate" upsampling, blocks in stage 0): the
# released `dc-ae-f32c32-sana-1.0/model.safetensors` key names. `attn.to_qkv` is a transient name for
# the fused q/k/v weight.

_OP = r"(?P<side>encoder|decoder)\.(?:down|up)_blocks\.(?P<i>\d+)\.(?P<j>\d+)\."
_STAGE_OP = r"\g<side>.stages.\g<i>.op_list.\g<j>."


def _keep(key: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _as_1x1_conv(key: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(*tensor.shape, 1, 1)


DIFFUSERS_TO_ORIGINAL = tuple(
    (re.compile(pattern), replacement, rewrite)
    for pattern, replacement, rewrite in (
        (r"encoder\.conv_in\.", "encoder.project_in.conv.", _keep),
        (r"encoder\.conv_out\.", "encoder.project_out.main.op_list.0.conv.", _keep),
        (r"decoder\.conv_in\.", "decoder.project_in.main.conv.", _keep),
        (r"decoder\.norm_out\.", "decoder.project_out.op_list.0.", _keep),
        (r"decoder\.conv_out\.", "decoder.project_out.op_list.2.conv.", _keep),
        (r"(?P<side>encoder)\.down_blocks\.(?P<i>\d+)\.(?P<j>\d+)\.conv\.", _STAGE_OP + "main.conv.", _keep),
        (r"(?P<side>decoder)\.up_blocks\.(?P<i>\d+)\.(?P<j>\d+)\.conv\.", _STAGE_OP + "main.conv.conv.", _keep),
        (_OP + r"conv1\.", _STAGE_OP + "main.conv1.conv.", _keep),
        (_OP + r"conv2\.", _STAGE_OP + "main.conv2.conv.", _keep),
        (_OP + r"norm\.", _STAGE_OP + "main.conv2.norm.", _keep),
        (_OP + r"attn\.to_qkv\.weight$", _STAGE_OP + "context_module.main.qkv.conv.weight", _as_1x1_conv),
        (_OP + r"attn\.to_qkv_multiscale\.(?P<s>\d+)\.proj_in\.", _STAGE_OP + r"context_module.main.aggreg.\g<s>.0.",
         _keep),
        (_OP + r"attn\.to_qkv_multiscale\.(?P<s>\d+)\.proj_out\.", _STAGE_OP + r"context_module.main.aggreg.\g<s>.1.",
         _keep),
        (_OP + r"attn\.to_out\.weight$", _STAGE_OP + "context_module.main.proj.conv.weight", _as_1x1_conv),
        (_OP + r"attn\.norm_out\.", _STAGE_OP + "context_module.main.proj.norm.", _keep),
        (_OP + r"conv_out\.conv_inverted\.", _STAGE_OP + "local_module.main.inverted_conv.conv.", _keep),
        (_OP + r"conv_out\.conv_depth\.", _STAGE_OP + "local_module.main.depth_conv.conv.", _keep),
        (_OP + r"conv_out\.conv_point\.", _STAGE_OP + "local_module.main.point_conv.conv.", _keep),
        (_OP + r"conv_out\.norm\.", _STAGE_OP + "local_module.main.point_conv.norm.", _keep),
    )
)


def _fuse_qkv(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    fused = {k: v for k, v in state_dict.items() if not re.search(r"\.attn\.to_[qkv]\.weight$", k)}
    for key in state_dict:
        if key.endswith(".attn.to_q.weight"):
            prefix = key[: -len("to_q.weight")]
            fused[prefix + "to_qkv.weight"] = torch.cat([state_dict[f"{prefix}to_{n}.weight"] for n in "qkv"])
    return fused


def diffusers_dcae_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sana-structured diffusers `AutoencoderDC` tensors under the original efficientvit names."""
    converted = {}
    for key, tensor in _fuse_qkv(state_dict).items():
        for pattern, replacement, rewrite in DIFFUSERS_TO_ORIGINAL:
            match = pattern.match(key)
            if match:
                converted[match.expand(replacement) + key[match.end():]] = rewrite(key, tensor)
                break
        else:
            raise KeyError(f"no efficientvit name for DC-AE key {key}")
    return converted


# --- writers ---------------------------------------------------------------------------------------------

LAYOUT_WRITERS = {"diffusers": dict, "original": diffusers_dcae_to_original}


def write_dcae_safetensors(
    path: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None, layout: str = "diffusers",
    prefix: str = "", dtype: torch.dtype | None = None,
) -> Path:
    """One `.safetensors` file in `layout` ('diffusers' or 'original'), keys optionally under `prefix`."""
    from safetensors.torch import save_file

    tensors = LAYOUT_WRITERS[layout](state_dict if state_dict is not None else make_dcae_state_dict())
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def write_dcae_diffusers_folder(
    root: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None,
    config: DCAEConfig = TINY_DCAE_CONFIG, scaling_factor: float = SANA_DCAE_SCALING_FACTOR,
) -> Path:
    """A pipeline folder's `vae/` (config.json + diffusion_pytorch_model.safetensors); returns that folder."""
    folder = Path(root) / "vae"
    folder.mkdir(parents=True, exist_ok=True)
    config_json = {"_class_name": "AutoencoderDC", **config.autoencoder_kwargs(), "scaling_factor": scaling_factor}
    (folder / "config.json").write_text(json.dumps(config_json, indent=2))
    write_dcae_safetensors(folder / "diffusion_pytorch_model.safetensors",
                           state_dict if state_dict is not None else make_dcae_state_dict(config))
    return folder
