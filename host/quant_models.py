"""Sana and Wan MODELs built on ``quant_ops``: GGUF / scaled-fp8 / comfy_quant files, or float files
quantized at load (``quantization`` fp8_e4m3 / int8), computed by ``dequant`` or ``lowp``.

The builds follow the plain ones (``host/sana_model.build_sana_model``, ``host/wan_loading``'s
config route) with two differences: the model gets our ``operations``, and detection runs on
``quant_loading.detection_view`` (logical shapes) while the packed records load into the layers.
"""

from __future__ import annotations

from pathlib import Path

import comfy.model_detection
import comfy.model_patcher
import torch

from ..errors import VeloxLoadError
from ..loaders.families import SANA, WAN
from ..loaders.sana_detect import sniff_sana
from ..loaders.wan_detect import sniff_wan, wan_core_config
from .model_build import build_patcher
from .quant_loading import (
    Weights,
    densify_non_matrices,
    detection_view,
    restore_packed,
    squeeze_packed_1x1,
)

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
    model_config = SanaModelConfig(config.model_kwargs())
    model_config.sampling_settings = dict(model_config.sampling_settings, shift=config.flow_shift)
    return build_patcher(SANA, model_config, canonical, state_dict, path, f"Sana {config.describe()}", dtype,
                         quantization, compute)


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
    return build_patcher(WAN, model_config, canonical, state_dict, path, variant.describe(), dtype,
                         quantization, compute)
