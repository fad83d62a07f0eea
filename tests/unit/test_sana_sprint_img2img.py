"""SANA-Sprint image-to-image: VeloxSampler's denoise on the TrigFlow path vs diffusers'
SanaSprintImg2ImgPipeline's strength (fp32, tiny Sprint config, tiny DC-AE on both sides).

Both sides get the same image, weights and noise: the reference draws its initial noise and then each
step's re-noise from one CPU generator, so ours is handed the same stream (initial noise through
``comfy.sample.prepare_noise``, the re-noise through the TrigFlow sampler's noise source).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderDC, SanaSprintImg2ImgPipeline, SanaTransformer2DModel, SCMScheduler

from velox.sampling import trigflow
from velox.tiny.dcae import SANA_DCAE_SCALING_FACTOR, TINY_DCAE_CONFIG, make_dcae_state_dict
from velox.tiny.sana import TINY_SANA_CONFIGS, diffusers_transformer_config, tiny_sana_state_dict

CONFIG = TINY_SANA_CONFIGS["sprint"]
SEED, GUIDANCE, TOKENS, SIDE = 11, 4.5, 12, 8  # SIDE: latent cells (256 px)
PARITY_RTOL = 1e-5  # relative L2, fp32


@pytest.fixture(scope="module")
def weights():
    return tiny_sana_state_dict(CONFIG, seed=4)


@pytest.fixture(scope="module")
def dcae_weights():
    return make_dcae_state_dict(TINY_DCAE_CONFIG, seed=0)


@pytest.fixture(scope="module")
def pipeline(weights, dcae_weights):
    from velox.loaders.sana_keys import canonicalize_sana_state_dict, official_to_diffusers

    config = {k: v for k, v in diffusers_transformer_config(CONFIG).items() if not k.startswith("_")}
    transformer = SanaTransformer2DModel(**config).eval()
    transformer.load_state_dict(official_to_diffusers(canonicalize_sana_state_dict(weights)), strict=True)
    vae = AutoencoderDC(**TINY_DCAE_CONFIG.autoencoder_kwargs(), scaling_factor=SANA_DCAE_SCALING_FACTOR).eval()
    vae.load_state_dict(dcae_weights, strict=True)
    pipe = SanaSprintImg2ImgPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                     scheduler=SCMScheduler(prediction_type="trigflow", sigma_data=0.5))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs():
    g = torch.Generator().manual_seed(5)
    prompt = torch.randn(1, TOKENS, CONFIG.caption_channels, generator=g)
    mask = torch.ones(1, TOKENS, dtype=torch.long)
    mask[:, 7:] = 0
    image = torch.rand(1, SIDE * 32, SIDE * 32, 3, generator=g)  # ComfyUI IMAGE: (B, H, W, 3) in [0, 1]
    return prompt, mask, image


def diffusers_img2img(pipe, steps: int, strength: float) -> torch.Tensor:
    prompt, mask, image = inputs()
    with torch.no_grad():
        return pipe(prompt_embeds=prompt, prompt_attention_mask=mask, image=image.movedim(-1, 1), strength=strength,
                    height=SIDE * 32, width=SIDE * 32, num_inference_steps=steps,
                    intermediate_timesteps=1.3 if steps == 2 else None, guidance_scale=GUIDANCE,
                    generator=torch.Generator().manual_seed(SEED), use_resolution_binning=False,
                    output_type="latent", return_dict=False)[0]


@pytest.fixture(scope="module")
def comfy_parts(comfy_host, weights, dcae_weights):
    from velox.host.dcae_vae import load_dcae_vae
    from velox.host.sana_model import build_sana_model

    return build_sana_model(dict(weights), dtype=torch.float32), load_dcae_vae(dcae_weights, dtype=torch.float32)


def velox_img2img(comfy_parts, monkeypatch, steps: int, denoise: float) -> torch.Tensor:
    """VAEEncode, then VeloxSampler (custom: trigflow sampler and schedule) with the reference's noise stream."""
    import comfy.sample

    import nodes
    from velox.host.sana_model import SANA_SCALE_FACTOR
    from velox.nodes.sampler_nodes import VeloxSampler

    model, vae = comfy_parts
    prompt, mask, image = inputs()
    with torch.no_grad():  # as ComfyUI runs nodes
        (latent,) = nodes.VAEEncode().encode(vae, image)
    stream = torch.Generator().manual_seed(SEED)
    monkeypatch.setattr(comfy.sample, "prepare_noise",
                        lambda latent_image, seed, batch_index=None: torch.randn(latent_image.shape, generator=stream))
    monkeypatch.setattr(trigflow, "cpu_noise_sampler",
                        lambda x, seed: lambda sigma, sigma_next: torch.randn(x.shape, generator=stream).to(x))
    conditioning = [[prompt, {"attention_mask": mask}]]
    out = VeloxSampler.execute(model, conditioning, conditioning, latent, "custom", SEED, steps, GUIDANCE,
                               trigflow.TRIGFLOW, trigflow.TRIGFLOW, 1.0, denoise)
    return out.result[0]["samples"] * SANA_SCALE_FACTOR  # VAE-space latents back to model space


def test_img2img_schedule_is_the_tail_diffusers_runs(comfy_host):
    from velox.host.sana_sprint import sprint_sigmas

    full = trigflow.trigflow_sigmas(4)
    assert torch.equal(sprint_sigmas(4, 0.5), full[2:])  # 2 of 4 steps
    assert torch.equal(sprint_sigmas(4, 0.6), full[1:])  # 2.4 steps round up to 3
    assert torch.equal(sprint_sigmas(2, 0.6), trigflow.trigflow_sigmas(2))  # diffusers' default: from pure noise
    assert torch.equal(sprint_sigmas(2, 0.5), trigflow.trigflow_sigmas(2)[1:])  # from t = 1.3
    assert torch.equal(sprint_sigmas(3, 1.0), trigflow.trigflow_sigmas(3))


@pytest.mark.parametrize("steps, strength", [(2, 0.5), (4, 0.5), (4, 0.75), (3, 0.4)])
def test_sprint_denoise_equals_diffusers_sana_sprint_img2img_pipeline(comfy_host, pipeline, comfy_parts, monkeypatch,
                                                                        steps, strength):
    expected = diffusers_img2img(pipeline, steps, strength)
    ours = velox_img2img(comfy_parts, monkeypatch, steps, strength)
    error = float((ours - expected).norm() / expected.norm())
    print(f"sprint img2img parity ({steps} steps, strength {strength}): relative L2 {error:.2e}")
    assert error <= PARITY_RTOL, f"relative L2 {error:.2e} ({steps} steps, strength {strength})"


def test_lower_denoise_keeps_more_of_the_input_image(comfy_parts, monkeypatch):
    import nodes

    _, vae = comfy_parts
    with torch.no_grad():
        (latent,) = nodes.VAEEncode().encode(vae, inputs()[2])
    from velox.host.sana_model import SANA_SCALE_FACTOR

    source = latent["samples"] * SANA_SCALE_FACTOR
    distance = [float((velox_img2img(comfy_parts, monkeypatch, 4, s) - source).norm()) for s in (0.25, 0.5, 1.0)]
    assert distance[0] < distance[1] < distance[2]
