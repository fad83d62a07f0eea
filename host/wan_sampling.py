"""Wan 2.2 A14B's two experts in one sampling run, on ComfyUI's engine.

The high-noise expert denoises ``sigmas[:k+1]`` from fresh noise, the low-noise expert continues on
``sigmas[k:]`` with no new noise: the same two ``comfy.samplers.sample`` calls that core's graph of two
``KSamplerAdvanced`` nodes makes (add_noise / return_with_leftover_noise on the first, no noise on the
second), so a fixed step split reproduces that graph exactly. The hand-over step ``k`` comes from the
official boundary rule (``sampling/wan_experts.py``) or from a fixed split. One progress bar and one
preview callback count the whole run.
"""

from __future__ import annotations

import comfy.sample
import comfy.utils
import latent_preview
import torch

from ..sampling.wan_residency import HIGH, LOW
from .sampling import conditioning_on
from .wan_residency import expert_plan, prepared_expert, put_away

# unet_config fields that must agree between two experts (Wan: width, depth, channels in and out)
EXPERT_SHAPE_FIELDS = ("image_model", "dim", "ffn_dim", "num_layers", "in_dim", "out_dim", "model_type")


def expert_shape(model) -> dict:
    config = model.model.model_config.unet_config
    shape = {field: config.get(field) for field in EXPERT_SHAPE_FIELDS if field in config}
    shape["latent_format"] = type(model.model.latent_format).__name__
    return shape


def check_expert_pair(high, low, node: str) -> None:
    """Refuse two experts that are not the same architecture at the same size."""
    a, b = expert_shape(high), expert_shape(low)
    if a != b:
        diff = ", ".join(f"{key}: high {a.get(key)} vs low {b.get(key)}" for key in sorted(set(a) | set(b))
                         if a.get(key) != b.get(key))
        raise ValueError(f"{node}: model_high_noise and model_low_noise must be the two experts of one release "
                         f"(same architecture and size); they differ in {diff}. Load the matching "
                         "high_noise / low_noise pair (e.g. wan2.2_i2v_high_noise_14B + wan2.2_i2v_low_noise_14B).")


def wants_start_image(model) -> bool:
    """True for Wan image-to-video models: their patch embedding takes 16 noise + 20 image/mask channels
    (Wan 2.1 I2V, and both Wan 2.2 A14B I2V experts, which core classifies as t2v)."""
    config = model.model.model_config.unet_config
    return config.get("image_model") == "wan2.1" and config.get("in_dim", 16) > config.get("out_dim", 16)


def wants_clip_vision(model) -> bool:
    """True for Wan 2.1 I2V 14B, whose ``img_emb`` projects a CLIP ViT-H image embedding (core: model_type i2v)."""
    return model.model.model_config.unet_config.get("model_type") == "i2v"


def check_start_image(model, positive, node: str) -> None:
    """Refuse to run an I2V model on conditioning without a start image (core would fill zeros silently),
    or Wan 2.1 I2V without its CLIP vision embedding (core would skip the image branch silently)."""
    if wants_start_image(model) and not any("concat_latent_image" in extra for _, extra in positive):
        in_dim = model.model.model_config.unet_config.get("in_dim")
        raise ValueError(f"{node}: this is an image-to-video Wan model (in_dim {in_dim}) but the positive "
                         "conditioning carries no start image. Pass positive/negative through core "
                         "WanImageToVideo with its start_image connected (and use its latent output).")
    if wants_clip_vision(model) and not any(extra.get("clip_vision_output") is not None for _, extra in positive):
        raise ValueError(f"{node}: Wan 2.1 I2V needs the start image's CLIP vision embedding, but the positive "
                         "conditioning has none. Load clip_vision_h.safetensors with core CLIPVisionLoader, encode "
                         "the start image with CLIPVisionEncode (crop: none) and connect its output to "
                         "WanImageToVideo's clip_vision_output.")


def _offset_callback(callback, offset: int, total: int):
    def tick(step, x0, x, total_steps):
        callback(step + offset, x0, x, total)

    return tick


def _sample(model, noise, cfg, sampler, sigmas, positive, negative, latent_image, noise_mask, callback, seed):
    device = model.load_device
    return comfy.sample.sample_custom(
        model, noise, cfg, sampler, sigmas, conditioning_on(positive, device), conditioning_on(negative, device),
        latent_image, noise_mask=noise_mask, callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
    )


def release_expert(done, following) -> None:
    """Take the finished expert off the GPU before ``following`` runs: free when the plan keeps a pinned
    host copy of it (``host/wan_residency.py``); a clone of the same weights is left alone."""
    if done is following or done.is_clone(following):
        return
    put_away(done)


def _phase_experts(high, low) -> dict:
    """The distinct experts in run order: one entry when both phases run the same weights (Wan 2.1)."""
    return {HIGH: high} if low is high or low.is_clone(high) else {HIGH: high, LOW: low}


def _enter_phase(phase: str, experts: dict, plan) -> None:
    for name, patcher in experts.items():
        if name not in plan.allowed(phase):
            release_expert(patcher, experts[phase])


def sample_two_experts(high, low, positive, negative, latent: dict, seed: int, cfg_high: float, cfg_low: float,
                       sampler_high, sampler_low, sigmas: torch.Tensor, switch_step: int,
                       vram_budget_gb: float = 0.0) -> dict:
    """High-noise expert for steps ``< switch_step``, low-noise expert for the rest; returns a LATENT.

    ``latent["samples"]``: (B, C, T, H, W) for video. ``sigmas``: steps + 1, decreasing.
    ``vram_budget_gb``: the most VRAM the run may use (0: the card's free memory); it picks the residency plan.
    """
    total = len(sigmas) - 1
    k = max(0, min(int(switch_step), total))
    latent_image = comfy.sample.fix_empty_latent_channels(high, latent["samples"])
    experts = _phase_experts(high, low)
    plan = expert_plan(experts, latent_image.shape, vram_budget_gb)
    run_high, run_low = prepared_expert(high, plan), prepared_expert(low, plan)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    noise_mask = latent.get("noise_mask")
    callback = latent_preview.prepare_callback(high, total)
    samples = latent_image
    if k > 0:
        _enter_phase(HIGH, experts, plan)  # the low expert may be left loaded by an earlier run
        samples = _sample(run_high, noise, cfg_high, sampler_high, sigmas[:k + 1], positive, negative,
                          latent_image, noise_mask, _offset_callback(callback, 0, total), seed)
    if k < total:
        if k > 0:  # continue from the leftover noise, as KSamplerAdvanced with add_noise disabled
            noise = torch.zeros(samples.size(), dtype=samples.dtype, layout=samples.layout, device="cpu")
        _enter_phase(LOW if LOW in experts else HIGH, experts, plan)
        samples = _sample(run_low, noise, cfg_low, sampler_low, sigmas[k:], positive, negative, samples,
                          noise_mask, _offset_callback(callback, k, total), seed)
    out = latent.copy()
    out["samples"] = samples
    return out
