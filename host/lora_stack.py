"""Apply a stack of LoRAs to a MODEL (and CLIP) through ComfyUI's own patch machinery.

Per LoRA, in stack order:
1. read the safetensors file (``loaders.lora_keys``), refuse NaN / inf tensors;
2. refuse a LoRA of another family (``loaders.lora_detect``: Wan / Sana / VideoCrafter);
3. resolve every key dialect onto the model's modules and build core's adapters with
   ``comfy.lora.load_lora`` (LoRA, LoHa, LoKr, diff, diff_b: core's own classes and maths);
4. check ranks and shapes (core would only log an error and skip the layer);
5. ordinary weights: ``ModelPatcher.add_patches(patches, strength)``, exactly what core's
   ``LoraLoaderModelOnly`` does, so a stack equals the chain of core nodes bit for bit;
   quantized layers (modules with a ``velox_lowrank`` attribute): a ``LowRankSide`` attached as an
   object patch, the LoRA never merged into the packed weight; parameters that core's loader never
   patches (those of non-leaf modules, e.g. Wan's ``blocks.N.modulation``): an ON_LOAD callback;
6. keys that match nothing are counted and named in the log and in the returned report; a LoRA
   none of whose keys lands anywhere is refused (``matches_nothing``), never a silent no-op.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import comfy.lora
import comfy.lora_convert
import comfy.utils
import comfy.weight_adapter as weight_adapter
import torch
from comfy.patcher_extension import CallbacksMP

from ..errors import VeloxLoadError
from ..loaders.families import lora_fits
from ..loaders.lora_detect import FAMILY_NAMES, keys_of_no_family, lora_family, model_family
from ..loaders.lora_keys import (
    LORA_EXPECTED,
    LoraTarget,
    describe_unmatched,
    is_text_encoder_key,
    module_aliases,
    read_lora_file,
    read_lora_keys,
    resolve_lora_keys,
    split_lora_key,
)
from .lowrank import LowRankSide

UNET_PREFIX = "diffusion_model."
LOWRANK_ATTRIBUTE = "velox_lowrank"
NONLEAF_CALLBACK = "velox_nonleaf_patches"
_FILE_CACHE: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
FILE_CACHE_SIZE = 4  # Wan reward LoRAs are ~0.85 GB each


@dataclass
class LoraReport:
    """What one LoRA did to one model: counts and the keys that found no module."""

    name: str
    strength: float
    family: str | None = None
    merged: int = 0  # weights patched through ModelPatcher
    unmerged: int = 0  # quantized layers given a low-rank side product
    clip_patched: int = 0
    unmatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        parts = [f"{self.name} @ {self.strength:g}: {self.merged} weight(s) merged"]
        if self.unmerged:
            parts.append(f"{self.unmerged} quantized layer(s) unmerged (low-rank side products)")
        if self.clip_patched:
            parts.append(f"{self.clip_patched} text-encoder weight(s)")
        text = ", ".join(parts)
        for note in self.notes:
            text += f"\n  note: {note}"
        if self.unmatched:
            text += f"\n  WARNING: {describe_unmatched(self.unmatched)}"
        return text


def read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors (cached by path, size and mtime), refused when any is NaN or inf."""
    path = Path(path)
    stat = path.stat() if path.is_file() else None
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns) if stat else None
    if cache_key in _FILE_CACHE:
        _FILE_CACHE.move_to_end(cache_key)
        return _FILE_CACHE[cache_key]
    lora = read_lora_file(path)
    check_finite(lora, path)
    if cache_key is not None:
        _FILE_CACHE[cache_key] = lora
        while len(_FILE_CACHE) > FILE_CACHE_SIZE:
            _FILE_CACHE.popitem(last=False)
    return lora


def check_finite(lora: Mapping[str, torch.Tensor], path: str | Path | None) -> None:
    bad = [k for k, v in lora.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise VeloxLoadError(path, f"{len(bad)} tensor(s) hold NaN or inf values: {sorted(bad)[:4]}",
                             "a LoRA with finite weights (re-export it, or check the training run)")


# ----------------------------------------------------------------------------------------------
# one LoRA on one model
# ----------------------------------------------------------------------------------------------


DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_quantized_layer(module: torch.nn.Module) -> bool:
    """A layer of ``host/quant_ops.py`` (it has ``velox_lowrank``) whose weight is packed / fp8 / int8;
    its dense layers (norm-adjacent, never-quantize list) merge like any bf16 weight."""
    if not hasattr(module, LOWRANK_ATTRIBUTE):
        return False
    weight = getattr(module, "weight", None)
    return weight is None or weight.dtype not in DENSE_DTYPES


class ModelLoraContext:
    """What applying LoRAs to one model needs, computed once per stack: shapes, family, aliases,
    and the modules that take low-rank side products."""

    def __init__(self, patcher):
        state = patcher.model.state_dict()
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.family = model_family(self.shapes)
        self.aliases = module_aliases(self.shapes, self.family, UNET_PREFIX)
        self.quantized = {
            UNET_PREFIX + name: module for name, module in patcher.model.diffusion_model.named_modules()
            if is_quantized_layer(module)
        }

    def quantized_module(self, weight_key: str):
        if not weight_key.endswith(".weight"):
            return None
        return self.quantized.get(weight_key[: -len(".weight")])

    def weight_shape(self, weight_key: str) -> tuple[int, ...]:
        """The logical shape (a packed GGUF weight's storage shape is not)."""
        module = self.quantized_module(weight_key)
        if module is not None and hasattr(module, "out_features"):
            return (module.out_features, module.in_features)
        return self.shapes[weight_key]


def check_family(lora: Mapping[str, torch.Tensor], context: ModelLoraContext, name: str) -> str | None:
    family = lora_family(lora.keys())
    if family is not None and context.family is not None and not lora_fits(family, context.family):
        raise _wrong_family(name, family, context.family, "the model")
    return family


def _wrong_family(name: str, found: str, wanted: str, target: str) -> VeloxLoadError:
    return VeloxLoadError(name, f"is a {FAMILY_NAMES[found]} LoRA (from its key names) but {target} is "
                          f"{FAMILY_NAMES[wanted]}", f"a LoRA trained for {FAMILY_NAMES[wanted]}")


def matches_nothing(name: str, keys, family: str | None) -> VeloxLoadError:
    """The refusal of a LoRA none of whose keys lands on the model: applied, it would change nothing
    while the run looks as if it had worked, so it is never a silent no-op."""
    expected = f"a {FAMILY_NAMES[family]} LoRA" if family else "a LoRA"
    return VeloxLoadError(name, f"changes nothing, refused: {describe_unmatched(keys)}",
                          f"{expected} whose keys name this model's layers")


def check_lora_file_family(path: str | Path, family: str, name: str) -> None:
    """Refuse a LoRA file that is not for ``family`` before any model is at hand (the reward presets),
    from its checked header alone; a file of no known family has its unknown keys named."""
    keys = read_lora_keys(path)
    found = lora_family(keys)
    if found is None:
        unknown = describe_unmatched(keys_of_no_family(keys) or keys, target="layer of any model family Velox knows")
        raise VeloxLoadError(name, f"changes nothing, refused: {unknown}", f"a {FAMILY_NAMES[family]} LoRA")
    if found != family:
        raise _wrong_family(name, found, family, "this node")


def _target_numel(target: LoraTarget, weight_shape: tuple[int, ...]) -> int:
    shape = list(weight_shape)
    if target.offset is not None:
        shape[target.offset[0]] = target.offset[2]
    return math.prod(shape)


def check_adapter(name: str, target: LoraTarget, adapter, weight_shape: tuple[int, ...]) -> None:
    """Ranks of a LoRA pair agree and its product has the target's size (core would only log)."""
    if not isinstance(adapter, weight_adapter.LoRAAdapter):
        return
    up, down, mid = adapter.weights[0], adapter.weights[1], adapter.weights[3]
    where = target.weight_key[len(UNET_PREFIX):].removesuffix(".weight")
    if mid is None and up.shape[1] != down.shape[0]:
        raise VeloxLoadError(name, f"mismatched ranks at {where}: up {tuple(up.shape)} has rank {up.shape[1]}, "
                             f"down {tuple(down.shape)} has rank {down.shape[0]}", LORA_EXPECTED)
    if adapter.weights[5] is None and mid is None:
        size, want = up.shape[0] * down[0].numel(), _target_numel(target, weight_shape)
        if size != want:
            raise VeloxLoadError(name, f"shape mismatch at {where}: up {tuple(up.shape)} @ down "
                                 f"{tuple(down.shape)} does not fit the model's weight {weight_shape}",
                                 "a LoRA for this model's size (e.g. 14B vs 1.3B)")


def _check_pairs(name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """A low-rank half without its other half would crash core's adapter with a bare KeyError."""
    halves = {"lora_up.weight": "lora_down.weight", "lora_down.weight": "lora_up.weight",
              "lora_A.weight": "lora_B.weight", "lora_B.weight": "lora_A.weight"}
    for key in tensors:
        module, suffix = split_lora_key(key)
        other = halves.get(suffix)
        if other is not None and f"{module}.{other}" not in tensors:
            raise VeloxLoadError(name, f"{key} has no matching {other}", LORA_EXPECTED)


def _side_term(name: str, where: str, adapter, strength: float):
    """(down, up, strength * alpha / rank) of a plain LoRA adapter; other adapters cannot stay unmerged."""
    if not isinstance(adapter, weight_adapter.LoRAAdapter) or any(
            adapter.weights[i] is not None for i in (3, 4, 5)):
        kind = adapter[0] if isinstance(adapter, tuple) else getattr(adapter, "name", type(adapter).__name__)
        raise VeloxLoadError(name, f"its {kind} patch on the quantized layer {where} cannot stay unmerged "
                             "(only plain low-rank LoRA pairs can)",
                             "a bf16 / fp16 model for this LoRA, or the stack baked to one LoRA first")
    up, down, alpha = adapter.weights[0], adapter.weights[1], adapter.weights[2]
    rank = down.shape[0]
    scale = strength * ((alpha / rank) if alpha is not None else 1.0)
    return down.flatten(1), up.flatten(1), scale


def apply_lora_to_model(patcher, lora: Mapping[str, torch.Tensor], strength: float, name: str,
                        context: ModelLoraContext) -> LoraReport:
    """Patch ``patcher`` (already a clone owned by the caller) with one LoRA; return its report."""
    report = LoraReport(name, strength)
    report.family = check_family(lora, context, name)
    resolved = resolve_lora_keys(lora, context.aliases)
    report.unmatched = list(resolved.unmatched)
    _check_pairs(name, resolved.tensors)
    patches = comfy.lora.load_lora(resolved.tensors, resolved.core_key_map(), log_missing=False)
    if not patches and not resolved.text_encoder:  # text-encoder keys may still patch a CLIP
        raise matches_nothing(name, lora, context.family)
    loaded_targets = {k if isinstance(k, str) else k[0] for k in patches}
    for lookup_id, target in resolved.modules.items():
        bias_key = target.weight_key.removesuffix(".weight") + ".bias"
        if target.weight_key not in loaded_targets and bias_key not in loaded_targets:  # no adapter core knows
            report.unmatched += [resolved.sources[k] for k in resolved.tensors if k.startswith(lookup_id + ".")]
    merged, sides = {}, {}
    for core_key, adapter in patches.items():
        key = core_key if isinstance(core_key, str) else core_key[0]
        target = LoraTarget(key, None if isinstance(core_key, str) else core_key[1])
        check_adapter(name, target, adapter, context.weight_shape(key))
        if context.quantized_module(key) is not None:
            sides[key] = _side_term(name, key[len(UNET_PREFIX):], adapter, strength)
        else:
            merged[core_key] = adapter
    report.merged = len(patcher.add_patches(merged, strength))
    if any(isinstance(k, str) and is_nonleaf_parameter(patcher.model, k) for k in merged):
        _ensure_nonleaf_patching(patcher)
    for key, term in sides.items():
        _attach_side(patcher, key[: -len(".weight")], term)
    report.unmerged = len(sides)
    if resolved.text_encoder:
        report.notes.append(f"{len(resolved.text_encoder)} text-encoder key(s): applied only where a CLIP is "
                            "connected")
    return report


def is_nonleaf_parameter(model, key: str) -> bool:
    """A parameter whose module also has sub-modules with parameters (Wan's ``blocks.N.modulation``,
    ``head.modulation``; Sana's ``scale_shift_table``). ``ModelPatcher.load`` (ComfyUI 0.3.75,
    ``_load_list``: "skip random weights in non leaf modules") never applies patches to these, so a
    ``diff`` on them would be dropped without a word."""
    module_path, _, name = key.rpartition(".")
    try:
        owner = comfy.utils.get_attr(model, module_path) if module_path else model
    except AttributeError:
        return False
    own = {n for n, _ in owner.named_parameters(recurse=False)}
    return name in own and any(n not in own for n, _ in owner.named_parameters(recurse=True))


def _ensure_nonleaf_patching(patcher) -> None:
    if NONLEAF_CALLBACK not in patcher.callbacks.get(CallbacksMP.ON_LOAD, {}):
        patcher.add_callback_with_key(CallbacksMP.ON_LOAD, NONLEAF_CALLBACK, patch_nonleaf_parameters)


def patch_nonleaf_parameters(patcher, *load_args) -> None:
    """ON_LOAD: apply the patches core's loader skipped, with core's own ``patch_weight_to_device``
    (fp32 maths, stochastic rounding, a backup that ``unpatch_model`` restores). A key already in the
    backup is already patched: a second load (partial loads) must not add the diff twice."""
    for key in list(patcher.patches):
        if key not in patcher.backup and is_nonleaf_parameter(patcher.model, key):
            patcher.patch_weight_to_device(key)  # on the parameter's own device: these are small


def _attach_side(patcher, module_path: str, term) -> None:
    attribute = f"{module_path}.{LOWRANK_ATTRIBUTE}"
    current = patcher.object_patches.get(attribute)
    side = current.extended([term]) if isinstance(current, LowRankSide) else LowRankSide([term])
    patcher.add_object_patch(attribute, side)
    if LOWRANK_ATTRIBUTE not in patcher.callbacks.get(CallbacksMP.ON_DETACH, {}):
        patcher.add_callback_with_key(CallbacksMP.ON_DETACH, LOWRANK_ATTRIBUTE, release_side_products)


def release_side_products(patcher, unpatch_all: bool = True) -> None:
    """ON_DETACH: the side products' GPU copies go with the model (ComfyUI does not count them)."""
    for value in patcher.object_patches.values():
        if isinstance(value, LowRankSide):
            value.release()


def apply_lora_to_clip(clip, lora: Mapping[str, torch.Tensor], strength: float, report: LoraReport) -> None:
    """Text-encoder keys through core's CLIP key map, unchanged (core's own path for CLIP LoRAs)."""
    text_keys = {k: v for k, v in lora.items() if is_text_encoder_key(k)}
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    converted = comfy.lora_convert.convert_lora(text_keys)
    patches = comfy.lora.load_lora(converted, key_map, log_missing=False)
    report.clip_patched = len(clip.add_patches(patches, strength))
    report.notes = [n for n in report.notes if "text-encoder" not in n]
    clip_modules = set(key_map)
    unmatched = [k for k in converted if (split_lora_key(k) or ("",))[0] not in clip_modules]
    report.unmatched += unmatched


# ----------------------------------------------------------------------------------------------
# stacks
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackItem:
    """One LoRA of a stack: its file, a display name, and its strengths."""

    path: Path
    strength_model: float
    strength_clip: float = 0.0
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.path.name


def apply_lora_stack(model, clip, items: Sequence[StackItem]) -> tuple[object, object, list[LoraReport]]:
    """MODEL / CLIP clones with every LoRA of ``items`` applied in order; reports per LoRA.

    Items with both strengths 0 are skipped, as core's LoraLoader skips them."""
    items = [item for item in items if item.strength_model != 0 or (clip is not None and item.strength_clip != 0)]
    if not items:
        return model, clip, []
    new_model = model.clone() if model is not None else None
    new_clip = clip.clone() if clip is not None else None
    context = ModelLoraContext(new_model) if new_model is not None else None
    reports = []
    for item in items:
        lora = read_lora(item.path)
        report = LoraReport(item.label, item.strength_model)
        if new_model is not None and item.strength_model != 0:
            report = apply_lora_to_model(new_model, lora, item.strength_model, item.label, context)
        if new_clip is not None and item.strength_clip != 0:
            apply_lora_to_clip(new_clip, lora, item.strength_clip, report)
        if report.unmatched:
            logging.warning("Velox LoRA %s: %s", item.label, describe_unmatched(report.unmatched))
        reports.append(report)
    return new_model, new_clip, reports


def stack_report(title: str, reports: Sequence[LoraReport]) -> str:
    if not reports:
        return f"{title}: no LoRA applied (empty stack or all strengths 0)"
    return f"{title}: {len(reports)} LoRA(s)\n" + "\n".join(r.line() for r in reports)


def lora_path(name: str) -> Path:
    """A LoRA dropdown value resolved through ``folder_paths`` ("loras")."""
    import folder_paths

    full = folder_paths.get_full_path("loras", name)
    if full is None or not os.path.isfile(full):
        raise VeloxLoadError(name, "not found in models/loras", "a LoRA file listed in the dropdown")
    return Path(full)
