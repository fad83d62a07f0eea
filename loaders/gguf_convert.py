"""Checkpoints -> GGUF, streamed: plan every tensor from shapes, write the header, then read,
quantize and write one group of tensors at a time (a Sana block, or a single Wan tensor).

Per tensor (canonical names and shapes, ``gguf_families``):

| tensor                                                         | stored as                         |
|----------------------------------------------------------------|-----------------------------------|
| 1-D, <= 1024 elements, or a ``keep_f32`` parameter (modulation) | F32 (F16 when the source is fp16) |
| on the family's never-quantize list                            | the float fallback                |
| not 2-D (conv weights; Sana's 1x1 convs are 2-D already)       | the float fallback                |
| a row (all dims but the first, flattened) not whole blocks     | the float fallback, with a note   |
| anything else                                                  | the requested type (``RECIPES``)  |

The float fallback is lossless by default (BF16 for a bf16 source, F16 for fp16, F32 for fp32),
or the type ``fallback`` names. ggml holds at most 4 dims, so a float tensor of more than 4 dims
(Wan's Conv3d patch embedding) is stored as its 2-D ``(out, in * kernel)`` rows with its shape under
``comfy.gguf.orig_shape.<name>`` (INT32 array, city96's convention), which ``gguf_reader`` (and
ComfyUI-GGUF) restore; ``choose_storage`` would store an N-D block-typed tensor the same way.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from ..errors import VeloxLoadError
from ..kernels.gguf_quantize_torch import quantize
from ..kernels.gguf_types import block_layout
from .families import family_by_architecture
from .gguf_families import (
    FAMILIES,
    GGUFFamily,
    detect_family,
    make_canonicalizer,
    select_source_keys,
    source_groups,
)
from .gguf_reader import ORIG_SHAPE_PREFIX
from .gguf_source import LazyCheckpoint, open_checkpoint
from .gguf_writer import INT32, UINT32, TensorPlan, Typed, write_gguf

FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)


@dataclass(frozen=True)
class Recipe:
    """A requested file type: the base type, llama.cpp-style bumps (name pattern -> type) and the
    ``general.file_type`` (gguf.LlamaFileType) it is recorded as."""

    name: str
    base: Q
    file_type: int
    bumps: tuple[tuple[str, Q], ...] = ()

    def type_for(self, name: str) -> Q:
        return next((qtype for pattern, qtype in self.bumps if re.search(pattern, name)), self.base)


# llama.cpp's _M mixes (city96's lcpp.patch for image models): attention V and FFN-down one step up.
# Sana's V lives in the fused qkv, so only its FFN-down (point_conv) is bumped.
_M_BUMPED = r"\.v\.weight$|\.to_v\.|attn_v|\.ffn\.2\.weight$|ffn_down|mlp\.point_conv\."
RECIPES: dict[str, Recipe] = {
    "F32": Recipe("F32", Q.F32, 0), "F16": Recipe("F16", Q.F16, 1), "BF16": Recipe("BF16", Q.BF16, 32),
    "Q8_0": Recipe("Q8_0", Q.Q8_0, 7), "Q4_0": Recipe("Q4_0", Q.Q4_0, 2), "Q5_0": Recipe("Q5_0", Q.Q5_0, 8),
    "Q4_K": Recipe("Q4_K", Q.Q4_K, 14), "Q4_K_S": Recipe("Q4_K_S", Q.Q4_K, 14),
    "Q4_K_M": Recipe("Q4_K_M", Q.Q4_K, 15, ((_M_BUMPED, Q.Q6_K),)),
    "Q5_K": Recipe("Q5_K", Q.Q5_K, 16), "Q5_K_S": Recipe("Q5_K_S", Q.Q5_K, 16),
    "Q5_K_M": Recipe("Q5_K_M", Q.Q5_K, 17, ((_M_BUMPED, Q.Q6_K),)),
    "Q6_K": Recipe("Q6_K", Q.Q6_K, 18),
}
GGML_QUANT_VERSION = 2
SMALL_TENSOR = 1024  # elements: city96's QUANTIZATION_THRESHOLD, kept in F32
LOSSLESS_FLOAT = {torch.float32: Q.F32, torch.float64: Q.F32, torch.bfloat16: Q.BF16, torch.float16: Q.F16}
F16_MAX = 65504.0


@dataclass(frozen=True)
class TensorChoice:
    """How one canonical tensor is stored: its type, logical and stored shapes, and why (``note``)."""

    name: str
    group: int
    qtype: int
    shape: tuple[int, ...]
    stored_shape: tuple[int, ...]
    note: str = ""


@dataclass
class ConversionReport:
    """What a conversion wrote: per-tensor choices (final types), the family and the detected variant."""

    path: Path
    family: str
    variant: str
    tensors: list[TensorChoice]
    notes: list[str] = field(default_factory=list)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for choice in self.tensors:
            name = Q(choice.qtype).name
            counts[name] = counts.get(name, 0) + 1
        return counts


def convert_to_gguf(source: str | Path, destination: str | Path, qtype: str | int = "Q8_0",
                    family: str = "auto", fallback: str = "auto", component: str = "transformer",
                    device: str | torch.device = "cpu",
                    progress: Callable[[TensorChoice], None] | None = None) -> ConversionReport:
    """Convert ``source`` (safetensors / sharded / diffusers folder / weights-only .pth) to GGUF.

    qtype: a ``RECIPES`` name (Q8_0 ... Q6_K, the llama.cpp mixes Q4_K_M / Q5_K_M, F16 ...) or a GGML
    type number; family: ``auto`` or a ``FAMILIES`` key; fallback: ``auto`` (lossless) or F32 / F16 /
    BF16; device: where quantization runs (``cuda`` for big models: on one CPU core Q4_K costs about
    0.5 s per million weights). Memory: one group of source tensors plus its quantized bytes.
    """
    recipe = parse_recipe(qtype)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("convert_to_gguf: device cuda was asked for, but torch sees no CUDA device")
    fallback_type = None if fallback == "auto" else _parse_type(fallback, FLOAT_TYPES, "fallback")
    checkpoint = open_checkpoint(source, component)
    refuse_quantized_source(checkpoint)
    chosen = choose_family(family, list(checkpoint.meta), checkpoint.path)
    names = select_source_keys(chosen, list(checkpoint.meta))
    blobs = _byte_tensors(checkpoint, names)
    names = [name for name in names if checkpoint.meta[name].is_floating_point()]
    groups = source_groups(chosen, names)
    canonicalize = make_canonicalizer(chosen, names, checkpoint.path)
    choices = _plan(chosen, groups, checkpoint, canonicalize, recipe, fallback_type)
    variant, extra_metadata = describe_variant(chosen, names, checkpoint)
    metadata = {**_metadata(chosen, checkpoint, recipe, variant, extra_metadata, choices), **blobs}
    stream = _stream(choices, groups, checkpoint, canonicalize, device)
    by_name = {choice.name: choice for choice in choices}
    written = write_gguf(
        destination, metadata,
        [TensorPlan(c.name, c.qtype, c.stored_shape) for c in choices],
        lambda plan: next(stream),
        progress=None if progress is None else (lambda plan: progress(by_name[plan.name])),
    )
    final = [dataclasses.replace(c, qtype=p.qtype, note=_swap_note(c, p.qtype)) for c, p in zip(choices, written)]
    return ConversionReport(Path(destination), chosen.name, variant, final, list(checkpoint.notes))


def parse_recipe(value: str | int) -> Recipe:
    """``"Q4_K_M"`` / ``"q8_0"`` / a GGML type number -> its Recipe; ValueError naming the choices."""
    key = value.upper() if isinstance(value, str) else next(
        (name for name, recipe in RECIPES.items() if int(recipe.base) == int(value)), str(value))
    if key not in RECIPES:
        raise ValueError(f"convert_to_gguf: qtype {value!r} is not one of {', '.join(RECIPES)}")
    return RECIPES[key]


def _parse_type(value: str | int, allowed: tuple[Q, ...], what: str) -> Q:
    try:
        qtype = Q[value.upper()] if isinstance(value, str) else Q(int(value))
    except (KeyError, ValueError):
        qtype = None
    if qtype not in allowed:
        raise ValueError(f"convert_to_gguf: {what} {value!r} is not one of {', '.join(t.name for t in allowed)}")
    return qtype


def refuse_quantized_source(checkpoint: LazyCheckpoint) -> None:
    if any(k.endswith((".scale_weight", ".weight_scale", ".comfy_quant")) or k == "scaled_fp8" for k in checkpoint.meta):
        raise VeloxLoadError(checkpoint.path, "is a scaled-fp8 / comfy_quant checkpoint (weights times scales)",
                             "a bf16 / fp16 / fp32 checkpoint to convert (GGUF from fp8 would compound errors)")


def _byte_tensors(checkpoint: LazyCheckpoint, names: list[str]) -> dict[str, bytes]:
    """Non-float tensors: byte blobs (a tokenizer's ``spiece_model``) go to metadata
    ``velox.bytes.<name>``; other integer buffers are left out with a note."""
    blobs = {}
    for name in names:
        dtype = checkpoint.meta[name].dtype
        if dtype in (torch.uint8, torch.int8):
            blobs[f"velox.bytes.{name}"] = checkpoint.load(name).contiguous().view(torch.uint8).numpy().tobytes()
        elif not checkpoint.meta[name].is_floating_point():
            checkpoint.notes.append(f"{name}: {dtype} buffer left out (GGUF holds float and block types here)")
    return blobs


def choose_family(name: str, keys: list[str], path: Path) -> GGUFFamily:
    if name == "auto":
        return detect_family(keys, path)
    if name not in FAMILIES:
        raise ValueError(f"convert_to_gguf: family {name!r} is not one of auto, {', '.join(FAMILIES)}")
    return FAMILIES[name]


# ----------------------------------------------------------------------------------------------
# planning (shapes only)
# ----------------------------------------------------------------------------------------------


def _plan(family: GGUFFamily, groups: list[list[str]], checkpoint: LazyCheckpoint, canonicalize,
          recipe: Recipe, fallback: Q | None) -> list[TensorChoice]:
    choices: list[TensorChoice] = []
    for index, group in enumerate(groups):
        canonical = canonicalize({key: checkpoint.meta[key] for key in group})
        for name, meta in canonical.items():
            choices.append(choose_storage(family, name, meta, recipe.type_for(name), fallback, index))
    seen = set()
    for choice in choices:
        if choice.name in seen:
            raise VeloxLoadError(checkpoint.path, f"two source tensors map to {choice.name}",
                                 "one tensor per canonical name (mixed layouts in one file?)")
        seen.add(choice.name)
    return choices


def choose_storage(family: GGUFFamily, name: str, meta: torch.Tensor, requested: Q,
                   fallback: Q | None, group: int = 0) -> TensorChoice:
    """The type and stored shape of one canonical tensor (the table in the module docstring)."""
    shape = tuple(int(d) for d in meta.shape)
    numel = int(np.prod(shape)) if shape else 1
    lossless = LOSSLESS_FLOAT.get(meta.dtype, Q.F16)
    float_type = requested if requested in FLOAT_TYPES else (fallback or lossless)

    def stored(qtype: Q, note: str = "") -> TensorChoice:
        flat = (shape[0], numel // shape[0]) if len(shape) > 2 else shape or (1,)
        keep_dims = qtype in FLOAT_TYPES and len(shape) <= 4
        return TensorChoice(name, group, int(qtype), shape, (shape or (1,)) if keep_dims else flat, note)

    if stays_f32(family, name, shape):
        return stored(Q.F32 if meta.dtype in (torch.float32, torch.bfloat16, torch.float64) else Q.F16)
    if requested in FLOAT_TYPES:
        return stored(requested)
    if reason := float_reason(family, name, shape):
        return stored(float_type, reason)
    block_size, _ = block_layout(requested)
    row = numel // shape[0]
    if row % block_size:
        return stored(float_type, f"rows of {row} are not whole {requested.name} blocks of {block_size}")
    return stored(requested)


def stays_f32(family: GGUFFamily, name: str, shape: tuple[int, ...]) -> bool:
    """1-D and small tensors and the family's F32 parameters: never quantized, stored at full precision."""
    numel = int(np.prod(shape)) if shape else 1
    return len(shape) <= 1 or numel <= SMALL_TENSOR or family.keeps_f32(name)


def float_reason(family: GGUFFamily, name: str, shape: tuple[int, ...]) -> str:
    """Why a weight stays in its float type whatever was asked for ("" when it may be quantized)."""
    if family.keeps_float(name):
        return "never-quantize list"
    if len(shape) != 2:  # convs stay float: Velox's quantized layers are linears (city96's lcpp.patch rule too)
        return f"{len(shape)}-D weight"
    return ""


def _swap_note(choice: TensorChoice, final: int) -> str:
    if final == choice.qtype:
        return choice.note
    return f"values beyond fp16 range: stored as {Q(final).name}"


# ----------------------------------------------------------------------------------------------
# metadata
# ----------------------------------------------------------------------------------------------


def describe_variant(family: GGUFFamily, names: list[str], checkpoint: LazyCheckpoint) -> tuple[str, dict]:
    """(variant name, extra metadata) from the family's own detector, on shapes (and Sana's PE buffer)."""
    meta = {name: checkpoint.meta[name] for name in names}
    if family.name == "sana":
        from .sana_detect import sniff_sana

        if "pos_embed" in meta:  # a filled buffer means PE (2K / 4K): read it, it is small
            meta["pos_embed"] = checkpoint.load("pos_embed")
        config, _ = sniff_sana(meta, checkpoint.path, diffusers_config=checkpoint.config)
        return config.name, {"velox.sana.config": json.dumps(dataclasses.asdict(config), sort_keys=True)}
    if family.name == "wan":
        from .wan_detect import sniff_wan

        variant, _ = sniff_wan(meta, checkpoint.path)
        return variant.describe(), {}
    if family.name == "videocrafter":
        from .videocrafter_detect import detect_variant, split_components

        return detect_variant(split_components(meta), checkpoint.path).name, {}
    registered = family_by_architecture(family.architecture)
    if registered is not None and registered.kind == "diffusion" and registered.sniff is not None:
        detail, _ = registered.function("sniff")(meta, checkpoint.path)
        return getattr(detail, "name", family.name), {}
    return family.name, {}


def _metadata(family: GGUFFamily, checkpoint: LazyCheckpoint, recipe: Recipe, variant: str, extra: dict,
              choices: list[TensorChoice]) -> dict[str, object]:
    metadata: dict[str, object] = {
        "general.architecture": family.architecture,
        "general.quantization_version": Typed(UINT32, GGML_QUANT_VERSION),
        "general.file_type": Typed(UINT32, recipe.file_type),
        "general.name": checkpoint.path.stem,
        "velox.converter": "velox scripts/convert_to_gguf.py",
        "velox.family": family.name,
        "velox.variant": variant,
        "velox.source": checkpoint.path.name,
        "velox.requested_type": recipe.name,
        **extra,
    }
    if checkpoint.config:
        metadata["velox.diffusers_config"] = json.dumps(checkpoint.config, sort_keys=True)
    for key, value in sorted(checkpoint.metadata.items()):
        metadata[f"velox.safetensors_metadata.{key}"] = str(value)
    for choice in choices:
        if choice.stored_shape != choice.shape:  # flattened, or a 0-d scalar stored as (1,)
            metadata[ORIG_SHAPE_PREFIX + choice.name] = Typed(INT32, list(choice.shape))
    return metadata


# ----------------------------------------------------------------------------------------------
# data (one group at a time)
# ----------------------------------------------------------------------------------------------


def _stream(choices: list[TensorChoice], groups: list[list[str]], checkpoint: LazyCheckpoint, canonicalize,
            device: torch.device) -> Iterator[np.ndarray | tuple[np.ndarray, int]]:
    """Each tensor's bytes in plan order; a group's source tensors are read when its first tensor is due."""
    loaded_group, canonical = -1, {}
    for choice in choices:
        if choice.group != loaded_group:
            canonical = canonicalize({key: checkpoint.load(key) for key in groups[choice.group]})
            loaded_group = choice.group
        yield tensor_bytes(canonical.pop(choice.name), choice, device)


def tensor_bytes(tensor: torch.Tensor, choice: TensorChoice, device: torch.device) -> np.ndarray | tuple:
    """One tensor -> its GGUF bytes as ``choice`` stores it (F16 that overflows -> BF16, same size)."""
    values = tensor.detach().to(device=device).reshape(choice.stored_shape)
    if not values.is_floating_point():
        values = values.float()
    qtype = choice.qtype
    if qtype == Q.F16 and values.dtype != torch.float16 and values.numel() and values.abs().max() > F16_MAX:
        qtype = Q.BF16
    try:
        raw = quantize(values, qtype) if qtype not in FLOAT_TYPES else _float_bytes(values, qtype)
    except ValueError as error:
        raise ValueError(f"tensor {choice.name}: {error}") from None
    data = raw.cpu().numpy()
    return data if qtype == choice.qtype else (data, int(qtype))


def _float_bytes(values: torch.Tensor, qtype: Q) -> torch.Tensor:
    """Float types without a detour through fp32 when the source already is that type."""
    target = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
    return values.to(target).contiguous().view(torch.uint8).reshape(-1)
