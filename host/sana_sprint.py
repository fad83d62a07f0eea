"""SANA-Sprint on ComfyUI's engine: the TrigFlow SAMPLER, its sigmas, and the single-pass guidance.

Sprint is guidance-distilled: the guidance scale goes into the network (its ``cfg_embedder``,
x0.1 inside the model) and there is no negative pass. Here the scale travels in the conditioning
under ``guidance`` (what ``SanaModel.extra_conds`` reads, and what core's FluxGuidance node sets),
and sampling runs at CFG 1, so ComfyUI skips the uncond batch. The TrigFlow math is in
``sampling/trigflow.py``.
"""

from __future__ import annotations

import logging

import comfy.samplers
import node_helpers

from ..sampling.trigflow import TRIGFLOW, img2img_start, trigflow_sigmas
from .sampling import sample_latent, sampler_object
from .sana_model import SanaModel


def is_sprint_model(model) -> bool:
    """True when MODEL is a Sana transformer with Sprint's guidance embedder."""
    base = getattr(model, "model", None)
    return isinstance(base, SanaModel) and getattr(base.diffusion_model, "cfg_embedder", None) is not None


def trigflow_sampler() -> comfy.samplers.KSAMPLER:
    """Sprint's consistency sampler as a SAMPLER for core custom sampling."""
    return sampler_object(TRIGFLOW)


def sprint_sigmas(steps: int, denoise: float = 1.0):
    """Flow sigmas of the official TrigFlow times: all steps + 1, or with denoise < 1 the tail that
    diffusers' ``SanaSprintImg2ImgPipeline`` runs for ``num_inference_steps=steps, strength=denoise``
    (its schedule, not core KSampler's longer one: the same numbers give the same image)."""
    start = img2img_start(steps, denoise)
    if denoise < 1.0 and start == 0:
        logging.warning("Velox: SANA-Sprint with %d step(s) at denoise %.2f starts from pure noise, as diffusers' "
                        "img2img does (it runs the last steps * denoise steps, rounded up); raise steps or "
                        "lower denoise to keep part of the input image.", steps, denoise)
    return trigflow_sigmas(steps)[start:]


def with_guidance(conditioning: list, guidance: float) -> list:
    """CONDITIONING carrying Sprint's embedded guidance scale (the raw scale, e.g. 4.5)."""
    return node_helpers.conditioning_set_values(conditioning, {"guidance": guidance})


def sample_single_pass(model, positive, negative, latent: dict, seed: int, guidance: float,
                       sampler: comfy.samplers.KSAMPLER, sigmas) -> dict:
    """One model pass per step (CFG 1) with ``guidance`` embedded; ``negative`` only rides along
    for post-CFG patches such as PAG."""
    return sample_latent(model, with_guidance(positive, guidance), negative, latent, seed, 1.0, sampler, sigmas)
