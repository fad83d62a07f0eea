"""VideoCrafter / DynamiCrafter in ComfyUI on the CPU: loading a whole release file, sampling, decoding.

Tiny release files (``tiny.videocrafter.demo_release_state_dict``) in the official ``model.ckpt``
layout. The node's sampler must equal a direct ``sample_ddim`` run over the same UNet (whose loop is
checked against lvdm in test_videocrafter_ddim); core's SamplerCustom path with our SAMPLER must agree
with it; core's CLIP / CLIP vision built from the file must give lvdm's OpenCLIP outputs (written out
here, open_clip is not installed); bad inputs must fail with clear messages.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def release_files(tmp_path_factory, comfy_host):
    from demo_models_videocrafter import write_release_ckpt

    folder = tmp_path_factory.mktemp("vc")
    return {"vc2": write_release_ckpt(folder / "videocrafter2_t2v.ckpt", "vc2", 0),
            "dc512": write_release_ckpt(folder / "dynamicrafter_512.ckpt", "dc512", 1)}


@pytest.fixture(scope="module")
def loaded(release_files):
    """Each release loaded once: {kind: (MODEL, CLIP, VAE, CLIP_VISION, variant)}."""
    from velox.host.videocrafter_loading import load_videocrafter_checkpoint

    return {kind: load_videocrafter_checkpoint(path, dtype=torch.float32) for kind, path in release_files.items()}


def _conditioning(clip, text):
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def test_vc2_release_loads_and_samples(loaded):
    from velox.host.videocrafter_sampling import resolve_settings, sample_videocrafter

    model, clip, vae, vision, variant = loaded["vc2"]
    assert variant.key == "vc2" and vision is None
    positive, negative = _conditioning(clip, "a corgi running"), _conditioning(clip, "")
    latent = {"samples": torch.zeros(1, 4, 4, 4, 4)}  # 4 frames: VideoCrafter takes 1..32
    settings = resolve_settings(variant, 2, 0.0, 1.0, 0, -1.0, "release")
    assert settings.cfg == 12.0 and settings.fps == 28
    first = sample_videocrafter(model, positive, negative, latent, 7, settings)["samples"]
    again = sample_videocrafter(model, positive, negative, latent, 7, settings)["samples"]
    assert first.shape == (1, 4, 4, 4, 4) and torch.isfinite(first).all()
    assert torch.equal(first, again)
    frames = vae.decode(first.transpose(1, 2).flatten(0, 1))
    assert frames.shape == (4, 32, 32, 3)
    deterministic = resolve_settings(variant, 2, 0.0, 0.0, 0, -1.0, "release")
    got = sample_videocrafter(model, positive, negative, latent, 3, deterministic)["samples"]
    want = _direct_ddim(model, variant, positive, negative, latent, 3, deterministic)
    assert ((got - want).norm() / want.norm()).item() < 1e-5  # batched cond/uncond vs two calls
    no_cfg = resolve_settings(variant, 2, 1.0, 0.0, 0, -1.0, "release")  # CFG 1: one pass per step
    got = sample_videocrafter(model, positive, negative, latent, 3, no_cfg)["samples"]
    want = _direct_ddim(model, variant, positive, negative, latent, 3, no_cfg)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def _direct_ddim(model, variant, positive, negative, latent, seed, settings):
    """The same run written out: the pure-torch sampler over the UNet, no host code."""
    import comfy.sample

    from velox.sampling.videocrafter_ddim import guided_output, make_plan, sample_ddim

    unet = model.model.diffusion_model
    cond, uncond = positive[0][0][:, :77], negative[0][0][:, :77]
    fps = torch.tensor([settings.fps])

    def model_fn(x, t):
        c = unet(x, t, cond, fps=fps)
        u = unet(x, t, uncond, fps=fps)
        return guided_output(c, u, settings.cfg, settings.guidance_rescale)

    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    with torch.no_grad():
        x = sample_ddim(model_fn, noise, make_plan(variant.schedule, settings.steps, 0.0, settings.spacing))
    return x / 0.18215


def test_dynamicrafter_release_needs_an_image_and_16_frames(loaded):
    from velox.host.videocrafter_sampling import resolve_settings, sample_videocrafter
    from velox.nodes.videocrafter_nodes import DynamiCrafterConditioning

    model, clip, vae, vision, variant = loaded["dc512"]
    assert variant.key == "dc512" and vision is not None
    positive, negative = _conditioning(clip, "waves"), _conditioning(clip, "")
    settings = resolve_settings(variant, 2, 0.0, 1.0, 0, -1.0, "release")
    assert (settings.cfg, settings.fps, settings.guidance_rescale, settings.spacing) == (
        7.5, 24, 0.7, "uniform_trailing")
    latent = {"samples": torch.zeros(1, 4, 16, 4, 4)}
    with pytest.raises(ValueError, match="start image"):
        sample_videocrafter(model, positive, negative, latent, 0, settings)
    with pytest.raises(ValueError, match="cannot make 8 frames"):
        sample_videocrafter(model, positive, negative, {"samples": torch.zeros(1, 4, 8, 4, 4)}, 0, settings)
    image = torch.rand(1, 40, 48, 3)
    pos, neg = DynamiCrafterConditioning.execute(positive, negative, vision, vae, image, 32, 32).args
    out = sample_videocrafter(model, pos, neg, latent, 0, settings)["samples"]
    assert out.shape == (1, 4, 16, 4, 4) and torch.isfinite(out).all()


def test_loader_refuses_foreign_and_corrupt_files(tmp_path, comfy_host):
    from safetensors.torch import save_file

    from velox.errors import VeloxLoadError
    from velox.host.videocrafter_loading import load_videocrafter_checkpoint

    wan = tmp_path / "wan.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2), "head.modulation": torch.zeros(1, 2, 2)}, wan)
    with pytest.raises(VeloxLoadError, match="Wan transformer"):
        load_videocrafter_checkpoint(wan)
    sana = tmp_path / "sana.safetensors"
    save_file({"blocks.0.mlp.inverted_conv.conv.weight": torch.zeros(2, 2)}, sana)
    with pytest.raises(VeloxLoadError, match="Sana transformer"):
        load_videocrafter_checkpoint(sana)
    corrupt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(8)}}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    with pytest.raises(VeloxLoadError, match="corrupt"):
        load_videocrafter_checkpoint(corrupt)


@pytest.mark.parametrize(("core_zero_snr_table", "tolerance"), [(False, 5e-3), (True, 1e-4)])
def test_core_custom_sampling_with_the_ddim_sampler_matches_the_reference_sampler(
        loaded, monkeypatch, core_zero_snr_table, tolerance):
    """SamplerCustom's path (core CFG guider + VeloxVideoCrafterDDIM + VeloxVideoCrafterSigmas) against the
    exact sampler on DynamiCrafter 512 (v, zero SNR, trailing, base_scale 0.7), guidance rescale off.
    The whole gap is ComfyUI's zero-SNR table (alpha_bar_999 = 4.9e-8 where lvdm has 0): give the exact
    sampler core's value and the two agree to float32 rounding."""
    import comfy.sample
    import comfy.samplers

    from velox.host.videocrafter_ksampler import sample_videocrafter_ddim, videocrafter_sigmas
    from velox.host.videocrafter_sampling import resolve_settings, sample_videocrafter
    from velox.nodes.videocrafter_nodes import DynamiCrafterConditioning

    if core_zero_snr_table:
        import velox.sampling.videocrafter_ddim as ddim

        lvdm_table = ddim.alphas_cumprod

        def core_table(schedule):
            table = lvdm_table(schedule).copy()
            table[-1] = 4.8973451890853435e-08 if schedule.zero_terminal_snr else table[-1]
            return table

        monkeypatch.setattr(ddim, "alphas_cumprod", core_table)
    model, clip, vae, vision, variant = loaded["dc512"]
    positive, negative = _conditioning(clip, "waves"), _conditioning(clip, "")
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    pos, neg = DynamiCrafterConditioning.execute(positive, negative, vision, vae, image, 32, 32).args
    latent = {"samples": torch.zeros(1, 4, 16, 4, 4)}
    settings = resolve_settings(variant, 3, 0.0, 0.0, 0, 0.0, "release")
    want = sample_videocrafter(model, pos, neg, latent, 5, settings)["samples"]
    noise = comfy.sample.prepare_noise(latent["samples"], 5)
    sampler = comfy.samplers.KSAMPLER(sample_videocrafter_ddim, extra_options={"eta": 0.0})
    sigmas = videocrafter_sigmas(model, 3, "uniform_trailing")
    got = comfy.sample.sample_custom(model, noise, 7.5, sampler, sigmas, pos, neg, latent["samples"],
                                     disable_pbar=True, seed=5)  # already process_latent_out'ed
    assert ((got - want).norm() / want.norm()).item() < tolerance


def test_interpolation_concat_has_start_and_end_latents_only(comfy_host):
    from types import SimpleNamespace

    from velox.host.videocrafter_sampling import concat_latent

    base = SimpleNamespace(process_latent_in=lambda x: x * 0.18215)
    start, end = torch.ones(1, 4, 2, 3), 2 * torch.ones(1, 4, 2, 3)
    image_to_video = concat_latent(base, {"videocrafter_image_latent": start}, 16, (2, 3))
    assert image_to_video.shape == (1, 4, 16, 2, 3)
    assert torch.allclose(image_to_video, torch.full_like(image_to_video, 0.18215))
    interp = concat_latent(base, {"videocrafter_image_latent": start, "videocrafter_end_latent": end}, 16, (2, 3))
    assert torch.allclose(interp[:, :, 0], start * 0.18215) and torch.allclose(interp[:, :, -1], end * 0.18215)
    assert interp[:, :, 1:-1].abs().sum() == 0
    with pytest.raises(ValueError, match="encode the image at the video's size"):
        concat_latent(base, {"videocrafter_image_latent": start}, 16, (4, 4))


def _openclip_visual_tokens(sd: dict, pixels: torch.Tensor, layers: int, heads: int) -> torch.Tensor:
    """lvdm's FrozenOpenCLIPImageEmbedderV2.encode_with_vision_transformer on already-normalised pixels:
    patches + class token + positions, ln_pre, OpenCLIP residual blocks; no ln_post (written out here
    from open_clip's VisionTransformer / ResidualAttentionBlock, which are not installed)."""
    import torch.nn.functional as F

    p = "embedder.model.visual."
    w = {k[len(p):]: v.float() for k, v in sd.items() if k.startswith(p)}
    x = F.conv2d(pixels, w["conv1.weight"], stride=w["conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([w["class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + w["positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], w["ln_pre.weight"], w["ln_pre.bias"])
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        b = {k[len(block):]: v for k, v in w.items() if k.startswith(block)}
        h = F.layer_norm(x, x.shape[-1:], b["ln_1.weight"], b["ln_1.bias"]).transpose(0, 1)
        h, _ = F.multi_head_attention_forward(h, h, h, x.shape[-1], heads, b["attn.in_proj_weight"],
                                              b["attn.in_proj_bias"], None, None, False, 0.0,
                                              b["attn.out_proj.weight"], b["attn.out_proj.bias"], need_weights=False)
        x = x + h.transpose(0, 1)
        h = F.layer_norm(x, x.shape[-1:], b["ln_2.weight"], b["ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, b["mlp.c_fc.weight"], b["mlp.c_fc.bias"])),
                         b["mlp.c_proj.weight"], b["mlp.c_proj.bias"])
    return x


def test_clip_vision_tokens_are_the_references_pre_ln_post_states(release_files, loaded):
    """Core's CLIP vision, built from ``embedder.model.visual.*``, returns what lvdm's image embedder returns
    (all blocks, before ln_post) for the same normalised 224x224 pixels."""
    import comfy.clip_vision

    from velox.loaders.checkpoint_files import load_state_dict

    vision = loaded["dc512"][3]
    sd = load_state_dict(release_files["dc512"])
    image = torch.rand(1, 224, 224, 3, generator=torch.Generator().manual_seed(1))
    got = vision.encode_image(image, crop=False)["last_hidden_state"].float()
    pixels = comfy.clip_vision.clip_preprocess(image, size=224, crop=False).float()
    want = _openclip_visual_tokens(sd, pixels, layers=2, heads=1)
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_clip_text_is_the_references_penultimate_layer(release_files, loaded):
    """Core's SD2 CLIP on ``cond_stage_model.model.*`` returns lvdm's FrozenOpenCLIPEmbedder output: token +
    position embeddings, all blocks but the last (causal mask), then ln_final ("penultimate")."""
    import torch.nn.functional as F

    from velox.loaders.checkpoint_files import load_state_dict

    clip = loaded["vc2"][1]
    tokens = clip.tokenize("a corgi running on the beach")
    got = clip.encode_from_tokens(tokens).float()
    ids = torch.tensor([[t[0] for t in tokens["h"][0]]])
    p = "cond_stage_model.model."
    w = {k[len(p):]: v.float() for k, v in load_state_dict(release_files["vc2"]).items() if k.startswith(p)}
    x = w["token_embedding.weight"][ids] + w["positional_embedding"]
    causal = torch.full((77, 77), float("-inf")).triu(1)
    for i in range(3 - 1):
        block = f"transformer.resblocks.{i}."
        b = {k[len(block):]: v for k, v in w.items() if k.startswith(block)}
        h = F.layer_norm(x, x.shape[-1:], b["ln_1.weight"], b["ln_1.bias"]).transpose(0, 1)
        h, _ = F.multi_head_attention_forward(h, h, h, x.shape[-1], 1, b["attn.in_proj_weight"],
                                              b["attn.in_proj_bias"], None, None, False, 0.0,
                                              b["attn.out_proj.weight"], b["attn.out_proj.bias"],
                                              need_weights=False, attn_mask=causal)
        x = x + h.transpose(0, 1)
        h = F.layer_norm(x, x.shape[-1:], b["ln_2.weight"], b["ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, b["mlp.c_fc.weight"], b["mlp.c_fc.bias"])),
                         b["mlp.c_proj.weight"], b["mlp.c_proj.bias"])
    want = F.layer_norm(x, x.shape[-1:], w["ln_final.weight"], w["ln_final.bias"])
    assert got.shape == want.shape == (1, 77, 64)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
