"""VideoCrafter / DynamiCrafter UNets on ``quant_ops``: GGUF files, ComfyUI scaled-fp8 / comfy_quant files,
or float files quantized at load (``quantization`` fp8_e4m3 / int8), computed by ``dequant`` or ``lowp``.

Two GGUF layouts load:

- what ``loaders/gguf_convert.py`` writes from a release file: every key under its lvdm prefix, the
  UNet's Linear weights in block types and the VAE / OpenCLIP text / vision / Resampler in float, so
  one ``.gguf`` still yields MODEL, CLIP, VAE and CLIP_VISION;
- a UNet alone (keys bare or under ``model.diffusion_model.`` / ``diffusion_model.``), city96's
  "UNet only" pattern: MODEL alone, the rest from the release file or core's loaders.

``videocrafter_loading.build_videocrafter_unet`` builds float and quantized UNets in one pass (detection
reads ``detection_view``'s logical shapes, the packed records go back under the UNet's names, renames
only, and a quantized model gets our ``operations``); this file holds what only quantized files need.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import VeloxLoadError
from ..loaders.families import VIDEOCRAFTER, family_by_architecture
from ..loaders.videocrafter_detect import EXPECTED, PREFIXES
from .quant_loading import Weights, is_gguf
from .quant_tensor import PackedWeight

ENCODER_PREFIXES = tuple(PREFIXES[c] for c in ("vae", "text", "vision"))  # built by core, never packed


def dense_encoders(weights: Weights) -> dict[str, torch.Tensor]:
    """The VAE / text / vision tensors, any packed one dequantized (fp32): core's classes take floats.
    Our converter keeps them float; another writer may not."""
    return {k: v.dequantize(torch.float32) if isinstance(v, PackedWeight) else v
            for k, v in weights.items() if k.startswith(ENCODER_PREFIXES)}


def refuse_foreign_gguf(path: str | Path, metadata: Mapping[str, object] | None = None) -> None:
    """A GGUF whose ``general.architecture`` names another family Velox knows: refused by name, before
    any shape is read (a Wan or Sana file, a text encoder). metadata: the GGUF's, when already read."""
    if not is_gguf(path):
        return
    if metadata is None:
        from ..loaders.gguf_reader import read_gguf

        metadata = read_gguf(path).metadata
    architecture = metadata.get("general.architecture")
    architecture = architecture if isinstance(architecture, str) else None
    family = family_by_architecture(architecture)
    if family is not None and family is not VIDEOCRAFTER:
        raise VeloxLoadError(path, f"this GGUF holds a {family.name} model (general.architecture {architecture!r}), "
                             "not a VideoCrafter / DynamiCrafter UNet; use its own Velox loader",
                             "a GGUF converted from " + EXPECTED)
