"""Wan MODELs built on ``quant_ops``: GGUF / scaled-fp8 / comfy_quant files, or float files
quantized at load (``quantization`` fp8_e4m3 / int8), computed by ``dequant`` or ``lowp``.

Every family builds float and quantized weights in one pass (``host/sana_model.build_sana_model``,
``host/sana_video_model.build_sana_video_model``, ``host/wan_model.build_wan_from_weights``,
``host/videocrafter_loading.build_videocrafter_unet``); this is the quantized entry to Wan's.
"""

from __future__ import annotations

from pathlib import Path

import comfy.model_patcher
import torch

from .quant_loading import Weights
from .wan_model import build_wan_from_weights


def build_quantized_wan(weights: Weights, path: str | Path | None = None, dtype: torch.dtype | None = None,
                        quantization: str = "none", compute: str = "dequant",
                        diffusers_config: dict | None = None) -> comfy.model_patcher.ModelPatcher:
    """Wan (core's WanModel / VaceWanModel) from weights that may hold ``PackedWeight`` records, on
    quantized operations whatever they hold: ``wan_model.build_wan_from_weights``'s one pass;
    ``diffusers_config`` (its config.json) gives the head count, which the weights do not show."""
    return build_wan_from_weights(weights, path, dtype, quantization, compute, diffusers_config, quantized=True)
