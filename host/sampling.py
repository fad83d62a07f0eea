"""Sampling on ComfyUI's engine with Velox's flow samplers and schedules.

Everything goes through ``comfy.sample.sample_custom`` (CFG guider, batching of cond/uncond,
previews, the progress bar and interruption), with a SAMPLER and SIGMAS of our choosing.
"""

from __future__ import annotations

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..sampling.flow_dpm_solver import sample_flow_dpm_solver
from ..sampling.flow_schedules import FLOW_SCHEDULES
from ..sampling.trigflow import TRIGFLOW, sample_trigflow

VELOX_SAMPLERS = {"flow_dpm_solver": sample_flow_dpm_solver, TRIGFLOW: sample_trigflow}
SAMPLER_CHOICES = [*VELOX_SAMPLERS, *comfy.samplers.KSampler.SAMPLERS]
SCHEDULER_CHOICES = [*FLOW_SCHEDULES, *comfy.samplers.KSampler.SCHEDULERS]


def sampler_object(name: str) -> comfy.samplers.KSAMPLER:
    if name in VELOX_SAMPLERS:
        return comfy.samplers.KSAMPLER(VELOX_SAMPLERS[name])
    return comfy.samplers.sampler_object(name)


def with_flow_shift(model, shift: float):
    """A clone of MODEL whose flow sigmas use ``shift`` (what core ModelSamplingSD3 does)."""

    class FlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    patched = model.clone()
    sampling = FlowSampling(model.model.model_config)
    sampling.set_parameters(shift=shift, multiplier=1000)
    patched.add_object_patch("model_sampling", sampling)
    return patched


def flow_sigmas(model, scheduler: str, steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """steps + 1 sigmas; with denoise < 1, the tail of a longer schedule (as core KSampler)."""
    total = steps if denoise >= 1.0 else int(steps / denoise)
    if scheduler in FLOW_SCHEDULES:
        sigmas = FLOW_SCHEDULES[scheduler](total, shift)
    else:
        sampling = model.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, total).cpu()
    return sigmas[-(steps + 1):]


def conditioning_on(conditioning: list, device: torch.device) -> list:
    """A copy of CONDITIONING whose tensors live on ``device``.

    Core keeps conditioning on the CPU and copies it to the GPU at every step; a pageable copy
    waits for the GPU to drain, so the CPU cannot queue the next step's kernels ahead.
    """
    def moved(value):
        return value.to(device, non_blocking=True) if torch.is_tensor(value) else value

    return [[moved(tensor), {key: moved(value) for key, value in extra.items()}] for tensor, extra in conditioning]


def sample_latent(model, positive, negative, latent: dict, seed: int, cfg: float,
                  sampler: comfy.samplers.KSAMPLER, sigmas: torch.Tensor) -> dict:
    """Run one sampling pass; returns a LATENT dict with the denoised samples."""
    device = model.load_device
    positive, negative = conditioning_on(positive, device), conditioning_on(negative, device)
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
    samples = comfy.sample.sample_custom(
        model, noise, cfg, sampler, sigmas, positive, negative, latent_image,
        noise_mask=latent.get("noise_mask"), callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
    )
    out = latent.copy()
    out["samples"] = samples
    return out
