"""What the GGUF converter needs to know per model family: its ``general.architecture``, how its
keys become canonical names (one group of source keys at a time), and which tensors never get a
block type.

Canonical names are the ones Velox's loaders produce (official Sana / Wan names, which for Wan are
also ComfyUI's and city96's), so a converted file loads through the same key maps as a
safetensors one. Groups exist because Sana's diffusers layout fuses ``to_q/to_k/to_v`` into one
``qkv``: the converter reads a whole block's tensors together, never the whole model.

Keep-in-float and keep-in-F32 patterns, markers and architectures come from the family registry
(``loaders/families.py``): embeddings, modulation, norms, heads, time / text embedders stay in a
float type; F32 holds what city96 keeps in F32 (Wan's ``modulation``, Sana's
``scale_shift_table``: added to activations, not multiplied).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import VeloxLoadError
from .families import FAMILIES as REGISTRY
from .families import Family, family_by_architecture, family_by_markers
from .sana_keys import SANA_PREFIXES as COMFY_PREFIXES
from .wan_keys import diffusers_to_official_key, is_diffusers_wan, strip_wan_prefix

Canonicalize = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class GGUFFamily:
    """One family's conversion rules (see the module docstring)."""

    name: str
    architecture: str  # general.architecture
    keep_float: tuple[str, ...]  # never a block type
    keep_f32: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()  # a key ending in one of these marks the family (auto detection)

    def keeps_float(self, name: str) -> bool:
        return any(re.search(pattern, name) for pattern in self.keep_float)

    def keeps_f32(self, name: str) -> bool:
        return any(re.search(pattern, name) for pattern in self.keep_f32)


def _from_registry(family: Family) -> GGUFFamily:
    return GGUFFamily(family.gguf_architecture, family.gguf_architecture, family.keep_float, family.keep_f32,
                      family.markers)


# Keyed by the GGUF architecture (the converter's ``--family``): Velox's families that have one,
# in the registry's order (the order auto detection tries), and the generic rules.
FAMILIES: dict[str, GGUFFamily] = {
    **{f.gguf_architecture: _from_registry(f) for f in REGISTRY.values() if f.gguf_architecture},
    "generic": GGUFFamily("generic", "velox", keep_float=(r"norm", r"embed")),
}
AUTO_ORDER = tuple(name for name in FAMILIES if name != "generic")


def detect_family(names: list[str], path: str | Path | None = None) -> GGUFFamily:
    """The family whose marker keys appear (the registry's ``marks``, checked in ``AUTO_ORDER``);
    VeloxLoadError otherwise."""
    found = family_by_markers(names, (family_by_architecture(name) for name in AUTO_ORDER))
    if found is not None:
        return FAMILIES[found.gguf_architecture]
    known = [family_by_architecture(name).display_name for name in AUTO_ORDER]
    raise VeloxLoadError(path, f"matches no family Velox converts (first keys: {', '.join(names[:4])})",
                         f"a {', '.join(known[:-1])} or {known[-1]} checkpoint (or choose the generic family)")


# ----------------------------------------------------------------------------------------------
# canonical names, a group of source keys at a time
# ----------------------------------------------------------------------------------------------

_SANA_BLOCK = re.compile(r"^(?:transformer_)?blocks\.(\d+)\.")


def _registered(family: GGUFFamily) -> Family | None:
    return family_by_architecture(family.architecture)


def select_source_keys(family: GGUFFamily, names: list[str]) -> list[str]:
    """The source keys the family converts: for the families with a key map (Sana, Wan, ...) the ones
    under ComfyUI's prefix when there are any (a bundled VAE / text encoder is left out), as their
    loaders choose; else all."""
    registered = _registered(family)
    if registered is not None and registered.canonicalize is not None:
        for prefix in COMFY_PREFIXES:
            selected = [name for name in names if name.startswith(prefix)]
            if selected:
                return selected
    return list(names)


def source_groups(family: GGUFFamily, names: list[str]) -> list[list[str]]:
    """Source keys in groups that canonicalize on their own, in a stable order: a block at a time for
    the families whose key maps fuse a block's tensors (the registry's ``gguf_block_groups``)."""
    registered = _registered(family)
    if registered is None or not registered.gguf_block_groups:
        return [[name] for name in names]
    groups: dict[str, list[str]] = {}
    for name in names:
        match = _SANA_BLOCK.match(_strip_comfy_prefix(name))
        groups.setdefault(f"block {int(match.group(1)):05d}" if match else "top", []).append(name)
    return [groups[key] for key in sorted(groups)]


def _strip_comfy_prefix(name: str) -> str:
    for prefix in COMFY_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def make_canonicalizer(family: GGUFFamily, names: list[str], path: str | Path | None = None) -> Canonicalize:
    """A function from a group's source tensors to canonical ones, fixed for the whole key set: Wan's
    per-key map, else the registry's ``canonicalize`` of the family, else the names as they are."""
    if family.name == "wan":
        diffusers = is_diffusers_wan(strip_wan_prefix(dict.fromkeys(names)))

        def wan(group: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out = {}
            for key, tensor in group.items():
                name = _strip_comfy_prefix(key)
                official = diffusers_to_official_key(name) if diffusers else name
                if official is None:
                    raise VeloxLoadError(path, f"diffusers Wan key {key} matches no known layout",
                                         "a diffusers WanTransformer3DModel / WanVACETransformer3DModel checkpoint")
                out[official] = tensor
            return out
        return wan
    registered = _registered(family)
    if registered is not None and registered.canonicalize is not None:
        canonicalize = registered.function("canonicalize")
        return lambda group: canonicalize(group, path)
    return dict
