"""Wan inside ComfyUI: core's own supported-model config for canonical Wan weights, and the build.

Core has the backbone (``comfy.ldm.wan.model.WanModel`` / ``VaceWanModel``); what it lacks is the
layouts and the facts its detection fixes. A load is one pass: detect the variant and canonicalize
(``loaders.wan_detect.sniff_wan``, on logical shapes) -> core's config (``wan_model_config``) ->
``host/model_build.build_patcher``, on core's operations for float weights, on the registry's
quantized ones for GGUF / scaled-fp8 / comfy_quant files or a ``quantization`` chosen at load. A float
file's tensors that core's model has no place for pass with a warning, as core's own loader lets them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import comfy.model_detection
import comfy.model_patcher
import torch

from ..errors import VeloxLoadError
from ..loaders.families import WAN
from ..loaders.wan_detect import WanVariant, sniff_wan, wan_core_config
from .model_build import build_patcher
from .quant_loading import Weights, densify_non_matrices, detection_view, has_quantized_layers, restore_packed

EXPECTED = "a complete Wan transformer checkpoint"


def build_wan_from_weights(weights: Weights, path: str | Path | None = None, dtype: torch.dtype | None = None,
                           quantization: str = "none", compute: str = "dequant",
                           diffusers_config: dict | None = None, model_options: dict | None = None,
                           quantized: bool | None = None) -> comfy.model_patcher.ModelPatcher:
    """Wan weights of any layout (``PackedWeight`` records included) as a MODEL, in one pass.

    quantized: build on quantized operations (default: when ``quantization`` is not "none" or the
    weights hold packed records); model_options (core's ``dtype``, ``custom_operations``,
    ``fp8_optimizations``) apply to float builds. ``diffusers_config`` (its config.json) gives the
    head count, which the weights do not show.
    """
    if quantized is None:
        quantized = quantization != "none" or has_quantized_layers(weights)
    weights = densify_non_matrices(weights)
    view, lookup = detection_view(weights)  # packed records -> meta tensors of their logical shapes
    variant, canonical = sniff_wan(view, path)
    state_dict = restore_packed(canonical, lookup, path)
    model_config = wan_model_config(canonical, diffusers_config, path, variant)
    if not quantized:
        dtype = _apply_model_options(model_config, model_options, dtype)
    return build_patcher(WAN, model_config, canonical, state_dict, path, variant.describe(), dtype,
                         quantization, compute, quantized=quantized, expected=EXPECTED,
                         refuse_unexpected=quantized)


def build_wan_model(
    state_dict: dict[str, torch.Tensor], variant: WanVariant, path: str | Path | None = None,
    dtype: torch.dtype | None = None, model_options: dict | None = None, diffusers_config: dict | None = None,
) -> comfy.model_patcher.ModelPatcher:
    """Canonical (official-name) float Wan weights, already detected as ``variant``, as core's model,
    every parameter checked to be filled (``build_patcher``)."""
    model_config = wan_model_config(state_dict, diffusers_config, path, variant)
    dtype = _apply_model_options(model_config, model_options, dtype)
    return build_patcher(WAN, model_config, state_dict, state_dict, path, variant.describe(), dtype,
                         quantized=False, expected=EXPECTED, refuse_unexpected=False)


def wan_model_config(canonical: Mapping[str, torch.Tensor], diffusers_config: Mapping | None, path,
                     variant: WanVariant):
    """Core's supported-model config (WAN21_T2V / WAN21_I2V / WAN21_Vace / ...) detected from canonical
    weights, with what core's detection fixes (``text_dim`` 4096, ``freq_dim`` 256, heads dim // 128)
    set as the weights, or their config.json, have it (``wan_core_config``): still core's WanModel."""
    model_config = comfy.model_detection.model_config_from_unet(dict(canonical), "")
    if model_config is None:
        raise VeloxLoadError(path, f"ComfyUI could not build {variant.describe()}", "a Wan transformer core knows")
    model_config.unet_config.update(wan_core_config(canonical, diffusers_config, path))
    return model_config


def _apply_model_options(model_config, model_options: dict | None, dtype: torch.dtype | None):
    """Core's ``model_options`` on a float build: operations and fp8 optimizations set on the config;
    the dtype to build in (``dtype`` wins over the options')."""
    options = model_options or {}
    model_config.custom_operations = options.get("custom_operations", model_config.custom_operations)
    if options.get("fp8_optimizations", False):
        model_config.optimizations["fp8"] = True
    return dtype if dtype is not None else options.get("dtype")
