"""Files and folders -> Sana's MODEL, CLIP and VAE (what the loader nodes call)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..loaders.checkpoint_files import read_component
from .dcae_vae import load_dcae_vae
from .quant_loading import read_checkpoint
from .sana_model import build_sana_model
from .sana_text_encoder import load_sana_text_encoder


def load_sana_model(path: Path, dtype: torch.dtype | None = None, quantization: str = "none",
                    quant_compute: str = "dequant"):
    """A Sana transformer (any layout, GGUF and ComfyUI fp8 formats included) as a ComfyUI MODEL: the
    read step, then ``build_sana_model``'s one pass.

    quantization (none / fp8_e4m3 / int8) and quant_compute (dequant / lowp): ``host/quant_ops.py``.
    """
    checkpoint = read_checkpoint(path, "transformer")
    return build_sana_model(checkpoint.weights, path=str(path), dtype=dtype,
                            diffusers_config=checkpoint.diffusers_config, quantization=quantization,
                            compute=quant_compute, gguf_metadata=checkpoint.gguf_metadata)


def load_gemma(path: Path, cpu: bool = False):
    """Gemma-2 (ComfyUI single file, HF folder or Sana diffusers folder) as Sana's CLIP."""
    return load_sana_text_encoder(path, device="cpu" if cpu else None)


def load_dcae(path: Path):
    """DC-AE (diffusers or efficientvit layout, file or folder) as a native VAE."""
    state_dict, _ = read_component(path, "vae")
    return load_dcae_vae(state_dict, path=path)
