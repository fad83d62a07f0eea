"""SANA-Video through Velox's nodes in ComfyUI against diffusers (fp32, CPU, tiny configs).

- the loader node reads every layout users have (official .pth / safetensors, ComfyUI prefix, diffusers
  file, folder, sharded folder, Hugging Face cache) into the same model as diffusers'
  ``SanaVideoTransformer3DModel`` and refuses a Wan or an image-Sana file in words;
- a whole run on the node path (SANA-Video Text Encode + Sana Text Encode for the negative, the empty or
  image-to-video latent, the Velox Sampler, real Gemma tokenization) equals diffusers'
  ``SanaVideoPipeline`` / ``SanaImageToVideoPipeline`` given the same prompts and starting latents;
- the same for the 720p variant on the LTX-2 VAE (128 channels, 8 x 32 x 32): core's EmptyLTXVLatentVideo
  or the image-to-video node with the LTX-2 VAE connected, the Velox Sampler, core's VAEDecode, against
  the pipelines handed diffusers' AutoencoderKLLTX2Video, down to the decoded frames.

ComfyUI starts sampling from ``sigma_0 * noise + (1 - sigma_0) * latent`` (core's flow noise scaling;
diffusers starts from the latents it is handed), so the diffusers run is handed exactly that.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from velox.errors import VeloxLoadError
from velox.loaders.sana_video_keys import (
    canonicalize_sana_video_state_dict,
    diffusers_config,
    sana_video_official_to_diffusers,
)
from velox.tiny import sana_video as tiny

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKLWan,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaImageToVideoPipeline,
    SanaVideoPipeline,
    SanaVideoTransformer3DModel,
)

PARITY_RTOL = 1e-5  # relative L2, fp32, one forward
LOOP_RTOL = 1e-4  # relative L2, fp32, a whole sampling run
SHIFT, GUIDANCE, MOTION = 8.0, 6.0, 30
PROMPT = "a small fluffy white cat sleeping on a windowsill"  # lower case and stripped: diffusers' cleaning is a no-op
NEGATIVE = "blurry, low quality, extra fingers"
LAYOUTS = ("official_pth", "official_safetensors", "comfyui_prefixed", "diffusers_file", "diffusers_folder",
           "diffusers_sharded", "hf_cache")


def relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(scope="module")
def tiny_model(comfy_host):
    from velox.tiny.gemma import TINY_GEMMA_HIDDEN

    config = tiny.tiny_sana_video_config(TINY_GEMMA_HIDDEN)
    weights = tiny.tiny_sana_video_state_dict(config, seed=4)
    kwargs = {k: v for k, v in diffusers_config(config).items() if not k.startswith("_")}
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    reference = SanaVideoTransformer3DModel(**kwargs).eval()
    reference.load_state_dict(sana_video_official_to_diffusers(canonicalize_sana_video_state_dict(weights)))
    return config, weights, reference


@pytest.fixture(scope="module")
def models_dir(tiny_model, tmp_path_factory):
    """Every layout, a Wan and an image-Sana file, registered as ComfyUI's diffusion_models folder."""
    import folder_paths

    from velox.models.sana import SanaConfig
    from velox.tiny.sana import tiny_sana_state_dict, write_official_pth
    from velox.tiny.wan import TINY_WAN_CONFIGS, tiny_wan_state_dict, write_hf_cache_repo, write_official_file

    config, weights, _ = tiny_model
    root = tmp_path_factory.mktemp("sana_video_models")
    models = root / "diffusion_models"
    tiny.write_official(models / "SANA_Video_2B_480p.pth", weights)
    tiny.write_official(models / "sana_video_official.safetensors", weights)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in weights.items()},
              str(models / "sana_video_comfyui.safetensors"))
    tiny.write_diffusers_file(models / "sana_video_diffusers.safetensors", weights)
    tiny.write_diffusers_folder(models / "SANA-Video_2B_480p_diffusers", config, weights)
    tiny.write_diffusers_folder(models / "sana_video_sharded", config, weights, shards=3)
    write_hf_cache_repo(models / "SANA-Video_2B_480p_diffusers", root / "hf_cache",
                        "Efficient-Large-Model/SANA-Video_2B_480p_diffusers")
    write_official_file(tiny_wan_state_dict(TINY_WAN_CONFIGS["t2v"], seed=0), models / "wan2.1_t2v_tiny.safetensors")
    write_official_pth(models / "Sana_1600M_1024px_BF16.pth",
                       tiny_sana_state_dict(SanaConfig(hidden_size=64, depth=2, num_heads=2, caption_channels=64)))
    folder_paths.add_model_folder_path("diffusion_models", str(models))
    yield root
    folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(models))  # leave other tests' lists alone


LAYOUT_CHOICES = {
    "official_pth": "SANA_Video_2B_480p.pth",
    "official_safetensors": "sana_video_official.safetensors",
    "comfyui_prefixed": "sana_video_comfyui.safetensors",
    "diffusers_file": "sana_video_diffusers.safetensors",
    "diffusers_folder": "SANA-Video_2B_480p_diffusers/",
    "diffusers_sharded": "sana_video_sharded/",
    "hf_cache": "hf-cache: Efficient-Large-Model/SANA-Video_2B_480p_diffusers",
}


def load_through_node(choice: str):
    from velox.nodes.sana_video_nodes import SanaVideoLoader

    return SanaVideoLoader.execute(choice, "fp32").result[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loader_node_reads_every_layout_into_diffusers_model(tiny_model, models_dir, monkeypatch, layout):
    import comfy.latent_formats

    from velox.nodes.sana_video_nodes import SanaVideoLoader

    config, _, reference = tiny_model
    monkeypatch.setenv("HF_HUB_CACHE", str(models_dir / "hf_cache"))
    listed = SanaVideoLoader.define_schema().inputs[0].options
    assert LAYOUT_CHOICES[layout] in listed
    patcher = load_through_node(LAYOUT_CHOICES[layout])
    model = patcher.model
    assert isinstance(model.latent_format, comfy.latent_formats.Wan21)
    assert model.model_sampling.shift == SHIFT and model.model_sampling.multiplier == 1000
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 4, 6, generator=generator)
    context = torch.randn(2, 7, config.caption_channels, generator=generator)
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0
    t = torch.tensor([412.75, 873.5])
    with torch.no_grad():
        want = reference(x, context, t, encoder_attention_mask=mask).sample
        got = model.diffusion_model(x, t, context, context_mask=mask)
    assert relative_l2(got, want) <= PARITY_RTOL


@pytest.mark.parametrize("choice,message", [
    ("wan2.1_t2v_tiny.safetensors", r"wan2\.1_t2v_tiny\.safetensors: looks like a Wan transformer, not a SANA-Video "
     r"transformer; load it with 'Load Wan Model \(Velox\)'; expected a SANA-Video transformer"),
    ("Sana_1600M_1024px_BF16.pth", r"Sana_1600M_1024px_BF16\.pth: looks like a Sana transformer, not a SANA-Video "
     r"transformer; load it with 'Load Sana Model \(Velox\)'; expected a SANA-Video transformer"),
])
def test_loader_node_refuses_wan_and_image_sana_files_in_words(models_dir, choice, message):
    with pytest.raises(VeloxLoadError, match=message):
        load_through_node(choice)


@pytest.mark.parametrize("node", ["VeloxEmptySanaVideoLatent", "VeloxSanaVideoImageToVideo"])
def test_latent_nodes_refuse_frame_counts_the_wan_vae_cannot_take(comfy_host, node):
    from velox.nodes import sana_video_nodes

    cls = next(c for c in sana_video_nodes.SANA_VIDEO_NODES if c.define_schema().node_id == node)
    message = cls.validate_inputs(width=64, height=64, length=80, batch_size=1)
    assert message == f"{node}: length must be 4n + 1 frames (1, 5, 9, ..., 81), got 80: use 77 or 81"
    assert cls.validate_inputs(width=64, height=64, length=81, batch_size=1) is True


def test_wan21_latent_format_normalises_as_diffusers_latents_mean_and_std(comfy_host):
    import inspect

    import comfy.latent_formats

    defaults = inspect.signature(AutoencoderKLWan.__init__).parameters  # the release VAE's config values
    mean_list, std_list = defaults["latents_mean"].default, defaults["latents_std"].default
    fmt = comfy.latent_formats.Wan21()
    assert torch.equal(fmt.latents_mean.flatten(), torch.tensor(mean_list))
    assert torch.equal(fmt.latents_std.flatten(), torch.tensor(std_list))
    z = torch.randn(1, 16, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(mean_list).view(1, -1, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(std_list).view(1, -1, 1, 1, 1)
    assert relative_l2(fmt.process_in(z), (z - mean) * inverse_std) <= 1e-6


# ----------------------------------------------------------------------------------------------
# whole runs: node path vs diffusers pipelines
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma(comfy_host, tmp_path_factory):
    """The tiny Gemma as ComfyUI CLIP (ours) and as diffusers' tokenizer + decoder (reference)."""
    from transformers import Gemma2ForCausalLM, GemmaTokenizer

    from velox.host.sana_text_encoder import load_sana_text_encoder
    from velox.tiny.gemma import write_tiny_gemma_hf_folder

    folder = write_tiny_gemma_hf_folder(tmp_path_factory.mktemp("gemma") / "gemma-2-2b-it", seed=0)
    decoder = Gemma2ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return load_sana_text_encoder(folder), GemmaTokenizer.from_pretrained(folder), decoder.get_decoder()


def node_conditioning(clip):
    from velox.nodes.sana_nodes import SanaTextEncode
    from velox.nodes.sana_video_nodes import SanaVideoTextEncode

    positive = SanaVideoTextEncode.execute(clip, PROMPT, MOTION).result[0]
    negative = SanaTextEncode.execute(clip, NEGATIVE, False).result[0]
    return positive, negative


def sample_through_node(model, positive, negative, latent, seed, **settings):
    from velox.nodes.sampler_nodes import VeloxSampler

    values = dict(preset="sana_video_480p", steps=50, cfg=GUIDANCE, sampler_name="flow_dpm_solver",
                  scheduler="flow_dpm_solver", shift=SHIFT, denoise=1.0)
    values.update(settings)
    return VeloxSampler.execute(model, positive, negative, latent, seed=seed, **values).result[0]["samples"]


def comfy_start(latent: dict, seed: int, sigma0: float, latent_format=None) -> torch.Tensor:
    """What core's sampler starts from: the seed's noise, scaled, plus the latent normalised by the
    model's latent format (Wan21 by default; LTXV, the 720p model's, passes it through)."""
    import comfy.latent_formats
    import comfy.sample

    samples = latent["samples"]
    noise = comfy.sample.prepare_noise(samples, seed)
    latent_format = latent_format or comfy.latent_formats.Wan21()
    normalised = latent_format.process_in(samples) if torch.count_nonzero(samples) else samples
    return sigma0 * noise + (1.0 - sigma0) * normalised


def test_preset_row_is_the_release_setting(comfy_host):
    from velox.sampling.presets import SAMPLING_PRESETS

    preset = SAMPLING_PRESETS["sana_video_480p"]
    assert (preset.steps, preset.cfg, preset.shift, preset.sampler, preset.scheduler) == (
        50, 6.0, 8.0, "flow_dpm_solver", "flow_dpm_solver")


def test_text_to_video_node_run_equals_sana_video_pipeline(tiny_model, models_dir, gemma):
    """50 Flow-DPM-Solver steps, CFG 6, shift 8 (preset sana_video_480p), floored timesteps, as the
    release's DPMSolverMultistepScheduler; prompts encoded by both sides from text."""
    import comfy.latent_formats

    from velox.nodes.sana_video_nodes import EmptySanaVideoLatent
    from velox.sampling.flow_schedules import flow_dpm_solver_sigmas

    _, _, reference = tiny_model
    clip, tokenizer, decoder = gemma
    model = load_through_node("SANA_Video_2B_480p.pth")
    positive, negative = node_conditioning(clip)
    latent = EmptySanaVideoLatent.execute(32, 32, 9, 1).result[0]
    assert latent["samples"].shape == (1, 16, 3, 4, 4)
    got = sample_through_node(model, positive, negative, latent, seed=11)

    start = comfy_start(latent, 11, float(flow_dpm_solver_sigmas(50, SHIFT)[0]))
    scheduler = DPMSolverMultistepScheduler(flow_shift=SHIFT, use_flow_sigmas=True, prediction_type="flow_prediction")
    pipe = SanaVideoPipeline(tokenizer=tokenizer, text_encoder=decoder, vae=None, transformer=reference,
                             scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe(prompt=f"{PROMPT} motion score: {MOTION}.", negative_prompt=NEGATIVE, latents=start.clone(),
                    num_inference_steps=50, guidance_scale=GUIDANCE, height=32, width=32, frames=9,
                    output_type="latent", use_resolution_binning=False, max_sequence_length=300).frames
    ours = comfy.latent_formats.Wan21().process_in(got)  # ComfyUI hands back VAE-space latents
    assert relative_l2(ours, want) <= LOOP_RTOL


@pytest.fixture(scope="module")
def wan_vae(comfy_host, tmp_path_factory):
    """The tiny Wan 2.1 VAE as ComfyUI's VAE (through Velox's loader) and as diffusers' AutoencoderKLWan."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from velox.host.wan_loading import load_wan_vae
    from velox.tiny import wan

    weights = wan.tiny_wan_vae_state_dict(seed=5)
    path = wan.write_official_file(weights, tmp_path_factory.mktemp("vae") / "wan_2.1_vae.safetensors")
    reference = AutoencoderKLWan(base_dim=wan.TINY_VAE_DIM, z_dim=wan.VAE_Z_DIM, dim_mult=[1, 2, 4, 4],
                                 num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True]).eval()
    reference.load_state_dict(convert_wan_vae_to_diffusers(dict(weights)), strict=True)
    return load_wan_vae(path), reference


def image_to_video_run(model, clip, vae, image, seed, **settings):
    from velox.nodes.sana_video_nodes import SanaVideoImageToVideo

    positive, negative = node_conditioning(clip)
    start_image = image.permute(0, 2, 3, 1)  # ComfyUI IMAGE: (N, H, W, C) in [0, 1]
    positive, negative, latent = SanaVideoImageToVideo.execute(positive, negative, vae, start_image, 64, 32, 9,
                                                               1).result
    assert latent["samples"].shape == (1, 16, 3, 4, 8) and latent["noise_mask"][0, 0, :, 0, 0].tolist() == [0, 1, 1]
    return latent, sample_through_node(model, positive, negative, latent, seed, **settings)


@pytest.mark.parametrize("sampler", ["release_dpm_solver", "flow_match_euler_exact"])
def test_image_to_video_node_run_equals_sana_image_to_video_pipeline(tiny_model, models_dir, gemma, wan_vae,
                                                                    sampler):
    """Frame 0 is the start image's latent throughout and the others are sampled: with the release's
    scheduler (preset, floored timesteps), and with FlowMatchEuler (fractional timesteps: the model
    built with timestep_rounding='exact') for 8 steps."""
    import comfy.latent_formats

    from velox.host.sana_video_model import build_sana_video_model
    from velox.sampling.flow_schedules import flow_dpm_solver_sigmas, flow_match_euler_sigmas

    _, weights, reference = tiny_model
    clip, tokenizer, decoder = gemma
    comfy_vae, diffusers_vae = wan_vae
    image = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(7))
    if sampler == "release_dpm_solver":
        model = load_through_node("SANA-Video_2B_480p_diffusers/")
        steps, settings = 50, {}
        scheduler = DPMSolverMultistepScheduler(flow_shift=SHIFT, use_flow_sigmas=True,
                                                prediction_type="flow_prediction")
        sigma0 = float(flow_dpm_solver_sigmas(steps, SHIFT)[0])
    else:
        model = build_sana_video_model(dict(weights), dtype=torch.float32, timestep_rounding="exact")
        steps = 8
        settings = dict(preset="custom", steps=steps, sampler_name="euler", scheduler="flow_match_euler")
        scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
        sigma0 = float(flow_match_euler_sigmas(steps, SHIFT)[0])
    latent, got = image_to_video_run(model, clip, comfy_vae, image, seed=3, **settings)

    pipe = SanaImageToVideoPipeline(tokenizer=tokenizer, text_encoder=decoder, vae=diffusers_vae,
                                    transformer=reference, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe(image=image, prompt=f"{PROMPT} motion score: {MOTION}.", negative_prompt=NEGATIVE,
                    latents=comfy_start(latent, 3, sigma0), num_inference_steps=steps, guidance_scale=GUIDANCE,
                    height=32, width=64, frames=9, output_type="latent", use_resolution_binning=False,
                    max_sequence_length=300).frames
    ours = comfy.latent_formats.Wan21().process_in(got)
    assert relative_l2(ours[:, :, :1], want[:, :, :1]) <= PARITY_RTOL  # the image latent, untouched
    assert relative_l2(ours, want) <= LOOP_RTOL


# ----------------------------------------------------------------------------------------------
# 720p: the LTX-2 VAE (128 channels, 8 x 32 x 32, 1 x 1 x 1 patches)
# ----------------------------------------------------------------------------------------------

STEPS_720P = 8
WIDTH_720P, HEIGHT_720P, FRAMES_720P = 96, 64, 17  # latent 3 frames of 2 x 3


@pytest.fixture(scope="module")
def sana_video_720p(comfy_host, tmp_path_factory):
    """A tiny 720p-style transformer as an official .pth loaded through the loader node, and the same
    weights in diffusers' SanaVideoTransformer3DModel."""
    import folder_paths

    from velox.tiny.gemma import TINY_GEMMA_HIDDEN

    config = tiny.tiny_sana_video_720p_config(TINY_GEMMA_HIDDEN)
    weights = tiny.tiny_sana_video_state_dict(config, seed=6)
    kwargs = {k: v for k, v in diffusers_config(config).items() if not k.startswith("_")}
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    reference = SanaVideoTransformer3DModel(**kwargs).eval()
    reference.load_state_dict(sana_video_official_to_diffusers(canonicalize_sana_video_state_dict(weights)))
    models = tmp_path_factory.mktemp("sana_video_720p") / "diffusion_models"
    tiny.write_official(models / "sana_video_720p_tiny.pth", weights)
    folder_paths.add_model_folder_path("diffusion_models", str(models))
    try:
        model = load_through_node("sana_video_720p_tiny.pth")
    finally:
        folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(models))
    return reference, model


@pytest.fixture(scope="module")
def ltx2_vae(ltx2_host, tiny_ltx2_vae, tmp_path_factory):
    """The tiny LTX-2 VAE as core's VAE (a diffusers folder through Velox's loader) and as diffusers' own."""
    from velox.host.ltx2_vae_loading import load_ltx2_vae

    folder = tmp_path_factory.mktemp("ltx2_vae") / "vae"
    tiny_ltx2_vae.save_pretrained(str(folder))
    return load_ltx2_vae(folder), tiny_ltx2_vae


def decode_through_core(vae, samples: torch.Tensor) -> torch.Tensor:
    """Core's VAEDecode: IMAGE frames (B * F, H, W, C) in [0, 1]."""
    import nodes

    return nodes.VAEDecode().decode(vae, {"samples": samples})[0]


def as_image_frames(video: torch.Tensor) -> torch.Tensor:
    """diffusers' output_type='pt' video (B, F, C, H, W) -> ComfyUI IMAGE frames (B * F, H, W, C)."""
    return video.permute(0, 1, 3, 4, 2).reshape(-1, *video.shape[3:], video.shape[2])


def run_pipeline_720p(pipe, latents: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's final latents and its decoded video from the same start."""
    pipe.set_progress_bar_config(disable=True)
    settings = dict(prompt=f"{PROMPT} motion score: {MOTION}.", negative_prompt=NEGATIVE,
                    num_inference_steps=STEPS_720P, guidance_scale=GUIDANCE, height=HEIGHT_720P, width=WIDTH_720P,
                    frames=FRAMES_720P, use_resolution_binning=False, max_sequence_length=300, **inputs)
    with torch.no_grad():
        latent = pipe(latents=latents.clone(), output_type="latent", **settings).frames
        video = pipe(latents=latents.clone(), output_type="pt", **settings).frames
    return latent, video


def release_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(flow_shift=SHIFT, use_flow_sigmas=True, prediction_type="flow_prediction")


def test_720p_text_to_video_run_and_decode_equal_sana_video_pipeline(sana_video_720p, ltx2_vae, gemma):
    """Core's EmptyLTXVLatentVideo gives the shape SanaVideoPipeline prepares for the LTX-2 VAE; 8 steps of
    Flow-DPM-Solver (CFG 6, shift 8, floored timesteps) and core's VAEDecode equal the pipeline's latents
    and its decoded frames (vae.decode(z * latents_std + latents_mean))."""
    import comfy.latent_formats
    from comfy_extras.nodes_lt import EmptyLTXVLatentVideo

    from velox.sampling.flow_schedules import flow_dpm_solver_sigmas

    reference, model = sana_video_720p
    comfy_vae, diffusers_vae = ltx2_vae
    clip, tokenizer, decoder = gemma
    assert isinstance(model.model.latent_format, comfy.latent_formats.LTXV)
    positive, negative = node_conditioning(clip)
    latent = EmptyLTXVLatentVideo.execute(WIDTH_720P, HEIGHT_720P, FRAMES_720P, 1).result[0]
    got = sample_through_node(model, positive, negative, latent, seed=21, preset="custom", steps=STEPS_720P)
    frames = decode_through_core(comfy_vae, got)

    pipe = SanaVideoPipeline(tokenizer=tokenizer, text_encoder=decoder, vae=diffusers_vae, transformer=reference,
                             scheduler=release_scheduler())
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (8, 32)
    prepared = pipe.prepare_latents(1, reference.config.in_channels, HEIGHT_720P, WIDTH_720P, FRAMES_720P,
                                    torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert latent["samples"].shape == prepared.shape == (1, 128, 3, 2, 3)
    start = comfy_start(latent, 21, float(flow_dpm_solver_sigmas(STEPS_720P, SHIFT)[0]), comfy.latent_formats.LTXV())
    want_latent, want_video = run_pipeline_720p(pipe, start)
    want_frames = as_image_frames(want_video)
    assert relative_l2(got, want_latent) <= LOOP_RTOL  # LTXV's latent format is the identity
    assert frames.shape == want_frames.shape == (FRAMES_720P, HEIGHT_720P, WIDTH_720P, 3)
    assert relative_l2(frames, want_frames) <= LOOP_RTOL
    assert ((want_frames > 0.01) & (want_frames < 0.99)).float().mean() > 0.5  # not a comparison of clipped pixels


def test_720p_image_to_video_run_and_decode_equal_sana_image_to_video_pipeline(sana_video_720p, ltx2_vae, gemma):
    """With the LTX-2 VAE connected, the image-to-video node builds (1, 128, (17 - 1) / 8 + 1, 64 / 32, 96 / 32)
    with the image's latent (already normalised by core's LTX VAE) in frame 0; 8 release-scheduler steps
    and the decode equal SanaImageToVideoPipeline, whose image latent is (mode - latents_mean) / latents_std."""
    import comfy.latent_formats

    from velox.nodes.sana_video_nodes import SanaVideoImageToVideo
    from velox.sampling.flow_schedules import flow_dpm_solver_sigmas

    reference, model = sana_video_720p
    comfy_vae, diffusers_vae = ltx2_vae
    clip, tokenizer, decoder = gemma
    image = torch.rand(1, 3, HEIGHT_720P, WIDTH_720P, generator=torch.Generator().manual_seed(8))
    positive, negative = node_conditioning(clip)
    positive, negative, latent = SanaVideoImageToVideo.execute(positive, negative, comfy_vae, image.permute(0, 2, 3, 1),
                                                               WIDTH_720P, HEIGHT_720P, FRAMES_720P, 1).result
    assert latent["samples"].shape == (1, 128, 3, 2, 3)
    assert latent["noise_mask"][0, 0, :, 0, 0].tolist() == [0, 1, 1]
    got = sample_through_node(model, positive, negative, latent, seed=5, preset="custom", steps=STEPS_720P)
    frames = decode_through_core(comfy_vae, got)

    pipe = SanaImageToVideoPipeline(tokenizer=tokenizer, text_encoder=decoder, vae=diffusers_vae,
                                    transformer=reference, scheduler=release_scheduler())
    start = comfy_start(latent, 5, float(flow_dpm_solver_sigmas(STEPS_720P, SHIFT)[0]), comfy.latent_formats.LTXV())
    want_latent, want_video = run_pipeline_720p(pipe, start, image=image)
    want_frames = as_image_frames(want_video)
    assert relative_l2(got[:, :, :1], want_latent[:, :, :1]) <= LOOP_RTOL  # the image latent, untouched
    assert relative_l2(got, want_latent) <= LOOP_RTOL
    assert frames.shape == want_frames.shape == (FRAMES_720P, HEIGHT_720P, WIDTH_720P, 3)
    assert relative_l2(frames, want_frames) <= LOOP_RTOL
    assert ((want_frames > 0.01) & (want_frames < 0.99)).float().mean() > 0.5


def test_image_to_video_refuses_sizes_the_connected_ltx2_vae_cannot_take(ltx2_vae, wan_vae):
    """Queue-time checks are the Wan VAE's (77 = 4n + 1 passes); at run time the LTX-2 VAE's 8n + 1 and
    multiples of 32 are enforced, in words, while the Wan VAE takes 13 frames (4 latent frames)."""
    from velox.nodes.sana_video_nodes import SanaVideoImageToVideo as node

    comfy_vae, _ = ltx2_vae
    image = torch.rand(1, HEIGHT_720P, WIDTH_720P, 3, generator=torch.Generator().manual_seed(9))
    assert node.validate_inputs(width=WIDTH_720P, height=HEIGHT_720P, length=77, batch_size=1) is True
    prefix = "VeloxSanaVideoImageToVideo: with the connected VAE (128 latent channels, 8x32x32 compression), "
    with pytest.raises(ValueError, match=re.escape(
            prefix + "length must be 8n + 1 frames (1, 9, 17, ..., 81), got 77: use 73 or 81")):
        node.execute(None, None, comfy_vae, image, WIDTH_720P, HEIGHT_720P, 77, 1)
    with pytest.raises(ValueError, match=re.escape(prefix + "width must be a multiple of 32, got 80: use 64 or 96")):
        node.execute(None, None, comfy_vae, image, 80, HEIGHT_720P, 9, 1)

    wan, _ = wan_vae
    latent = node.execute(None, None, wan, torch.rand(1, 32, 64, 3), 64, 32, 13, 1).result[2]
    assert latent["samples"].shape == (1, 16, 4, 4, 8)
