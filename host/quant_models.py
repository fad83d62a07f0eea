"""Sana and Wan MODELs built on ``quant_ops``: GGUF / scaled-fp8 / comfy_quant files, or float files
quantized at load (``quantization`` fp8_e4m3 / int8), computed by ``dequant`` or ``lowp``.

The builds follow the plain ones (``host/sana_model.build_sana_model``, ``host/wan_loading``'s
config route) with two differences: the model gets our ``operations``, and detection runs on
``quant_loading.detection_view`` (logical shapes) while the packed records load into the layers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.utils
import torch

from ..errors import VeloxLoadError
from ..loaders.sana_detect import sniff_sana
from ..loaders.state_dict_fit import load_into
from ..loaders.wan_detect import sniff_wan, wan_core_config
from .quant_loading import (
    NEVER_QUANTIZE,
    Weights,
    densify_non_matrices,
    detection_view,
    restore_packed,
    squeeze_packed_1x1,
)
from .quant_ops import QuantLinear, make_quant_operations
from .quant_tensor import PackedWeight
from .shared_activation import SHARED_INPUT


def _devices() -> tuple[torch.device, torch.device]:
    return comfy.model_management.get_torch_device(), comfy.model_management.unet_offload_device()


def _inference_dtypes(model_config, shapes: Mapping[str, torch.Tensor], dtype: torch.dtype | None, load_device):
    """ComfyUI's weight / compute dtype choice, made from the logical shapes (packed = bf16)."""
    supported = list(model_config.supported_inference_dtypes)
    if dtype is None:
        dtype = comfy.model_management.unet_dtype(
            model_params=comfy.utils.calculate_parameters(shapes), supported_dtypes=supported,
            weight_dtype=comfy.utils.weight_dtype(shapes))
    model_config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(dtype, load_device, supported))
    return dtype


def _load_checked(module: torch.nn.Module, state_dict: Weights, path, what: str) -> None:
    """Load every tensor; refuse a model left with a missing or unfilled parameter.

    A packed tensor meant for anything but a Linear's weight (a quantized embedding table, say) is
    dequantized once here: only ``QuantLinear`` computes from packed storage."""
    linears = {name for name, m in module.named_modules() if isinstance(m, QuantLinear)}
    state_dict = {k: v.dequantize(torch.float32) if isinstance(v, PackedWeight)
                  and not (k.endswith(".weight") and k[: -len(".weight")] in linears) else v
                  for k, v in state_dict.items()}
    missing, unexpected = load_into(module, state_dict, path, what)
    unfilled = [name for name, p in module.named_parameters() if p.is_meta]
    if missing or unexpected or unfilled:
        raise VeloxLoadError(path, f"weights do not fit {what} (missing {(missing or unfilled)[:4]}, "
                             f"unexpected {unexpected[:4]})", f"a complete {what} checkpoint")


def _describe(quantization: str, compute: str, weights: Weights) -> str:
    kinds = sorted({v.kind for v in weights.values() if isinstance(v, PackedWeight)})
    return f"stored {'/'.join(kinds) or 'float'}, load-time quantization {quantization}, compute {compute}"


# ----------------------------------------------------------------------------------------------
# Sana
# ----------------------------------------------------------------------------------------------


def build_quantized_sana(weights: Weights, path: str | Path | None = None, dtype: torch.dtype | None = None,
                         diffusers_config: dict | None = None, quantization: str = "none",
                         compute: str = "dequant") -> comfy.model_patcher.ModelPatcher:
    """Sana from weights that may hold ``PackedWeight`` records, as a ComfyUI MODEL."""
    from .sana_model import SanaModelConfig

    weights = densify_non_matrices(squeeze_packed_1x1(weights))
    view, lookup = detection_view(weights)
    config, canonical = sniff_sana(view, path=str(path) if path else None, diffusers_config=diffusers_config,
                                   config=_gguf_sana_config(path))
    state_dict = restore_packed(canonical, lookup, path)
    load_device, offload_device = _devices()
    model_config = SanaModelConfig(config.model_kwargs())
    model_config.sampling_settings = dict(model_config.sampling_settings, shift=config.flow_shift)
    dtype = _inference_dtypes(model_config, canonical, dtype, load_device)
    model_config.custom_operations = make_quant_operations(quantization, compute, NEVER_QUANTIZE["sana"])
    model = model_config.get_model(state_dict, device=offload_device)
    _load_checked(model.diffusion_model, state_dict, path, f"Sana {config.describe()}")
    logging.info("Velox: Sana %s loaded from %s (%s; %s)", config.describe(), path, dtype,
                 _describe(quantization, compute, state_dict))
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def _gguf_sana_config(path: str | Path | None):
    """The SanaConfig our converter records in a GGUF: shapes cannot show a 2K / 4K position embedding."""
    from ..loaders.gguf_detect import sana_config_from_metadata
    from ..loaders.gguf_reader import read_gguf
    from .quant_loading import is_gguf

    if path is None or not is_gguf(Path(path)):
        return None
    return sana_config_from_metadata(read_gguf(path).metadata)


# ----------------------------------------------------------------------------------------------
# Wan
# ----------------------------------------------------------------------------------------------


def build_quantized_wan(weights: Weights, path: str | Path | None = None, dtype: torch.dtype | None = None,
                        quantization: str = "none", compute: str = "dequant",
                        diffusers_config: dict | None = None) -> comfy.model_patcher.ModelPatcher:
    """Wan (core's WanModel / VaceWanModel) from weights that may hold ``PackedWeight`` records;
    ``diffusers_config`` (its config.json) gives the head count, which the weights do not show."""
    weights = densify_non_matrices(weights)
    view, lookup = detection_view(weights)
    variant, canonical = sniff_wan(view, path)
    state_dict = restore_packed(canonical, lookup, path)
    model_config = comfy.model_detection.model_config_from_unet(dict(canonical), "")
    if model_config is None:
        raise VeloxLoadError(path, f"ComfyUI could not build {variant.describe()}", "a Wan transformer core knows")
    model_config.unet_config.update(wan_core_config(canonical, diffusers_config, path))
    load_device, offload_device = _devices()
    dtype = _inference_dtypes(model_config, canonical, dtype, load_device)
    model_config.custom_operations = make_quant_operations(quantization, compute, NEVER_QUANTIZE["wan"],
                                                           shared_input=SHARED_INPUT["wan"])
    model = model_config.get_model(dict(canonical), "", device=offload_device)
    _load_checked(model.diffusion_model, state_dict, path, variant.describe())
    logging.info("Velox: %s loaded from %s (%s; %s)", variant.describe(), path, dtype,
                 _describe(quantization, compute, state_dict))
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
