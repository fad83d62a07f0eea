"""One VideoCrafter / DynamiCrafter release file -> MODEL, CLIP, VAE and (I2V) CLIP_VISION, on core classes.

The file is the official Lightning ``model.ckpt`` (read with ``torch.load(weights_only=True)``), a
safetensors of the same keys, or a GGUF of either or of the UNet alone (``host.videocrafter_quant``).
``loaders.videocrafter_detect`` splits it by prefix and names the release; then:

- MODEL: ``host.videocrafter_model`` (Velox UNet3D + Resampler in a ComfyUI BaseModel);
- VAE: ``comfy.sd.VAE`` on ``first_stage_model.*`` (SD KL-f8; a narrower demo VAE gets its ddconfig
  from the shapes);
- CLIP: core's SD2 OpenCLIP ViT-H text model (penultimate layer) on ``cond_stage_model.model.*``,
  converted by core's own ``SD20.process_clip_state_dict``; a smaller demo tower gets its sizes
  through ``model_options["clip_h_model_config"]``;
- CLIP_VISION: core's ClipVisionModel on ``embedder.model.visual.*`` (OpenCLIP keys converted by core).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import comfy.clip_vision
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
import torch

from ..errors import VeloxLoadError
from ..loaders.families import VIDEOCRAFTER
from ..loaders.videocrafter_detect import (
    VideoCrafterVariant,
    detect_variant,
    refuse_foreign,
    split_components,
)
from .model_build import build_patcher
from .quant_loading import (
    densify_non_matrices,
    detection_view,
    has_quantized_layers,
    read_checkpoint,
    restore_packed,
)
from .videocrafter_model import VideoCrafterModelConfig

SD_VAE_CH = 128  # the released KL-f8 VAE's base width; anything else is built from its shapes
VIT_H_LAYERS = 32
OPENCLIP_TEXT_PREFIX = "cond_stage_model.model."
VISION_PREFIX = "embedder.model.visual."


def load_videocrafter_checkpoint(path: str | Path, variant: str = "auto", dtype: torch.dtype | None = None,
                                 quantization: str = "none", quant_compute: str = "dequant"):
    """(MODEL, CLIP | None, VAE | None, CLIP_VISION | None, VideoCrafterVariant) from one release file.

    GGUF (``host.videocrafter_quant``), scaled-fp8 and comfy_quant files, and ``quantization`` other than
    "none" (fp8_e4m3 / int8, computed by ``quant_compute`` dequant / lowp) load on ``host/quant_ops.py``.
    """
    from .videocrafter_quant import dense_encoders

    path = Path(path)
    weights = read_videocrafter_weights(path)
    model, found = build_videocrafter_unet(weights, path, variant, dtype, quantization, quant_compute)
    encoders = dense_encoders(weights)
    parts = split_components(encoders)
    vae = build_vae(parts["vae"], path) if "vae" in parts else None
    clip = build_clip(encoders, path) if "text" in parts else None
    vision = build_clip_vision(encoders, path) if "vision" in parts else None
    logging.info("Velox: %s loaded from %s", found.name, path.name)
    return model, clip, vae, vision, found


def load_videocrafter_unet(path: str | Path, variant: str = "auto", dtype: torch.dtype | None = None,
                           quantization: str = "none", quant_compute: str = "dequant"):
    """(MODEL, VideoCrafterVariant) from a UNet-only file or a release file (whose other models are skipped)."""
    path = Path(path)
    return build_videocrafter_unet(read_videocrafter_weights(path), path, variant, dtype, quantization, quant_compute)


def read_videocrafter_weights(path: Path) -> dict:
    """The read step: the file's weights, once; a GGUF of another family is refused by name first."""
    from .videocrafter_quant import refuse_foreign_gguf

    checkpoint = read_checkpoint(path, "transformer")
    refuse_foreign_gguf(path, checkpoint.gguf_metadata)
    return checkpoint.weights


def build_videocrafter_unet(weights: dict, path: Path, variant: str = "auto", dtype: torch.dtype | None = None,
                            quantization: str = "none", quant_compute: str = "dequant"):
    """(MODEL, VideoCrafterVariant) in one pass: detection on logical shapes, then one build, on
    quantized operations for packed weights or a ``quantization`` chosen at load."""
    quantized = quantization != "none" or has_quantized_layers(weights)
    view, lookup = detection_view(weights)  # packed records -> meta tensors of their logical shapes
    parts = split_components(view)
    if "unet" not in parts:
        refuse_foreign(view, path)
    found = detect_variant(parts, path, variant)
    unet = unet_weights(parts, found)
    state_dict = densify_non_matrices(restore_packed(unet, lookup, path))
    return build_unet(unet, state_dict, found, path, dtype, quantization, quant_compute, quantized), found


def unet_weights(parts: dict, variant: VideoCrafterVariant) -> dict:
    """The diffusion model's state dict: the UNet and, for image-to-video releases, the Resampler."""
    weights = dict(parts["unet"])
    weights.update({f"image_proj_model.{k}": v for k, v in parts.get("image_proj", {}).items()})
    if variant.resampler is None:
        weights = {k: v for k, v in weights.items() if not k.startswith("image_proj_model.")}
    return weights


def build_videocrafter_model(parts: dict, variant: VideoCrafterVariant, path=None,
                             dtype: torch.dtype | None = None) -> comfy.model_patcher.ModelPatcher:
    """Float UNet (+ Resampler) weights, already split and detected, on core's own operations."""
    weights = unet_weights(parts, variant)
    return build_unet(weights, weights, variant, path, dtype, quantized=False)


def build_unet(shapes: dict, state_dict: dict, variant: VideoCrafterVariant, path=None,
               dtype: torch.dtype | None = None, quantization: str = "none", compute: str = "dequant",
               quantized: bool = True) -> comfy.model_patcher.ModelPatcher:
    """The build step: the UNet (+ Resampler) as a MODEL through the families' ``build_patcher``."""
    return build_patcher(VIDEOCRAFTER, VideoCrafterModelConfig(variant), shapes, state_dict, path,
                         f"the detected {variant.name} UNet", dtype, quantization, compute, quantized=quantized,
                         expected="a complete VideoCrafter / DynamiCrafter checkpoint")


# ---------------------------------------------------------------------------------------------- VAE
def build_vae(vae_sd: dict, path=None) -> comfy.sd.VAE:
    conv_in = vae_sd.get("encoder.conv_in.weight")
    if conv_in is None:
        raise VeloxLoadError(path, "first_stage_model.* holds no KL VAE encoder", "the SD KL-f8 VAE weights")
    config = None if int(conv_in.shape[0]) == SD_VAE_CH else {"params": _kl_vae_params(vae_sd)}
    vae = comfy.sd.VAE(sd=dict(vae_sd), config=config)
    if vae.first_stage_model is None:
        raise VeloxLoadError(path, "ComfyUI did not recognise first_stage_model.* as a VAE", "the SD KL-f8 VAE")
    return vae


def _kl_vae_params(vae_sd: dict) -> dict:
    """AutoencoderKL kwargs read from the shapes of a non-standard-width KL VAE (the tiny demos)."""
    ch = int(vae_sd["encoder.conv_in.weight"].shape[0])
    levels = sorted({int(k.split(".")[2]) for k in vae_sd if k.startswith("encoder.down.")})
    blocks = sorted({int(k.split(".")[4]) for k in vae_sd if k.startswith("encoder.down.0.block.")})
    mult = [int(vae_sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in levels]
    z = int(vae_sd["decoder.conv_in.weight"].shape[1])
    ddconfig = {"double_z": True, "z_channels": z, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": ch,
                "ch_mult": mult, "num_res_blocks": len(blocks), "attn_resolutions": [], "dropout": 0.0}
    return {"ddconfig": ddconfig, "embed_dim": int(vae_sd["post_quant_conv.weight"].shape[1])}


# ---------------------------------------------------------------------------------------------- CLIP
def build_clip(state_dict: dict, path=None):
    """Core's SD2 CLIP (OpenCLIP ViT-H/14 text, penultimate layer) from ``cond_stage_model.model.*``."""
    sd20 = comfy.supported_models.SD20(dict(comfy.supported_models.SD20.unet_config))
    clip_sd = sd20.process_clip_state_dict({k: v for k, v in state_dict.items() if k.startswith(OPENCLIP_TEXT_PREFIX)})
    options = {}
    sizes = _text_tower_sizes(clip_sd)
    if sizes["hidden_size"] != 1024 or sizes["num_hidden_layers"] != 24:
        options["clip_h_model_config"] = sizes
    clip = comfy.sd.CLIP(sd20.clip_target(), embedding_directory=None, tokenizer_data=clip_sd,
                         parameters=comfy.utils.calculate_parameters(clip_sd), model_options=options)
    missing, _ = clip.load_sd(clip_sd, full_model=True)
    optional = ("position_ids", "text_projection", "logit_scale")
    missing = [k for k in missing if not any(name in k for name in optional)]
    if missing:
        raise VeloxLoadError(path, f"cond_stage_model.* does not fill the OpenCLIP text model ({missing[:3]})",
                             "the SD2 OpenCLIP ViT-H/14 text encoder")
    return clip


def _text_tower_sizes(clip_sd: dict) -> dict:
    prefix = "clip_h.transformer.text_model."
    hidden = int(clip_sd[prefix + "embeddings.token_embedding.weight"].shape[1])
    layers = len({k.split(".")[5] for k in clip_sd if k.startswith(prefix + "encoder.layers.")})
    inner = int(clip_sd[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0])
    return {"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": inner,
            "num_attention_heads": max(1, hidden // 64)}


# ---------------------------------------------------------------------------------------------- vision
def build_clip_vision(state_dict: dict, path=None):
    """Core's CLIP vision model from ``embedder.model.visual.*`` (ViT-H/14, or a smaller demo tower)."""
    visual = {k: v for k, v in state_dict.items() if k.startswith(VISION_PREFIX)}
    converted = comfy.clip_vision.convert_to_transformers(dict(visual), VISION_PREFIX)
    layers = len({k.split(".")[3] for k in converted if k.startswith("vision_model.encoder.layers.")})
    if layers == VIT_H_LAYERS:
        vision = comfy.clip_vision.load_clipvision_from_sd(converted)
    else:
        vision = _small_clip_vision(converted, layers)
    if vision is None:
        raise VeloxLoadError(path, "embedder.* is not a CLIP vision tower ComfyUI knows", "OpenCLIP ViT-H/14 visual")
    return vision


def _small_clip_vision(converted: dict, layers: int):
    patch = converted["vision_model.embeddings.patch_embedding.weight"]
    positions = int(converted["vision_model.embeddings.position_embedding.weight"].shape[0])
    hidden, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    config = {"hidden_act": "gelu", "hidden_size": hidden, "image_size": int(round((positions - 1) ** 0.5)) * patch_size,
              "intermediate_size": int(converted["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
              "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": max(1, hidden // 64),
              "num_channels": 3, "num_hidden_layers": layers, "patch_size": patch_size}
    if "visual_projection.weight" in converted:
        config["projection_dim"] = int(converted["visual_projection.weight"].shape[0])
    with tempfile.TemporaryDirectory() as folder:  # core's ClipVisionModel reads its config from a file
        config_path = Path(folder) / "clip_vision_config.json"
        config_path.write_text(json.dumps(config))
        vision = comfy.clip_vision.ClipVisionModel(str(config_path))
    vision.load_sd(converted)
    return vision
