"""Sana nodes: loaders for the transformer, Gemma and DC-AE, text encoding, empty latents.

Glue only: each node validates its inputs, calls a loader or the host bridge, and returns
ComfyUI's own types (MODEL, CLIP, CONDITIONING, VAE, LATENT).
"""

from __future__ import annotations

import comfy.model_management
import torch
from comfy_api.latest import io

from ..host.model_paths import model_choices, resolve_model_choice
from ..host.quant_inputs import quantization_inputs
from ..loaders.families import SANA, diffusers_folder_family
from .queue_validation import VeloxNode

CATEGORY = "Velox/Sana"
DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPILE_MODES = {"off": None, "inductor": "default", "inductor + cuda graphs": "reduce-overhead"}


def _is_sana_folder(path) -> bool:
    owner = diffusers_folder_family(path)  # a folder of another family (SANA-Video, Wan) is not listed
    if owner is not None and owner is not SANA:
        return False
    return (path / "transformer" / "config.json").is_file() or (
        (path / "config.json").is_file() and "Sana" in (path / "config.json").read_text(errors="ignore")
    )


def _is_gemma_folder(path) -> bool:
    return (path / "text_encoder" / "config.json").is_file() or (
        (path / "config.json").is_file() and "gemma" in (path / "config.json").read_text(errors="ignore").lower()
    )


def _is_dcae_folder(path) -> bool:
    return (path / "vae" / "config.json").is_file() or (
        (path / "config.json").is_file() and "AutoencoderDC" in (path / "config.json").read_text(errors="ignore")
    )


class SanaModelLoader(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxSanaLoader",
            display_name="Load Sana Model (Velox)",
            category=CATEGORY,
            description="Loads a Sana / Sana 1.5 / SANA-Sprint transformer from any layout (official .pth or "
            "safetensors, diffusers file or folder, ComfyUI-prefixed, local Hugging Face cache). The size, "
            "q/k norm, position embedding and Sprint variant are detected from the weights.",
            inputs=[
                io.Combo.Input("model_name", options=model_choices("diffusion_models", _is_sana_folder, (".gguf",)),
                               tooltip="A file (GGUF included) or diffusers folder in models/diffusion_models, or a Sana "
                               "repository already in the Hugging Face cache (never downloaded)."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="default",
                               tooltip="Weight precision; 'default' lets ComfyUI pick for this GPU."),
                io.Combo.Input("compile", options=list(COMPILE_MODES), default="off",
                               tooltip="torch.compile the transformer at its first sampling step, once per "
                               "resolution and batch size (about a minute each). 'cuda graphs' also "
                               "removes launch overhead; use it only when the model stays on the GPU."),
                *quantization_inputs(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model_name, weight_dtype, compile, quantization="none", quant_compute="dequant") -> io.NodeOutput:
        from ..host.sana_loading import load_sana_model

        path = resolve_model_choice("diffusion_models", model_name)
        model = load_sana_model(path, dtype=DTYPES[weight_dtype], quantization=quantization,
                                quant_compute=quant_compute)
        if COMPILE_MODES[compile] is not None:
            from comfy_api.torch_helpers import set_torch_compile_wrapper

            set_torch_compile_wrapper(model=model, backend="inductor", dynamic=False, mode=COMPILE_MODES[compile])
        return io.NodeOutput(model)


class GemmaLoader(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxGemmaLoader",
            display_name="Load Sana Text Encoder (Gemma-2, Velox)",
            category=CATEGORY,
            description="Loads Gemma-2-2B(-it) as Sana's text encoder: ComfyUI's single-file Gemma, a "
            "Hugging Face folder (config.json, weights, tokenizer files), or a Sana diffusers folder's "
            "text_encoder/ + tokenizer/.",
            inputs=[
                io.Combo.Input("text_encoder_name", options=model_choices("text_encoders", _is_gemma_folder,
                                                                          (".gguf",)),
                               tooltip="A file (GGUF included) or folder in models/text_encoders, or a cached "
                               "repository."),
                io.Combo.Input("device", options=["default", "cpu"], default="default",
                               tooltip="'cpu' keeps Gemma (5 GB in bf16) off the GPU."),
            ],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, text_encoder_name, device) -> io.NodeOutput:
        from ..host.sana_loading import load_gemma

        path = resolve_model_choice("text_encoders", text_encoder_name)
        return io.NodeOutput(load_gemma(path, cpu=device == "cpu"))


class SanaTextEncode(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxSanaTextEncode",
            display_name="Sana Text Encode (Velox)",
            category=CATEGORY,
            description="Encodes a prompt the way Sana was trained: Gemma's last hidden state after the final "
            "norm, 300 tokens, with the attention mask carried in the conditioning.",
            inputs=[
                io.Clip.Input("clip", tooltip="The Gemma text encoder from 'Load Sana Text Encoder'."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The prompt."),
                io.Boolean.Input("complex_human_instruction", default=True,
                                 tooltip="Prepend Sana's complex human instruction (on for the positive "
                                 "prompt, as the reference does; off for the negative prompt)."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, clip, text, complex_human_instruction) -> io.NodeOutput:
        if clip is None:
            raise RuntimeError("VeloxSanaTextEncode: no text encoder connected to 'clip'.")
        tokens = clip.tokenize(text, sana_chi=complex_human_instruction)
        return io.NodeOutput(clip.encode_from_tokens_scheduled(tokens))


class DCAELoader(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxDCAELoader",
            display_name="Load DC-AE VAE (Velox)",
            category=CATEGORY,
            description="Loads Sana's DC-AE f32c32 autoencoder (official or diffusers layout) as a native VAE "
            "that core VAEDecode / VAEEncode / VAEDecodeTiled accept.",
            inputs=[
                io.Combo.Input("vae_name", options=model_choices("vae", _is_dcae_folder),
                               tooltip="A file or folder in models/vae, or a cached repository."),
            ],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, vae_name) -> io.NodeOutput:
        from ..host.sana_loading import load_dcae

        return io.NodeOutput(load_dcae(resolve_model_choice("vae", vae_name)))


class EmptySanaLatent(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxEmptySanaLatent",
            display_name="Empty Sana Latent (Velox)",
            category=CATEGORY,
            description="An empty 32-channel DC-AE latent at 1/32 of the image size.",
            inputs=[
                io.Int.Input("width", default=1024, min=32, max=8192, step=32,
                             tooltip="Image width in pixels; a multiple of 32."),
                io.Int.Input("height", default=1024, min=32, max=8192, step=32,
                             tooltip="Image height in pixels; a multiple of 32."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per run."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def value_problems(cls, values: dict) -> list[str]:
        return [f"{name} {value} is not a multiple of 32 (DC-AE works on 32-pixel cells); use "
                f"{value // 32 * 32} or {value // 32 * 32 + 32}"
                for name, value in values.items() if name in ("width", "height") and isinstance(value, int) and value % 32]

    @classmethod
    def execute(cls, width, height, batch_size) -> io.NodeOutput:
        cls.check_values(width=width, height=height, batch_size=batch_size)
        device = comfy.model_management.intermediate_device()
        latent = torch.zeros([batch_size, 32, height // 32, width // 32], device=device)
        return io.NodeOutput({"samples": latent})


SANA_NODES = [SanaModelLoader, GemmaLoader, SanaTextEncode, DCAELoader, EmptySanaLatent]
