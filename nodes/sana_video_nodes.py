"""SANA-Video nodes: the transformer loader, the prompt encoder, empty and image-to-video latents, and
the LTX-2 VAE loader (the 720p variant's VAE).

Glue only: each node validates its inputs and calls ``host.sana_video_model``,
``host.sana_video_conditioning`` or ``host.ltx2_vae_loading``. Gemma comes from 'Load Sana Text
Encoder', the Wan 2.1 VAE from 'Load Wan VAE' (480p) or the LTX-2 VAE from 'Load LTX-2 VAE' (720p),
sampling from the Velox Sampler (or core KSampler), all on ComfyUI's own types.

Sizes: queue-time checks are the Wan VAE's (4n + 1 frames, multiples of 16), which every LTX-2 size
(8n + 1, multiples of 32) also passes; image-to-video checks the size again against the connected VAE
when it runs.
"""

from __future__ import annotations

import json

import comfy.model_management
import torch
from comfy_api.latest import io

from ..host.model_paths import model_choices, resolve_model_choice
from ..host.quant_inputs import quantization_inputs
from ..host.sana_video_conditioning import DEFAULT_MOTION_SCORE, latent_frames, video_vae_compression
from ..loaders.families import SANA_VIDEO, diffusers_folder_family
from ..loaders.ltx2_vae_keys import DIFFUSERS_CLASS as LTX2_VAE_CLASS
from .queue_validation import VeloxNode
from .sana_nodes import DTYPES
from .wan_sampling_nodes import video_size_problem, wan_video_problem

CATEGORY = "Velox/SANA-Video"
LATENT_CHANNELS = 16  # Wan 2.1 VAE (the 480p release)
MIN_SIZE_MULTIPLE = 16  # the 480p model's 2 x 2 patches of 1/8 latent pixels; LTX-2's 1/32 is coarser


def _is_sana_video_folder(path) -> bool:
    return diffusers_folder_family(path) is SANA_VIDEO


def _is_ltx2_vae_folder(path) -> bool:
    return any(_config_class(config) == LTX2_VAE_CLASS for config in (path / "vae" / "config.json", path / "config.json"))


def _config_class(config) -> str | None:
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def _size_inputs(tooltips: dict[str, str] | None = None) -> list:
    tooltips = {
        "width": "Video width in pixels, a multiple of 16 (480p release: 832).",
        "height": "Video height in pixels, a multiple of 16 (480p release: 480).",
        "length": "Frames, 4n + 1 as the Wan VAE needs (release: 81 at 16 fps).",
        **(tooltips or {}),
    }
    return [
        io.Int.Input("width", default=832, min=16, max=8192, step=16, tooltip=tooltips["width"]),
        io.Int.Input("height", default=480, min=16, max=8192, step=16, tooltip=tooltips["height"]),
        io.Int.Input("length", default=81, min=1, max=8192, step=4, tooltip=tooltips["length"]),
        io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Videos per batch."),
    ]


# image-to-video takes either VAE: the tooltips say both rules
VAE_DEPENDENT_TOOLTIPS = {
    "width": "Video width in pixels: a multiple of 16 with the Wan VAE (480p: 832), of 32 with the LTX-2 VAE "
    "(720p: 1280).",
    "height": "Video height in pixels: a multiple of 16 with the Wan VAE (480p: 480), of 32 with the LTX-2 VAE "
    "(720 is not: 704 or 736).",
    "length": "Frames: 4n + 1 with the Wan VAE, 8n + 1 with the LTX-2 VAE (81 suits both).",
}


def _vae_size_problem(vae, width: int, height: int, length: int) -> str | None:
    """The size against the connected VAE (Wan 2.1: 4n + 1 frames, multiples of 16; LTX-2: 8n + 1, 32),
    or None; what queue-time validation, which cannot see the VAE, leaves to run time."""
    compression = video_vae_compression(vae)
    if compression is None:
        return ("the connected VAE is not a video VAE: connect the Wan 2.1 VAE ('Load Wan VAE') or the LTX-2 VAE "
                "('Load LTX-2 VAE (Velox)')")
    frames_per_latent, spatial = compression
    problem = video_size_problem(width, height, length, frames_per_latent, max(spatial, MIN_SIZE_MULTIPLE))
    if problem is None:
        return None
    return (f"with the connected VAE ({vae.latent_channels} latent channels, {frames_per_latent}x{spatial}x{spatial} "
            f"compression), {problem}")


def _size_problems(values: dict) -> list[str]:
    sizes = {"width": 16, "height": 16, "length": 1}  # stand-ins for linked sizes, checked at run time
    sizes.update((name, value) for name, value in values.items() if name in sizes and isinstance(value, int))
    problem = wan_video_problem(**sizes)
    return [problem] if problem else []


class SanaVideoLoader(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxSanaVideoLoader",
            display_name="Load SANA-Video Model (Velox)",
            category=CATEGORY,
            description="Loads a SANA-Video transformer (2B 480p on the Wan 2.1 VAE; the 720p LTX-2 variant "
            "loads too) from any layout: the official SANA_Video_2B_480p.pth or safetensors, a diffusers "
            "file or folder (SANA-Video_2B_480p_diffusers, sharded too), ComfyUI-prefixed, or the local "
            "Hugging Face cache, GGUF (scripts/convert_to_gguf.py) or scaled-fp8 / comfy_quant. The variant is detected "
            "from the weights; shift 8 is set for sampling.",
            inputs=[
                io.Combo.Input("model_name", options=model_choices("diffusion_models", _is_sana_video_folder, (".gguf",)),
                               tooltip="A file (GGUF included) or diffusers folder in models/diffusion_models, or a "
                               "SANA-Video repository already in the Hugging Face cache (never downloaded)."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="default",
                               tooltip="Weight precision; 'default' lets ComfyUI pick for this GPU."),
                *quantization_inputs(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model_name, weight_dtype, quantization="none", quant_compute="dequant") -> io.NodeOutput:
        from ..host.sana_video_model import load_sana_video_model

        path = resolve_model_choice("diffusion_models", model_name)
        return io.NodeOutput(load_sana_video_model(path, dtype=DTYPES[weight_dtype], quantization=quantization,
                                                   quant_compute=quant_compute))


class SanaVideoTextEncode(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxSanaVideoTextEncode",
            display_name="SANA-Video Text Encode (Velox)",
            category=CATEGORY,
            description="Encodes the positive prompt as SANA-Video's pipelines do: ' motion score: N.' appended, "
            "the video complex human instruction in front, Gemma's last hidden state over 300 tokens with "
            "the attention mask. Encode the negative prompt with 'Sana Text Encode' and complex human "
            "instruction off (the reference encodes it plainly, without a motion score).",
            inputs=[
                io.Clip.Input("clip", tooltip="The Gemma text encoder from 'Load Sana Text Encoder'."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The prompt."),
                io.Int.Input("motion_score", default=DEFAULT_MOTION_SCORE, min=0, max=1000,
                             tooltip="How much motion to ask for; appended as ' motion score: N.' (release "
                             "default 30; higher moves more)."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, clip, text, motion_score) -> io.NodeOutput:
        from ..host.sana_video_conditioning import encode_sana_video_prompt

        if clip is None:
            raise RuntimeError("VeloxSanaVideoTextEncode: no text encoder connected to 'clip'.")
        return io.NodeOutput(encode_sana_video_prompt(clip, text, motion_score))


class EmptySanaVideoLatent(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxEmptySanaVideoLatent",
            display_name="Empty SANA-Video Latent (Velox)",
            category=CATEGORY,
            description="Empty 5-D Wan 2.1 VAE latent for SANA-Video text-to-video: (B, 16, (frames - 1) / 4 + 1, "
            "H / 8, W / 8). Refuses frame counts other than 4n + 1 and sizes that are not multiples of 16, "
            "saying which value to use. For the 720p LTX-2 variant use core's EmptyLTXVLatentVideo "
            "(128 channels, 8x32x32).",
            inputs=_size_inputs(),
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def value_problems(cls, values: dict) -> list[str]:
        return _size_problems(values)

    @classmethod
    def execute(cls, width, height, length, batch_size) -> io.NodeOutput:
        cls.check_values(width=width, height=height, length=length, batch_size=batch_size)
        shape = [batch_size, LATENT_CHANNELS, latent_frames(length), height // 8, width // 8]
        return io.NodeOutput({"samples": torch.zeros(shape, device=comfy.model_management.intermediate_device())})


class SanaVideoImageToVideo(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxSanaVideoImageToVideo",
            display_name="SANA-Video Image to Video (Velox)",
            category=CATEGORY,
            description="SANA-Video image-to-video as SanaImageToVideoPipeline: the start image, resized to the "
            "video size, is VAE-encoded into latent frame 0, which a noise mask keeps clean (the model runs "
            "it at t = 0); the other frames are sampled. The conditioning passes through unchanged. The latent "
            "follows the connected VAE: Wan 2.1 (480p; 16 channels, 4n + 1 frames, 1/8 size) or LTX-2 (720p; "
            "128 channels, 8n + 1 frames, 1/32 size); a size that VAE cannot take is refused when the node runs.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="From 'SANA-Video Text Encode'."),
                io.Conditioning.Input("negative", tooltip="The plainly encoded negative prompt."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE ('Load Wan VAE') for 480p, or the LTX-2 VAE "
                             "('Load LTX-2 VAE (Velox)') for 720p."),
                io.Image.Input("start_image", tooltip="The first frame of the video (the first image of a batch)."),
                *_size_inputs(VAE_DEPENDENT_TOOLTIPS),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative"),
                     io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def value_problems(cls, values: dict) -> list[str]:
        return _size_problems(values)

    @classmethod
    def execute(cls, positive, negative, vae, start_image, width, height, length, batch_size) -> io.NodeOutput:
        from ..host.sana_video_conditioning import image_to_video_latent

        cls.check_values(width=width, height=height, length=length, batch_size=batch_size)
        problem = _vae_size_problem(vae, width, height, length)
        if problem:
            raise ValueError(f"{cls.define_schema().node_id}: {problem}")
        latent = image_to_video_latent(vae, start_image, width, height, length, batch_size)
        return io.NodeOutput(positive, negative, latent)


class LTX2VAELoader(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxLTX2VAELoader",
            display_name="Load LTX-2 VAE (Velox)",
            category=CATEGORY,
            description="Loads the LTX-2 video VAE (128 latent channels, 8x32x32 compression; SANA-Video 720p's) "
            "as a native VAE that core VAEDecode / VAEEncode accept: a diffusers AutoencoderKLLTX2Video folder or "
            "file, or the official / ComfyUI LTX-2 VAE safetensors (a whole LTX-2 checkpoint's vae. part too). "
            "LTX-Video 0.9.x VAEs are refused.",
            inputs=[
                io.Combo.Input("vae_name", options=model_choices("vae", _is_ltx2_vae_folder),
                               tooltip="A .safetensors file or diffusers folder in models/vae, or a cached "
                               "repository (never downloaded)."),
            ],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, vae_name) -> io.NodeOutput:
        from ..host.ltx2_vae_loading import load_ltx2_vae

        return io.NodeOutput(load_ltx2_vae(resolve_model_choice("vae", vae_name)))


SANA_VIDEO_NODES = [SanaVideoLoader, SanaVideoTextEncode, EmptySanaVideoLatent, SanaVideoImageToVideo, LTX2VAELoader]
