"""A whole sampling run: our MODEL on ComfyUI's engine vs diffusers' Sana loop (fp32, tiny config)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel

from velox.models.sana import SanaConfig
from velox.sampling.flow_schedules import flow_match_euler_sigmas
from velox.tiny.sana import diffusers_transformer_config, tiny_sana_state_dict

CONFIG = SanaConfig(name="tiny", hidden_size=64, depth=2, num_heads=2, caption_channels=48)
SHIFT, GUIDANCE, TOKENS = 3.0, 4.5, 12


@pytest.fixture(scope="module")
def weights():
    return tiny_sana_state_dict(CONFIG, seed=3)


@pytest.fixture(scope="module")
def reference(weights):
    from velox.loaders.sana_keys import canonicalize_sana_state_dict, official_to_diffusers

    config = {k: v for k, v in diffusers_transformer_config(CONFIG).items() if not k.startswith("_")}
    model = SanaTransformer2DModel(**config).eval()
    model.load_state_dict(official_to_diffusers(canonicalize_sana_state_dict(weights)), strict=True)
    return model


def prompts():
    g = torch.Generator().manual_seed(5)
    positive = torch.randn(1, TOKENS, CONFIG.caption_channels, generator=g)
    negative = torch.randn(1, TOKENS, CONFIG.caption_channels, generator=g)
    positive_mask = torch.ones(1, TOKENS, dtype=torch.long)
    positive_mask[:, 7:] = 0
    negative_mask = torch.ones(1, TOKENS, dtype=torch.long)
    negative_mask[:, 3:] = 0
    noise = torch.randn(1, 32, 8, 8, generator=g)
    return positive, positive_mask, negative, negative_mask, noise


def diffusers_euler_loop(model, steps: int) -> torch.Tensor:
    """SanaPipeline's denoising loop with CFG (uncond first, as diffusers batches it)."""
    positive, positive_mask, negative, negative_mask, latents = prompts()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    scheduler.set_timesteps(steps)
    context = torch.cat([negative, positive])
    mask = torch.cat([negative_mask, positive_mask])
    with torch.no_grad():
        for t in scheduler.timesteps:
            velocity = model(hidden_states=torch.cat([latents, latents]), encoder_hidden_states=context,
                             encoder_attention_mask=mask, timestep=t.expand(2), return_dict=False)[0]
            uncond, cond = velocity.chunk(2)
            latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents).prev_sample
    return latents


def velox_euler_run(weights, steps: int) -> torch.Tensor:
    import comfy.sample
    import comfy.samplers

    from velox.host.sana_model import SANA_SCALE_FACTOR, build_sana_model

    positive, positive_mask, negative, negative_mask, noise = prompts()
    model = build_sana_model(dict(weights), dtype=torch.float32)
    samples = comfy.sample.sample_custom(
        model, noise, GUIDANCE, comfy.samplers.sampler_object("euler"), flow_match_euler_sigmas(steps, SHIFT),
        [[positive, {"attention_mask": positive_mask}]], [[negative, {"attention_mask": negative_mask}]],
        torch.zeros_like(noise), disable_pbar=True, seed=0,
    )
    return samples * SANA_SCALE_FACTOR  # ComfyUI hands back VAE-space latents; diffusers keeps model space


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_euler_run_on_comfy_engine_equals_diffusers_flow_match_loop(comfy_host, weights, reference, steps):
    expected = diffusers_euler_loop(reference, steps)
    ours = velox_euler_run(weights, steps)
    error = float((ours - expected).norm() / expected.norm())
    print(f"euler parity {steps} steps: relative L2 {error:.2e}")
    assert error <= 1e-4, f"relative L2 {error:.2e} after {steps} steps"
