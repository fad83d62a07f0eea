"""Which model a GGUF file holds: family and variant from tensor names, restored shapes and metadata.

Works on files written by city96's tools (Wan: official unprefixed names, ``general.architecture``
"wan", the 5-D patch embedding as a 5-D F32 tensor), by llama.cpp (umT5 / Gemma-2 text encoders
under llama.cpp names) and by ours (``scripts/convert_to_gguf.py``: canonical names, original
shapes under ``comfy.gguf.orig_shape.*``, ``velox.*`` metadata). The family detectors of the
safetensors path run unchanged on a ``{name: meta tensor}`` view of the logical shapes, so a GGUF
file and its safetensors source are detected the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch

from ..errors import VeloxLoadError
from .families import FAMILIES, families_of_kind, family_by_markers
from .gguf_reader import GGUFContents
from .gguf_text_keys import is_llama_cpp_layout, text_key_map, value_offset

# general.architecture -> family, when the writer said it (city96, llama.cpp, ours)
ARCHITECTURES = {architecture: family.name for family in FAMILIES.values()
                 for architecture in (family.gguf_architecture, *family.gguf_aliases) if architecture}
UMT5_XXL_VOCAB = 256384


@dataclass(frozen=True)
class GGUFDetection:
    """A GGUF file's family (``sana``, ``wan``, ``videocrafter``, ``umt5``, ``gemma2``), a readable
    variant, the family's own description (SanaConfig, WanVariant, VideoCrafterVariant, or None),
    and for text encoders the map from the file's names to HF names (identity when already HF)."""

    family: str
    variant: str
    detail: object | None = None
    key_map: dict[str, str] = field(default_factory=dict)

    llama_cpp_names: bool = False

    def value_offset(self, hf_name: str) -> float:
        """What to add to a tensor after renaming: llama.cpp stores Gemma's norms as 1 + w; files that
        keep HF names (ours) store w itself."""
        if not self.llama_cpp_names or self.family not in ("umt5", "gemma2"):
            return 0.0
        return value_offset(hf_name, self.family)


def shape_view(contents: GGUFContents) -> dict[str, torch.Tensor]:
    """{name: meta tensor of the logical shape}: what the shape-based detectors need (fp32 as dtype)."""
    return {name: torch.empty(record.shape, device="meta") for name, record in contents.tensors.items()}


def detect_gguf(contents: GGUFContents) -> GGUFDetection:
    """Family and variant of a parsed GGUF; VeloxLoadError naming the file when nothing matches."""
    names = list(contents.tensors)
    family = _family(contents, names)
    view = shape_view(contents)
    if family == "sana":
        return _sana(contents, view)
    if family == "wan":
        from .wan_detect import sniff_wan

        variant, _ = sniff_wan(view, contents.path)
        return GGUFDetection("wan", variant.describe(), variant)
    if family == "videocrafter":
        from .videocrafter_detect import detect_variant, split_components

        variant = detect_variant(split_components(view), contents.path)
        return GGUFDetection("videocrafter", variant.name, variant)
    registered = FAMILIES[family]
    if registered.kind != "text_encoder" and registered.sniff is not None:  # the registry's own detector
        detail, _ = registered.function("sniff")(view, contents.path)
        return GGUFDetection(family, getattr(detail, "name", family), detail)
    return _text_encoder(family, names, view)


def _family(contents: GGUFContents, names: list[str]) -> str:
    by_architecture = ARCHITECTURES.get(contents.architecture or "")
    if by_architecture:
        return by_architecture
    for text_encoder in families_of_kind("text_encoder"):
        if is_llama_cpp_layout(names, text_encoder.name) or text_encoder.marks(names):
            return text_encoder.name
    # No or a foreign architecture string ("pig", stable-diffusion.cpp's none): judge by the names.
    by_names = family_by_markers(names, (f for f in families_of_kind("diffusion") if f.gguf_architecture))
    if by_names is not None:
        return by_names.name
    raise VeloxLoadError(contents.path, f"GGUF of architecture {contents.architecture!r} holds no model "
                         f"Velox knows (first tensors: {', '.join(names[:4])})",
                         "a Sana, Wan, VideoCrafter / DynamiCrafter, umT5 or Gemma-2 GGUF")


def sana_config_from_metadata(metadata: Mapping[str, object]):
    """The SanaConfig our converter recorded (``velox.sana.config``), else None.

    Shapes cannot show Sana's position embedding (2K / 4K): the official ``pos_embed`` buffer or a
    diffusers config.json tells it, and a GGUF has neither, so a loader passes this as
    ``sniff_sana(..., config=...)``.
    """
    from ..models.sana import SanaConfig

    stored = metadata.get("velox.sana.config")
    if not isinstance(stored, str):
        return None
    known = {f.name for f in fields(SanaConfig)}
    return SanaConfig(**{k: v for k, v in json.loads(stored).items() if k in known})


def diffusers_config_from_metadata(metadata: Mapping[str, object]) -> dict | None:
    """The diffusers config.json of the converted folder (``velox.diffusers_config``), else None."""
    stored = metadata.get("velox.diffusers_config")
    return json.loads(stored) if isinstance(stored, str) else None


def _sana(contents: GGUFContents, view: dict[str, torch.Tensor]) -> GGUFDetection:
    from .sana_detect import sniff_sana

    detected, _ = sniff_sana(view, contents.path, diffusers_config=diffusers_config_from_metadata(contents.metadata),
                             config=sana_config_from_metadata(contents.metadata))
    return GGUFDetection("sana", detected.name, detected)


def _text_encoder(family: str, names: list[str], view: Mapping[str, torch.Tensor]) -> GGUFDetection:
    llama_cpp = is_llama_cpp_layout(names, family)
    key_map = text_key_map(names, family) if llama_cpp else {name: name for name in names}
    embedding = next((view[g] for g, hf in key_map.items() if hf in ("shared.weight", "model.embed_tokens.weight")),
                     None)
    vocab, width = (tuple(embedding.shape) if embedding is not None else (0, 0))
    layout = "llama.cpp names" if llama_cpp else "HF names"
    if family == "umt5":
        name = "umT5-XXL" if vocab == UMT5_XXL_VOCAB else f"T5 / umT5 encoder (vocab {vocab}, width {width})"
    else:
        name = f"Gemma-2 (vocab {vocab}, width {width})"
    return GGUFDetection(family, f"{name}, {layout}", None, key_map, llama_cpp_names=llama_cpp)
