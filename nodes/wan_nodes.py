"""Wan loader nodes: the transformer (any layout, either Wan 2.2 expert), the VAE and umT5-XXL.

Glue only: each node resolves its dropdown choice and calls ``host.wan_loading``, which builds
ComfyUI core's own Wan classes, so the outputs are core's MODEL, VAE and CLIP types.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..host.attention_select import apply_attention_choice, attention_input
from ..host.model_paths import model_choices, resolve_model_choice
from ..host.quant_inputs import quantization_inputs
from ..host.wan_loading import EXPERTS
from .queue_validation import VeloxNode

CATEGORY = "Velox/Wan"
WAN_CLASS_NAMES = ("WanTransformer3DModel", "WanVACETransformer3DModel", '"WanModel"')  # diffusers, official
DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _config_mentions(path, name: str) -> bool:
    config = path / "config.json"
    return config.is_file() and name in config.read_text(errors="ignore")


def _is_wan_folder(path) -> bool:
    configs = (path / "transformer", path / "high_noise_model", path)
    return any(_config_mentions(folder, name) for folder in configs for name in WAN_CLASS_NAMES)


def _is_wan_vae_folder(path) -> bool:
    return _config_mentions(path / "vae", "AutoencoderKLWan") or _config_mentions(path, "AutoencoderKLWan")


def _is_umt5_folder(path) -> bool:
    return _config_mentions(path / "text_encoder", "umt5") and (path / "tokenizer").is_dir()


class WanModelLoader(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxWanLoader",
            display_name="Load Wan Model (Velox)",
            category=CATEGORY,
            description="Loads a Wan 2.1 / 2.2 transformer (T2V 1.3B / 14B, I2V 14B, Wan 2.2 A14B experts, VACE) "
            "from any layout (official or Kijai safetensors, ComfyUI-prefixed, diffusers file or folder, "
            "sharded, local Hugging Face cache) onto ComfyUI core's Wan model. The variant is detected "
            "from the weights.",
            inputs=[
                io.Combo.Input("model_name", options=model_choices("diffusion_models", _is_wan_folder, (".gguf",)),
                               tooltip="A file (GGUF included) or diffusers folder in models/diffusion_models, or a Wan "
                               "repository already in the Hugging Face cache (never downloaded)."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="default",
                               tooltip="Weight precision; 'default' lets ComfyUI pick for this GPU."),
                io.Combo.Input("expert", options=list(EXPERTS), default="high_noise",
                               tooltip="Only for a Wan 2.2 A14B folder: 'high_noise' loads transformer/ "
                               "(or high_noise_model/), 'low_noise' loads transformer_2/ (or "
                               "low_noise_model/). Single files hold one model and ignore this."),
                *quantization_inputs(),
                attention_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model_name, weight_dtype, expert, quantization="none", quant_compute="dequant",
                attention="auto") -> io.NodeOutput:
        from ..host.wan_loading import load_wan_model

        path = resolve_model_choice("diffusion_models", model_name)
        patcher = load_wan_model(path, dtype=DTYPES[weight_dtype], expert=expert, quantization=quantization,
                                 quant_compute=quant_compute)
        lowp = quant_compute == "lowp" and quantization != "none"
        return io.NodeOutput(apply_attention_choice(patcher, attention, lowp))


class WanVAELoader(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxWanVAELoader",
            display_name="Load Wan VAE (Velox)",
            category=CATEGORY,
            description="Loads the Wan VAE (official / ComfyUI / Kijai file, or diffusers AutoencoderKLWan "
            "file or folder) as a native VAE that core VAEDecode / VAEEncode / WanImageToVideo accept.",
            inputs=[
                io.Combo.Input("vae_name", options=model_choices("vae", _is_wan_vae_folder),
                               tooltip="A file or folder in models/vae, or a cached repository."),
            ],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, vae_name) -> io.NodeOutput:
        from ..host.wan_loading import load_wan_vae

        return io.NodeOutput(load_wan_vae(resolve_model_choice("vae", vae_name)))


class UMT5Loader(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxUMT5Loader",
            display_name="Load Wan Text Encoder (umT5-XXL, Velox)",
            category=CATEGORY,
            description="Loads umT5-XXL as Wan's text encoder: ComfyUI's umt5_xxl_*.safetensors, or a Wan "
            "diffusers folder's text_encoder/ + tokenizer/. Core's CLIPTextEncode encodes with it. The size is "
            "read from the weights (umT5-XXL loads as core loads it; smaller umT5s get their own config).",
            inputs=[
                io.Combo.Input("text_encoder_name", options=model_choices("text_encoders", _is_umt5_folder,
                                                                          (".gguf",)),
                               tooltip="A file (GGUF included) or folder in models/text_encoders, or a cached "
                               "repository."),
                io.Combo.Input("device", options=["default", "cpu"], default="default",
                               tooltip="'cpu' keeps umT5-XXL (11 GB in bf16) off the GPU."),
            ],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, text_encoder_name, device) -> io.NodeOutput:
        from ..host.wan_loading import load_umt5

        path = resolve_model_choice("text_encoders", text_encoder_name)
        return io.NodeOutput(load_umt5(path, cpu=device == "cpu"))


WAN_LOADER_NODES = [WanModelLoader, WanVAELoader, UMT5Loader]
