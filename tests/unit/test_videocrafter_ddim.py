"""The VideoCrafter / DynamiCrafter DDIM sampler against full sampling loops of lvdm's DDIMSampler.

Goldens (``tests/data/videocrafter/ddim_*.safetensors``) come from the reference sampler class with
the tiny reference UNet (``scripts/golden/make_videocrafter_golden.py``): 4 steps, CFG, fixed x_T and
per-step noise; VideoCrafter 2 (eps, scale_b 0.7, uniform) at eta 0 and 1; DynamiCrafter 512
(v, zero terminal SNR, base_scale 0.7, uniform_trailing, guidance rescale 0.7) at eta 0 and 1;
DynamiCrafter 256 (eps, no rescale) at eta 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from velox.models.unet3d import UNet3D
from velox.sampling.videocrafter_ddim import (
    VideoDiffusionSchedule,
    alphas_cumprod,
    ddim_timesteps,
    guided_output,
    make_plan,
    sample_ddim,
)
from velox.tiny.videocrafter import TINY_UNETS, fill_deterministic

from .test_videocrafter_unet import PARITY_RTOL, load_golden, relative_l2

CASES = {
    "vc2_eta0": ("vc2", 0.0, 12.0, 0.0, "uniform", VideoDiffusionSchedule(scale_end=0.7, prev_scale_at_end="one")),
    "vc2_eta1": ("vc2", 1.0, 12.0, 0.0, "uniform", VideoDiffusionSchedule(scale_end=0.7, prev_scale_at_end="one")),
    "dc512_eta0": ("dc512", 0.0, 7.5, 0.7, "uniform_trailing",
                   VideoDiffusionSchedule("v", True, scale_end=0.7, prev_scale_at_end="first")),
    "dc512_eta1": ("dc512", 1.0, 7.5, 0.7, "uniform_trailing",
                   VideoDiffusionSchedule("v", True, scale_end=0.7, prev_scale_at_end="first")),
    "dc256_eta1": ("dc256", 1.0, 7.5, 0.0, "uniform", VideoDiffusionSchedule()),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_ddim_loop_matches_reference(name: str) -> None:
    variant, eta, cfg_scale, rescale, spacing, schedule = CASES[name]
    golden, _ = load_golden(f"ddim_{name}")
    unet = fill_deterministic(UNet3D(TINY_UNETS[variant]).eval())
    steps = golden["noises"].shape[0]
    plan = make_plan(schedule, steps, eta, spacing)
    assert np.array_equal(plan.timesteps, golden["timesteps"].numpy())

    def model_fn(x, t):
        if "concat" in golden:
            x = torch.cat([x, golden["concat"]], dim=1)
        cond = unet(x, t, golden["cond"], fps=golden["fps"])
        uncond = unet(x, t, golden["uncond"], fps=golden["fps"])
        return guided_output(cond, uncond, cfg_scale, rescale)

    with torch.no_grad():
        sample = sample_ddim(model_fn, golden["x_T"].clone(), plan, noise_fn=lambda i: golden["noises"][i])
    assert relative_l2(sample, golden["sample"]) < PARITY_RTOL


def test_zero_terminal_snr_and_trailing_spacing() -> None:
    acp = alphas_cumprod(VideoDiffusionSchedule("v", zero_terminal_snr=True))
    assert acp[-1] == pytest.approx(0.0, abs=1e-12)
    assert ddim_timesteps(50, "uniform_trailing")[-1] == 999
    assert ddim_timesteps(50, "uniform")[0] == 1


def test_eta_zero_is_deterministic() -> None:
    plan = make_plan(VideoDiffusionSchedule(scale_end=0.7), 3, 0.0)
    x = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    model_fn = lambda x, t: 0.1 * x  # noqa: E731
    assert torch.equal(sample_ddim(model_fn, x.clone(), plan), sample_ddim(model_fn, x.clone(), plan))
