"""Velox's SANA-Video transformer against diffusers' SanaVideoTransformer3DModel and SanaVideoPipeline.

Tiny configs of the real architecture (480p-style: 2 heads of 112 on 2x2 patches of a 16-channel
latent; 720p-style: 32-channel heads on 1x1 patches of a 128-channel latent; one without q/k norm),
fp32 on the CPU, one text mask with padding in one batch element, odd latent frame counts.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from velox.loaders.sana_video_keys import (
    canonicalize_sana_video_state_dict,
    config_from_diffusers,
    detect_sana_video,
    diffusers_config,
    sana_video_official_to_diffusers,
)
from velox.models.sana_video import (
    SANA_VIDEO_PRESETS,
    SanaVideoConfig,
    SanaVideoTransformer,
    rope_axis_dims,
)
from velox.sampling.flow_dpm_solver import sample_flow_dpm_solver
from velox.sampling.flow_schedules import flow_dpm_solver_sigmas, flow_match_euler_sigmas

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaImageToVideoPipeline,
    SanaTransformer2DModel,
    SanaVideoPipeline,
    SanaVideoTransformer3DModel,
    WanTransformer3DModel,
)

PARITY_RTOL = 1e-5  # relative L2, fp32, one forward
LOOP_RTOL = 1e-4  # relative L2, fp32, a whole sampling run
TOKENS = 7
TINY_CONFIGS = {
    "480p_style": SanaVideoConfig(hidden_size=224, depth=2, num_heads=2, linear_head_dim=112, caption_channels=40,
                                  name="tiny_480p_style"),
    "720p_style": SanaVideoConfig(hidden_size=64, depth=2, num_heads=2, linear_head_dim=32, in_channels=128,
                                  out_channels=128, caption_channels=24, patch_size=(1, 1, 1), sample_size=22,
                                  vae="ltx2", name="tiny_720p_style"),
    "no_qk_norm": SanaVideoConfig(hidden_size=96, depth=3, num_heads=3, linear_head_dim=32, caption_channels=40,
                                  mlp_ratio=2.5, qk_norm=False, cross_norm=False, name="tiny_no_qk_norm"),
}


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norm weights around 1), so that a wrong key or a transposed map shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2 and not name.endswith("scale_shift_table"):
                param.copy_(noise / param[0].numel() ** 0.5)
            elif "norm" in name:
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
    return model


def diffusers_model(config: SanaVideoConfig, seed: int = 0) -> SanaVideoTransformer3DModel:
    kwargs = {k: v for k, v in diffusers_config(config).items() if not k.startswith("_")}
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    return randomize_(SanaVideoTransformer3DModel(**kwargs), seed).eval()


def ours_from_diffusers(config: SanaVideoConfig, reference: SanaVideoTransformer3DModel) -> SanaVideoTransformer:
    model = SanaVideoTransformer.from_config(config).eval()
    model.load_state_dict(canonicalize_sana_video_state_dict(reference.state_dict()), strict=True)
    return model


def make_inputs(config: SanaVideoConfig, frames: int, height: int = 4, width: int = 6, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, frames, height, width, generator=generator)
    context = torch.randn(2, TOKENS, config.caption_channels, generator=generator)
    mask = torch.ones(2, TOKENS)
    mask[1, 4:] = 0  # the second prompt is shorter: three padded tokens
    return x, context, mask


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def pair(request):
    config = TINY_CONFIGS[request.param]
    reference = diffusers_model(config, seed=len(request.param))
    return config, reference, ours_from_diffusers(config, reference)


@pytest.mark.parametrize("frames", [1, 3, 5])
def test_transformer_matches_diffusers_on_odd_frame_counts(pair, frames):
    config, reference, ours = pair
    x, context, mask = make_inputs(config, frames)
    timesteps = torch.tensor([412.75, 873.5])  # sigma * 1000, deliberately fractional
    with torch.no_grad():
        want = reference(x, context, timesteps, encoder_attention_mask=mask).sample
        got = ours(x, timesteps, context, context_mask=mask)
    assert got.shape == want.shape == (2, config.out_channels, frames, 4, 6)
    assert relative_l2(got, want) <= PARITY_RTOL


def test_image_to_video_frame_timesteps_match_diffusers_token_timesteps(pair):
    """SanaImageToVideoPipeline runs the conditioning frame at t = 0 through a per-token timestep
    ``t * (1 - mask)``; ours takes the same as one timestep per latent frame."""
    config, reference, ours = pair
    x, context, mask = make_inputs(config, frames=5)
    B, _, T, H, W = x.shape
    pt, ph, pw = config.patch_size
    conditioning = torch.zeros(B, 1, T // pt, H // ph, W // pw)
    conditioning[:, :, 0] = 1.0
    t = torch.tensor(731.25)
    token_timesteps = t.expand(conditioning.shape) * (1 - conditioning)  # as the I2V pipeline
    frame_timesteps = token_timesteps[:, 0, :, 0, 0]  # (B, frames): [0, t, t, t, t]
    with torch.no_grad():
        want = reference(x, context, token_timesteps, encoder_attention_mask=mask).sample
        got = ours(x, frame_timesteps, context, context_mask=mask)
        uniform = ours(x, t.expand(B), context, context_mask=mask)
    assert relative_l2(got, want) <= PARITY_RTOL
    assert relative_l2(uniform, want) > 1e-3  # the conditioning frame's timestep does matter


def test_official_layout_round_trips_and_drops_training_tensors(pair):
    config, reference, ours = pair
    canonical = canonicalize_sana_video_state_dict(reference.state_dict())
    official_file = {k: (v[:, :, None, None] if k.endswith(("inverted_conv.conv.weight", "point_conv.conv.weight"))
                         else v) for k, v in canonical.items()}  # the .pth keeps 4-D 1x1 convs
    official_file.update({"pos_embed": torch.zeros(1, 4, config.hidden_size),
                          "y_embedder.y_embedding": torch.zeros(300, config.caption_channels),
                          "logvar_linear.weight": torch.zeros(1, config.hidden_size)})
    prefixed = {"model.diffusion_model." + k: v for k, v in official_file.items()}
    again = canonicalize_sana_video_state_dict(prefixed)
    assert again.keys() == canonical.keys() == ours.state_dict().keys()
    assert all(torch.equal(again[k], canonical[k]) for k in canonical)
    back = sana_video_official_to_diffusers(canonical)
    want = reference.state_dict()
    assert back.keys() == want.keys()
    assert all(torch.equal(back[k], want[k]) for k in want)


def test_detector_recovers_the_config_from_every_layout(pair):
    config, reference, _ = pair
    expected = dataclasses.replace(config, name="custom", flow_shift=8.0)
    diffusers_weights = reference.state_dict()
    canonical = canonicalize_sana_video_state_dict(diffusers_weights)
    assert detect_sana_video(diffusers_weights) == expected
    assert detect_sana_video(canonical) == expected
    header_shapes = {"model.diffusion_model." + k: tuple(v.shape) for k, v in canonical.items()}
    assert detect_sana_video(header_shapes) == expected
    assert detect_sana_video(list(canonical)) is None  # names alone cannot give widths
    folder_config = {**diffusers_config(config), "num_cross_attention_heads": 1}  # heads come from config.json
    assert config_from_diffusers(folder_config, expected) == dataclasses.replace(expected, num_heads=1)


@pytest.mark.parametrize("preset", list(SANA_VIDEO_PRESETS))
def test_detector_names_the_release_presets(preset):
    config = SANA_VIDEO_PRESETS[preset]
    official = SanaVideoTransformer.from_config(config, device="meta").state_dict()
    assert detect_sana_video(official) == config
    assert detect_sana_video(sana_video_official_to_diffusers(official)) == config
    assert rope_axis_dims(config.linear_head_dim) == (40, 36, 36)  # diffusers' t / h / w split of 112


def test_detector_rejects_image_sana_and_wan():
    sana = SanaTransformer2DModel(
        in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64, caption_channels=40,
        sample_size=8, patch_size=1, qk_norm="rms_norm_across_heads",
    ).state_dict()
    wan = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
    ).state_dict()
    wan_official = {"patch_embedding.weight": (32, 16, 1, 2, 2), "blocks.0.self_attn.q.weight": (32, 32),
                    "blocks.0.ffn.0.weight": (64, 32), "head.head.weight": (64, 32),
                    "text_embedding.0.weight": (32, 32)}
    sana_official = {"x_embedder.proj.weight": (64, 32, 1, 1), "blocks.0.attn.qkv.weight": (192, 64),
                     "blocks.0.mlp.inverted_conv.conv.weight": (320, 64, 1, 1),
                     "final_layer.linear.weight": (32, 64), "y_embedder.y_proj.fc1.weight": (64, 40)}
    for foreign in (sana, wan, wan_official, sana_official):
        assert detect_sana_video(foreign) is None


def test_flow_dpm_solver_run_matches_sana_video_pipeline():
    """Four Flow-DPM-Solver steps with CFG 6 and shift 8 (the release's scheduler): ours through Velox's
    sampler vs SanaVideoPipeline on the same latents and prompt embeddings. DPMSolverMultistepScheduler
    hands the transformer int64 timesteps (floor of sigma * 1000), so the loop does too."""
    config = TINY_CONFIGS["720p_style"]
    reference = diffusers_model(config, seed=11)
    ours = ours_from_diffusers(config, reference)
    latents, context, mask = make_inputs(config, frames=3, seed=5)
    latents = latents[:1]
    cond, uncond = context[:1], context[1:]
    cond_mask, uncond_mask = mask[:1], mask[1:]
    steps, shift, guidance = 4, 8.0, 6.0

    scheduler = DPMSolverMultistepScheduler(flow_shift=shift, use_flow_sigmas=True, prediction_type="flow_prediction")
    pipe = SanaVideoPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=reference, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(
        prompt_embeds=cond, prompt_attention_mask=cond_mask, negative_prompt=None, negative_prompt_embeds=uncond,
        negative_prompt_attention_mask=uncond_mask, latents=latents.clone(), num_inference_steps=steps,
        guidance_scale=guidance, height=32, width=32, output_type="latent", use_resolution_binning=False,
    ).frames

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        timestep = (sigma.double() * 1000).floor()  # the scheduler's int64 timesteps, as the official .long()
        both = ours(torch.cat([x, x]), torch.cat([timestep, timestep]), context.flip(0), context_mask=mask.flip(0))
        uncond_v, cond_v = both.chunk(2)
        velocity = uncond_v + guidance * (cond_v - uncond_v)
        return x - sigma.view(-1, 1, 1, 1, 1) * velocity  # flow: x0 = x - sigma * v

    got = sample_flow_dpm_solver(denoise, latents.clone(), flow_dpm_solver_sigmas(steps, shift))
    assert relative_l2(got, want) <= LOOP_RTOL


def test_image_to_video_euler_run_matches_sana_image_to_video_pipeline():
    """Three flow-Euler steps (the I2V conversion's scheduler) with CFG: the Wan-VAE latent of the image,
    normalised by the VAE's latents_mean / latents_std, replaces latent frame 0, which runs at t = 0
    and is never stepped; ours vs SanaImageToVideoPipeline on the same noise."""
    config = TINY_CONFIGS["480p_style"]
    reference = diffusers_model(config, seed=13)
    ours = ours_from_diffusers(config, reference)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
    generator = torch.Generator().manual_seed(7)
    image = torch.rand(1, 3, 32, 64, generator=generator)  # [0, 1]; 9 frames of 32 x 64 -> latent 3 x 4 x 8
    noise = torch.randn(1, config.in_channels, 3, 4, 8, generator=generator)
    _, context, mask = make_inputs(config, frames=1, seed=9)
    steps, shift, guidance = 3, 8.0, 6.0

    pipe = SanaImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=reference,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe(
            image=image, prompt_embeds=context[:1], prompt_attention_mask=mask[:1], negative_prompt=None,
            negative_prompt_embeds=context[1:], negative_prompt_attention_mask=mask[1:], latents=noise.clone(),
            num_inference_steps=steps, guidance_scale=guidance, height=32, width=64, frames=9,
            output_type="latent", use_resolution_binning=False,
        ).frames

        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        image_latent = (vae.encode((image * 2 - 1)[:, :, None]).latent_dist.mode() - mean) * inverse_std
        x = torch.cat([image_latent, noise[:, :, 1:]], dim=2)
        sigmas = flow_match_euler_sigmas(steps, shift)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            frame_t = torch.full((2, 3), float(sigma * 1000))
            frame_t[:, 0] = 0  # the conditioning frame is clean
            both = ours(torch.cat([x, x]), frame_t, context.flip(0), context_mask=mask.flip(0))
            uncond_v, cond_v = both.chunk(2)
            velocity = uncond_v + guidance * (cond_v - uncond_v)
            x = torch.cat([x[:, :, :1], x[:, :, 1:] + (sigma_next - sigma) * velocity[:, :, 1:]], dim=2)
    assert relative_l2(x, want) <= LOOP_RTOL
    assert torch.equal(x[:, :, 0], want[:, :, 0])


def test_block_replace_hook_sees_every_block_and_latent_must_fit_the_patches(pair):
    """ComfyUI's ``patches_replace["dit"][("double_block", i)]`` wraps block i; a pass-through patch
    changes nothing. A latent whose height is not a multiple of the patch is refused in words."""
    config, _, ours = pair
    x, context, mask = make_inputs(config, frames=3)
    seen = []

    def passthrough(args, extra):
        seen.append(args["img"].shape)
        return extra["original_block"](args)

    patches = {("double_block", i): passthrough for i in range(config.depth)}
    options = {"patches_replace": {"dit": patches}}
    with torch.no_grad():
        plain = ours(x, torch.tensor([500.0, 20.5]), context, context_mask=mask)
        hooked = ours(x, torch.tensor([500.0, 20.5]), context, context_mask=mask, transformer_options=options)
    assert torch.equal(plain, hooked) and len(seen) == config.depth
    if config.patch_size[1] > 1:
        with pytest.raises(ValueError, match="multiple of the patch size"):
            ours(x[:, :, :, :3], torch.tensor([500.0, 20.5]), context)
