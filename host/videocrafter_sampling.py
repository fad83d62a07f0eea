"""Sample a VideoCrafter / DynamiCrafter MODEL with the reference DDIM (``sampling.videocrafter_ddim``).

Core's KSampler cannot reproduce lvdm's sampler: the timestep-scaled x0 needs the next timestep's
scale, and DynamiCrafter's guidance rescale acts on the raw v output. So this runs the DDIM loop
itself on the MODEL's diffusion model (loaded by ComfyUI's model management, LoRA patches applied),
with cond and uncond in one batch, ComfyUI's progress bar and interruption.

Conditioning: the first entry of each CONDITIONING; its tensor is the text context (truncated to 77
tokens, as lvdm's embedder), its dict may hold ``clip_vision_tokens`` (B, N, 1280) and
``videocrafter_image_latent`` (B, 4, h, w), raw VAE latents, set by the I2V conditioning node.
Noise: x_T = ``comfy.sample.prepare_noise`` of the seed (what KSampler would draw); the per-step
noises (eta > 0) come from a CPU generator seeded with seed + 1, so a seed reproduces a video.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.sample
import comfy.utils
import torch

from ..loaders.videocrafter_detect import VideoCrafterVariant
from ..sampling.videocrafter_ddim import guided_output, make_plan, sample_ddim

RELEASE = "release"  # "use the release's value" for a setting


@dataclass(frozen=True)
class VideoCrafterSettings:
    steps: int
    cfg: float
    eta: float
    fps: int
    guidance_rescale: float
    spacing: str


def resolve_settings(variant: VideoCrafterVariant, steps: int, cfg: float, eta: float, fps: int,
                     guidance_rescale: float, spacing: str) -> VideoCrafterSettings:
    """Widget values, where 0 / -1 / "release" mean the release's own setting (``VARIANTS`` presets)."""
    p = variant.preset
    return VideoCrafterSettings(
        steps=steps, cfg=p.cfg if cfg <= 0 else cfg, eta=eta, fps=p.fps if fps <= 0 else fps,
        guidance_rescale=p.guidance_rescale if guidance_rescale < 0 else guidance_rescale,
        spacing=p.spacing if spacing == RELEASE else spacing)


def model_variant(model, node: str) -> VideoCrafterVariant:
    variant = getattr(model.model.model_config, "velox_variant", None)
    if variant is None:
        raise ValueError(f"{node}: the MODEL is not a VideoCrafter / DynamiCrafter model; load it with "
                         "VeloxVideoCrafterLoader")
    return variant


def _first(conditioning, node: str, name: str):
    if not conditioning:
        raise ValueError(f"{node}: {name} conditioning is empty")
    tensor, extra = conditioning[0][0], conditioning[0][1]
    return tensor[:, :77], extra


def check_video_latent(samples: torch.Tensor, variant: VideoCrafterVariant, node: str) -> None:
    if samples.ndim != 5 or samples.shape[1] != 4:
        raise ValueError(f"{node}: expected a 5-D video latent (B, 4, T, H/8, W/8) from VeloxEmptyVideoCrafterLatent, "
                         f"got shape {tuple(samples.shape)}")
    variant.check_frames(int(samples.shape[2]), node)


def sample_videocrafter(model, positive, negative, latent: dict, seed: int, settings: VideoCrafterSettings,
                        node: str = "VeloxVideoCrafterSampler") -> dict:
    variant = model_variant(model, node)
    samples = latent["samples"]
    check_video_latent(samples, variant, node)
    (cond, cond_extra), (uncond, uncond_extra) = _first(positive, node, "positive"), _first(negative, node, "negative")
    if variant.is_i2v and ("clip_vision_tokens" not in cond_extra or "videocrafter_image_latent" not in cond_extra):
        raise ValueError(f"{node}: {variant.name} is image-to-video and needs a start image: pass the "
                         "conditioning through VeloxDynamiCrafterConditioning")
    batched = [2 * samples.shape[0], *samples.shape[1:]]  # cond + uncond in one batch
    inference = comfy.model_management.minimum_inference_memory()
    comfy.model_management.load_models_gpu(
        [model], memory_required=model.model.memory_required(batched) + inference,
        minimum_memory_required=model.model.memory_required(list(samples.shape)) + inference)
    base = model.model
    device = model.load_device
    dtype = base.manual_cast_dtype or base.get_dtype()
    unet = base.diffusion_model
    batch, _, frames, h, w = samples.shape
    inputs = _batched_inputs(variant, base, cond, uncond, cond_extra, uncond_extra, settings.fps, batch, frames,
                             (h, w), device, dtype)
    plan = make_plan(variant.schedule, settings.steps, settings.eta, settings.spacing)
    noise = comfy.sample.prepare_noise(samples, seed).to(device, torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    progress = comfy.utils.ProgressBar(len(plan))

    passes = 1 if settings.cfg == 1.0 else 2  # lvdm skips the unconditional pass at CFG 1

    def model_fn(x, t):
        comfy.model_management.throw_exception_if_processing_interrupted()
        n = batch * passes
        xs = torch.cat([x] * passes).to(dtype)
        if inputs["concat"] is not None:
            xs = torch.cat([xs, inputs["concat"][:n]], dim=1)
        tokens = None if inputs["tokens"] is None else inputs["tokens"][:n]
        out = unet(xs, torch.cat([t] * passes), inputs["context"][:n], fps=inputs["fps"][:n],
                   clip_vision_tokens=tokens).float()
        if passes == 1:
            return out
        c, u = out.chunk(2)
        return guided_output(c, u, settings.cfg, settings.guidance_rescale)

    def noise_fn(_step):
        return torch.randn(noise.shape, generator=generator).to(device)

    with torch.no_grad():
        x = sample_ddim(model_fn, noise, plan, noise_fn, callback=lambda i, x, x0: progress.update(1))
    return {"samples": base.process_latent_out(x.float()).to(comfy.model_management.intermediate_device())}


def concat_latent(base, extra: dict, frames: int, hw) -> torch.Tensor:
    """DynamiCrafter's c_concat (B, 4, T, h, w): the start latent on every frame, or for interpolation /
    loop (an end image given) the start and end latents on the first and last frames, zeros between."""
    start = base.process_latent_in(extra["videocrafter_image_latent"].float())
    if tuple(start.shape[-2:]) != tuple(hw):
        raise ValueError(f"VeloxVideoCrafterSampler: the start image latent is {tuple(start.shape[-2:])}, "
                         f"the video latent {tuple(hw)}; encode the image at the video's size")
    end = extra.get("videocrafter_end_latent", None)
    if end is None:
        return start[:, :, None].expand(-1, -1, frames, -1, -1)
    out = torch.zeros(start.shape[0], start.shape[1], frames, *start.shape[-2:], dtype=start.dtype)
    out[:, :, 0], out[:, :, -1] = start, base.process_latent_in(end.float())
    return out


def _batched_inputs(variant, base, cond, uncond, cond_extra, uncond_extra, fps, batch, frames, hw, device, dtype):
    """Context, fps, image tokens and the concat latent for the (cond, uncond) batch of 2B."""
    def per_sample(t):
        return comfy.utils.repeat_to_batch_size(t, batch).to(device, dtype)

    context = torch.cat([per_sample(cond), per_sample(uncond)])
    tokens = concat = None
    if variant.is_i2v:
        tokens = torch.cat([per_sample(cond_extra["clip_vision_tokens"]),
                            per_sample(uncond_extra.get("clip_vision_tokens", cond_extra["clip_vision_tokens"]))])
    if variant.concat_image:
        image = per_sample(concat_latent(base, cond_extra, frames, hw))
        concat = torch.cat([image, image])  # lvdm keeps the image latent in the unconditional pass too
    fps_tensor = torch.full((2 * batch,), fps, device=device, dtype=torch.long)
    return {"context": context, "tokens": tokens, "concat": concat, "fps": fps_tensor}
