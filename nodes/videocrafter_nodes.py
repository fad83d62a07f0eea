"""VideoCrafter 1/2 and DynamiCrafter nodes: loader, empty video latent, I2V conditioning, sampler, decode.

Glue only: ``host.videocrafter_loading`` builds MODEL / CLIP / VAE / CLIP_VISION on core classes,
``host.videocrafter_sampling`` runs the reference DDIM. Prompts go through core's CLIPTextEncode.
LATENT is 5-D (B, 4, T, H/8, W/8), unscaled like every ComfyUI latent.
"""

from __future__ import annotations

import comfy.model_management
import torch
from comfy_api.latest import io

from ..host.attention_select import apply_attention_choice, attention_input
from ..host.model_paths import model_choices, resolve_model_choice
from ..host.quant_inputs import quantization_inputs
from ..loaders.videocrafter_detect import VARIANTS
from .queue_validation import VeloxNode

CATEGORY = "Velox/VideoCrafter"
DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SPACINGS = ["release", "uniform", "uniform_trailing"]
NEGATIVE_IMAGE_VALUE = 0.5  # lvdm's negative image is zeros in [-1, 1], i.e. mid grey in ComfyUI's [0, 1]


class VideoCrafterLoader(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxVideoCrafterLoader",
            display_name="Load VideoCrafter / DynamiCrafter (Velox)",
            category=CATEGORY,
            description="Loads a VideoCrafter 1 / 2 or DynamiCrafter release file (model.ckpt, read weights-only, or "
            "safetensors with the same keys) as MODEL, CLIP (SD2 OpenCLIP ViT-H text), VAE (SD KL-f8) and, for "
            "image-to-video releases, CLIP_VISION (ViT-H). The release is detected from the weights.",
            inputs=[
                io.Combo.Input("ckpt_name", options=model_choices("checkpoints", lambda _p: False, (".gguf",)),
                               tooltip="A release file in models/checkpoints (e.g. VideoCrafter2's model.ckpt "
                               "renamed videocrafter2_t2v.ckpt, dynamicrafter_512.ckpt), or a .gguf that "
                               "scripts/convert_to_gguf.py made of one (UNet quantized, the rest float)."),
                io.Combo.Input("variant", options=["auto", *VARIANTS], default="auto",
                               tooltip="auto: from the weights; DynamiCrafter 512 / 1024 / interpolation share "
                               "their keys, so the file name decides ('1024', 'interp') unless set here."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="default",
                               tooltip="UNet weight precision; 'default' lets ComfyUI pick for this GPU."),
                *quantization_inputs(),
                attention_input(),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output(), io.ClipVision.Output()],
        )

    @classmethod
    def execute(cls, ckpt_name, variant, weight_dtype, quantization="none", quant_compute="dequant",
                attention="auto") -> io.NodeOutput:
        from ..host.videocrafter_loading import load_videocrafter_checkpoint

        path = resolve_model_choice("checkpoints", ckpt_name)
        model, clip, vae, vision, _ = load_videocrafter_checkpoint(path, variant, DTYPES[weight_dtype],
                                                                   quantization, quant_compute)
        lowp = quant_compute == "lowp" and quantization != "none"
        return io.NodeOutput(apply_attention_choice(model, attention, lowp), clip, vae, vision)


class VideoCrafterUNetLoader(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxVideoCrafterUNetLoader",
            display_name="Load VideoCrafter / DynamiCrafter UNet (Velox)",
            category=CATEGORY,
            description="Loads only the 3D UNet (and, for image-to-video, its image projection) as MODEL: a "
            "UNet-only file in models/diffusion_models (GGUF, safetensors) or a whole release file whose other "
            "models are skipped. CLIP, VAE and CLIP_VISION then come from VeloxVideoCrafterLoader on the release "
            "file, or core's CLIPLoader / VAELoader / CLIPVisionLoader.",
            inputs=[
                io.Combo.Input("unet_name", options=model_choices("diffusion_models", lambda _p: False, (".gguf",)),
                               tooltip="A VideoCrafter / DynamiCrafter UNet in models/diffusion_models (or "
                               "models/unet): .gguf, .safetensors or a weights-only .ckpt."),
                io.Combo.Input("variant", options=["auto", *VARIANTS], default="auto",
                               tooltip="auto: from the weights; DynamiCrafter 512 / 1024 / interpolation share "
                               "their keys, so the file name decides ('1024', 'interp') unless set here."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="default",
                               tooltip="UNet weight precision; 'default' lets ComfyUI pick for this GPU."),
                *quantization_inputs(),
                attention_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, unet_name, variant, weight_dtype, quantization="none", quant_compute="dequant",
                attention="auto") -> io.NodeOutput:
        from ..host.videocrafter_loading import load_videocrafter_unet

        path = resolve_model_choice("diffusion_models", unet_name)
        model, _ = load_videocrafter_unet(path, variant, DTYPES[weight_dtype], quantization, quant_compute)
        lowp = quant_compute == "lowp" and quantization != "none"
        return io.NodeOutput(apply_attention_choice(model, attention, lowp))


class EmptyVideoCrafterLatent(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxEmptyVideoCrafterLatent",
            display_name="Empty VideoCrafter Latent (Velox)",
            category=CATEGORY,
            description="An empty 5-D video latent (B, 4, frames, height/8, width/8). Official sizes: VideoCrafter 2 "
            "and DynamiCrafter 512 320x512, DynamiCrafter 1024 576x1024, DynamiCrafter 256 256x256; 16 frames.",
            inputs=[
                io.Int.Input("width", default=512, min=64, max=2048, step=64,
                             tooltip="Video width in pixels (VideoCrafter 2 / DynamiCrafter 512: 512)."),
                io.Int.Input("height", default=320, min=64, max=2048, step=64,
                             tooltip="Video height in pixels (VideoCrafter 2 / DynamiCrafter 512: 320)."),
                io.Int.Input("frames", default=16, min=1, max=64,
                             tooltip="Frames: 16 as released (DynamiCrafter takes exactly 16, VideoCrafter 1..32)."),
                io.Int.Input("batch_size", default=1, min=1, max=16, tooltip="Videos per run."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, width, height, frames, batch_size) -> io.NodeOutput:
        shape = (batch_size, 4, frames, height // 8, width // 8)
        samples = torch.zeros(shape, device=comfy.model_management.intermediate_device())
        return io.NodeOutput({"samples": samples})


class DynamiCrafterConditioning(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxDynamiCrafterConditioning",
            display_name="DynamiCrafter Image Conditioning (Velox)",
            category=CATEGORY,
            description="Adds the start image to image-to-video conditioning (DynamiCrafter, VideoCrafter 1 I2V): "
            "its CLIP ViT-H tokens (resized to 224x224 without crop, as the reference) and, for DynamiCrafter, "
            "its VAE latent concatenated to every frame. The negative gets the tokens of a mid-grey image "
            "(the reference's zero image in [-1, 1]).",
            inputs=[
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning (CLIPTextEncode)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt's conditioning (the reference "
                                      "uses an empty prompt)."),
                io.ClipVision.Input("clip_vision", tooltip="The loader's CLIP_VISION (ViT-H)."),
                io.Vae.Input("vae", tooltip="The loader's VAE, to encode the start image."),
                io.Image.Input("start_image", tooltip="Resized to width x height before VAE encoding."),
                io.Int.Input("width", default=512, min=64, max=2048, step=64,
                             tooltip="The video's width: the start image latent must match the video latent."),
                io.Int.Input("height", default=320, min=64, max=2048, step=64,
                             tooltip="The video's height: the start image latent must match the video latent."),
                io.Image.Input("end_image", optional=True,
                               tooltip="Interpolation / loop (DynamiCrafter 512 interp): the last frame. Then "
                               "only the first and last frames carry image latents, the others zeros."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, positive, negative, clip_vision, vae, start_image, width, height, end_image=None) -> io.NodeOutput:
        if clip_vision is None:
            raise ValueError("VeloxDynamiCrafterConditioning: no CLIP_VISION; load an image-to-video release file "
                             "(it carries embedder.model.visual.*) or core's CLIP vision ViT-H")
        if vae is None:
            raise ValueError("VeloxDynamiCrafterConditioning: no VAE; this file has no first_stage_model.*, load "
                             "the SD KL-f8 VAE (e.g. vae-ft-mse-840000) with core's VAELoader")
        image = start_image[:1]
        tokens = clip_vision.encode_image(image, crop=False)["last_hidden_state"]
        grey = torch.full_like(image, NEGATIVE_IMAGE_VALUE)
        grey_tokens = clip_vision.encode_image(grey, crop=False)["last_hidden_state"]
        values = {"videocrafter_image_latent": _encode(vae, image, width, height)}
        if end_image is not None:
            values["videocrafter_end_latent"] = _encode(vae, end_image[:1], width, height)
        pos = _with(positive, {"clip_vision_tokens": tokens, **values})
        neg = _with(negative, {"clip_vision_tokens": grey_tokens, **values})
        return io.NodeOutput(pos, neg)


def _encode(vae, image, width: int, height: int) -> torch.Tensor:
    import comfy.utils

    pixels = comfy.utils.common_upscale(image.movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
    return vae.encode(pixels[:, :, :, :3])


def _with(conditioning, values: dict):
    return [[tensor, {**extra, **values}] for tensor, extra in conditioning]


class VideoCrafterSampler(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxVideoCrafterSampler",
            display_name="VideoCrafter Sampler (Velox)",
            category=CATEGORY,
            description="The reference DDIM of VideoCrafter / DynamiCrafter: eta, CFG, the timestep-scaled x0 "
            "correction (scale_b / base_scale), v-prediction with zero terminal SNR, trailing spacing and "
            "guidance rescale. Zero / -1 / 'release' take the release's official value (VideoCrafter 2: CFG 12, "
            "fps 28; DynamiCrafter: CFG 7.5, fps 24 (512) / 10 (1024), frame stride 3 (256)).",
            inputs=[
                io.Model.Input("model", tooltip="A MODEL from VeloxVideoCrafterLoader."),
                io.Conditioning.Input("positive", tooltip="What the video should show (for image-to-video: "
                                      "through VeloxDynamiCrafterConditioning)."),
                io.Conditioning.Input("negative", tooltip="What to steer away from (the reference: empty prompt)."),
                io.Latent.Input("latent", tooltip="A 5-D latent from VeloxEmptyVideoCrafterLatent."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed (start noise and the eta noise of every step)."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="DDIM steps (official: 50)."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="0: the release's CFG."),
                io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="DDIM eta: 1.0 as every official script; 0 is deterministic."),
                io.Int.Input("fps", default=0, min=0, max=120,
                             tooltip="fps (or DynamiCrafter 256's frame stride) the model is told; 0: release."),
                io.Float.Input("guidance_rescale", default=-1.0, min=-1.0, max=1.0, step=0.05,
                               tooltip="-1: the release's (0.7 for DynamiCrafter 512 / 1024, else 0)."),
                io.Combo.Input("timestep_spacing", options=SPACINGS, default="release",
                               tooltip="release: the release's (uniform; DynamiCrafter 512 / 1024: "
                               "uniform_trailing, which starts at t = 999)."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, seed, steps, cfg, eta, fps, guidance_rescale,
                timestep_spacing) -> io.NodeOutput:
        from ..host.videocrafter_sampling import model_variant, resolve_settings, sample_videocrafter

        variant = model_variant(model, "VeloxVideoCrafterSampler")
        settings = resolve_settings(variant, steps, cfg, eta, fps, guidance_rescale, timestep_spacing)
        return io.NodeOutput(sample_videocrafter(model, positive, negative, latent, seed, settings))


class VideoCrafterDecode(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxVideoCrafterDecode",
            display_name="VideoCrafter Decode (Velox)",
            category=CATEGORY,
            description="Decodes a 5-D video latent frame by frame in chunks (the reference's perframe_ae) into "
            "B x T images, frames of one video consecutive.",
            inputs=[
                io.Vae.Input("vae", tooltip="The loader's VAE (SD KL-f8)."),
                io.Latent.Input("samples", tooltip="A 5-D video latent (VeloxVideoCrafterSampler)."),
                io.Int.Input("frames_per_chunk", default=4, min=1, max=64,
                             tooltip="Frames decoded at once: fewer use less memory."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, vae, samples, frames_per_chunk) -> io.NodeOutput:
        latent = samples["samples"]
        if vae is None:
            raise ValueError("VeloxVideoCrafterDecode: no VAE; this file has no first_stage_model.*, load the SD "
                             "KL-f8 VAE with core's VAELoader")
        if latent.ndim != 5:
            raise ValueError(f"VeloxVideoCrafterDecode: expected a 5-D video latent, got shape {tuple(latent.shape)}")
        frames = latent.transpose(1, 2).flatten(0, 1)  # (B*T, 4, h, w), each video's frames in order
        images = [vae.decode(chunk) for chunk in frames.split(frames_per_chunk)]
        return io.NodeOutput(torch.cat(images).reshape(-1, *images[0].shape[-3:]))


class VideoCrafterDDIM(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxVideoCrafterDDIM",
            display_name="VideoCrafter DDIM Sampler (Velox)",
            category=CATEGORY,
            description="lvdm's DDIM as a SAMPLER for core SamplerCustom: eta noise and the release's "
            "timestep-scaled x0 correction, read from the MODEL. Use with VeloxVideoCrafterSigmas. Core's CFG "
            "guider has no guidance rescale; VeloxVideoCrafterSampler is the exact reference.",
            inputs=[io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.01,
                                   tooltip="DDIM eta: 1.0 as every official script; 0 is deterministic.")],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, eta) -> io.NodeOutput:
        import comfy.samplers

        from ..host.videocrafter_ksampler import sample_videocrafter_ddim

        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_videocrafter_ddim, extra_options={"eta": eta}))


class VideoCrafterSigmas(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxVideoCrafterSigmas",
            display_name="VideoCrafter DDIM Sigmas (Velox)",
            category=CATEGORY,
            description="lvdm's DDIM timesteps as sigmas of the MODEL: 'uniform' (range(0, 1000, 1000 // steps) "
            "+ 1, VideoCrafter and DynamiCrafter 256) or 'uniform_trailing' (ends at 999, DynamiCrafter 512 / 1024).",
            inputs=[
                io.Model.Input("model", tooltip="A MODEL from VeloxVideoCrafterLoader."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="DDIM steps (official: 50)."),
                io.Combo.Input("timestep_spacing", options=SPACINGS, default="release",
                               tooltip="release: the loaded release's spacing."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, steps, timestep_spacing) -> io.NodeOutput:
        from ..host.videocrafter_ksampler import videocrafter_sigmas
        from ..host.videocrafter_sampling import model_variant

        if timestep_spacing == "release":
            timestep_spacing = model_variant(model, "VeloxVideoCrafterSigmas").preset.spacing
        return io.NodeOutput(videocrafter_sigmas(model, steps, timestep_spacing))


VIDEOCRAFTER_NODES = [VideoCrafterLoader, EmptyVideoCrafterLatent, DynamiCrafterConditioning, VideoCrafterSampler,
                      VideoCrafterDecode, VideoCrafterDDIM, VideoCrafterSigmas, VideoCrafterUNetLoader]
