"""Files -> state dicts whose quantized weights are ``PackedWeight`` records, ready for ``quant_ops``.

Three on-disk forms of quantized weights are read here, into one representation:

- GGUF (``*.gguf``, ``loaders/gguf_reader.py``, memory-mapped): quantized tensors stay packed
  (zero-copy views of the map), F32 / F16 / BF16 tensors become ordinary (zero-copy) tensors;
- ComfyUI "scaled fp8": a ``scaled_fp8`` marker and ``<layer>.scale_weight`` (+ ``scale_input``);
- ComfyUI's per-layer ``comfy_quant`` format: ``<layer>.comfy_quant`` (uint8 JSON bytes such as
  ``{"format": "float8_e4m3fn"}``) or the safetensors metadata ``_quantization_metadata``
  (``{"layers": {name: {"format": ...}}}``), with ``<layer>.weight_scale`` (+ ``input_scale``).
  Formats read: ``float8_e4m3fn`` and ``int8_tensorwise`` (per-tensor or per-row scale), and
  ``nvfp4`` (uint8 e2m1 codes, ``weight_scale`` e4m3 block scales in cuBLAS's swizzled layout,
  ``weight_scale_2`` fp32 global scale; ``kernels/nvfp4_torch.py``); others (mxfp8, ConvRot, ...) are
  refused by name. Layers without a format stay as written, so mixed files load as written.

Family code detects the variant from shapes alone, so ``detection_view`` gives it meta tensors of
the logical shapes and ``restore_packed`` puts the packed records back under the names the
family's key map chose (renames only; a key map that would compute on a packed tensor is refused).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as Q

from ..errors import VeloxLoadError
from ..kernels import nvfp4_torch
from ..kernels.fp8_linear import FP8_DTYPE
from ..loaders.checkpoint_files import read_component, read_safetensors_metadata, sibling_config
from ..loaders.families import families_of_kind
from .quant_tensor import PackedWeight, per_channel_scale

GGUF_SUFFIX = ".gguf"
QUANTIZATIONS = ("none", "fp8_e4m3", "int8", "nvfp4")
QUANT_COMPUTES = ("dequant", "lowp")
# Layers that stay in high precision whatever the selector says (regular expressions over layer
# names): embeddings, modulation, norms, heads, time/text embedders, the depthwise conv. The
# registry's keep-in-float patterns, one table with the converter's.
NEVER_QUANTIZE: dict[str, tuple[str, ...]] = {f.name: f.keep_float for f in families_of_kind("diffusion")}
COMFY_QUANT_SUFFIX = ".comfy_quant"
QUANT_METADATA_KEY = "_quantization_metadata"
SCALED_FP8_MARKER = "scaled_fp8"
# file suffix -> the scale it holds (comfy_quant names; ``scale_weight`` is legacy scaled fp8)
SCALE_SUFFIXES = {".weight_scale": "weight_scale", ".scale_weight": "weight_scale",
                  ".weight_scale_2": "weight_scale_2"}
INPUT_SCALE_SUFFIXES = (".input_scale", ".scale_input")  # static activation scales: W8A8 here is dynamic
COMFY_QUANT_STORAGE = {"float8_e4m3fn": FP8_DTYPE, "int8_tensorwise": torch.int8}
COMFY_QUANT_EXPECTED = "comfy_quant layers in float8_e4m3fn, int8_tensorwise (without ConvRot) or nvfp4"
NVFP4_EXPECTED = ("an nvfp4 layer: uint8 weight (N16, K16/2), weight_scale e4m3 (roundup(N16, 128), "
                  "roundup(K16/16, 4)), weight_scale_2 with one fp32 element")

Weights = dict[str, "torch.Tensor | PackedWeight"]


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == GGUF_SUFFIX and Path(path).is_file()


@dataclasses.dataclass
class Checkpoint:
    """The read step of a load: the weights (``PackedWeight`` for quantized ones), the diffusers
    config.json that describes them (a folder's, or the one next to a file), and a GGUF's metadata."""

    weights: Weights
    diffusers_config: dict | None = None
    gguf_metadata: dict | None = None


def read_checkpoint(path: str | Path, component: str = "transformer") -> Checkpoint:
    """A checkpoint (GGUF, safetensors, safe pickle, diffusers folder), read once.

    The config is the folder's config.json, or the one next to a file (``sibling_config``).
    Quantized weights of every on-disk form come back as ``PackedWeight``.
    """
    path = Path(path)
    if is_gguf(path):
        from ..loaders.gguf_reader import read_gguf

        contents = read_gguf(path)
        return Checkpoint(gguf_weights(contents), sibling_config(path), dict(contents.metadata))
    state_dict, config = read_component(path, component)
    return Checkpoint(fold_quantized_layers(state_dict, _safetensors_metadata(path), path), config)


def read_weights(path: str | Path, component: str = "transformer") -> tuple[Weights, dict | None]:
    """(weights, diffusers config) of ``read_checkpoint``."""
    checkpoint = read_checkpoint(path, component)
    return checkpoint.weights, checkpoint.diffusers_config


def read_gguf_weights(path: str | Path) -> Weights:
    """A GGUF file's tensors: float types as zero-copy tensors, block types as ``PackedWeight``."""
    from ..loaders.gguf_reader import read_gguf

    return gguf_weights(read_gguf(path))


def gguf_weights(contents) -> Weights:
    """A parsed GGUF's (``read_gguf``) tensors: float types as zero-copy tensors, block types as
    ``PackedWeight``."""
    from ..loaders.gguf_reader import record_as_torch

    float_views = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    weights: Weights = {}
    for name, record in contents.tensors.items():
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
        scales = {name: weights.pop(layer + suffix) for suffix, name in SCALE_SUFFIXES.items() if layer + suffix in weights}
        for suffix in INPUT_SCALE_SUFFIXES:
            weights.pop(layer + suffix, None)
        fmt = formats.get(layer) or ("nvfp4" if "weight_scale_2" in scales else None)  # only nvfp4 has a second scale
        if fmt is None and not scales:
            continue
        weight = weights[key]
        if fmt is None and weight.dtype not in COMFY_QUANT_STORAGE.values():  # a legacy scale on a float weight
            scale = scales["weight_scale"].float().reshape(-1, *[1] * (weight.ndim - 1))
            weights[key] = (weight.float() * scale).to(weight.dtype)
            continue
        fmt = fmt or "float8_e4m3fn"
        reader = COMFY_QUANT_READERS.get(fmt)
        if reader is None:
            raise VeloxLoadError(path, f"layer {layer} is quantized as {fmt!r}, which Velox cannot load",
                                 COMFY_QUANT_EXPECTED)
        weights[key] = reader(weight, fmt, scales, layer, path)
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


def _scaled_layer(weight: torch.Tensor, fmt: str, scales: Mapping[str, torch.Tensor], layer: str, path):
    """fp8 / int8 codes and an optional per-tensor or per-row ``weight_scale``."""
    storage, scale = COMFY_QUANT_STORAGE[fmt], scales.get("weight_scale")
    if weight.dtype != storage:
        raise VeloxLoadError(path, f"layer {layer} claims {fmt} but its weight is {weight.dtype}",
                             COMFY_QUANT_EXPECTED)
    channels = weight.shape[0]
    scale = per_channel_scale(torch.ones(()) if scale is None else scale, channels)
    packed = PackedWeight(weight, tuple(weight.shape), scale=scale)
    # only Linear layers hold packed weights; a scaled conv (rare) is dequantized once, here
    return packed if weight.ndim == 2 else packed.dequantize(torch.float32)


def _nvfp4_layer(weight: torch.Tensor, fmt: str, scales: Mapping[str, torch.Tensor], layer: str, path):
    """Core's NVFP4 layer -> ``PackedWeight`` of logical shape (N16, K16) (the file keeps no other);
    the scales are checked against the codes, so a mismatched file fails here, not in a kernel."""
    def refuse(problem: str):
        return VeloxLoadError(path, f"nvfp4 layer {layer}: {problem}", NVFP4_EXPECTED)

    if weight.dtype not in (torch.uint8, nvfp4_torch.STORAGE) or weight.ndim != 2:
        raise refuse(f"weight is {weight.dtype} {tuple(weight.shape)}")
    for name in ("weight_scale", "weight_scale_2"):
        if name not in scales:
            raise refuse(f"{name} is missing")
    shape = (weight.shape[0], weight.shape[1] * 2)
    block_scales, global_scale = scales["weight_scale"], scales["weight_scale_2"]
    if shape != nvfp4_torch.padded_shape(shape) or tuple(block_scales.shape) != nvfp4_torch.block_scale_shape(shape):
        raise refuse(f"weight_scale {tuple(block_scales.shape)} does not fit weight {tuple(weight.shape)} "
                     f"(expected {nvfp4_torch.block_scale_shape(shape)})")
    if block_scales.dtype not in (nvfp4_torch.E4M3, torch.uint8) or global_scale.numel() != 1:
        raise refuse(f"weight_scale is {block_scales.dtype}, weight_scale_2 has {global_scale.numel()} elements")
    return PackedWeight(weight.view(nvfp4_torch.STORAGE), shape, scale=block_scales.view(nvfp4_torch.E4M3),
                        scale_2=global_scale.float().reshape(()))


# comfy_quant format -> its reader (weight, format, scales, layer, path) -> PackedWeight (or a dense tensor)
COMFY_QUANT_READERS = {"float8_e4m3fn": _scaled_layer, "int8_tensorwise": _scaled_layer, "nvfp4": _nvfp4_layer}


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
            value = dataclasses.replace(value, shape=value.shape[:2])
        out[key] = value
    return out


def densify_non_matrices(weights: Weights) -> Weights:
    """Packed tensors that no Linear will take (not 2-D) dequantized once, to fp32."""
    return {k: v.dequantize(torch.float32) if isinstance(v, PackedWeight) and len(v.shape) != 2 else v
            for k, v in weights.items()}
