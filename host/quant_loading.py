"""Files -> state dicts whose quantized weights are ``PackedWeight`` records, ready for ``quant_ops``.

Three on-disk forms of quantized weights are read here, into one representation:

- GGUF (``*.gguf``, ``loaders/gguf_reader.py``, memory-mapped): quantized tensors stay packed
  (zero-copy views of the map), F32 / F16 / BF16 tensors become ordinary (zero-copy) tensors;
- ComfyUI "scaled fp8": a ``scaled_fp8`` marker and ``<layer>.scale_weight`` (+ ``scale_input``);
- ComfyUI's per-layer ``comfy_quant`` format: ``<layer>.comfy_quant`` (uint8 JSON bytes such as
  ``{"format": "float8_e4m3fn"}``) or the safetensors metadata ``_quantization_metadata``
  (``{"layers": {name: {"format": ...}}}``), with ``<layer>.weight_scale`` (+ ``input_scale``).
  Formats read: ``float8_e4m3fn`` and ``int8_tensorwise`` (per-tensor or per-row scale); others
  (nvfp4, mxfp8, ConvRot, ...) are refused by name.

Family code detects the variant from shapes alone, so ``detection_view`` gives it meta tensors of
the logical shapes and ``restore_packed`` puts the packed records back under the names the
family's key map chose (renames only; a key map that would compute on a packed tensor is refused).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as Q

from ..errors import VeloxLoadError
from ..kernels.fp8_linear import FP8_DTYPE
from ..loaders.checkpoint_files import read_component, read_safetensors_metadata, sibling_config
from .quant_tensor import PackedWeight, per_channel_scale

GGUF_SUFFIX = ".gguf"
QUANTIZATIONS = ("none", "fp8_e4m3", "int8")
QUANT_COMPUTES = ("dequant", "lowp")
# Layers that stay in high precision whatever the selector says (regular expressions over layer
# names): embeddings, modulation, norms, heads, time/text embedders, the depthwise conv.
NEVER_QUANTIZE: dict[str, tuple[str, ...]] = {
    "sana": (r"^x_embedder\.", r"^t_embedder\.", r"^cfg_embedder\.", r"^t_block\.", r"^y_embedder\.",
             r"^final_layer\.", r"^logvar_linear", r"depth_conv", r"norm"),
    "wan": (r"^patch_embedding", r"^vace_patch_embedding", r"^text_embedding\.", r"^time_embedding\.",
            r"^time_projection\.", r"^img_emb\.", r"^head\.", r"modulation", r"norm"),
    "videocrafter": (r"^time_embed\.", r"^fps_embedding\.", r"emb_layers\.", r"^image_proj_model\.",
                     r"^input_blocks\.0\.0\.", r"^out\.", r"norm", r"embeddings_table"),
}
COMFY_QUANT_SUFFIX = ".comfy_quant"
QUANT_METADATA_KEY = "_quantization_metadata"
SCALED_FP8_MARKER = "scaled_fp8"
WEIGHT_SCALE_SUFFIXES = (".weight_scale", ".scale_weight")  # comfy_quant, legacy scaled fp8
INPUT_SCALE_SUFFIXES = (".input_scale", ".scale_input")  # static activation scales: W8A8 here is dynamic
COMFY_QUANT_STORAGE = {"float8_e4m3fn": FP8_DTYPE, "int8_tensorwise": torch.int8}
COMFY_QUANT_EXPECTED = "comfy_quant layers in float8_e4m3fn or int8_tensorwise (without ConvRot)"

Weights = dict[str, "torch.Tensor | PackedWeight"]


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == GGUF_SUFFIX and Path(path).is_file()


def read_weights(path: str | Path, component: str = "transformer") -> tuple[Weights, dict | None]:
    """A checkpoint (GGUF, safetensors, safe pickle, diffusers folder) -> (weights, diffusers config).

    The config is the folder's config.json, or the one next to a file (``sibling_config``).
    Quantized weights of every on-disk form come back as ``PackedWeight``.
    """
    path = Path(path)
    if is_gguf(path):
        return read_gguf_weights(path), sibling_config(path)
    state_dict, config = read_component(path, component)
    return fold_quantized_layers(state_dict, _safetensors_metadata(path), path), config


def read_gguf_weights(path: str | Path) -> Weights:
    """A GGUF file's tensors: float types as zero-copy tensors, block types as ``PackedWeight``."""
    from ..loaders.gguf_reader import read_gguf, record_as_torch

    float_views = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    weights: Weights = {}
    for name, record in read_gguf(path).tensors.items():
        data = record_as_torch(record)
        if record.qtype in float_views:
            weights[name] = data.view(float_views[record.qtype]).reshape(record.shape)
        else:
            weights[name] = PackedWeight(data, tuple(record.shape), qtype=record.qtype)
    return weights


def _safetensors_metadata(path: Path) -> dict:
    """A single safetensors file's metadata (ComfyUI's per-layer quantization); {} for the rest."""
    return read_safetensors_metadata(path) if path.is_file() and path.suffix == ".safetensors" else {}


def has_quantized_layers(weights: Mapping[str, object]) -> bool:
    return any(isinstance(v, PackedWeight) for v in weights.values())


# ----------------------------------------------------------------------------------------------
# ComfyUI scaled fp8 and comfy_quant -> PackedWeight
# ----------------------------------------------------------------------------------------------


def fold_quantized_layers(state_dict: Mapping[str, torch.Tensor], metadata: Mapping | None = None,
                          path: str | Path | None = None) -> Weights:
    """Scaled-fp8 and comfy_quant layers become ``PackedWeight`` (fp8 / int8 + per-channel scale);
    their marker, scale and input-scale tensors disappear. Anything else passes through."""
    weights: Weights = dict(state_dict)
    marker = next((k for k in weights if k == SCALED_FP8_MARKER or k.endswith("." + SCALED_FP8_MARKER)), None)
    if marker is not None:
        weights.pop(marker)
    formats = _layer_formats(weights, metadata, path)
    for key in [k for k in weights if k.endswith(".weight")]:
        layer = key[: -len(".weight")]
        scale = next((weights.pop(layer + s) for s in WEIGHT_SCALE_SUFFIXES if layer + s in weights), None)
        for suffix in INPUT_SCALE_SUFFIXES:
            weights.pop(layer + suffix, None)
        fmt = formats.get(layer)
        if fmt is None and scale is None:
            continue
        weight = weights[key]
        if fmt is None and weight.dtype not in COMFY_QUANT_STORAGE.values():  # a legacy scale on a float weight
            weights[key] = (weight.float() * scale.float().reshape(-1, *[1] * (weight.ndim - 1))).to(weight.dtype)
            continue
        weights[key] = _packed_layer(weight, fmt or "float8_e4m3fn", scale, layer, path)
    return weights


def _layer_formats(weights: Weights, metadata: Mapping | None, path) -> dict[str, str]:
    """Layer name -> comfy_quant format, from ``.comfy_quant`` tensors and the file's metadata."""
    formats: dict[str, str] = {}
    header = (metadata or {}).get(QUANT_METADATA_KEY)
    if header:
        layers = json.loads(header).get("layers", {}) if isinstance(header, str) else header.get("layers", {})
        formats.update({name: config.get("format") for name, config in layers.items()})
    for key in [k for k in weights if k.endswith(COMFY_QUANT_SUFFIX)]:
        raw = weights.pop(key)
        try:
            config = json.loads(bytes(raw.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise VeloxLoadError(path, f"{key} is not JSON", COMFY_QUANT_EXPECTED) from None
        if config.get("convrot"):
            raise VeloxLoadError(path, f"layer {key[: -len(COMFY_QUANT_SUFFIX)]} uses ConvRot "
                                 f"({config.get('format')}), which Velox cannot load", COMFY_QUANT_EXPECTED)
        formats[key[: -len(COMFY_QUANT_SUFFIX)]] = config.get("format")
    return formats


def _packed_layer(weight: torch.Tensor, fmt: str, scale: torch.Tensor | None, layer: str, path):
    storage = COMFY_QUANT_STORAGE.get(fmt)
    if storage is None:
        raise VeloxLoadError(path, f"layer {layer} is quantized as {fmt!r}, which Velox cannot load",
                             COMFY_QUANT_EXPECTED)
    if weight.dtype != storage:
        raise VeloxLoadError(path, f"layer {layer} claims {fmt} but its weight is {weight.dtype}",
                             COMFY_QUANT_EXPECTED)
    channels = weight.shape[0]
    scale = per_channel_scale(torch.ones(()) if scale is None else scale, channels)
    packed = PackedWeight(weight, tuple(weight.shape), scale=scale)
    # only Linear layers hold packed weights; a scaled conv (rare) is dequantized once, here
    return packed if weight.ndim == 2 else packed.dequantize(torch.float32)


# ----------------------------------------------------------------------------------------------
# shape-only views for detection
# ----------------------------------------------------------------------------------------------


def detection_view(weights: Weights, dtype: torch.dtype = torch.bfloat16):
    """(state dict for detection, lookup): packed records replaced by meta tensors of their logical
    shape. ``restore_packed(result_of_key_map, lookup)`` swaps them back."""
    view: dict[str, torch.Tensor] = {}
    lookup: dict[int, tuple[torch.Tensor, PackedWeight]] = {}
    for key, value in weights.items():
        if isinstance(value, PackedWeight):
            proxy = torch.empty(value.shape, dtype=dtype, device="meta")
            lookup[id(proxy)] = (proxy, value)
            view[key] = proxy
        else:
            view[key] = value
    return view, lookup


def restore_packed(state_dict: Mapping[str, torch.Tensor], lookup, path=None) -> Weights:
    restored: Weights = {}
    for key, value in state_dict.items():
        if value.device.type == "meta":
            if id(value) not in lookup:
                raise VeloxLoadError(path, f"{key} is quantized but this layout needs it computed on (fused or "
                                     "reshaped) before loading", "a quantized file under the official names")
            restored[key] = lookup[id(value)][1]
        else:
            restored[key] = value
    return restored


def squeeze_packed_1x1(weights: Weights) -> Weights:
    """Packed (O, I, 1, 1) convs as (O, I) (same element order), so 1x1 convs load as Linears."""
    out: Weights = {}
    for key, value in weights.items():
        if isinstance(value, PackedWeight) and len(value.shape) == 4 and value.shape[2:] == (1, 1):
            value = PackedWeight(value.data, value.shape[:2], value.qtype, value.scale)
        out[key] = value
    return out


def densify_non_matrices(weights: Weights) -> Weights:
    """Packed tensors that no Linear will take (not 2-D) dequantized once, to fp32."""
    return {k: v.dequantize(torch.float32) if isinstance(v, PackedWeight) and len(v.shape) != 2 else v
            for k, v in weights.items()}
