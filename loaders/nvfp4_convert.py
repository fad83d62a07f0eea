"""Checkpoints -> ComfyUI core's NVFP4 safetensors (``comfy_quant`` layout), streamed like the GGUF
converter: plan every tensor from shapes, write the header, then read, quantize and write one group
of tensors at a time (a Sana block, or a single Wan tensor).

Per canonical tensor (the GGUF converter's keep-in-high-precision rules, ``gguf_convert``):

| tensor                                                         | stored as                           |
|----------------------------------------------------------------|-------------------------------------|
| 1-D, <= 1024 elements, or a ``keep_f32`` parameter (modulation) | float32 (float16 for an fp16 source) |
| on the family's never-quantize list, or not 2-D                | its source dtype, with a note       |
| a side not a multiple of 16                                    | its source dtype, with a note       |
| anything else                                                  | nvfp4                               |

An nvfp4 layer ``<layer>.weight`` is written as core's ``MixedPrecisionOps`` saves one: ``weight``
(uint8 e2m1 codes, two per byte), ``weight_scale`` (e4m3 block scales, swizzled), ``weight_scale_2``
(fp32 global scale, 0-d) and ``comfy_quant`` (uint8 JSON ``{"format": "nvfp4"}``); the bytes are
``kernels/nvfp4_torch.quantize_nvfp4``'s, which equal comfy-kitchen's. Sides must be multiples of 16
because the file keeps only the padded shape (core takes the logical one from the module, Velox's
reader from the file). Names are the canonical (official) ones, so core and Velox load the file as
they load a bf16 one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import VeloxLoadError
from ..kernels import nvfp4_torch
from .families import FAMILIES
from .gguf_convert import choose_family, describe_variant, float_reason, refuse_quantized_source, stays_f32
from .gguf_families import GGUFFamily, make_canonicalizer, select_source_keys, source_groups
from .gguf_source import LazyCheckpoint, open_checkpoint
from .safetensors_writer import SafetensorsPlan, write_safetensors

NVFP4 = "nvfp4"
NVFP4_FAMILIES = tuple(f.gguf_architecture for f in FAMILIES.values() if f.nvfp4)
COMFY_QUANT = json.dumps({"format": NVFP4}).encode("utf-8")  # what core's MixedPrecisionOps.state_dict writes
LOSSLESS = {torch.float64: torch.float32}  # safetensors holds every other float dtype as read


@dataclass(frozen=True)
class NVFP4Choice:
    """How one canonical tensor is stored: ``storage`` is ``nvfp4`` or a torch dtype name."""

    name: str
    group: int
    storage: str
    shape: tuple[int, ...]
    note: str = ""


@dataclass
class NVFP4Report:
    """What a conversion wrote: per-tensor choices, the family and the detected variant."""

    path: Path
    family: str
    variant: str
    tensors: list[NVFP4Choice]
    notes: list[str] = field(default_factory=list)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for choice in self.tensors:
            counts[choice.storage] = counts.get(choice.storage, 0) + 1
        return counts


def convert_to_nvfp4(source: str | Path, destination: str | Path, family: str = "auto",
                     component: str = "transformer", device: str | torch.device = "cpu",
                     progress: Callable[[NVFP4Choice], None] | None = None) -> NVFP4Report:
    """Convert a Sana or Wan ``source`` (safetensors / sharded / diffusers folder / weights-only .pth)
    to core's NVFP4 safetensors. device: where quantization runs. Memory: one group of source tensors
    plus its quantized bytes."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("convert_to_nvfp4: device cuda was asked for, but torch sees no CUDA device")
    checkpoint = open_checkpoint(source, component)
    refuse_quantized_source(checkpoint)
    chosen = choose_family(family, list(checkpoint.meta), checkpoint.path)
    if chosen.name not in NVFP4_FAMILIES:
        raise VeloxLoadError(checkpoint.path, f"is a {chosen.name} checkpoint",
                             f"a {' or '.join(NVFP4_FAMILIES)} checkpoint (the families NVFP4 files are made for)")
    names = [n for n in select_source_keys(chosen, list(checkpoint.meta)) if checkpoint.meta[n].is_floating_point()]
    groups = source_groups(chosen, names)
    canonicalize = make_canonicalizer(chosen, names, checkpoint.path)
    choices = _plan(chosen, groups, checkpoint, canonicalize)
    variant, extra = describe_variant(chosen, names, checkpoint)
    stream = _stream(choices, groups, checkpoint, canonicalize, device)
    write_safetensors(destination, [plan for choice in choices for plan in file_plans(choice)],
                      lambda plan: next(stream), _metadata(chosen, checkpoint, variant, extra),
                      progress=None if progress is None else _once_per_choice(progress, choices))
    return NVFP4Report(Path(destination), chosen.name, variant, choices, list(checkpoint.notes))


def choose_nvfp4_storage(family: GGUFFamily, name: str, meta: torch.Tensor, group: int = 0) -> NVFP4Choice:
    """How one canonical tensor is stored (the table in the module docstring)."""
    shape = tuple(int(d) for d in meta.shape)
    if stays_f32(family, name, shape):
        dtype = torch.float16 if meta.dtype == torch.float16 else torch.float32
        return NVFP4Choice(name, group, _dtype_name(dtype), shape)
    source = _dtype_name(LOSSLESS.get(meta.dtype, meta.dtype))
    if reason := float_reason(family, name, shape):
        return NVFP4Choice(name, group, source, shape, reason)
    if shape != nvfp4_torch.padded_shape(shape):
        return NVFP4Choice(name, group, source, shape, f"{shape} is not whole 16 x 16 tiles")
    return NVFP4Choice(name, group, NVFP4, shape)


def file_plans(choice: NVFP4Choice) -> list[SafetensorsPlan]:
    """The file tensors one choice becomes (four for an nvfp4 layer, one otherwise)."""
    if choice.storage != NVFP4:
        return [SafetensorsPlan(choice.name, getattr(torch, choice.storage), choice.shape)]
    layer = choice.name.removesuffix(".weight")
    return [SafetensorsPlan(choice.name, torch.uint8, nvfp4_torch.packed_shape(choice.shape)),
            SafetensorsPlan(layer + ".weight_scale", nvfp4_torch.E4M3, nvfp4_torch.block_scale_shape(choice.shape)),
            SafetensorsPlan(layer + ".weight_scale_2", torch.float32, ()),
            SafetensorsPlan(layer + ".comfy_quant", torch.uint8, (len(COMFY_QUANT),))]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _plan(family: GGUFFamily, groups: list[list[str]], checkpoint: LazyCheckpoint, canonicalize) -> list[NVFP4Choice]:
    choices: list[NVFP4Choice] = []
    for index, group in enumerate(groups):
        canonical = canonicalize({key: checkpoint.meta[key] for key in group})
        choices += [choose_nvfp4_storage(family, name, meta, index) for name, meta in canonical.items()]
    planned = [plan.name for choice in choices for plan in file_plans(choice)]
    if len(set(planned)) != len(planned):
        clash = next(name for name in planned if planned.count(name) > 1)
        raise VeloxLoadError(checkpoint.path, f"two source tensors map to {clash}",
                             "one tensor per canonical name (mixed layouts in one file?)")
    return choices


def _metadata(family: GGUFFamily, checkpoint: LazyCheckpoint, variant: str, extra: dict) -> dict[str, str]:
    metadata = {"velox.converter": "velox scripts/convert_to_gguf.py --format nvfp4", "velox.family": family.name,
                "velox.variant": variant, "velox.source": checkpoint.path.name, **extra}
    if checkpoint.config:
        metadata["velox.diffusers_config"] = json.dumps(checkpoint.config, sort_keys=True)
    return metadata


def _once_per_choice(progress: Callable[[NVFP4Choice], None], choices: list[NVFP4Choice]):
    """Call ``progress`` after the last file tensor of each choice."""
    last = {file_plans(choice)[-1].name: choice for choice in choices}
    return lambda plan: progress(last[plan.name]) if plan.name in last else None


def _stream(choices: list[NVFP4Choice], groups: list[list[str]], checkpoint: LazyCheckpoint, canonicalize,
            device: torch.device) -> Iterator[torch.Tensor]:
    """Each file tensor in plan order; a group's source tensors are read when its first tensor is due."""
    loaded_group, canonical = -1, {}
    for choice in choices:
        if choice.group != loaded_group:
            canonical = canonicalize({key: checkpoint.load(key) for key in groups[choice.group]})
            loaded_group = choice.group
        yield from stored_tensors(canonical.pop(choice.name), choice, device)


def stored_tensors(tensor: torch.Tensor, choice: NVFP4Choice, device: torch.device) -> list[torch.Tensor]:
    """One canonical tensor -> the file tensors ``choice`` stores it as (``file_plans`` order)."""
    if choice.storage != NVFP4:
        return [tensor.detach().to(getattr(torch, choice.storage))]
    codes, block_scales, global_scale = nvfp4_torch.quantize_nvfp4(tensor.detach().to(device))
    comfy_quant = torch.frombuffer(bytearray(COMFY_QUANT), dtype=torch.uint8)
    return [codes.cpu(), block_scales.cpu(), global_scale.cpu().reshape(()), comfy_quant]
