"""DC-AE (Sana's `dc-ae-f32c32-sana-1.0/1.1` autoencoder): detection, config and key layouts.

The canonical layout for DC-AE is diffusers' `AutoencoderDC`, because that is what ComfyUI core's
port (`comfy/ldm/ace/vae/autoencoder_dc.py`) is keyed by. The original mit-han-lab/efficientvit
layout (`encoder.stages.N.op_list.M.main.conv1.conv.weight`, `...context_module.main.qkv.conv.weight`)
is mapped onto it here; the mapping restates, as a table, the facts of diffusers'
`scripts/convert_dcae_to_diffusers.py` (`AE_KEYS_RENAME_DICT`, `remap_qkv_`, `remap_proj_conv_`).

The architecture is read from keys and shapes only (never from a file name). No comfy import here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import VeloxLoadError

# Prefixes a DC-AE state dict may carry inside bigger files or other tools' saves.
DCAE_PREFIXES: tuple[str, ...] = ("first_stage_model.", "vae.", "ae.", "dcae.", "model.", "module.")

# Which layout a state dict is in: a key matching the pattern decides.
DCAE_LAYOUT_SIGNATURES: dict[str, re.Pattern] = {
    "diffusers": re.compile(r"^(?:encoder\.down|decoder\.up)_blocks\.\d+\.\d+\."),
    "original": re.compile(r"^(?:encoder|decoder)\.stages\.\d+\.op_list\.\d+\."),
}

# Other checkpoints users pick by mistake, named in the error so they know what they gave us.
OTHER_CHECKPOINT_SIGNATURES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^decoder\.up\.\d+\.block\."), "a KL autoencoder in the LDM layout (SD 1.x/2.x/SDXL/Flux VAE)"),
    (re.compile(r"^decoder\.up_blocks\.\d+\.resnets\."), "a KL autoencoder in the diffusers layout (AutoencoderKL*)"),
    (re.compile(r"^decoder\.(?:upsamples|head|middle)\."), "a Wan VAE"),
    (re.compile(r"^(?:taesd_)?decoder\.\d+\."), "a TAESD/TAEHV tiny autoencoder"),
    (re.compile(r"^(?:model\.diffusion_model\.|blocks\.\d+\.|transformer_blocks\.)"), "a diffusion model"),
)

EXPECTED_DCAE = (
    "a DC-AE autoencoder (Sana's dc-ae-f32c32), with keys such as 'decoder.up_blocks.3.1.attn.to_q.weight' "
    "(diffusers AutoencoderDC) or 'decoder.stages.3.op_list.1.context_module.main.qkv.conv.weight' "
    "(mit-han-lab efficientvit)"
)

# --- original efficientvit layout -> diffusers layout -------------------------------------------------
# Keys are first normalised the way diffusers' converter does: the wrapper segments `main` and `op_list`
# vanish and `stages` become `down_blocks` / `up_blocks`. Then the first matching row rewrites the key.

_BLOCK = r"(?P<block>(?:encoder\.down|decoder\.up)_blocks\.\d+\.\d+\.)"


def _keep(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: tensor}


def _squeeze_1x1(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 1x1 conv weight (O, I, 1, 1) stored for a Linear (O, I)."""
    return {key: tensor.reshape(tensor.shape[0], tensor.shape[1])}


def _split_qkv(prefix: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fused 1x1 `qkv` conv (3*D, C, 1, 1) becomes `to_q`, `to_k`, `to_v` Linears (D, C)."""
    q, k, v = tensor.reshape(tensor.shape[0], tensor.shape[1]).chunk(3, dim=0)
    return {f"{prefix}to_q.weight": q, f"{prefix}to_k.weight": k, f"{prefix}to_v.weight": v}


# (pattern on the normalised original key, diffusers replacement, tensor rewrite). A pattern ending in
# `$` names a whole key; otherwise the unmatched rest (`weight`, `bias`, BatchNorm buffers) is kept.
ORIGINAL_TO_DIFFUSERS: tuple[tuple[re.Pattern, str, Callable], ...] = tuple(
    (re.compile(pattern), replacement, rewrite)
    for pattern, replacement, rewrite in (
        (r"encoder\.project_in\.conv\.conv\.", "encoder.conv_in.conv.", _keep),  # f32c32-in/mix: stride-2 in
        (r"encoder\.project_in\.conv\.", "encoder.conv_in.", _keep),
        (r"encoder\.project_out\.0\.conv\.", "encoder.conv_out.", _keep),
        (r"decoder\.project_in\.conv\.", "decoder.conv_in.", _keep),
        (r"decoder\.project_out\.0\.", "decoder.norm_out.", _keep),
        (r"decoder\.project_out\.2\.conv\.conv\.", "decoder.conv_out.conv.", _keep),  # f32c32-in/mix
        (r"decoder\.project_out\.2\.conv\.", "decoder.conv_out.", _keep),
        # ResBlock
        (_BLOCK + r"conv1\.conv\.", r"\g<block>conv1.", _keep),
        (_BLOCK + r"conv2\.conv\.", r"\g<block>conv2.", _keep),
        (_BLOCK + r"conv2\.norm\.", r"\g<block>norm.", _keep),
        # down/up-sampling op: a ConvLayer (`conv.conv`) or, for the stride-2 "Conv" type, a bare conv
        (_BLOCK + r"conv\.conv\.", r"\g<block>conv.", _keep),
        (_BLOCK + r"conv\.(?=weight$|bias$)", r"\g<block>conv.", _keep),
        # EfficientViTBlock: LiteMLA context module
        (_BLOCK + r"context_module\.qkv\.conv\.weight$", r"\g<block>attn.", _split_qkv),
        (_BLOCK + r"context_module\.aggreg\.(?P<s>\d+)\.0\.", r"\g<block>attn.to_qkv_multiscale.\g<s>.proj_in.", _keep),
        (_BLOCK + r"context_module\.aggreg\.(?P<s>\d+)\.1\.", r"\g<block>attn.to_qkv_multiscale.\g<s>.proj_out.", _keep),
        (_BLOCK + r"context_module\.proj\.conv\.weight$", r"\g<block>attn.to_out.weight", _squeeze_1x1),
        (_BLOCK + r"context_module\.proj\.norm\.", r"\g<block>attn.norm_out.", _keep),
        # EfficientViTBlock: GLUMBConv local module
        (_BLOCK + r"local_module\.inverted_conv\.conv\.", r"\g<block>conv_out.conv_inverted.", _keep),
        (_BLOCK + r"local_module\.depth_conv\.conv\.", r"\g<block>conv_out.conv_depth.", _keep),
        (_BLOCK + r"local_module\.point_conv\.conv\.", r"\g<block>conv_out.conv_point.", _keep),
        (_BLOCK + r"local_module\.point_conv\.norm\.", r"\g<block>conv_out.norm.", _keep),
    )
)

_ORIGINAL_WRAPPER_SEGMENTS = frozenset({"main", "op_list"})
_ORIGINAL_STAGE_CONTAINERS = {"encoder.stages.": "encoder.down_blocks.", "decoder.stages.": "decoder.up_blocks."}


def _normalise_original_key(key: str) -> str:
    key = ".".join(part for part in key.split(".") if part not in _ORIGINAL_WRAPPER_SEGMENTS)
    for old, new in _ORIGINAL_STAGE_CONTAINERS.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def original_dcae_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """Map an efficientvit-layout DC-AE state dict onto diffusers `AutoencoderDC` keys."""
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        normalised = _normalise_original_key(key)
        for pattern, replacement, rewrite in ORIGINAL_TO_DIFFUSERS:
            match = pattern.match(normalised)
            if match:
                converted.update(rewrite(match.expand(replacement) + normalised[match.end():], tensor))
                break
        else:
            unknown.append(key)
    if unknown:
        raise VeloxLoadError(
            path, f"{len(unknown)} key(s) of the efficientvit DC-AE layout are not known, e.g. {unknown[:3]}",
            EXPECTED_DCAE,
        )
    return converted


# --- config detection ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DCAEConfig:
    """The constructor arguments of diffusers' / ComfyUI core's `AutoencoderDC`, read from a state dict.

    `has_encoder` is False for decoder-only files; the encoder is then built empty and cannot encode.
    """

    encoder_block_out_channels: tuple[int, ...]
    decoder_block_out_channels: tuple[int, ...]
    encoder_layers_per_block: tuple[int, ...]
    decoder_layers_per_block: tuple[int, ...]
    encoder_block_types: tuple[str, ...]
    decoder_block_types: tuple[str, ...]
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...]
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...]
    decoder_norm_types: tuple[str, ...]
    decoder_act_fns: tuple[str, ...]
    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    downsample_block_type: str = "Conv"
    upsample_block_type: str = "interpolate"
    has_encoder: bool = True

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.decoder_block_out_channels) - 1)

    def autoencoder_kwargs(self) -> dict:
        """Keyword arguments for `AutoencoderDC(...)` (core's port and diffusers' class take the same)."""
        kwargs = {
            name: getattr(self, name)
            for name in (
                "in_channels", "latent_channels", "attention_head_dim", "encoder_block_types",
                "decoder_block_types", "encoder_block_out_channels", "decoder_block_out_channels",
                "encoder_layers_per_block", "decoder_layers_per_block", "encoder_qkv_multiscales",
                "decoder_qkv_multiscales", "upsample_block_type", "downsample_block_type",
                "decoder_norm_types", "decoder_act_fns",
            )
        }
        return {name: _as_lists(value) for name, value in kwargs.items()}


def _as_lists(value):
    return [_as_lists(v) for v in value] if isinstance(value, tuple) else value


# Sana 1.0 / 1.1 (identical architecture; 1.1 differs only in weights). `SANA_DCAE_CONFIG` is the preset
# the detector must reproduce from the released files.
_SANA_TYPES = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
_SANA_SCALES = ((), (), (), (5,), (5,), (5,))
SANA_DCAE_CONFIG = DCAEConfig(
    encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
    decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_block_types=_SANA_TYPES,
    decoder_block_types=_SANA_TYPES,
    encoder_qkv_multiscales=_SANA_SCALES,
    decoder_qkv_multiscales=_SANA_SCALES,
    decoder_norm_types=("rms_norm",) * 6,
    decoder_act_fns=("silu",) * 6,
)

# A block is recognised by one of its weights (suffix after `<side>_blocks.i.j.`), whose input width is
# the stage width.
BLOCK_SIGNATURES: dict[str, str] = {"conv1.weight": "ResBlock", "attn.to_q.weight": "EfficientViTBlock"}
# A block's norm is BatchNorm when it has running statistics, else RMSNorm.
NORM_SIGNATURES: dict[str, str] = {"norm.running_mean": "batch_norm", "attn.norm_out.running_mean": "batch_norm"}
# The activation is not stored; every released DC-AE pairs these (diffusers' converter configs).
ACTIVATION_FOR_NORM: dict[str, str] = {"rms_norm": "silu", "batch_norm": "relu"}
# Shape of the down/up-sampling conv's output, relative to the stage width it produces, names its type.
DOWNSAMPLE_TYPE_BY_RATIO: dict[int, str] = {1: "Conv", 4: "pixel_unshuffle"}  # width[i+1] / conv out
UPSAMPLE_TYPE_BY_RATIO: dict[int, str] = {1: "interpolate", 4: "pixel_shuffle"}  # conv out / width[i]
SIDE_CONTAINERS: dict[str, str] = {"encoder": "encoder.down_blocks", "decoder": "decoder.up_blocks"}


@dataclass
class _Side:
    widths: list[int]
    layers: list[int]
    types: list[str]
    scales: list[tuple[int, ...]]
    norms: list[str]
    resample_conv_out: dict[int, int]  # stage -> out channels of its down/up-sampling conv


def _read_side(sd: Mapping[str, torch.Tensor], side: str, path) -> _Side | None:
    container = SIDE_CONTAINERS[side]
    pattern = re.compile(re.escape(container) + r"\.(\d+)\.(\d+)\.(.+)$")
    ops: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        match = pattern.match(key)
        if match:
            ops.setdefault((int(match[1]), int(match[2])), {})[match[3]] = tensor
    if not ops:
        return None
    num_stages = max(stage for stage, _ in ops) + 1
    side_info = _Side([0] * num_stages, [0] * num_stages, ["ResBlock"] * num_stages, [()] * num_stages,
                      ["rms_norm"] * num_stages, {})
    for (stage, op), params in sorted(ops.items()):
        signature = next((suffix for suffix in BLOCK_SIGNATURES if suffix in params), None)
        if signature is None:  # the down/up-sampling conv of this stage
            if "conv.weight" not in params:
                raise VeloxLoadError(path, f"{container}.{stage}.{op} is neither a block nor a resampling conv "
                                     f"({sorted(params)[:3]})", EXPECTED_DCAE)
            side_info.resample_conv_out[stage] = params["conv.weight"].shape[0]
            continue
        block_type = BLOCK_SIGNATURES[signature]
        if side_info.layers[stage] and side_info.types[stage] != block_type:
            raise VeloxLoadError(path, f"{container}.{stage} mixes block types", EXPECTED_DCAE)
        side_info.layers[stage] += 1
        side_info.types[stage] = block_type
        side_info.widths[stage] = params[signature].shape[1]  # conv1 (C, C, 3, 3) / to_q (D, C)
        side_info.scales[stage] = _qkv_multiscales(params)
        side_info.norms[stage] = next((n for suffix, n in NORM_SIGNATURES.items() if suffix in params), "rms_norm")
    # A stage without blocks has no weights of its own and its settings shape no tensor: take the next
    # stage's block type and norm and half its width, as every released DC-AE has it.
    for stage in reversed(range(num_stages - 1)):
        if not side_info.layers[stage]:
            side_info.widths[stage] = max(1, side_info.widths[stage + 1] // 2)
            side_info.types[stage], side_info.norms[stage] = side_info.types[stage + 1], side_info.norms[stage + 1]
    return side_info


_MULTISCALE_PROJ_IN = re.compile(r"attn\.to_qkv_multiscale\.(\d+)\.proj_in\.weight")


def _qkv_multiscales(params: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """Kernel sizes of an EfficientViTBlock's multi-scale depthwise convs, in module order."""
    found = {int(m[1]): t.shape[-1] for name, t in params.items() if (m := _MULTISCALE_PROJ_IN.fullmatch(name))}
    return tuple(found[s] for s in sorted(found))


def _resample_type(side: _Side, table: dict[int, str], ratio_of, what: str, path) -> str | None:
    for stage, conv_out in sorted(side.resample_conv_out.items()):
        ratio = ratio_of(stage, conv_out)
        if ratio not in table:
            raise VeloxLoadError(path, f"{what} conv of stage {stage} has {conv_out} output channels", EXPECTED_DCAE)
        return table[ratio]
    return None


def _attention_head_dim(sd: Mapping[str, torch.Tensor]) -> int:
    """The grouped 1x1 `proj_out` has one group per head: its input width per group is the head dim."""
    for key, tensor in sd.items():
        if key.endswith(".attn.to_qkv_multiscale.0.proj_out.weight"):
            return tensor.shape[1]
    return 32


def detect_dcae_config(state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None) -> DCAEConfig:
    """Read the `AutoencoderDC` architecture from a diffusers-layout DC-AE state dict (keys and shapes)."""
    decoder = _read_side(state_dict, "decoder", path)
    if decoder is None or "decoder.conv_in.weight" not in state_dict:
        raise VeloxLoadError(path, "no DC-AE decoder weights (decoder.up_blocks.*, decoder.conv_in.weight)", EXPECTED_DCAE)
    encoder = _read_side(state_dict, "encoder", path)
    in_channels_key = next((k for k in ("encoder.conv_in.weight", "encoder.conv_in.conv.weight") if k in state_dict), None)
    upsample = _resample_type(decoder, UPSAMPLE_TYPE_BY_RATIO, lambda i, out: out // decoder.widths[i], "upsample", path)
    if encoder is None:  # decoder-only file: an empty encoder keeps AutoencoderDC buildable
        stages = len(decoder.widths)
        encoder = _Side(list(decoder.widths), [0] * stages, list(decoder.types), [()] * stages, [], {})
    if in_channels_key:
        in_channels = state_dict[in_channels_key].shape[1]
    else:
        in_channels = state_dict["decoder.conv_out.weight"].shape[0] if "decoder.conv_out.weight" in state_dict else 3
    downsample = _resample_type(encoder, DOWNSAMPLE_TYPE_BY_RATIO, lambda i, out: encoder.widths[i + 1] // out,
                                "downsample", path)
    return DCAEConfig(
        encoder_block_out_channels=tuple(encoder.widths),
        decoder_block_out_channels=tuple(decoder.widths),
        encoder_layers_per_block=tuple(encoder.layers),
        decoder_layers_per_block=tuple(decoder.layers),
        encoder_block_types=tuple(encoder.types),
        decoder_block_types=tuple(decoder.types),
        encoder_qkv_multiscales=tuple(encoder.scales),
        decoder_qkv_multiscales=tuple(decoder.scales),
        decoder_norm_types=tuple(decoder.norms),
        decoder_act_fns=tuple(ACTIVATION_FOR_NORM[n] for n in decoder.norms),
        in_channels=in_channels,
        latent_channels=state_dict["decoder.conv_in.weight"].shape[1],
        attention_head_dim=_attention_head_dim(state_dict),
        downsample_block_type=downsample or "Conv",
        upsample_block_type=upsample or "interpolate",
        has_encoder=in_channels_key is not None,
    )


# --- entry point -----------------------------------------------------------------------------------------


def strip_dcae_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Select the autoencoder's tensors from a file that nests them under a known prefix."""
    sd = dict(state_dict)
    while not any(k.startswith("decoder.") for k in sd):
        prefix = next((p for p in DCAE_PREFIXES if any(k.startswith(p + "decoder.") for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def detect_dcae_layout(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """'diffusers', 'original', or None when the keys are not a DC-AE's."""
    for layout, signature in DCAE_LAYOUT_SIGNATURES.items():
        if any(signature.match(k) for k in state_dict):
            return layout
    return None


def _not_a_dcae(state_dict: Mapping[str, torch.Tensor], path) -> VeloxLoadError:
    what = next((name for signature, name in OTHER_CHECKPOINT_SIGNATURES if any(signature.match(k) for k in state_dict)),
                None)
    problem = f"this is {what}, not a DC-AE" if what else "no DC-AE autoencoder keys found"
    sample = sorted(state_dict)[:3]
    return VeloxLoadError(path, f"{problem} (first keys: {sample})", EXPECTED_DCAE)


def prepare_dcae_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None
) -> tuple[DCAEConfig, dict[str, torch.Tensor]]:
    """Any DC-AE state dict -> (its config, the same tensors under diffusers `AutoencoderDC` keys).

    Raises `VeloxLoadError` naming `path` when the tensors are not a DC-AE.
    """
    sd = strip_dcae_prefix(state_dict)
    layout = detect_dcae_layout(sd)
    if layout is None:
        raise _not_a_dcae(sd, path)
    sd = {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder."))}
    if layout == "original":
        sd = original_dcae_to_diffusers(sd, path)
    return detect_dcae_config(sd, path), sd
