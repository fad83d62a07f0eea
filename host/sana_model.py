"""Sana inside ComfyUI: the BaseModel subclass, its model config and latent format.

Sana predicts flow velocity (v = noise - x0) and takes sigma*1000 as its timestep, which is
ComfyUI's ``ModelType.FLOW`` with ``ModelSamplingDiscreteFlow(shift, multiplier=1000)``. The
text mask arrives in the conditioning dict as ``attention_mask`` (our CLIP puts it there)
and reaches the transformer as ``context_mask``.
"""

from __future__ import annotations

import logging

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import comfy.utils
import torch

from ..errors import VeloxLoadError
from ..loaders.sana_detect import sniff_sana
from ..loaders.state_dict_fit import load_into
from ..models.sana import SanaConfig, SanaTransformer

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


class SanaModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLOW, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=SanaTransformer)

    def get_dtype(self):
        # core models keep a .dtype attribute; ours is pure PyTorch, so ask its weights
        return next(self.diffusion_model.parameters()).dtype

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        mask = kwargs.get("attention_mask", None)
        if mask is not None:
            out["context_mask"] = comfy.conds.CONDRegular(mask)
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
) -> comfy.model_patcher.ModelPatcher:
    """Detect, build and load a Sana transformer from any supported layout; return a MODEL."""
    config, state_dict = sniff_sana(raw_state_dict, path=path, diffusers_config=diffusers_config)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    model_config = SanaModelConfig(_unet_config(config))
    model_config.sampling_settings["shift"] = config.flow_shift if shift is None else shift
    parameters = comfy.utils.calculate_parameters(state_dict)
    if dtype is None:
        dtype = comfy.model_management.unet_dtype(
            model_params=parameters,
            supported_dtypes=model_config.supported_inference_dtypes,
            weight_dtype=comfy.utils.weight_dtype(state_dict),
        )
    manual_cast = comfy.model_management.unet_manual_cast(
        dtype, load_device, model_config.supported_inference_dtypes
    )
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model(state_dict, device=offload_device)
    _load_strict(model.diffusion_model, state_dict, path)
    logging.info("Velox: Sana %s loaded from %s (%s)", config.describe(), path or "state dict", dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def _unet_config(config: SanaConfig) -> dict:
    return config.model_kwargs()


def _load_strict(module: torch.nn.Module, state_dict: dict, path: str | None) -> None:
    """Every parameter must come from the file: a partial Sana would sample garbage silently."""
    missing, unexpected = load_into(module, state_dict, path, "the detected Sana config")
    if missing or unexpected:
        raise VeloxLoadError(path, f"weights do not fit the detected Sana config (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]})", "a complete Sana transformer checkpoint")
