"""SANA-Sprint on ComfyUI's engine vs diffusers' SanaSprintPipeline (fp32, tiny Sprint config).

The reference is the real pipeline (its own SCMScheduler loop, latents * sigma_d, TrigFlow <-> flow
transforms, guidance * guidance_embeds_scale) driving diffusers' SanaTransformer2DModel holding the
same random weights; prompt embeddings and initial latents are handed in, so no text encoder or VAE
runs. Its step noise comes from a CPU generator seeded with seed + 1, which is what our sampler draws.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler

from velox.sampling.trigflow import trigflow_sigmas, trigflow_times
from velox.tiny.sana import TINY_SANA_CONFIGS, diffusers_transformer_config, tiny_sana_state_dict

CONFIG = TINY_SANA_CONFIGS["sprint"]
SEED, GUIDANCE, TOKENS = 11, 4.5, 12
PARITY_RTOL = 1e-5  # relative L2, fp32


@pytest.fixture(scope="module")
def weights():
    return tiny_sana_state_dict(CONFIG, seed=4)


@pytest.fixture(scope="module")
def pipeline(weights):
    from velox.loaders.sana_keys import canonicalize_sana_state_dict, official_to_diffusers

    config = {k: v for k, v in diffusers_transformer_config(CONFIG).items() if not k.startswith("_")}
    transformer = SanaTransformer2DModel(**config).eval()
    transformer.load_state_dict(official_to_diffusers(canonicalize_sana_state_dict(weights)), strict=True)
    scheduler = SCMScheduler(prediction_type="trigflow", sigma_data=0.5)
    pipe = SanaSprintPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                              scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs():
    g = torch.Generator().manual_seed(5)
    prompt = torch.randn(1, TOKENS, CONFIG.caption_channels, generator=g)
    mask = torch.ones(1, TOKENS, dtype=torch.long)
    mask[:, 7:] = 0
    noise = torch.randn(1, 32, 8, 8, generator=g)
    return prompt, mask, noise


def diffusers_sprint(pipe, steps: int) -> torch.Tensor:
    prompt, mask, noise = inputs()
    with torch.no_grad():
        return pipe(prompt_embeds=prompt, prompt_attention_mask=mask, latents=noise.clone(), height=256, width=256,
                    num_inference_steps=steps, intermediate_timesteps=1.3 if steps == 2 else None,
                    guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED + 1),
                    use_resolution_binning=False, output_type="latent", return_dict=False)[0]


def velox_sprint(weights, steps: int) -> torch.Tensor:
    """Our MODEL + TrigFlow SAMPLER on ComfyUI's engine, the initial noise handed in exactly."""
    import comfy.sample

    from velox.host.sana_model import SANA_SCALE_FACTOR, build_sana_model
    from velox.host.sana_sprint import sample_single_pass, sprint_sigmas, trigflow_sampler

    prompt, mask, noise = inputs()
    model = build_sana_model(dict(weights), dtype=torch.float32)
    conditioning = [[prompt, {"attention_mask": mask}]]
    latent = {"samples": torch.zeros_like(noise)}
    original = comfy.sample.prepare_noise
    comfy.sample.prepare_noise = lambda latent_image, seed, batch_index=None: noise.clone()
    try:
        samples = sample_single_pass(model, conditioning, conditioning, latent, SEED, GUIDANCE, trigflow_sampler(),
                                     sprint_sigmas(steps))["samples"]
    finally:
        comfy.sample.prepare_noise = original
    return samples * SANA_SCALE_FACTOR  # ComfyUI hands back VAE-space latents; diffusers keeps model space


def test_trigflow_times_are_the_official_schedules():
    assert trigflow_times(2).tolist() == pytest.approx([1.5708, 1.3, 0.0])
    assert trigflow_times(4).tolist() == pytest.approx([1.5708, 1.1781, 0.7854, 0.3927, 0.0])
    assert trigflow_times(1).tolist() == pytest.approx([1.5708, 0.0])
    sigmas = trigflow_sigmas(2)
    expected = [math.sin(t) / (math.sin(t) + math.cos(t)) for t in (1.5708, 1.3, 0.0)]
    assert sigmas.tolist() == pytest.approx(expected, rel=1e-6)
    assert sigmas[-1] == 0.0


def test_trigflow_step_equals_scm_scheduler_step_in_flow_space():
    """cos(s) x_t - sin(s) F (SCMScheduler) is sigma_d times the flow denoised estimate x - sigma v."""
    g = torch.Generator().manual_seed(0)
    x0, noise, velocity = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    t = trigflow_times(4)[1]
    sigma = float(trigflow_sigmas(4)[1])
    x_flow = (1 - sigma) * x0 + sigma * noise
    sigma_d = 0.5
    x_trig = x_flow * sigma_d * (torch.cos(t) + torch.sin(t))
    model_input = x_trig / sigma_d * math.sqrt(sigma**2 + (1 - sigma) ** 2)
    trig_output = ((1 - 2 * sigma) * model_input + (1 - 2 * sigma + 2 * sigma**2) * velocity) / math.sqrt(
        sigma**2 + (1 - sigma) ** 2) * sigma_d
    scm_denoised = torch.cos(t) * x_trig - torch.sin(t) * trig_output
    torch.testing.assert_close(model_input, x_flow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scm_denoised / sigma_d, x_flow - sigma * velocity, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sprint_run_on_comfy_engine_equals_diffusers_sana_sprint_pipeline(comfy_host, weights, pipeline, steps):
    expected = diffusers_sprint(pipeline, steps)
    ours = velox_sprint(weights, steps)
    error = float((ours - expected).norm() / expected.norm())
    print(f"sprint parity {steps} step(s): relative L2 {error:.2e}")
    assert error <= PARITY_RTOL, f"relative L2 {error:.2e} after {steps} step(s)"


def test_sprint_guidance_scale_reaches_the_model(comfy_host, weights):
    """A different embedded guidance changes the result; the negative prompt does not (no CFG pass)."""
    from velox.host.sana_model import build_sana_model
    from velox.host.sana_sprint import sample_single_pass, sprint_sigmas, trigflow_sampler

    prompt, mask, noise = inputs()
    model = build_sana_model(dict(weights), dtype=torch.float32)
    positive = [[prompt, {"attention_mask": mask}]]
    other = [[torch.randn_like(prompt), {"attention_mask": mask}]]
    latent = {"samples": torch.zeros_like(noise)}

    def run(negative, guidance):
        return sample_single_pass(model, positive, negative, latent, SEED, guidance, trigflow_sampler(),
                                  sprint_sigmas(2))["samples"]

    base = run(positive, GUIDANCE)
    torch.testing.assert_close(run(other, GUIDANCE), base, rtol=0, atol=0)
    assert float((run(positive, 1.0) - base).norm() / base.norm()) > 1e-3
