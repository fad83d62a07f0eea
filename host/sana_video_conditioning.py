"""SANA-Video's conditioning: the prompt as the reference encodes it, and the image-to-video latent.

Prompt: diffusers ``SanaVideoPipeline`` / ``SanaImageToVideoPipeline`` append ``" motion score: {n}."``
to the user's prompt (the official docs and inference script, default 30) and encode it behind the
video pipelines' own complex human instruction (below); the negative prompt is encoded plainly
(no instruction, no motion score), which is Sana's plain 300-token encoding.

Image-to-video (``SanaImageToVideoPipeline.prepare_latents``): the start image, resized to the video
size, is VAE-encoded as a one-frame video (the distribution's mode) and replaces latent frame 0; only
frames 1.. are denoised while frame 0 runs at t = 0. In ComfyUI that is a LATENT holding the raw image
latent in frame 0 with a ``noise_mask`` of 0 there and 1 elsewhere (core normalises it with the
model's latent format, as diffusers does with the VAE's latents_mean / latents_std; core's LTX VAE
returns it normalised already, and the 720p model's LTXV latent format passes it through).

The latent's shape follows the connected VAE, as the pipelines take ``vae_scale_factor_temporal`` /
``_spatial`` from the VAE's config: Wan 2.1 (480p) packs 4 frames after the first into one latent frame
at 1/8 of the size (16 channels), LTX-2 (720p) 8 frames at 1/32 (128 channels).
"""

from __future__ import annotations

import comfy.model_management
import comfy.utils
import torch

# diffusers 0.42 SanaVideoPipeline.__call__ (and SanaImageToVideoPipeline) default complex_human_instruction
SANA_VIDEO_COMPLEX_HUMAN_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "video generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, motion, and "
    "temporal relationships to create vivid and dynamic scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat slowly settling into a curled position, "
    "peacefully falling asleep on a warm sunny windowsill, with gentle sunlight filtering through surrounding pots "
    "of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps gradually lighting up, a diverse crowd of people in colorful clothing walking past, and a double-decker "
    "bus smoothly passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)
DEFAULT_MOTION_SCORE = 30
WAN_VAE_TEMPORAL_FACTOR = 4  # Wan VAE: 1 + 4n frames -> 1 + n latent frames, 1/8 of the size


def with_motion_score(text: str, motion_score: int) -> str:
    """The official prompt suffix: ``prompt + " motion score: 30."``."""
    return f"{text} motion score: {motion_score}."


def encode_sana_video_prompt(clip, text: str, motion_score: int = DEFAULT_MOTION_SCORE) -> list:
    """A positive SANA-Video CONDITIONING (Gemma features + attention mask), as ``encode_prompt``."""
    tokens = clip.tokenize(with_motion_score(text, motion_score), sana_chi=SANA_VIDEO_COMPLEX_HUMAN_INSTRUCTION)
    return clip.encode_from_tokens_scheduled(tokens)


def latent_frames(length: int, frames_per_latent: int = WAN_VAE_TEMPORAL_FACTOR) -> int:
    """Latent frames for ``length`` video frames: the first frame alone, then one per ``frames_per_latent``."""
    return (length - 1) // frames_per_latent + 1


def video_vae_compression(vae) -> tuple[int, int] | None:
    """(frames per latent frame, pixels per latent pixel) of a core video VAE: Wan 2.1 (4, 8), LTX-2
    (8, 32). Read from ``downscale_index_formula`` (T, H, W), which ComfyUI 0.3.75 and 0.8.0 set for every
    video VAE; None for an image VAE (2-D latent)."""
    formula = getattr(vae, "downscale_index_formula", None)
    if getattr(vae, "latent_dim", 2) != 3 or not isinstance(formula, tuple) or len(formula) != 3:
        return None
    return int(formula[0]), int(vae.spacial_compression_encode())


def image_to_video_latent(vae, start_image: torch.Tensor, width: int, height: int, length: int,
                          batch_size: int = 1) -> dict:
    """LATENT for image-to-video: (B, C, frames, H/s, W/s) zeros with the VAE latent of ``start_image``
    (first image, resized to width x height) in frame 0, and a noise mask that keeps frame 0 clean.
    C, s and the frame count come from the VAE (Wan 2.1: 16, 8, (length - 1) / 4 + 1; LTX-2: 128, 32,
    (length - 1) / 8 + 1).

    start_image: (N, H, W, C) in [0, 1], ComfyUI's IMAGE.
    """
    compression = video_vae_compression(vae)
    if compression is None:
        raise ValueError("image_to_video_latent: the VAE is not a video VAE (expected the Wan 2.1 or LTX-2 VAE)")
    frames_per_latent, spatial = compression
    image = comfy.utils.common_upscale(start_image[:1].movedim(-1, 1), width, height, "bilinear", "center")
    image_latent = vae.encode(image.movedim(1, -1)[:, :, :, :3])  # (1, C, 1, H/s, W/s), mode of the posterior
    device = comfy.model_management.intermediate_device()
    shape = (batch_size, image_latent.shape[1], latent_frames(length, frames_per_latent), height // spatial,
             width // spatial)
    latent = torch.zeros(shape, device=device)
    latent[:, :, :1] = image_latent[:, :, :1].to(device)
    mask = torch.ones((1, 1, shape[2], shape[3], shape[4]), device=device)
    mask[:, :, :1] = 0.0  # frame 0 is the image: never noised, run at t = 0
    return {"samples": latent, "noise_mask": mask}
