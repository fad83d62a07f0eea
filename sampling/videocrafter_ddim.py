"""DDIM exactly as VideoCrafter / DynamiCrafter sample it (lvdm ``models/samplers/ddim.py``), pure torch.

What a stock DDIM lacks:

- **Timestep-scaled x0.** VideoCrafter 2 / 1-I2V / 1-1024 (``use_scale``) and DynamiCrafter 512/1024
  (``use_dynamic_rescale``) were trained on ``sqrt(a_t) * x0 * s_t + sqrt(1 - a_t) * eps`` with
  ``s = linspace(1, s_end, 400) ++ full(s_end)``; each DDIM step multiplies the predicted x0 by
  ``s_prev / s_t``. The two samplers differ only at the last step: VideoCrafter takes ``s_prev = s[0]``
  (= 1), DynamiCrafter the scale of the first DDIM timestep (``prev_scale_at_end``).
- **v-prediction with zero terminal SNR** (DynamiCrafter 512/1024): betas rescaled so a_999 = 0,
  ``uniform_trailing`` spacing that starts at t = 999, ``guidance_rescale`` 0.7.
- CFG ``u + s (c - u)`` on the raw model output, then the guidance rescale of Lin et al. 2023.

Schedules are computed in float64 (as lvdm's numpy) and applied in the latent's dtype. Noise for
eta > 0 comes from a ``noise_fn(step_index) -> tensor`` so a caller controls seeds exactly.
Shapes: x (B, 4, T, H, W); the model function maps (x, t (B,) long) -> output of x's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

TRAIN_TIMESTEPS = 1000
SCALE_TURNING_STEP = 400  # lvdm mid_step / turning_step


@dataclass(frozen=True)
class VideoDiffusionSchedule:
    """The noise schedule and target of one release.

    prediction: "eps" or "v". scale_end: ``scale_b`` / ``base_scale`` (None: no timestep scaling).
    prev_scale_at_end: "one" (VideoCrafter: s[0]) or "first" (DynamiCrafter: s at the first DDIM step).
    """

    prediction: str = "eps"
    zero_terminal_snr: bool = False
    scale_end: float | None = None
    prev_scale_at_end: str = "one"
    linear_start: float = 0.00085
    linear_end: float = 0.012


def betas(schedule: VideoDiffusionSchedule) -> np.ndarray:
    """lvdm "linear" = SD scaled-linear: linspace(sqrt(start), sqrt(end), 1000)^2, optional zero-SNR."""
    b = np.linspace(schedule.linear_start ** 0.5, schedule.linear_end ** 0.5, TRAIN_TIMESTEPS,
                    dtype=np.float64) ** 2
    return rescale_zero_terminal_snr(b) if schedule.zero_terminal_snr else b


def rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Alg. 1: shift/scale sqrt(alpha_bar) so its last value is 0 and its first unchanged."""
    root = np.sqrt(np.cumprod(1.0 - b))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    alpha_bar = root ** 2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def alphas_cumprod(schedule: VideoDiffusionSchedule) -> np.ndarray:
    return np.cumprod(1.0 - betas(schedule))


def scale_array(scale_end: float) -> np.ndarray:
    """s_t for t in [0, 1000): linspace(1, scale_end, 400) then constant."""
    ramp = np.linspace(1.0, scale_end, SCALE_TURNING_STEP)
    return np.concatenate([ramp, np.full(TRAIN_TIMESTEPS - SCALE_TURNING_STEP, scale_end)])


def ddim_timesteps(steps: int, spacing: str = "uniform") -> np.ndarray:
    """Ascending DDIM timesteps: "uniform" range(0, 1000, 1000 // S) + 1; "uniform_trailing" ends at 999.

    As in lvdm, "uniform" may give more than S steps (S = 30: 31). Where lvdm would index t = 1000 and
    crash (1000 // S divides 999: S = 3, 9, 27, ...) that step is dropped.
    """
    if spacing == "uniform":
        ts = np.arange(0, TRAIN_TIMESTEPS, TRAIN_TIMESTEPS // steps) + 1
        return ts[ts < TRAIN_TIMESTEPS]
    if spacing == "uniform_trailing":
        stride = TRAIN_TIMESTEPS / steps
        return np.flip(np.round(np.arange(TRAIN_TIMESTEPS, 0, -stride))).astype(np.int64) - 1
    raise ValueError(f"VideoCrafter DDIM: unknown timestep spacing {spacing!r} (uniform, uniform_trailing)")


@dataclass(frozen=True)
class DDIMPlan:
    """Per-step coefficients, ascending in timestep (index 0 = the last step taken)."""

    timesteps: np.ndarray
    alphas: np.ndarray
    alphas_prev: np.ndarray
    sigmas: np.ndarray
    scale_ratio: np.ndarray  # s_prev / s_t (1 without timestep scaling)
    prediction: str

    def __len__(self) -> int:
        return len(self.timesteps)


def make_plan(schedule: VideoDiffusionSchedule, steps: int, eta: float, spacing: str = "uniform") -> DDIMPlan:
    acp = alphas_cumprod(schedule)
    ts = ddim_timesteps(steps, spacing)
    alphas = acp[ts]
    alphas_prev = np.concatenate([acp[:1], acp[ts[:-1]]])
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    ratio = np.ones(len(ts))
    if schedule.scale_end is not None:
        s = scale_array(schedule.scale_end)[ts]
        end = 1.0 if schedule.prev_scale_at_end == "one" else s[0]
        ratio = np.concatenate([[end], s[:-1]]) / s
    return DDIMPlan(ts, alphas, alphas_prev, sigmas, ratio, schedule.prediction)


def eps_and_x0(plan: DDIMPlan, index: int, x: torch.Tensor, output: torch.Tensor):
    """(eps, x0) from the model output at DDIM index ``index`` (eps- or v-prediction)."""
    a_t = float(plan.alphas[index])
    if plan.prediction == "v":
        sa, so = a_t ** 0.5, (1 - a_t) ** 0.5
        return sa * output + so * x, sa * x - so * output
    return output, (x - (1 - a_t) ** 0.5 * output) / a_t ** 0.5


def ddim_step(plan: DDIMPlan, index: int, x: torch.Tensor, output: torch.Tensor,
              noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One lvdm DDIM update; returns (x_prev, scaled x0)."""
    eps, x0 = eps_and_x0(plan, index, x, output)
    x0 = x0 * float(plan.scale_ratio[index])
    a_prev, sigma = float(plan.alphas_prev[index]), float(plan.sigmas[index])
    x_prev = a_prev ** 0.5 * x0 + max(1.0 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def guided_output(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float, rescale: float = 0.0):
    """CFG on the raw output, then guidance rescale toward the conditional output's per-sample std."""
    if uncond is None or scale == 1.0:
        return cond
    out = uncond + scale * (cond - uncond)
    if rescale > 0:
        dims = list(range(1, cond.ndim))
        rescaled = out * (cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
        out = rescale * rescaled + (1 - rescale) * out
    return out


ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_ddim(model_fn: ModelFn, x: torch.Tensor, plan: DDIMPlan,
                noise_fn: Callable[[int], torch.Tensor] | None = None,
                callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run all steps from x = x_T; ``noise_fn(i)`` gives the noise of the i-th step taken (eta > 0)."""
    for i, index in enumerate(reversed(range(len(plan)))):
        t = torch.full((x.shape[0],), int(plan.timesteps[index]), device=x.device, dtype=torch.long)
        output = model_fn(x, t)
        noise = noise_fn(i) if plan.sigmas[index] > 0 and noise_fn is not None else None
        if plan.sigmas[index] > 0 and noise is None:
            noise = torch.randn_like(x)
        x, x0 = ddim_step(plan, index, x, output, noise)
        if callback is not None:
            callback(i, x, x0)
    return x
