"""lvdm's DDIM as a SAMPLER for core custom sampling (SamplerCustom / SamplerCustomAdvanced), plus its SIGMAS.

k-diffusion signature: ``model(x, sigma)`` returns ComfyUI's denoised x0 (after the guider's CFG), x is
in ComfyUI's variance-exploding scale (x_ddpm * sqrt(1 + sigma^2)). Each step converts to lvdm's DDPM
scale, applies the release's timestep-scaled x0 correction (read from the MODEL's detected release)
and lvdm's eta noise, and the last step lands on t = 0 (alpha_bar[0]) as lvdm does, returning lvdm's
sample. ``videocrafter_sigmas`` gives lvdm's DDIM timesteps as sigmas.

What differs from ``VeloxVideoCrafterSampler`` (the exact reference, ``host.videocrafter_sampling``):
the guider's CFG has no guidance rescale (DynamiCrafter's 0.7); ComfyUI's zero-SNR table keeps
alpha_bar_999 = 4.9e-8 instead of 0; with "uniform" spacing the first timestep (981) is below
ComfyUI's max sigma, so core scales the start noise by sqrt(1 - alpha_bar) where lvdm takes unit noise.
"""

from __future__ import annotations

import torch

from ..sampling.videocrafter_ddim import ddim_timesteps, scale_array


def _scale_lookup(variant):
    if variant is None or variant.schedule.scale_end is None:
        return None, "one"
    return torch.tensor(scale_array(variant.schedule.scale_end), dtype=torch.float64), \
        variant.schedule.prev_scale_at_end


@torch.no_grad()
def sample_videocrafter_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta: float = 1.0):
    extra_args = {} if extra_args is None else extra_args
    base = model.inner_model.inner_model
    sampling = base.model_sampling
    scale, prev_at_end = _scale_lookup(getattr(base.model_config, "velox_variant", None))
    alpha_0 = float(1.0 / (1.0 + sampling.sigmas[0].double() ** 2))
    seed = extra_args.get("seed", None)
    generator = torch.Generator().manual_seed(0 if seed is None else seed + 1)
    s_in = x.new_ones([x.shape[0]])
    x_ddpm = x / (1.0 + sigmas[0] ** 2) ** 0.5
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x_ddpm * (1.0 + sigma ** 2) ** 0.5, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x_ddpm, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        a_t = float(1.0 / (1.0 + sigma.double() ** 2))
        a_prev = alpha_0 if sigma_next == 0 else float(1.0 / (1.0 + sigma_next.double() ** 2))
        eps = (x_ddpm - a_t ** 0.5 * denoised) / (1.0 - a_t) ** 0.5
        x0 = denoised * _ratio(sampling, scale, prev_at_end, sigma, sigma_next)
        sigma_eta = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x_ddpm = a_prev ** 0.5 * x0 + max(1.0 - a_prev - sigma_eta ** 2, 0.0) ** 0.5 * eps
        if sigma_eta > 0:
            x_ddpm = x_ddpm + sigma_eta * torch.randn(x.shape, generator=generator).to(x)
    return x_ddpm if sigmas[-1] == 0 else x_ddpm * (1.0 + sigmas[-1] ** 2) ** 0.5


def _ratio(sampling, scale, prev_at_end, sigma, sigma_next) -> float:
    """s_prev / s_t of the step sigma -> sigma_next (1 without timestep scaling)."""
    if scale is None:
        return 1.0
    t = int(sampling.timestep(sigma.reshape(1)).round().item())
    s_t = float(scale[t])
    if sigma_next == 0:
        return (1.0 if prev_at_end == "one" else s_t) / s_t
    return float(scale[int(sampling.timestep(sigma_next.reshape(1)).round().item())]) / s_t


def videocrafter_sigmas(model, steps: int, spacing: str) -> torch.Tensor:
    """lvdm's DDIM timesteps (descending) as the MODEL's sigmas, then 0."""
    sampling = model.get_model_object("model_sampling")
    timesteps = torch.tensor(ddim_timesteps(steps, spacing)[::-1].copy(), dtype=torch.float32)
    return torch.cat([sampling.sigma(timesteps), torch.zeros(1)]).cpu()
