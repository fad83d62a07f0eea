"""SANA-Sprint's TrigFlow few-step sampler (sCM), expressed on flow sigmas for ComfyUI's engine.

Upstream: NVlabs Sana ``app/sana_sprint_pipeline.py`` (SCMScheduler, sigma_data 0.5, times from
pi/2) and diffusers ``SanaSprintPipeline`` + ``SCMScheduler(prediction_type="trigflow")``.

The reference samples x_t = cos(t) * sigma_d * x0 + sin(t) * sigma_d * noise with TrigFlow times
t in [0, pi/2]. It feeds the flow-trained network the flow latent (x_t / sigma_d) / (cos t + sin t)
at flow sigma s = sin t / (sin t + cos t), turns the velocity v into the TrigFlow output F and
steps with ``x0 = cos(t) x_t - sin(t) sigma_d F``. Written out, that x0 is exactly
``sigma_d * (x_flow - s * v)``: the flow model's own denoised estimate, and the final
``denoised / sigma_d`` is that estimate in the VAE's latent space. Re-noising with
``cos(t') x0 + sin(t') sigma_d noise`` is, in flow terms, ``(1 - s') x0 + s' noise``.

So on ComfyUI's engine Sprint is a FLOW model (v-prediction, timestep = sigma * 1000) sampled at
the sigmas ``sin t / (sin t + cos t)`` of the official times, with a consistency step (denoise,
then re-noise to the next sigma). sigma_d cancels; tests/unit/test_sana_sprint.py checks the
whole run against diffusers' pipeline.
"""

from __future__ import annotations

from typing import Callable

import torch

TRIGFLOW = "trigflow"  # sampler and schedule name in presets
SIGMA_DATA = 0.5  # SCMScheduler sigma_data; cancels in flow space (kept to document the mapping)
MAX_TIME = 1.57080  # the official first time, slightly above pi/2 (diffusers max_timesteps)
INTERMEDIATE_TIME = 1.3  # the official middle time of the 2-step schedule


def trigflow_times(steps: int, max_time: float = MAX_TIME,
                   intermediate_time: float | None = INTERMEDIATE_TIME) -> torch.Tensor:
    """steps + 1 TrigFlow times from ``max_time`` to 0, float32 as SCMScheduler makes them.

    2 steps: [max_time, intermediate_time, 0]; otherwise evenly spaced (linspace).
    """
    if steps < 1:
        raise ValueError(f"TrigFlow needs at least 1 step, got {steps}")
    if steps == 2 and intermediate_time is not None:
        return torch.tensor([max_time, intermediate_time, 0.0], dtype=torch.float32)
    return torch.linspace(max_time, 0.0, steps + 1, dtype=torch.float32)


def trigflow_time_to_flow_sigma(t: torch.Tensor) -> torch.Tensor:
    """Flow sigma sin t / (sin t + cos t) of TrigFlow time t (diffusers' ``scm_timestep``)."""
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


def trigflow_sigmas(steps: int, shift: float | None = None) -> torch.Tensor:
    """Flow sigmas of the official Sprint schedule (``shift`` is accepted and ignored: Sprint has none).

    The first sigma is 1.0000033 (max_time is a hair above pi/2), kept as is for exact parity.
    """
    return trigflow_time_to_flow_sigma(trigflow_times(steps))


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first of ``steps + 1`` times that an image-to-image run starts at, as diffusers'
    ``SanaSprintImg2ImgPipeline.get_timesteps``: the last ``steps * strength`` steps run, rounded
    up (2 steps at strength 0.6 both run, from pure noise: the input is all but ignored)."""
    return int(max(steps - min(steps * strength, steps), 0))


def cpu_noise_sampler(x: torch.Tensor, seed: int | None) -> Callable:
    """Fresh Gaussian noise per step from a CPU generator seeded with ``seed + 1``.

    CPU draws give the same image on every device (ComfyUI draws the initial noise on the CPU too),
    and ``seed + 1`` keeps the re-noise independent of the initial noise drawn from ``seed``.
    """
    generator = torch.Generator("cpu").manual_seed((0 if seed is None else int(seed)) + 1)

    def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x)

    return draw


@torch.no_grad()  # as k-diffusion's samplers: the engine never needs the graph
def sample_trigflow(
    model: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    noise_sampler: Callable | None = None,
) -> torch.Tensor:
    """Consistency sampling: x0 = model(x, sigma); x = (1 - sigma') x0 + sigma' noise; last step x0.

    k-diffusion signature (ComfyUI's ``KSAMPLER`` drives it): ``model(x, sigma * s_in, **extra_args)``
    returns the denoised estimate. x: (B, C, H, W) at sigmas[0]; sigmas: (steps + 1,) ending in 0.
    """
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = cpu_noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next > 0:
            x = (1.0 - sigma_next) * denoised + sigma_next * noise_sampler(sigma, sigma_next)
        else:
            x = denoised
    return x
