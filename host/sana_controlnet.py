"""Sana ControlNet inside ComfyUI: core's CONTROL_NET type around our ``SanaControlNet``.

Core's ``ControlNet`` does the rest: ``ControlNetApplyAdvanced`` sets the control image, strength and
start / end percent on a copy and chains it behind any earlier ControlNet; at every step core resizes
the image to the latent's pixel size, encodes it with the VAE given to the apply node, scales it with
the latent format, calls the control model with (x, hint, timesteps, context, context_mask), multiplies
by the strength and sums the chain; ``SanaModel`` hands the sum to the transformer as ``control``.
This subclass adds the checks that turn a mismatch into words: a control image whose aspect ratio
differs from the latent's (core would crop it silently), and a Sana ControlNet on another model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.controlnet
import comfy.model_management
import comfy.ops
import comfy.utils
import torch

from ..errors import VeloxLoadError
from ..loaders.checkpoint_files import read_component
from ..loaders.sana_controlnet_keys import sniff_sana_controlnet
from ..loaders.state_dict_fit import load_into
from ..models.sana_controlnet import SanaControlNet
from .sana_model import SanaLatentFormat, SanaModel

ASPECT_TOLERANCE = 0.02  # relative; rounding a size to 32-pixel cells stays well inside it


class ComfySanaControlNet(SanaControlNet):
    """The pure module with what core's ControlNet reads: ``dtype`` and a dict of residuals."""

    def __init__(self, *args, dtype: torch.dtype | None = None, **kwargs):
        super().__init__(*args, dtype=dtype, **kwargs)
        self.dtype = dtype

    def forward(self, x, hint, timesteps, context, context_mask=None, **kwargs) -> dict:
        """Core's call; ``control["input"][k]`` is added after the base model's block k + 1."""
        return {"input": super().forward(x, hint, timesteps, context, context_mask)}


class SanaControl(comfy.controlnet.ControlNet):
    """Core's ControlNet for a Sana ControlNet: the same machinery, plus input checks."""

    def pre_run(self, model, percent_to_timestep_function):
        check_model_fits(model, self.control_model)
        super().pre_run(model, percent_to_timestep_function)

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        if self.cond_hint_original is not None:
            check_control_image_fits(self.cond_hint_original, x_noisy)
        return super().get_control(x_noisy, t, cond, batched_number, transformer_options)

    def copy(self):
        """Core's ``copy`` builds a plain ControlNet; keep this class (ApplyAdvanced copies first)."""
        c = SanaControl(None, global_average_pooling=self.global_average_pooling, load_device=self.load_device,
                        manual_cast_dtype=self.manual_cast_dtype)
        c.control_model = self.control_model
        c.control_model_wrapped = self.control_model_wrapped
        self.copy_to(c)
        return c


def check_model_fits(model, control_model: SanaControlNet) -> None:
    """A Sana ControlNet only steers a Sana transformer of its own width."""
    if not isinstance(model, SanaModel):
        raise ValueError(f"Sana ControlNet: applied to a {type(model).__name__} model; it only works with a Sana "
                         "model loaded by 'Load Sana Model (Velox)'.")
    width = model.diffusion_model.hidden_size
    if width != control_model.hidden_size:
        raise ValueError(f"Sana ControlNet: it was trained for a Sana transformer of width "
                         f"{control_model.hidden_size}, but the model is {width} wide (Sana 0.6B: 1152, "
                         "1.6B: 2240); load the ControlNet made for this model size.")


def check_control_image_fits(image: torch.Tensor, x_noisy: torch.Tensor) -> None:
    """image: (B, 3, H, W) as ControlNetApplyAdvanced stores it; x_noisy: (B, 32, h, w).

    Core rescales the control image to the latent's size and crops what does not fit; a cropped
    control image steers the wrong places, so another aspect ratio is refused instead."""
    height, width = image.shape[-2:]
    latent_height, latent_width = x_noisy.shape[-2:]
    aspect, latent_aspect = width / height, latent_width / latent_height
    if abs(aspect / latent_aspect - 1.0) > ASPECT_TOLERANCE:
        raise ValueError(
            f"Sana ControlNet: the control image is {width}x{height} but the image being generated is "
            f"{latent_width * 32}x{latent_height * 32}; their aspect ratios differ, so the control would be "
            "cropped. Give a control image of the generated size (or scale / crop it to that aspect ratio "
            "first, e.g. with core 'Upscale Image').")


def load_sana_controlnet(path: str | Path, dtype: torch.dtype | None = None) -> SanaControl:
    """A Sana ControlNet file or diffusers folder as ComfyUI's CONTROL_NET."""
    raw, diffusers_config = read_component(path, "controlnet")
    return build_sana_controlnet(raw, path=str(path), dtype=dtype, diffusers_config=diffusers_config)


def build_sana_controlnet(raw_state_dict: dict, path: str | None = None, dtype: torch.dtype | None = None,
                          diffusers_config: dict | None = None) -> SanaControl:
    """Detect, build and load a Sana ControlNet from any supported layout; return a CONTROL_NET."""
    config, state_dict = sniff_sana_controlnet(raw_state_dict, path, diffusers_config)
    load_device = comfy.model_management.get_torch_device()
    if dtype is None:
        dtype = comfy.model_management.unet_dtype(
            model_params=-1, supported_dtypes=[torch.bfloat16, torch.float16, torch.float32],
            weight_dtype=comfy.utils.weight_dtype(state_dict))
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device)
    operations = comfy.ops.pick_operations(dtype, manual_cast, disable_fast_fp8=True)
    model = ComfySanaControlNet(**config.model_kwargs(), device=comfy.model_management.unet_offload_device(),
                                dtype=dtype, operations=operations)
    _load_strict(model, state_dict, path)
    logging.info("Velox: Sana ControlNet (width %d, %d copied blocks) loaded from %s (%s)", config.hidden_size,
                 config.depth, path or "state dict", dtype)
    return SanaControl(model, compression_ratio=1, latent_format=SanaLatentFormat(), load_device=load_device,
                       manual_cast_dtype=manual_cast, extra_conds=["context_mask"])


def _load_strict(module: torch.nn.Module, state_dict: dict, path: str | None) -> None:
    missing, unexpected = load_into(module, state_dict, path, "the detected Sana ControlNet config")
    if missing or unexpected:
        raise VeloxLoadError(path, f"weights do not fit the detected Sana ControlNet config (missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]})", "a complete Sana ControlNet checkpoint")
