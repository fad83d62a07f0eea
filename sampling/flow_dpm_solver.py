"""Flow-DPM-Solver: multistep DPM-Solver++ (2M, midpoint) on flow sigmas.

Sana's reference sampler (NVlabs ``DPMS(model_type="flow")``, diffusers
``DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")``).
For a flow model alpha_t = 1 - sigma and sigma_t = sigma, so lambda = log((1 - sigma) / sigma).
ComfyUI's ``dpmpp_2m`` assumes alpha_t = 1 (lambda = -log sigma), which is a different
solver on these models; tests/unit/test_flow_samplers.py shows the gap.

The function has k-diffusion's sampler signature, so ComfyUI's ``KSAMPLER`` can drive it:
``model(x, sigma * s_in, **extra_args)`` returns the denoised estimate x0.
"""

from __future__ import annotations

from typing import Callable

import torch


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1.0 - sigma) - torch.log(sigma)  # the reference's own form, for bitwise-close parity


def _first_order(x: torch.Tensor, d0: torch.Tensor, sigma_s: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    if sigma_t == 0:  # lambda_t = inf: the update collapses to the denoised estimate
        return d0
    h = _lambda(sigma_t) - _lambda(sigma_s)
    return (sigma_t / sigma_s) * x - (1.0 - sigma_t) * (torch.exp(-h) - 1.0) * d0


def _second_order(
    x: torch.Tensor,
    d0: torch.Tensor,
    d_prev: torch.Tensor,
    sigma_prev: torch.Tensor,
    sigma_s: torch.Tensor,
    sigma_t: torch.Tensor,
) -> torch.Tensor:
    lambda_s = _lambda(sigma_s)
    h = _lambda(sigma_t) - lambda_s
    r0 = (lambda_s - _lambda(sigma_prev)) / h
    d1 = (d0 - d_prev) / r0
    phi = (1.0 - sigma_t) * (torch.exp(-h) - 1.0)
    return (sigma_t / sigma_s) * x - phi * d0 - 0.5 * phi * d1


@torch.no_grad()
def sample_flow_dpm_solver(
    model: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Second-order multistep; first order on the first step and on the step to sigma = 0."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    previous = None
    for i in range(len(sigmas) - 1):
        sigma_s, sigma_t = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma_s * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma_s, "sigma_hat": sigma_s, "denoised": denoised})
        if previous is None or sigma_t == 0:
            x = _first_order(x, denoised, sigma_s, sigma_t)
        else:
            x = _second_order(x, denoised, previous, sigmas[i - 1], sigma_s, sigma_t)
        previous = denoised
    return x
