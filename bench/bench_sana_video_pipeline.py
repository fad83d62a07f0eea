"""SANA-Video 2B text-to-video at the default preset, decode included: Velox on ComfyUI's engine vs
diffusers 0.42.1 ``SanaVideoPipeline``. 480x832, 81 frames, 50 Flow-DPM-Solver steps at CFG 6 and shift 8,
Wan 2.1 VAE decode (issue #17, acceptance 4).

Both sides hold the same random weights: diffusers' ``SanaVideoTransformer3DModel`` of the 2B config
(bf16) and a Wan 2.1 ``AutoencoderKLWan`` (fp32, as the release keeps it). Text encoding is left out:
300 tokens of random Gemma-width features with masks (a full-length positive, a short negative).

- diffusers: the pipeline with the release's scheduler (``DPMSolverMultistepScheduler``, flow sigmas,
  flow_shift 8, flow prediction); ``output_type="latent"`` for sampling, the pipeline's own decode tail
  (denormalise, ``vae.decode``, ``postprocess_video``) for decode, ``output_type="pt"`` for the whole video;
- Velox: the code the nodes call: ``build_sana_video_model`` (MODEL), ``EmptySanaVideoLatent``,
  ``VeloxSampler`` at preset ``sana_video_480p`` (``custom`` with the preset's settings when ``--steps``
  differs), the Wan VAE through ``load_wan_vae`` (the diffusers VAE file) and core's ``VAE.decode``.

Both start from the same latent (core's ``sigma_0 * noise``). Each side first runs a short warm-up
(``--warmup-steps`` steps plus a decode), then is timed: sampling, decode (of diffusers' final latent on both
sides, so the videos compare), and the whole video, in which the peak GPU memory is taken. One JSON line per
side, then one that sets them side by side (seconds, ratios, relative L2 of the final latents and the videos).

    python bench/bench_sana_video_pipeline.py               # device: the 2B at 480x832, 81 frames, 50 steps
    python bench/bench_sana_video_pipeline.py --tiny        # CPU, tiny configs, seconds (the unit test)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from common import boot_comfy, emit, register_pack, relative_l2

PRESET = "sana_video_480p"
SEED = 42
TEXT_TOKENS = 300
NEGATIVE_TOKENS = 40  # a short negative prompt; the positive is full length (instruction-prefixed)
FULL = {"height": 480, "width": 832, "frames": 81}
TINY = {"height": 64, "width": 64, "frames": 9, "steps": 2}


@dataclasses.dataclass
class Run:
    """What one benchmark run is: sizes, steps, dtypes and the device."""

    tiny: bool
    height: int
    width: int
    frames: int
    steps: int
    warmup_steps: int
    repeat: int
    device: torch.device
    dtype: torch.dtype


# ----------------------------------------------------------------------------------------------
# shared inputs: configs, weights, text features, the starting latent
# ----------------------------------------------------------------------------------------------


def transformer_config(tiny: bool):
    from velox.models.sana_video import SANA_VIDEO_PRESETS
    from velox.tiny.sana_video import tiny_sana_video_config

    if tiny:
        return dataclasses.replace(tiny_sana_video_config(caption_channels=64), depth=1, name="tiny_sana_video_d1")
    return SANA_VIDEO_PRESETS["sana_video_2b_480p"]


def vae_kwargs(tiny: bool) -> dict:
    """``AutoencoderKLWan``'s defaults are the Wan 2.1 VAE; the tiny one only narrows its base width."""
    from velox.tiny.wan import TINY_VAE_DIM

    return {"base_dim": TINY_VAE_DIM} if tiny else {}


def release_scheduler(shift: float):
    """SANA-Video_2B_480p_diffusers' scheduler: DPM-Solver++ 2M on flow sigmas."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(flow_shift=shift, use_flow_sigmas=True, prediction_type="flow_prediction")


def text_features(caption_channels: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    positive_mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long)
    negative_mask = torch.zeros(1, TEXT_TOKENS, dtype=torch.long)
    negative_mask[:, :NEGATIVE_TOKENS] = 1
    return {"positive": torch.randn(1, TEXT_TOKENS, caption_channels, generator=g), "positive_mask": positive_mask,
            "negative": torch.randn(1, TEXT_TOKENS, caption_channels, generator=g), "negative_mask": negative_mask}


def empty_latent(run: Run) -> dict:
    from velox.nodes.sana_video_nodes import EmptySanaVideoLatent

    return EmptySanaVideoLatent.execute(run.width, run.height, run.frames, 1).result[0]


def comfy_start(latent: dict, steps: int, shift: float) -> torch.Tensor:
    """What core's sampler starts an empty latent from: ``sigma_0 * noise`` of the seed."""
    import comfy.sample

    from velox.sampling.flow_schedules import flow_dpm_solver_sigmas

    sigma0 = float(flow_dpm_solver_sigmas(steps, shift)[0])
    return sigma0 * comfy.sample.prepare_noise(latent["samples"], SEED)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 1) -> tuple[float, object]:
    """Median wall-clock seconds of ``fn`` over ``repeat`` runs and its last output (``common.wall_time``
    needs CUDA and drops the output; the tiny run is on the CPU and the outputs are compared)."""
    times, out = [], None
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def timed_with_peak(fn: Callable[[], object], device: torch.device, repeat: int) -> tuple[float, object, float | None]:
    """``timed`` plus the peak GPU memory over those runs (GiB; None on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, out = timed(fn, device, repeat)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, out, peak


def phase_times(run: Run, sample: Callable, decode: Callable, warm_up: Callable, reference_latent) -> dict:
    """Warm up, then time sampling, decode (of ``reference_latent`` when given, else of this side's own
    latent) and the whole video; returns the seconds, the peak and the outputs."""
    warm_up()
    sampling_s, latent = timed(sample, run.device, run.repeat)
    to_decode = latent if reference_latent is None else reference_latent
    decode_s, video = timed(lambda: decode(to_decode), run.device, run.repeat)
    whole_s, _, peak = timed_with_peak(lambda: decode(sample()), run.device, run.repeat)
    return {"sampling_s": sampling_s, "decode_s": decode_s, "whole_s": whole_s, "peak_gib": peak,
            "latent": latent, "video": video}


# ----------------------------------------------------------------------------------------------
# diffusers
# ----------------------------------------------------------------------------------------------


def diffusers_pipeline(run: Run, config, shift: float):
    from diffusers import AutoencoderKLWan, SanaVideoPipeline, SanaVideoTransformer3DModel

    from velox.loaders.sana_video_keys import diffusers_config

    kwargs = {k: v for k, v in diffusers_config(config).items() if not k.startswith("_")}
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    torch.manual_seed(0)
    with run.device:  # initialise on the GPU: the 2B's CPU init takes minutes on a few cores
        transformer = SanaVideoTransformer3DModel(**kwargs).to(run.dtype).eval()
        vae = AutoencoderKLWan(**vae_kwargs(run.tiny)).to(torch.float32).eval()
    pipe = SanaVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                             scheduler=release_scheduler(shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """The decode tail of ``SanaVideoPipeline.__call__`` for a Wan VAE: (B, F, C, H, W) in [0, 1]."""
    vae = pipe.vae
    latents = latents.to(vae.dtype)
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type="pt")


def bench_diffusers(run: Run, pipe, text: dict, start: torch.Tensor, cfg: float) -> dict:
    text = {k: v.to(run.device) for k, v in text.items()}
    start = start.to(run.device, torch.float32)

    def generate(steps: int, output_type: str) -> torch.Tensor:
        return pipe(prompt_embeds=text["positive"], prompt_attention_mask=text["positive_mask"], negative_prompt=None,
                    negative_prompt_embeds=text["negative"], negative_prompt_attention_mask=text["negative_mask"],
                    latents=start.clone(), num_inference_steps=steps, guidance_scale=cfg, height=run.height,
                    width=run.width, frames=run.frames, output_type=output_type,
                    use_resolution_binning=False).frames

    with torch.inference_mode():
        return phase_times(run, sample=lambda: generate(run.steps, "latent"),
                           decode=lambda latents: diffusers_decode(pipe, latents),
                           warm_up=lambda: generate(run.warmup_steps, "pt"), reference_latent=None)


# ----------------------------------------------------------------------------------------------
# Velox, through the code the nodes call
# ----------------------------------------------------------------------------------------------


def velox_vae(vae_state_dict: dict[str, torch.Tensor], folder: Path):
    """The diffusers ``AutoencoderKLWan`` weights as a file, read by the Wan VAE loader node's function."""
    from safetensors.torch import save_file

    from velox.host.wan_loading import load_wan_vae

    path = folder / "wan_2.1_vae_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in vae_state_dict.items()}, str(path))
    return load_wan_vae(path)


def velox_sample(model, positive, negative, latent: dict, steps: int) -> dict:
    """VeloxSampler at the preset, or ``custom`` with the preset's settings and other steps."""
    from velox.nodes.sampler_nodes import VeloxSampler
    from velox.sampling.presets import CUSTOM, SAMPLING_PRESETS

    p = SAMPLING_PRESETS[PRESET]
    preset = PRESET if steps == p.steps else CUSTOM
    return VeloxSampler.execute(model, positive, negative, latent, preset=preset, seed=SEED, steps=steps, cfg=p.cfg,
                                sampler_name=p.sampler, scheduler=p.scheduler, shift=p.shift,
                                denoise=1.0).result[0]


def bench_velox(run: Run, model, vae, text: dict, latent: dict, reference_latent: torch.Tensor) -> dict:
    """``reference_latent``: diffusers' final latent (normalised), decoded here in the VAE's space."""
    import comfy.latent_formats

    positive = [[text["positive"], {"attention_mask": text["positive_mask"]}]]
    negative = [[text["negative"], {"attention_mask": text["negative_mask"]}]]
    vae_space = comfy.latent_formats.Wan21().process_out(reference_latent.float().cpu())

    def warm_up():
        vae.decode(velox_sample(model, positive, negative, latent, run.warmup_steps)["samples"])

    with torch.inference_mode():
        return phase_times(run, sample=lambda: velox_sample(model, positive, negative, latent, run.steps)["samples"],
                           decode=vae.decode, warm_up=warm_up, reference_latent=vae_space)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------


def gib(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def side_record(run: Run, side: str, phases: dict, **extra) -> dict:
    record = {"bench": "sana_video_t2v_default_preset", "side": side, "tiny": run.tiny,
              "size": f"{run.height}x{run.width}", "frames": run.frames, "steps": run.steps}
    record.update({k: round(v, 4) for k, v in phases.items() if k.endswith("_s")})
    record["peak_gib"] = gib(phases["peak_gib"])
    record.update(extra)
    return record


def bench(run: Run) -> dict:
    import comfy.latent_formats
    import diffusers

    from velox.host.sana_video_model import build_sana_video_model
    from velox.sampling.presets import SAMPLING_PRESETS

    preset = SAMPLING_PRESETS[PRESET]
    config = transformer_config(run.tiny)
    text = text_features(config.caption_channels)
    latent = empty_latent(run)
    start = comfy_start(latent, run.steps, preset.shift)

    pipe = diffusers_pipeline(run, config, preset.shift)
    transformer_weights = {k: v.detach().cpu() for k, v in pipe.transformer.state_dict().items()}
    vae_weights = {k: v.detach().cpu() for k, v in pipe.vae.state_dict().items()}
    theirs = bench_diffusers(run, pipe, text, start, preset.cfg)
    emit(side_record(run, "diffusers", theirs, vae_dtype=str(pipe.vae.dtype).removeprefix("torch.")))
    reference_latent, reference_video = theirs["latent"].float().cpu(), theirs["video"].float().cpu()
    del pipe, theirs["latent"], theirs["video"]
    if run.device.type == "cuda":
        torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory(prefix="velox-sana-video-bench-") as folder:
        model = build_sana_video_model(transformer_weights, dtype=run.dtype)
        vae = velox_vae(vae_weights, Path(folder))
    del transformer_weights, vae_weights
    ours = bench_velox(run, model, vae, text, latent, reference_latent)
    emit(side_record(run, "velox", ours, vae_dtype=str(vae.vae_dtype).removeprefix("torch.")))

    our_latent = comfy.latent_formats.Wan21().process_in(ours["latent"].float().cpu())  # core hands back VAE space
    our_video = ours["video"].float().cpu()  # (B, F, H, W, C); diffusers' (B, F, C, H, W)
    summary = {"bench": "sana_video_t2v_default_preset", "side": "both", "tiny": run.tiny,
               "size": f"{run.height}x{run.width}", "frames": run.frames, "steps": run.steps, "cfg": preset.cfg,
               "shift": preset.shift, "transformer_dtype": str(run.dtype).removeprefix("torch.")}
    for phase in ("sampling_s", "decode_s", "whole_s"):
        summary[f"diffusers_{phase}"] = round(theirs[phase], 4)
        summary[f"velox_{phase}"] = round(ours[phase], 4)
        summary[f"{phase[:-2]}_ratio"] = round(ours[phase] / theirs[phase], 3)
    summary["diffusers_peak_gib"], summary["velox_peak_gib"] = gib(theirs["peak_gib"]), gib(ours["peak_gib"])
    video_error = relative_l2(our_video, reference_video.permute(0, 1, 3, 4, 2))
    summary["latent_rel_l2_vs_diffusers"] = float(f"{relative_l2(our_latent, reference_latent):.3g}")
    summary["video_rel_l2_vs_diffusers"] = float(f"{video_error:.3g}")
    summary["video_shape"] = list(our_video.shape)
    summary.update(device=torch.cuda.get_device_name() if run.device.type == "cuda" else "cpu",
                   torch=torch.__version__, diffusers=diffusers.__version__)
    emit(summary)
    return summary


def parse_run(argv: list[str] | None = None) -> Run:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs at 64x64, 9 frames, 2 steps (CPU)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the preset's 50; tiny: 2)")
    parser.add_argument("--frames", type=int, help="video frames, 4n + 1 (default 81; tiny: 9)")
    parser.add_argument("--height", type=int, help="pixels, a multiple of 16 (default 480; tiny: 64)")
    parser.add_argument("--width", type=int, help="pixels, a multiple of 16 (default 832; tiny: 64)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed warm-up run")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs of each phase (median)")
    args = parser.parse_args(argv)
    from velox.sampling.presets import SAMPLING_PRESETS

    sizes = dict(TINY) if args.tiny else dict(FULL, steps=SAMPLING_PRESETS[PRESET].steps)
    sizes.update({k: getattr(args, k) for k in ("steps", "frames", "height", "width") if getattr(args, k)})
    if (sizes["frames"] - 1) % 4:
        parser.error(f"--frames must be 4n + 1 (the Wan VAE's temporal stride), got {sizes['frames']}")
    cuda = torch.cuda.is_available()
    return Run(tiny=args.tiny, warmup_steps=args.warmup_steps, repeat=args.repeat,
               device=torch.device("cuda" if cuda else "cpu"), dtype=torch.bfloat16 if cuda else torch.float32,
               **sizes)


def main(argv: list[str] | None = None) -> None:
    boot_comfy()
    register_pack()
    bench(parse_run(argv))


if __name__ == "__main__":
    main()
