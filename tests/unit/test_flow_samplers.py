"""Velox's flow schedules and Flow-DPM-Solver against diffusers' schedulers (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from velox.sampling.flow_dpm_solver import sample_flow_dpm_solver
from velox.sampling.flow_schedules import flow_dpm_solver_sigmas, flow_match_euler_sigmas


def toy_flow_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth, sigma-dependent velocity field (stands in for a transformer)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x) * (0.5 + s) + 0.3 * torch.sin(3 * s) - 0.2 * x * s


def as_denoiser(velocity_model):
    """ComfyUI's CONST model sampling: denoised = x - sigma * v."""

    def denoise(x, sigma):
        return x - sigma.reshape(-1, 1, 1, 1) * velocity_model(x, sigma)

    return denoise


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_flow_match_euler_sigmas_equal_diffusers(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(flow_match_euler_sigmas(steps, shift), scheduler.sigmas.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_flow_dpm_solver_sigmas_equal_diffusers(steps, shift):
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(flow_dpm_solver_sigmas(steps, shift), scheduler.sigmas.float(), rtol=0, atol=1e-6)


def diffusers_dpm_loop(x: torch.Tensor, steps: int, shift: float) -> torch.Tensor:
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    scheduler.set_timesteps(steps)
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].reshape(1).expand(x.shape[0])
        x = scheduler.step(toy_flow_model(x, sigma), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps,shift", [(1, 3.0), (2, 3.0), (5, 1.0), (20, 3.0), (20, 6.0)])
def test_flow_dpm_solver_matches_diffusers_multistep_loop(steps, shift):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = diffusers_dpm_loop(x.clone(), steps, shift)
    ours = sample_flow_dpm_solver(as_denoiser(toy_flow_model), x.clone(), flow_dpm_solver_sigmas(steps, shift))
    assert relative_l2(ours, expected) <= 1e-5


def test_flow_dpm_solver_ticks_the_callback_once_per_step():
    seen = []
    x = torch.randn(1, 4, 4, 4)
    sample_flow_dpm_solver(as_denoiser(toy_flow_model), x, flow_dpm_solver_sigmas(6, 3.0),
                           callback=lambda info: seen.append(info["i"]))
    assert seen == list(range(6))


def test_core_dpmpp_2m_is_a_different_solver_on_flow_models(comfy_host):
    """Why Velox ships its own SAMPLER: core's dpmpp_2m assumes alpha_t = 1."""
    from comfy.k_diffusion.sampling import sample_dpmpp_2m

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigmas = flow_dpm_solver_sigmas(20, 3.0)
    expected = diffusers_dpm_loop(x.clone(), 20, 3.0)
    core = sample_dpmpp_2m(as_denoiser(toy_flow_model), x.clone(), sigmas, disable=True)
    ours = sample_flow_dpm_solver(as_denoiser(toy_flow_model), x.clone(), sigmas)
    assert relative_l2(ours, expected) <= 1e-5
    assert relative_l2(core, expected) > 1e-3
