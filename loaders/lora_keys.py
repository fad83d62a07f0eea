"""LoRA files -> one lookup name per target module, for every key dialect in the wild.

A LoRA key is ``<module><separator><suffix>``: the suffix names the adapter tensor (``lora_up.weight``,
``lora_B.weight``, ``hada_w1_a``, ``diff_b``, ``alpha``, ...; ``LORA_SUFFIXES``), the module names the
target layer in one of these dialects (``MODULE_PREFIXES``):

| dialect | example module |
|---|---|
| official / LightX2V | ``diffusion_model.blocks.0.self_attn.q`` |
| kohya / LyCORIS / OneTrainer | ``lora_unet_blocks_0_self_attn_q`` (dots as ``_``; mixed separators too) |
| VideoX-Fun (Wan2.2-Fun reward LoRAs) | ``lora_unet__blocks_0_self_attn_q`` (double underscore) |
| diffusers / peft | ``transformer.blocks.0.attn1.to_q``, ``base_model.model.blocks.0.attn1.to_q`` |

The names are resolved against the target model: ``module_aliases`` lists, for each module of the
model, every spelling a LoRA may use (canonical dotted and underscored, diffusers dotted and
underscored) and the target (the weight key, or the weight key plus a row range for fused
projections such as Sana's ``attn.qkv``). Tensors are never copied or cast here, so what core's
adapters later compute from them equals what core computes from the same file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import VeloxLoadError
from .checkpoint_files import load_safetensors, read_safetensors_header
from .families import FAMILIES

LORA_EXPECTED = "a LoRA .safetensors file (kohya, diffusers/peft, official, LyCORIS LoHa/LoKr or diff format)"

# Adapter tensors after the module name (core's comfy/weight_adapter/* and comfy/lora.py::load_lora).
# Order matters: longest first so ``lora_B.default.weight`` is not read as ``weight``.
LORA_SUFFIXES: tuple[str, ...] = tuple(sorted((
    "lora_up.weight", "lora_down.weight", "lora_mid.weight",  # kohya / official / LightX2V
    "lora_A.weight", "lora_B.weight", "lora_A.default.weight", "lora_B.default.weight",  # peft / diffusers
    "lora_A", "lora_B",  # mochi
    "lora.up.weight", "lora.down.weight", "lora_linear_layer.up.weight", "lora_linear_layer.down.weight",
    "alpha", "dora_scale", "reshape_weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",  # LoHa
    "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",  # LoKr
    "a1.weight", "a2.weight", "b1.weight", "b2.weight",  # GLoRA
    "oft_blocks", "rescale",  # OFT / BOFT
    "diff", "diff_b", "set_weight", "w_norm", "b_norm",  # full and bias diffs
), key=len, reverse=True))
UNDERSCORE_SUFFIXES = ("_lora.up.weight", "_lora.down.weight")  # old diffusers: ``to_q_lora.up.weight``
# Suffixes that name a parameter beside the module rather than the module's own weight:
# suffix -> (parameter appended to the module name, core adapter suffix). LightX2V's distill LoRAs
# store ``blocks.N.diff_m``, a full diff of Wan's ``blocks.N.modulation`` (core 0.3.75 drops these:
# Comfy-Org/ComfyUI#8922, kijai/ComfyUI-WanVideoWrapper#807).
PARAMETER_SUFFIXES: dict[str, tuple[str, str]] = {"diff_m": ("modulation", "diff")}

# Module-name prefixes, stripped before lookup: (prefix, dialect uses "_" for ".")
MODULE_PREFIXES: tuple[tuple[str, bool], ...] = (
    ("lora_unet__", True),  # VideoX-Fun: "lora_unet" + "." + "" + "." + name, dots -> "_"
    ("lora_unet_", True),
    ("lora_transformer_", True),  # OneTrainer
    ("lycoris_", True),  # SimpleTuner LyCORIS
    ("base_model.model.transformer.", False),
    ("base_model.model.", False),  # peft
    ("model.diffusion_model.", False),
    ("diffusion_model.", False),
    ("transformer.", False),  # diffusers
    ("unet.", False),
)
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
                         "text_encoders.", "lora_prior_te_")


@dataclass(frozen=True)
class LoraTarget:
    """Where one LoRA module lands: a model weight key, and for fused projections the slice
    ``(dim, start, length)`` of that weight (core's offset patches)."""

    weight_key: str
    offset: tuple[int, int, int] | None = None

    def as_core_key(self) -> str | tuple:
        return self.weight_key if self.offset is None else (self.weight_key, self.offset)


def _check_lora_path(path: Path) -> None:
    if path.suffix.lower() != ".safetensors":
        raise VeloxLoadError(path, f"is a {path.suffix or 'suffix-less'} file; Velox reads LoRAs only as "
                             "safetensors (pickled .pt/.ckpt/.bin LoRAs can run code)", LORA_EXPECTED)
    if not path.is_file():
        raise VeloxLoadError(path, "does not exist", LORA_EXPECTED)


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file; safetensors only (LoRAs are never pickles worth trusting), read
    by the pack's checked reader so a damaged file is named like any other checkpoint."""
    path = Path(path)
    _check_lora_path(path)
    state_dict = load_safetensors(path)
    if not state_dict:
        raise VeloxLoadError(path, "holds no tensors", LORA_EXPECTED)
    return state_dict


def read_lora_keys(path: str | Path) -> list[str]:
    """The tensor names of a LoRA file, from its checked header alone (no tensor is read)."""
    path = Path(path)
    _check_lora_path(path)
    keys = [k for k in read_safetensors_header(path) if k != "__metadata__"]
    if not keys:
        raise VeloxLoadError(path, "holds no tensors", LORA_EXPECTED)
    return keys


def split_lora_key(key: str) -> tuple[str, str] | None:
    """``(module, suffix)`` of one LoRA key; None when no known adapter suffix ends it."""
    for suffix in UNDERSCORE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:]
    for suffix, (parameter, adapter_suffix) in PARAMETER_SUFFIXES.items():
        if key.endswith("." + suffix):
            return f"{key[: -len(suffix) - 1]}.{parameter}", adapter_suffix
    for suffix in LORA_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def lookup_names(module: str) -> list[str]:
    """The spellings under which ``module`` (a LoRA module name) may appear in ``module_aliases``:
    the name with its dialect prefix stripped; underscored dialects with any stray dots made ``_``."""
    names = [module]
    for prefix, underscored in MODULE_PREFIXES:
        if module.startswith(prefix):
            rest = module[len(prefix):]
            names.append(rest.replace(".", "_") if underscored else rest)
    return names


def is_text_encoder_key(key: str) -> bool:
    return key.startswith(TEXT_ENCODER_PREFIXES)


def underscored(name: str) -> str:
    return name.replace(".", "_")


# ----------------------------------------------------------------------------------------------
# aliases of a model's modules, per family
# ----------------------------------------------------------------------------------------------


def _wan_diffusers_names(module: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, int, int] | None]]:
    from .wan_keys import official_to_diffusers_key

    name = official_to_diffusers_key(module)
    return [] if name is None or name == module else [(name, None)]


def _sana_diffusers_names(module: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, int, int] | None]]:
    from .sana_keys import SANA_KEY_MAP

    return SANA_KEY_MAP.lora_diffusers_names(module, shape)


def _no_diffusers_names(module: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, int, int] | None]]:
    return []


# family -> official module path + weight shape -> [(diffusers module path, row range or None)]
DIFFUSERS_NAMES = {"wan": _wan_diffusers_names, "sana": _sana_diffusers_names, "videocrafter": _no_diffusers_names}


def diffusers_names_of(family: str | None):
    """The family's official -> diffusers LoRA spellings: ``DIFFUSERS_NAMES``, else the registry's
    ``lora_names`` hook, else none."""
    if family in DIFFUSERS_NAMES:
        return DIFFUSERS_NAMES[family]
    registered = FAMILIES.get(family or "")
    return registered.function("lora_names") if registered is not None and registered.lora_names else _no_diffusers_names


def module_aliases(
    weight_shapes: Mapping[str, tuple[int, ...]], family: str | None, prefix: str = "diffusion_model."
) -> dict[str, LoraTarget]:
    """Every LoRA spelling of every module of a model -> its target.

    weight_shapes: the model's state-dict keys ending in ``.weight`` (or any parameter name, for
    ``diff`` patches of e.g. ``head.modulation``) under ``prefix``, with their shapes. Canonical
    names win over diffusers names when two collide.
    """
    diffusers_names = diffusers_names_of(family)
    aliases: dict[str, LoraTarget] = {}
    canonical: dict[str, LoraTarget] = {}
    for key, shape in weight_shapes.items():
        if not key.startswith(prefix):
            continue
        module = key[len(prefix):]
        if module.endswith(".weight"):
            module = module[: -len(".weight")]
        target = LoraTarget(key)
        canonical[module] = canonical[underscored(module)] = target
        for name, offset in diffusers_names(module, tuple(shape)):
            aliases[name] = aliases[underscored(name)] = LoraTarget(key, offset)
    aliases.update(canonical)
    return aliases


@dataclass
class ResolvedLora:
    """A LoRA file's keys sorted by where they land.

    modules: lookup id -> target; ``tensors``: the file's tensors re-keyed ``<lookup id>.<suffix>``
    (same tensor objects) for core's ``comfy.lora.load_lora(tensors, {id: target.as_core_key()})``;
    sources: re-keyed name -> the file's key; text_encoder: untouched keys meant for a text encoder;
    unmatched: keys that target nothing.
    """

    modules: dict[str, LoraTarget]
    tensors: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    unmatched: list[str]
    sources: dict[str, str] = field(default_factory=dict)

    def core_key_map(self) -> dict[str, str | tuple]:
        return {name: target.as_core_key() for name, target in self.modules.items()}


def resolve_lora_keys(lora: Mapping[str, torch.Tensor], aliases: Mapping[str, LoraTarget]) -> ResolvedLora:
    """Sort every key of ``lora`` onto the model's modules (``module_aliases``), text-encoder keys
    aside, and list the keys that match nothing (never silently dropped)."""
    resolved = ResolvedLora({}, {}, {}, [], {})
    for key, tensor in lora.items():
        if is_text_encoder_key(key):
            resolved.text_encoder[key] = tensor
            continue
        parts = split_lora_key(key)
        name = None if parts is None else next((n for n in lookup_names(parts[0]) if n in aliases), None)
        if name is None:
            resolved.unmatched.append(key)
            continue
        target = aliases[name]
        lookup_id = target.weight_key if target.offset is None else f"{target.weight_key}@{target.offset[1]}"
        resolved.modules[lookup_id] = target
        resolved.tensors[f"{lookup_id}.{parts[1]}"] = tensor
        resolved.sources[f"{lookup_id}.{parts[1]}"] = key
    return resolved


def describe_unmatched(keys: Iterable[str], shown: int = 4, target: str = "module of this model") -> str:
    """``"3 LoRA key(s) match no module of this model: a, b, c"`` (count + the first few)."""
    keys = sorted(keys)
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{len(keys)} LoRA key(s) match no {target}: {', '.join(keys[:shown])}{more}"
