"""The official <-> diffusers key map of the Sana-style transformers (Sana, SANA-Video), given its tables.

Both families lay their files out alike: diffusers' ``transformer_blocks.N.*`` hold separate q, k, v
projections that the official ``blocks.N.attn.qkv`` / ``blocks.N.cross_attn.kv_linear`` concatenate on
dim 0, every other module is a plain rename, and the Mix-FFN's 1x1 convs are 4-D in the files but 2-D
Linear weights in ``models/``. Only the tables differ, so each family's key module
(``sana_keys``, ``sana_video_keys``) makes one ``FusedKeyMap`` of its tables and keeps its public
functions as thin calls into it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from ..errors import VeloxLoadError

DIFFUSERS_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
OFFICIAL_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LEAVES = ("weight", "bias")
# The Mix-FFN's 1x1 convs (GLUMBConv, which SANA-Video keeps): 4-D in files, 2-D in models/
MIX_FFN_1X1_WEIGHTS = ("mlp.inverted_conv.conv.weight", "mlp.point_conv.conv.weight")

# (block index, official fused module, parameter leaf) -> diffusers part -> tensor
FusionParts = dict[tuple[int, str, str], dict[str, torch.Tensor]]
# (diffusers module, (dim, start, length) of the fused rows it owns, or None)
LoraName = tuple[str, tuple[int, int, int] | None]


def split_leaf(key: str) -> tuple[str, str]:
    """``attn1.to_out.0.weight`` -> (``attn1.to_out.0``, ``.weight``); a bare parameter keeps ''."""
    module, _, leaf = key.rpartition(".")
    return (module, "." + leaf) if module and leaf in _LEAVES else (key, "")


@dataclass(frozen=True)
class FusedKeyMap:
    """One family's tables and what it calls itself in errors.

    layout: the family in messages (``"Sana"``); expected: the names an unreadable file should have held;
    top_level_renames / block_renames: diffusers module -> official module, outside / inside the blocks;
    block_fusions: official fused module <- its diffusers parts, in concatenation order; dropped_keys /
    dropped_prefixes: buffers and training-only tensors no layout keeps; is_official: whether a key is
    already an official name (each family states its own set); squeezed_1x1: official weight names
    (key endings) that files hold as 4-D 1x1 convs.
    """

    layout: str
    expected: str
    top_level_renames: Mapping[str, str]
    block_renames: Mapping[str, str]
    block_fusions: Mapping[str, tuple[str, ...]]
    dropped_keys: frozenset[str]
    dropped_prefixes: tuple[str, ...]
    is_official: Callable[[str], bool]
    squeezed_1x1: tuple[str, ...] = MIX_FFN_1X1_WEIGHTS

    # ------------------------------------------------------------------------------------------
    # any layout -> official
    # ------------------------------------------------------------------------------------------

    def is_dropped(self, key: str) -> bool:
        """Buffers (``pos_embed``, the null caption) and training-only tensors (``logvar_linear``)."""
        return key in self.dropped_keys or key.startswith(self.dropped_prefixes)

    def canonicalize(self, state_dict: Mapping[str, torch.Tensor],
                     path: str | Path | None = None) -> dict[str, torch.Tensor]:
        """Unprefixed official or diffusers keys -> official names, 2-D 1x1 Mix-FFN weights, buffers
        dropped. Raises VeloxLoadError naming the first keys that match no layout, or a missing q/k/v part."""
        out: dict[str, torch.Tensor] = {}
        parts: FusionParts = {}
        unknown: list[str] = []
        for key, tensor in state_dict.items():
            if self.is_dropped(key):
                continue
            fused = self.fusion_part(key)
            if fused is not None:
                index, target, part, leaf = fused
                parts.setdefault((index, target, leaf), {})[part] = tensor
                continue
            official = self.official_name(key)
            if official is None:
                unknown.append(key)
            else:
                out[official] = tensor
        if unknown:
            raise VeloxLoadError(
                path, f"{len(unknown)} tensor(s) match no {self.layout} layout: {', '.join(sorted(unknown)[:6])}",
                self.expected,
            )
        out.update(self._fuse(parts, path))
        return {k: self._squeeze_1x1(k, v) for k, v in out.items()}

    def official_name(self, key: str) -> str | None:
        """The official name of an official or (non-fused) diffusers key; None for an unknown key."""
        return key if self.is_official(key) else self._rename(key)

    def fusion_part(self, key: str) -> tuple[int, str, str, str] | None:
        """``transformer_blocks.3.attn1.to_k.weight`` -> (3, ``attn.qkv``, ``attn1.to_k``, ``.weight``)."""
        match = DIFFUSERS_BLOCK_KEY.match(key)
        if match is None:
            return None
        module, leaf = split_leaf(match.group(2))
        target = self._part_to_fusion.get(module)
        return None if target is None else (int(match.group(1)), target, module, leaf)

    def _rename(self, key: str) -> str | None:
        match = DIFFUSERS_BLOCK_KEY.match(key)
        if match is not None:
            module, leaf = split_leaf(match.group(2))
            target = self.block_renames.get(module)
            return None if target is None else f"blocks.{match.group(1)}.{target}{leaf}"
        module, leaf = split_leaf(key)
        target = self.top_level_renames.get(module)
        return None if target is None else target + leaf

    @cached_property
    def _part_to_fusion(self) -> dict[str, str]:
        return {part: target for target, part_names in self.block_fusions.items() for part in part_names}

    def _fuse(self, parts: FusionParts, path: str | Path | None) -> dict[str, torch.Tensor]:
        fused = {}
        for (index, target, leaf), found in sorted(parts.items()):
            names = self.block_fusions[target]
            missing = [n for n in names if n not in found]
            if missing:
                raise VeloxLoadError(
                    path, f"transformer_blocks.{index}.{missing[0]}{leaf} is missing",
                    f"all of {', '.join(n + leaf for n in names)} for blocks.{index}.{target}",
                )
            fused[f"blocks.{index}.{target}{leaf}"] = torch.cat([found[n] for n in names], dim=0)
        return fused

    def _squeeze_1x1(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim == 4 and key.endswith(self.squeezed_1x1):
            return tensor.flatten(1)
        return tensor

    # ------------------------------------------------------------------------------------------
    # official -> diffusers (test and demo checkpoints, LoRA spellings)
    # ------------------------------------------------------------------------------------------

    def to_diffusers(self, state_dict: Mapping[str, torch.Tensor],
                     top_level: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
        """Official names -> diffusers names: fused projections split, 1x1 Mix-FFN weights 4-D, buffers
        dropped. ``top_level``: official -> diffusers module outside the blocks (a family with several
        diffusers spellings picks one); by default the reverse of ``top_level_renames``."""
        top_level = self._top_level_reverse if top_level is None else top_level
        out: dict[str, torch.Tensor] = {}
        for key, tensor in state_dict.items():
            if self.is_dropped(key):
                continue
            match = OFFICIAL_BLOCK_KEY.match(key)
            if match is None:
                module, leaf = split_leaf(key)
                out[top_level[module] + leaf] = tensor
            else:
                out.update(self._block_to_diffusers(match.group(1), match.group(2), tensor))
        return out

    def _block_to_diffusers(self, index: str, rest: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        prefix = f"transformer_blocks.{index}."
        module, leaf = split_leaf(rest)
        if module in self.block_fusions:
            names = self.block_fusions[module]
            return {prefix + n + leaf: t.clone() for n, t in zip(names, tensor.chunk(len(names), dim=0))}
        if rest.endswith(self.squeezed_1x1) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        return {prefix + self._block_reverse[module] + leaf: tensor}

    @cached_property
    def _top_level_reverse(self) -> dict[str, str]:
        return {official: diffusers for diffusers, official in self.top_level_renames.items()}

    @cached_property
    def _block_reverse(self) -> dict[str, str]:
        return {official: diffusers for diffusers, official in self.block_renames.items()}

    def lora_diffusers_names(self, module: str, shape: tuple[int, ...]) -> list[LoraName]:
        """The diffusers module names a LoRA may use for official ``module`` (weight ``shape``), each with
        the row range ``(dim, start, length)`` it owns of a fused projection (``attn.qkv`` <- to_q / to_k /
        to_v, ``cross_attn.kv_linear`` <- to_k / to_v), else None."""
        block = OFFICIAL_BLOCK_KEY.match(module)
        if block is None:
            return [(d, None) for d, o in self.top_level_renames.items() if o == module and d != module]
        index, inner = block.groups()
        names: list[LoraName] = [
            (f"transformer_blocks.{index}.{d}", None) for d, o in self.block_renames.items() if o == inner]
        parts = self.block_fusions.get(inner, ())
        if parts:
            rows = shape[0] // len(parts)
            names += [(f"transformer_blocks.{index}.{part}", (0, i * rows, rows)) for i, part in enumerate(parts)]
        return names
