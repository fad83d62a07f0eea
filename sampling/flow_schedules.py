"""Sigma schedules of flow-matching models, reproducing the reference schedulers exactly.

A flow model's sigma is the noise fraction: x_sigma = (1 - sigma) * x0 + sigma * noise.
"Shift" warps a uniform schedule towards high noise: s' = shift * s / (1 + (shift - 1) * s).
All functions return a float32 tensor of steps + 1 sigmas ending in 0.
"""

from __future__ import annotations

import numpy as np
import torch

TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_match_euler_sigmas(steps: int, shift: float, train_timesteps: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """diffusers ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)``.

    diffusers shifts the training table to find sigma_min, then shifts the inference
    linspace again; both shifts are kept so the two samplers see identical sigmas.
    """
    sigma_max = 1.0
    sigma_min = float(shift_sigmas(np.array([1.0 / train_timesteps]), shift)[0])
    timesteps = np.linspace(sigma_max * train_timesteps, sigma_min * train_timesteps, steps)
    sigmas = shift_sigmas(timesteps / train_timesteps, shift)
    return torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))


def flow_dpm_solver_sigmas(steps: int, shift: float, train_timesteps: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """diffusers ``DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)`` sigmas.

    This is the schedule of Sana's diffusers releases (Flow-DPM-Solver, time-uniform flow).
    """
    alphas = np.linspace(1.0, 1.0 / train_timesteps, steps + 1)
    sigmas = np.flip(shift_sigmas(1.0 - alphas, shift))[:-1]
    return torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))


def _trigflow_sigmas(steps: int, shift: float) -> torch.Tensor:
    from .trigflow import trigflow_sigmas  # SANA-Sprint's official times; Sprint has no shift

    return trigflow_sigmas(steps)


def _wan_flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    from .wan_experts import wan_flow_sigmas  # Wan's official FlowUniPC schedule

    return wan_flow_sigmas(steps, shift)


FLOW_SCHEDULES = {
    "flow_match_euler": flow_match_euler_sigmas,
    "flow_dpm_solver": flow_dpm_solver_sigmas,
    "trigflow": _trigflow_sigmas,
    "wan_flow": _wan_flow_sigmas,
}
