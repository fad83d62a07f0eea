"""Sana ControlNet: the module against diffusers' SanaControlNetModel, and a whole sampling run with the
ControlNet applied by core's ControlNetApplyAdvanced against diffusers' SanaControlNetPipeline (fp32, tiny
configs), from the official and the diffusers layouts; chaining, start / end percent and bad inputs.

The reference pipeline gets the same prompt embeddings, initial latents and control image, and encodes the
control image with diffusers' AutoencoderDC holding the same tiny DC-AE weights as our native VAE.
"""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import (
    AutoencoderDC,
    FlowMatchEulerDiscreteScheduler,
    SanaControlNetModel,
    SanaControlNetPipeline,
    SanaTransformer2DModel,
)

from velox.errors import VeloxLoadError
from velox.loaders.sana_controlnet_keys import official_controlnet_to_diffusers, sniff_sana_controlnet
from velox.models.sana import SanaConfig, SanaTransformer
from velox.models.sana_controlnet import SanaControlNet
from velox.sampling.flow_schedules import flow_match_euler_sigmas
from velox.tiny.dcae import SANA_DCAE_SCALING_FACTOR, TINY_DCAE_CONFIG, make_dcae_state_dict
from velox.tiny.sana import diffusers_transformer_config, tiny_sana_state_dict
from velox.tiny.sana_controlnet import (
    controlnet_only,
    diffusers_controlnet_config,
    tiny_sana_controlnet_state_dict,
    write_diffusers_controlnet,
    write_official_controlnet,
)

CONFIG = SanaConfig(name="tiny", hidden_size=64, depth=3, num_heads=2, caption_channels=48)
COPIED = 2
SHIFT, GUIDANCE, STRENGTH, TOKENS, SIDE = 3.0, 4.5, 0.8, 12, 8  # SIDE: latent cells (256 px)
PARITY_RTOL = 1e-4  # relative L2 after a whole run, fp32
MODULE_RTOL = 1e-5


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def base_weights():
    return tiny_sana_state_dict(CONFIG, seed=3)


@pytest.fixture(scope="module")
def official_file():
    """What an official *_ControlNet_HED.pth holds: a base transformer plus the ControlNet."""
    return tiny_sana_controlnet_state_dict(CONFIG, COPIED, seed=7)


@pytest.fixture(scope="module")
def dcae_weights():
    return make_dcae_state_dict(TINY_DCAE_CONFIG, seed=0)


def inputs():
    g = torch.Generator().manual_seed(5)
    positive = torch.randn(1, TOKENS, CONFIG.caption_channels, generator=g)
    negative = torch.randn(1, TOKENS, CONFIG.caption_channels, generator=g)
    positive_mask = torch.ones(1, TOKENS, dtype=torch.long)
    positive_mask[:, 7:] = 0
    negative_mask = torch.ones(1, TOKENS, dtype=torch.long)
    negative_mask[:, 3:] = 0
    noise = torch.randn(1, 32, SIDE, SIDE, generator=g)
    image = torch.rand(1, SIDE * 32, SIDE * 32, 3, generator=g)  # ComfyUI IMAGE: (B, H, W, 3) in [0, 1]
    return positive, positive_mask, negative, negative_mask, noise, image


# --- the module and the key maps (no ComfyUI) ----------------------------------------------------------------


def _diffusers_controlnet(official_file) -> SanaControlNetModel:
    config = {k: v for k, v in diffusers_controlnet_config(CONFIG, COPIED).items() if not k.startswith("_")}
    model = SanaControlNetModel(**config).eval()
    model.load_state_dict(official_controlnet_to_diffusers(controlnet_only(official_file)), strict=True)
    return model


def test_official_and_diffusers_layouts_map_to_the_same_canonical_controlnet(official_file):
    config, canonical = sniff_sana_controlnet(official_file, "Sana_600M_1024px_ControlNet_HED.pth")
    from_diffusers = official_controlnet_to_diffusers(canonical)
    config_d, canonical_d = sniff_sana_controlnet(from_diffusers, "diffusion_pytorch_model.safetensors")
    assert (config.depth, config.hidden_size, config.qk_norm) == (COPIED, 64, False)
    assert config_d == config and canonical_d.keys() == canonical.keys()
    assert all(torch.equal(canonical[k], canonical_d[k]) for k in canonical)
    assert not any(k.startswith(("blocks.", "final_layer.")) for k in canonical)  # the base stays out


def test_controlnet_module_equals_diffusers_sana_controlnet_model(official_file):
    config, canonical = sniff_sana_controlnet(official_file)
    ours = SanaControlNet(**config.model_kwargs()).eval()
    ours.load_state_dict(canonical, strict=True)
    reference = _diffusers_controlnet(official_file)
    g = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 32, 6, 10, generator=g), torch.randn(2, 32, 6, 10, generator=g)
    context, mask = torch.randn(2, TOKENS, 48, generator=g), torch.ones(2, TOKENS)
    mask[0, 5:] = 0
    timesteps = torch.tensor([812.5, 250.0])
    with torch.no_grad():
        got = ours(x, hint, timesteps, context, mask, scale=0.7)
        want = reference(x, encoder_hidden_states=context, timestep=timesteps, controlnet_cond=hint,
                         conditioning_scale=0.7, encoder_attention_mask=mask, return_dict=False)[0]
    assert len(got) == len(want) == COPIED
    for ours_k, want_k in zip(got, want):
        assert relative_l2(ours_k, want_k) <= MODULE_RTOL


def test_official_controlnet_file_also_loads_as_its_base_transformer(official_file):
    from velox.loaders.sana_detect import sniff_sana

    config, state_dict = sniff_sana(official_file, "Sana_600M_1024px_ControlNet_HED.pth")
    assert config.depth == CONFIG.depth and not any(k.startswith("controlnet.") for k in state_dict)


@pytest.mark.parametrize("keys, looks_like", [
    ({"input_hint_block.0.weight": torch.zeros(1), "zero_convs.0.0.weight": torch.zeros(1)},
     "Stable Diffusion (UNet) ControlNet"),
    ({"controlnet_x_embedder.weight": torch.zeros(1), "controlnet_blocks.0.weight": torch.zeros(1)},
     "Flux ControlNet"),
    ({"controlnet_cond_embedding.conv_in.weight": torch.zeros(1)}, "diffusers UNet ControlNet"),
    ({"blocks.0.mlp.inverted_conv.conv.weight": torch.zeros(1)}, "Sana transformer without ControlNet blocks"),
])
def test_a_controlnet_of_another_family_is_refused_by_name(keys, looks_like):
    with pytest.raises(VeloxLoadError, match=re.escape(looks_like)) as error:
        sniff_sana_controlnet(keys, "other_controlnet.safetensors")
    assert str(error.value).startswith("other_controlnet.safetensors: looks like")


def test_residuals_of_another_family_are_refused_in_words(base_weights):
    from velox.loaders.sana_detect import sniff_sana

    config, state_dict = sniff_sana(base_weights)
    model = SanaTransformer.from_config(config).eval()
    model.load_state_dict(state_dict)
    x, context = torch.randn(1, 32, 4, 4), torch.randn(1, TOKENS, 48)
    unet_control = {"input": [], "middle": [torch.randn(1, 320, 4, 4)], "output": [torch.randn(1, 320, 4, 4)]}
    with pytest.raises(ValueError, match="another model family"):
        model(x, torch.tensor([500.0]), context, control=unet_control)
    wider = {"input": [torch.randn(1, 16, 96)], "middle": [], "output": []}
    with pytest.raises(ValueError, match=r"residuals of shape \[1, 16, 96\].*needs residuals of shape \[1, 16, 64\]"):
        model(x, torch.tensor([500.0]), context, control=wider)


def test_a_control_latent_of_the_wrong_vae_or_size_is_refused_in_words(official_file):
    config, canonical = sniff_sana_controlnet(official_file)
    model = SanaControlNet(**config.model_kwargs()).eval()
    model.load_state_dict(canonical)
    x, context = torch.randn(1, 32, 4, 4), torch.randn(1, TOKENS, 48)
    with pytest.raises(ValueError, match="needs 32 latent channels; encode the control image with Sana's DC-AE"):
        model(x, torch.randn(1, 4, 32, 32), torch.tensor([500.0]), context)  # an SD VAE latent
    with pytest.raises(ValueError, match="control latent is 6x4 but the latent being sampled is 4x4"):
        model(x, torch.randn(1, 32, 4, 6), torch.tensor([500.0]), context)


# --- a whole run on ComfyUI's engine, ControlNet applied by core's node ------------------------------------


@pytest.fixture(scope="module")
def pipeline(base_weights, official_file, dcae_weights):
    from velox.loaders.sana_keys import canonicalize_sana_state_dict, official_to_diffusers

    config = {k: v for k, v in diffusers_transformer_config(CONFIG).items() if not k.startswith("_")}
    transformer = SanaTransformer2DModel(**config).eval()
    transformer.load_state_dict(official_to_diffusers(canonicalize_sana_state_dict(base_weights)), strict=True)
    vae = AutoencoderDC(**TINY_DCAE_CONFIG.autoencoder_kwargs(), scaling_factor=SANA_DCAE_SCALING_FACTOR).eval()
    vae.load_state_dict(dcae_weights, strict=True)
    pipe = SanaControlNetPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                  controlnet=_diffusers_controlnet(official_file),
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_run(pipe, steps: int, strength: float = STRENGTH) -> torch.Tensor:
    positive, positive_mask, negative, negative_mask, noise, image = inputs()
    with torch.no_grad():
        return pipe(prompt_embeds=positive, prompt_attention_mask=positive_mask, negative_prompt=None,
                    negative_prompt_embeds=negative,
                    negative_prompt_attention_mask=negative_mask, control_image=image.movedim(-1, 1) * 2 - 1,
                    controlnet_conditioning_scale=strength, latents=noise.clone(), height=SIDE * 32,
                    width=SIDE * 32, num_inference_steps=steps, guidance_scale=GUIDANCE,
                    use_resolution_binning=False, output_type="latent", return_dict=False)[0]


@pytest.fixture(scope="module")
def controlnets(comfy_host, tmp_path_factory, official_file):
    """CONTROL_NETs loaded from each layout on disk, as the loader node reads them."""
    from velox.host.sana_controlnet import load_sana_controlnet

    root = tmp_path_factory.mktemp("sana_controlnet")
    official = write_official_controlnet(root / "Sana_600M_1024px_ControlNet_HED.pth", official_file)
    folder = write_diffusers_controlnet(root / "Sana_ControlNet_diffusers", CONFIG, official_file, COPIED)
    return {"official": load_sana_controlnet(official, dtype=torch.float32),
            "diffusers": load_sana_controlnet(folder, dtype=torch.float32)}


@pytest.fixture(scope="module")
def comfy_parts(comfy_host, base_weights, dcae_weights):
    from velox.host.dcae_vae import load_dcae_vae
    from velox.host.sana_model import build_sana_model

    return build_sana_model(dict(base_weights), dtype=torch.float32), load_dcae_vae(dcae_weights, dtype=torch.float32)


def velox_run(comfy_parts, steps: int, applied: list[tuple], image: torch.Tensor | None = None) -> torch.Tensor:
    """``applied``: (CONTROL_NET, strength, start, end) per core Apply ControlNet node, chained in order."""
    import comfy.sample

    import nodes
    from velox.host.sampling import sampler_object
    from velox.host.sana_model import SANA_SCALE_FACTOR

    model, vae = comfy_parts
    positive, positive_mask, negative, negative_mask, noise, default_image = inputs()
    cond = [[positive, {"attention_mask": positive_mask}]]
    uncond = [[negative, {"attention_mask": negative_mask}]]
    for control, strength, start, end in applied:
        cond, uncond = nodes.ControlNetApplyAdvanced().apply_controlnet(
            cond, uncond, control, default_image if image is None else image, strength, start, end, vae=vae)
    samples = comfy.sample.sample_custom(
        model, noise, GUIDANCE, sampler_object("euler"), flow_match_euler_sigmas(steps, SHIFT), cond, uncond,
        torch.zeros_like(noise), disable_pbar=True, seed=0)
    return samples * SANA_SCALE_FACTOR  # ComfyUI hands back VAE-space latents; diffusers keeps model space


@pytest.mark.parametrize("layout", ["official", "diffusers"])
@pytest.mark.parametrize("steps", [1, 4])
def test_controlnet_through_core_apply_equals_diffusers_sana_controlnet_pipeline(
        pipeline, controlnets, comfy_parts, layout, steps):
    expected = diffusers_run(pipeline, steps)
    ours = velox_run(comfy_parts, steps, [(controlnets[layout], STRENGTH, 0.0, 1.0)])
    error = relative_l2(ours, expected)
    print(f"controlnet parity ({layout}, {steps} steps): relative L2 {error:.2e}")
    assert error <= PARITY_RTOL, f"relative L2 {error:.2e} after {steps} steps ({layout} layout)"
    assert relative_l2(diffusers_run(pipeline, steps, strength=0.0), expected) > 1e-3, "the control must matter"


def test_two_chained_controlnets_add_their_residuals(controlnets, comfy_parts):
    """Residuals are linear in the strength and chained ones sum: two at 0.4 equal one at 0.8."""
    single = velox_run(comfy_parts, 2, [(controlnets["official"], STRENGTH, 0.0, 1.0)])
    chained = velox_run(comfy_parts, 2, [(controlnets["official"], STRENGTH / 2, 0.0, 1.0),
                                         (controlnets["diffusers"], STRENGTH / 2, 0.0, 1.0)])
    assert relative_l2(chained, single) <= PARITY_RTOL


def test_start_and_end_percent_gate_the_control(controlnets, comfy_parts):
    """Core's percent range on flow sigmas: from 100 % on, no step is controlled; 0-50 % controls some."""
    plain = velox_run(comfy_parts, 4, [])
    never = velox_run(comfy_parts, 4, [(controlnets["official"], STRENGTH, 1.0, 1.0)])
    first_half = velox_run(comfy_parts, 4, [(controlnets["official"], STRENGTH, 0.0, 0.5)])
    full = velox_run(comfy_parts, 4, [(controlnets["official"], STRENGTH, 0.0, 1.0)])
    assert relative_l2(never, plain) == 0.0
    assert relative_l2(first_half, plain) > 1e-3 and relative_l2(first_half, full) > 1e-4


def test_a_control_image_of_another_aspect_ratio_is_refused_in_words(controlnets, comfy_parts):
    wide = torch.rand(1, SIDE * 32, SIDE * 48, 3)
    with pytest.raises(ValueError, match=r"control image is 384x256 but the image being generated is 256x256"):
        velox_run(comfy_parts, 1, [(controlnets["official"], STRENGTH, 0.0, 1.0)], image=wide)
    half_size = torch.rand(1, SIDE * 16, SIDE * 16, 3)  # same aspect ratio: core scales it, as for any ControlNet
    velox_run(comfy_parts, 1, [(controlnets["official"], STRENGTH, 0.0, 1.0)], image=half_size)


def test_a_sana_controlnet_of_another_width_is_refused_in_words(comfy_host, comfy_parts):
    import dataclasses

    from velox.host.sana_controlnet import build_sana_controlnet

    wider = dataclasses.replace(CONFIG, hidden_size=96, num_heads=3)
    control = build_sana_controlnet(tiny_sana_controlnet_state_dict(wider, COPIED, seed=1, with_base=False),
                                    path="Sana_1600M_ControlNet.pth", dtype=torch.float32)
    with pytest.raises(ValueError, match="trained for a Sana transformer of width 96, but the model is 64 wide"):
        velox_run(comfy_parts, 1, [(control, STRENGTH, 0.0, 1.0)])
