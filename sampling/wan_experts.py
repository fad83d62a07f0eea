"""Wan 2.2 A14B's two experts: which sampling step hands over from the high-noise to the low-noise one.

Official rule (Wan-Video/Wan2.2 ``wan/text2video.py`` / ``image2video.py``, ``_prepare_model_for_timestep``):
the scheduler's timesteps are ``int64(sigma * 1000)`` of the *shifted* schedule, and step ``i`` runs the
high-noise expert while ``t_i >= boundary * 1000`` (boundary 0.875 for T2V, 0.900 for I2V). The guidance
scale follows the same test (``guide_scale[1]`` for high noise, ``guide_scale[0]`` for low noise).
The schedule is ``FlowUniPCMultistepScheduler.set_timesteps(steps, shift=shift)``: ``steps`` sigmas
``linspace(0.999, 0, steps + 1)[:-1]`` (0.999 is the float32 ``sigma_max`` of the training table), shifted.
Pure PyTorch / NumPy; no comfy import.
"""

from __future__ import annotations

import numpy as np
import torch

TRAIN_TIMESTEPS = 1000
T2V_BOUNDARY = 0.875


def _official_sigma_range(train_timesteps: int = TRAIN_TIMESTEPS) -> tuple[float, float]:
    """``FlowUniPCMultistepScheduler(shift=1)``'s sigma_max / sigma_min: the float32 ends of 1 - alphas."""
    alphas = np.linspace(1, 1 / train_timesteps, train_timesteps)[::-1].copy()
    sigmas = torch.from_numpy(1.0 - alphas).to(torch.float32)
    return sigmas[0].item(), sigmas[-1].item()


def _official_shifted_sigmas(steps: int, shift: float, train_timesteps: int = TRAIN_TIMESTEPS) -> np.ndarray:
    sigma_max, sigma_min = _official_sigma_range(train_timesteps)
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def wan_flow_sigmas(steps: int, shift: float, train_timesteps: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """The official Wan sampling sigmas (FlowUniPC ``set_timesteps``): float32, steps + 1, ending in 0."""
    sigmas = _official_shifted_sigmas(steps, shift, train_timesteps)
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def official_timesteps(steps: int, shift: float, train_timesteps: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """The int64 timesteps the official generate loop compares with the boundary."""
    sigmas = _official_shifted_sigmas(steps, shift, train_timesteps)
    return torch.from_numpy(sigmas * train_timesteps).to(torch.int64)


def official_switch_step(steps: int, shift: float, boundary: float,
                         train_timesteps: int = TRAIN_TIMESTEPS) -> int:
    """How many steps the official loop gives the high-noise expert (first ``t < boundary * 1000``)."""
    timesteps = official_timesteps(steps, shift, train_timesteps)
    threshold = boundary * train_timesteps
    return sum(1 for t in timesteps if t.item() >= threshold)


def expert_switch_step(sigmas: torch.Tensor, boundary: float, train_timesteps: int = TRAIN_TIMESTEPS) -> int:
    """The step index k at which the low-noise expert takes over, for a schedule of ``len(sigmas) - 1`` steps.

    Steps ``0 .. k-1`` (sigmas[:k+1]) run the high-noise expert, steps ``k ..`` (sigmas[k:]) the low-noise
    one. Step i is high-noise while ``int(sigma_i * 1000) >= boundary * 1000``, as in the official loop;
    sigmas are decreasing, so k is the number of such steps. k = 0: low-noise only; k = steps: high only.
    """
    if not 0.0 <= boundary <= 1.0:
        raise ValueError(f"expert boundary must be in [0, 1] (Wan 2.2: 0.875 T2V, 0.9 I2V), got {boundary}")
    threshold = boundary * train_timesteps
    return sum(1 for sigma in sigmas[:-1].tolist() if int(sigma * train_timesteps) >= threshold)
