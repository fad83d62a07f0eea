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

import logging
from collections.abc import Mapping
from pathlib import Path

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import comfy.utils
import torch

from ..errors import VeloxLoadError
from ..loaders.checkpoint_files import read_component, unwrap_state_dict
from ..loaders.sana_detect import FOREIGN_FAMILIES, SANA_MARKERS
from ..loaders.sana_video_keys import (
    DIFFUSERS_CLASS,
    canonicalize_sana_video_state_dict,
    config_from_diffusers,
    detect_sana_video,
    strip_sana_video_prefix,
)
from ..loaders.state_dict_fit import load_into
from ..models.sana_video import SanaVideoConfig, SanaVideoTransformer

SANA_VIDEO_EXPECTED = (
    "a SANA-Video transformer: official keys such as x_embedder.proj.weight (5-D), blocks.0.attn.qkv.weight, "
    "blocks.0.mlp.t_conv.weight (SANA_Video_2B_480p.pth), or diffusers SanaVideoTransformer3DModel keys such "
    "as patch_embedding.weight, transformer_blocks.0.attn1.to_q.weight, transformer_blocks.0.ff.conv_temp.weight"
)
IMAGE_SANA = "an image Sana transformer (2-D patches, no temporal conv): load it with 'Load Sana Model'"
# the VAE a variant was trained on -> ComfyUI latent format (LTX-2's own normalisation is not in core 0.3.75)
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


class SanaVideoModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, model_type=comfy.model_base.ModelType.FLOW, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=SanaVideoTransformer)
        self.timestep_rounding = model_config.timestep_rounding

    def get_dtype(self):
        # core models keep a .dtype attribute; ours is pure PyTorch, so ask its weights
        return next(self.diffusion_model.parameters()).dtype

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        mask = kwargs.get("attention_mask", None)
        if mask is not None:
            out["context_mask"] = comfy.conds.CONDRegular(mask)
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


def load_sana_video_model(path: str | Path, dtype: torch.dtype | None = None,
                          timestep_rounding: str = "floor") -> comfy.model_patcher.ModelPatcher:
    """A SANA-Video transformer from a file (official .pth / safetensors, diffusers single file, ComfyUI
    prefixed), a diffusers folder (whole pipeline or ``transformer/``, sharded too) or an HF cache
    snapshot folder, as a ComfyUI MODEL."""
    state_dict, config = read_component(path, "transformer")
    return build_sana_video_model(state_dict, path=str(path), dtype=dtype, diffusers_config=config,
                                  timestep_rounding=timestep_rounding)


def build_sana_video_model(
    raw_state_dict: Mapping[str, torch.Tensor],
    path: str | None = None,
    dtype: torch.dtype | None = None,
    shift: float | None = None,
    diffusers_config: Mapping | None = None,
    timestep_rounding: str = "floor",
) -> comfy.model_patcher.ModelPatcher:
    """Detect, build and load a SANA-Video transformer from any layout; return a MODEL.

    dtype None lets ComfyUI choose for the device; shift None takes the variant's (8).
    """
    if timestep_rounding not in TIMESTEP_ROUNDINGS:
        raise ValueError(f"timestep_rounding {timestep_rounding!r}: expected one of {TIMESTEP_ROUNDINGS}")
    config, state_dict = sniff_sana_video(raw_state_dict, path, diffusers_config)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    model_config = SanaVideoModelConfig(config.model_kwargs())
    model_config.sampling_settings = {"shift": config.flow_shift if shift is None else shift, "multiplier": 1000}
    model_config.latent_format = LATENT_FORMATS.get(config.vae, comfy.latent_formats.Wan21)()
    model_config.timestep_rounding = timestep_rounding
    if dtype is None:
        dtype = comfy.model_management.unet_dtype(
            model_params=comfy.utils.calculate_parameters(state_dict),
            supported_dtypes=model_config.supported_inference_dtypes,
            weight_dtype=comfy.utils.weight_dtype(state_dict),
        )
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model(state_dict, device=offload_device)
    _load_strict(model.diffusion_model, state_dict, path, config)
    logging.info("Velox: %s loaded from %s (%s)", config.describe(), path or "state dict", dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def sniff_sana_video(raw_state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None,
                     diffusers_config: Mapping | None = None) -> tuple[SanaVideoConfig, dict[str, torch.Tensor]]:
    """Any SANA-Video layout -> (config, state dict under official names); anything else -> a
    VeloxLoadError saying what the file looks like."""
    raw = strip_sana_video_prefix(unwrap_state_dict(raw_state_dict, path))
    detected = detect_sana_video(raw)
    if detected is None:
        raise VeloxLoadError(path, f"looks like {_looks_like(raw)}, not a SANA-Video transformer", SANA_VIDEO_EXPECTED)
    if diffusers_config is not None and diffusers_config.get("_class_name") == DIFFUSERS_CLASS:
        detected = config_from_diffusers(diffusers_config, detected)
    return detected, canonicalize_sana_video_state_dict(raw, path)


def _looks_like(state_dict: Mapping[str, torch.Tensor]) -> str:
    keys = list(state_dict)
    if any(k.endswith(SANA_MARKERS) for k in keys):
        return IMAGE_SANA
    found = next((what for fragment, what in FOREIGN_FAMILIES if any(fragment in k for k in keys)), None)
    return found or f"an unknown model (first keys: {', '.join(keys[:4]) or 'none'})"


def _load_strict(module: torch.nn.Module, state_dict: dict, path: str | None, config: SanaVideoConfig) -> None:
    """Every parameter must come from the file: a partial model would sample noise silently."""
    what = f"the detected {config.describe()}"
    missing, unexpected = load_into(module, state_dict, path, what)
    if missing or unexpected:
        raise VeloxLoadError(path, f"weights do not fit {what} (missing {missing[:4]}, unexpected {unexpected[:4]})",
                             "a complete SANA-Video transformer checkpoint")
