"""SANA-Video inside ComfyUI: the BaseModel subclass, its model config, and the loader that builds it.

SANA-Video predicts flow velocity and takes sigma*1000 as its timestep, which is ComfyUI's
``ModelType.FLOW`` with ``ModelSamplingDiscreteFlow(shift=8, multiplier=1000)``. Three things differ
from image Sana (``host/sana_model.py``):

- the latent is a 5-D Wan 2.1 VAE latent; core's ``Wan21`` latent format normalises it exactly as
  diffusers' pipelines do (``(z - latents_mean) / latents_std``, the VAE config's numbers);
- image-to-video keeps latent frame 0 clean through the sampler's ``noise_mask``; the model then runs
  that frame at t = 0 and the others at t (core's WAN22 ``process_timestep``; diffusers'
  ``t * (1 - mask)``);
- the official model truncates its timestep (``timestep.long()``), and diffusers' release scheduler
  (DPMSolverMultistep) hands it integers, so timesteps are floored by default. ``timestep_rounding=
  "exact"`` keeps fractional sigma*1000 (diffusers' FlowMatchEuler pipelines).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_patcher
import comfy.supported_models_base
import torch

from ..loaders.families import SANA_VIDEO
from ..loaders.gguf_detect import diffusers_config_from_metadata
from ..loaders.sana_video_keys import sniff_sana_video
from ..models.sana_video import SanaVideoConfig, SanaVideoTransformer
from .model_build import build_patcher
from .quant_loading import (
    densify_non_matrices,
    detection_view,
    has_quantized_layers,
    read_checkpoint,
    restore_packed,
    squeeze_packed_1x1,
)
from .sana_model import SanaFamilyModel

# the VAE a variant was trained on -> ComfyUI latent format (core's LTXV format passes latents through: its
# LTX VAE applies the per-channel statistics itself, as VeloxLTX2VAELoader's VAE does)
LATENT_FORMATS = {"wan2.1": comfy.latent_formats.Wan21, "ltx2": comfy.latent_formats.LTXV}
TIMESTEP_ROUNDINGS = ("floor", "exact")


class SanaVideoModelConfig(comfy.supported_models_base.BASE):
    """ComfyUI's view of a SANA-Video checkpoint; ``unet_config`` holds the detected architecture."""

    unet_extra_config = {}
    sampling_settings = {"shift": 8.0, "multiplier": 1000}
    latent_format = comfy.latent_formats.Wan21
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]
    memory_usage_factor = 1.6  # image Sana's value per latent pixel; not measured for video
    timestep_rounding = "floor"

    def get_model(self, state_dict, prefix="", device=None):
        return SanaVideoModel(self, device=device)


class SanaVideoModel(SanaFamilyModel):
    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLOW, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=SanaVideoTransformer)
        self.timestep_rounding = model_config.timestep_rounding

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        denoise_mask = kwargs.get("denoise_mask", None)
        if denoise_mask is not None:
            out["denoise_mask"] = comfy.conds.CONDRegular(denoise_mask)
        return out

    def process_timestep(self, timestep, x, denoise_mask=None, **kwargs):
        """(B,) sigma*1000 -> (B,) or, with a 5-D noise mask, (B, latent frames): a frame the mask keeps
        clean (image-to-video's frame 0) runs at t = 0. Floored unless ``timestep_rounding`` is exact."""
        if self.timestep_rounding == "floor":
            timestep = torch.floor(timestep)
        if denoise_mask is None or denoise_mask.ndim != 5:
            return timestep
        per_frame = denoise_mask.mean(dim=(1, 3, 4))  # (B, frames): 0 for a kept frame, 1 for a noised one
        return per_frame * timestep.view(-1, 1)

    def scale_latent_inpaint(self, sigma, noise, latent_image, **kwargs):
        return latent_image  # the kept frame enters the model clean, at t = 0 (not re-noised)


# ----------------------------------------------------------------------------------------------
# files -> MODEL
# ----------------------------------------------------------------------------------------------


def load_sana_video_model(path: str | Path, dtype: torch.dtype | None = None, timestep_rounding: str = "floor",
                          quantization: str = "none", quant_compute: str = "dequant") -> comfy.model_patcher.ModelPatcher:
    """A SANA-Video transformer from a file (official .pth / safetensors, diffusers single file, ComfyUI
    prefixed, GGUF, scaled-fp8 / comfy_quant), a diffusers folder (whole pipeline or ``transformer/``,
    sharded too) or an HF cache snapshot folder, as a ComfyUI MODEL.

    quantization (none / fp8_e4m3 / int8 / nvfp4) and quant_compute (dequant / lowp): ``host/quant_ops.py``.
    """
    checkpoint = read_checkpoint(path, "transformer")
    config = checkpoint.diffusers_config
    if config is None and checkpoint.gguf_metadata is not None:  # our converter records a folder's config.json
        config = diffusers_config_from_metadata(checkpoint.gguf_metadata)
    return build_sana_video_model(checkpoint.weights, path=str(path), dtype=dtype, diffusers_config=config,
                                  timestep_rounding=timestep_rounding, quantization=quantization,
                                  quant_compute=quant_compute)


def build_sana_video_model(
    raw_state_dict: Mapping[str, torch.Tensor],
    path: str | None = None,
    dtype: torch.dtype | None = None,
    shift: float | None = None,
    diffusers_config: Mapping | None = None,
    timestep_rounding: str = "floor",
    quantization: str = "none",
    quant_compute: str = "dequant",
) -> comfy.model_patcher.ModelPatcher:
    """Detect, build and load a SANA-Video transformer from any layout; return a MODEL.

    dtype None lets ComfyUI choose for the device; shift None takes the variant's (8). Weights that
    hold ``PackedWeight`` records (GGUF, scaled fp8, comfy_quant) or a ``quantization`` other than
    "none" build on the registry's quantized operations (``host/model_build.build_patcher``).
    """
    if timestep_rounding not in TIMESTEP_ROUNDINGS:
        raise ValueError(f"timestep_rounding {timestep_rounding!r}: expected one of {TIMESTEP_ROUNDINGS}")
    quantized = quantization != "none" or has_quantized_layers(raw_state_dict)
    weights = densify_non_matrices(squeeze_packed_1x1(dict(raw_state_dict)))
    view, lookup = detection_view(weights)  # packed records -> meta tensors of their logical shapes
    config, canonical = sniff_sana_video(view, path, diffusers_config)
    state_dict = restore_packed(canonical, lookup, path)
    model_config = _model_config(config, shift, timestep_rounding)
    return build_patcher(SANA_VIDEO, model_config, canonical, state_dict, path, f"the detected {config.describe()}",
                         dtype, quantization, quant_compute, label=config.describe(), quantized=quantized)


def _model_config(config: SanaVideoConfig, shift: float | None, timestep_rounding: str) -> SanaVideoModelConfig:
    model_config = SanaVideoModelConfig(config.model_kwargs())
    model_config.sampling_settings = {"shift": config.flow_shift if shift is None else shift, "multiplier": 1000}
    model_config.latent_format = LATENT_FORMATS.get(config.vae, comfy.latent_formats.Wan21)()
    model_config.timestep_rounding = timestep_rounding
    return model_config
