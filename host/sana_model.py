"""Sana inside ComfyUI: the BaseModel subclass, its model config and latent format.

Sana predicts flow velocity (v = noise - x0) and takes sigma*1000 as its timestep, which is
ComfyUI's ``ModelType.FLOW`` with ``ModelSamplingDiscreteFlow(shift, multiplier=1000)``. The
text mask arrives in the conditioning dict as ``attention_mask`` (our CLIP puts it there)
and reaches the transformer as ``context_mask``.
"""

from __future__ import annotations

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_patcher
import comfy.supported_models_base
import torch

from ..loaders.checkpoint_files import diffusion_model_weights
from ..loaders.families import SANA
from ..loaders.gguf_detect import sana_config_from_metadata
from ..loaders.sana_detect import SANA_EXPECTED, sana_config
from ..loaders.sana_keys import canonicalize_sana_state_dict
from ..models.sana import SanaTransformer
from .model_build import build_patcher
from .quant_loading import (
    densify_non_matrices,
    detection_view,
    has_quantized_layers,
    restore_packed,
    squeeze_packed_1x1,
)

SANA_SCALE_FACTOR = 0.41407  # DC-AE f32c32 latent scale (Sana 1.0 / 1.1 configs)


class SanaLatentFormat(comfy.latent_formats.LatentFormat):
    """DC-AE f32c32 latents: 32 channels at 1/32 of the image size."""

    latent_channels = 32
    latent_dimensions = 2
    scale_factor = SANA_SCALE_FACTOR


class SanaModelConfig(comfy.supported_models_base.BASE):
    """ComfyUI's view of a Sana checkpoint; ``unet_config`` holds the detected SanaConfig."""

    unet_extra_config = {}
    sampling_settings = {"shift": 3.0, "multiplier": 1000}
    latent_format = SanaLatentFormat
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    memory_usage_factor = 1.6  # activations per latent pixel relative to SD1.5; measured loosely

    def get_model(self, state_dict, prefix="", device=None):
        return SanaModel(self, device=device)


class SanaFamilyModel(comfy.model_base.BaseModel):
    """What the BaseModels of Sana and SANA-Video share: a pure-PyTorch transformer, and Gemma's
    attention mask passed on as its ``context_mask``."""

    def get_dtype(self):
        # core models keep a .dtype attribute; ours is pure PyTorch, so ask its weights
        return next(self.diffusion_model.parameters()).dtype

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        mask = kwargs.get("attention_mask", None)
        if mask is not None:
            out["context_mask"] = comfy.conds.CONDRegular(mask)
        return out


class SanaModel(SanaFamilyModel):
    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLOW, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=SanaTransformer)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        guidance = kwargs.get("guidance", None)
        if guidance is not None:
            out["guidance"] = comfy.conds.CONDRegular(torch.FloatTensor([guidance]))
        return out


def build_sana_model(
    raw_state_dict: dict,
    path: str | None = None,
    dtype: torch.dtype | None = None,
    shift: float | None = None,
    diffusers_config: dict | None = None,
    quantization: str = "none",
    compute: str = "dequant",
    gguf_metadata: dict | None = None,
) -> comfy.model_patcher.ModelPatcher:
    """A Sana transformer of any layout as a MODEL, in one pass: detect the family -> canonicalize ->
    config -> build -> quantize, each once.

    raw_state_dict: what ``quant_loading.read_checkpoint`` read (it may hold ``PackedWeight`` records:
    GGUF, scaled fp8, comfy_quant); those, or a ``quantization`` other than "none" (computed by
    ``compute``), build on the registry's quantized operations. gguf_metadata: the GGUF's, whose
    recorded SanaConfig tells the 2K / 4K position embedding that shapes cannot show.
    """
    quantized = quantization != "none" or has_quantized_layers(raw_state_dict)
    weights = densify_non_matrices(squeeze_packed_1x1(dict(raw_state_dict)))
    view, lookup = detection_view(weights)  # packed records -> meta tensors of their logical shapes
    raw = diffusion_model_weights(view, path)
    SANA.check(raw, path, SANA_EXPECTED)
    canonical = canonicalize_sana_state_dict(raw, path)
    recorded = sana_config_from_metadata(gguf_metadata) if quantized and gguf_metadata else None
    config = sana_config(canonical, raw.get("pos_embed"), path, diffusers_config, recorded)
    state_dict = restore_packed(canonical, lookup, path)  # the packed records back under canonical names
    model_config = SanaModelConfig(config.model_kwargs())
    model_config.sampling_settings["shift"] = config.flow_shift if shift is None else shift
    return build_patcher(SANA, model_config, canonical, state_dict, path,
                         "the detected Sana config", dtype, quantization, compute, label=f"Sana {config.describe()}",
                         quantized=quantized, expected="a complete Sana transformer checkpoint")
