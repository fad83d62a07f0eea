"""LoRA stack entries, the Wan2.2-Fun reward-LoRA presets, and the warnings upstream advice implies.

A stack (the ``VELOX_LORA_STACK`` wire) is a list of ``StackEntry``: a file in ``models/loras`` with a
strength for Wan 2.2 A14B's high-noise expert and one for its low-noise expert; a single-model
stack carries the same strength in both.

Reward LoRAs (alibaba-pai/Wan2.2-Fun-Reward-LoRAs; rank 128, alpha 64; one file per expert and reward
model): the official note says the MPS LoRA for the low-noise expert "converges significantly more
slowly ... we recommend using HPSv2.1", hence the recommended preset and the warning. Strength 0.55
per expert is what VideoX-Fun's ``examples/wan2.2_fun/predict_t2v.py`` uses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

EXPERT_SIDES = ("high", "low")
REWARD_MODELS = ("MPS", "HPS2.1")
DEFAULT_REWARD_STRENGTH = 0.55
DEFAULT_MPS_WEIGHT = 0.6  # 0.6 MPS + 0.4 HPS2.1


def reward_lora_file(side: str, reward: str) -> str:
    """The release file name, e.g. ``Wan2.2-Fun-A14B-InP-high-noise-MPS.safetensors``."""
    return f"Wan2.2-Fun-A14B-InP-{side}-noise-{reward}.safetensors"


REWARD_LORA_FILES = tuple(reward_lora_file(side, reward) for side in EXPERT_SIDES for reward in REWARD_MODELS)

# preset -> expert side -> reward model -> share of that expert's strength ("mps" = the MPS weight)
REWARD_PRESETS: dict[str, dict[str, dict[str, str]]] = {
    "blend high, HPS2.1 low (recommended)": {"high": {"MPS": "mps", "HPS2.1": "rest"}, "low": {"HPS2.1": "one"}},
    "blend both experts": {"high": {"MPS": "mps", "HPS2.1": "rest"}, "low": {"MPS": "mps", "HPS2.1": "rest"}},
    "HPS2.1 both experts": {"high": {"HPS2.1": "one"}, "low": {"HPS2.1": "one"}},
    "MPS both experts": {"high": {"MPS": "one"}, "low": {"MPS": "one"}},
}
_SHARES = {"mps": lambda w: w, "rest": lambda w: 1.0 - w, "one": lambda w: 1.0}


@dataclass(frozen=True)
class StackEntry:
    """One LoRA of a stack: ``lora_name`` as listed in models/loras, strengths per Wan 2.2 expert."""

    lora_name: str
    strength_high: float
    strength_low: float

    def describe(self) -> str:
        if self.strength_high == self.strength_low:
            return f"{self.lora_name} @ {self.strength_high:g}"
        return f"{self.lora_name} @ high {self.strength_high:g} / low {self.strength_low:g}"


def reward_preset_entries(preset: str, mps_weight: float, strength_high: float,
                          strength_low: float) -> list[StackEntry]:
    """The reward LoRA files a preset puts on each expert, with their blended strengths."""
    if preset not in REWARD_PRESETS:
        raise ValueError(f"VeloxWanRewardLoras: preset {preset!r} is not one of {list(REWARD_PRESETS)}")
    if not 0.0 <= mps_weight <= 1.0:
        raise ValueError(f"VeloxWanRewardLoras: mps_weight must be within [0, 1], got {mps_weight}")
    strengths = {"high": strength_high, "low": strength_low}
    entries = []
    for side, shares in REWARD_PRESETS[preset].items():
        for reward, share in shares.items():
            strength = strengths[side] * _SHARES[share](mps_weight)
            if strength != 0:
                high, low = (strength, 0.0) if side == "high" else (0.0, strength)
                entries.append(StackEntry(reward_lora_file(side, reward), high, low))
    return entries


_EXPERT_IN_NAME = re.compile(r"(high|low)[-_ ]?noise", re.IGNORECASE)
_MPS_IN_NAME = re.compile(r"(^|[^a-z])mps([^a-z]|$)", re.IGNORECASE)


def expert_warnings(entries: Sequence[StackEntry]) -> list[str]:
    """Upstream advice as warnings: MPS on the low-noise expert; a file named for one expert on the other."""
    warnings = []
    for entry in entries:
        named = _EXPERT_IN_NAME.search(entry.lora_name)
        if _MPS_IN_NAME.search(entry.lora_name) and entry.strength_low != 0:
            warnings.append(f"{entry.lora_name} (MPS) is on the low-noise expert at {entry.strength_low:g}: the "
                            "Wan2.2-Fun authors say the low-noise MPS LoRA converges much more slowly and "
                            "recommend HPS2.1 there")
        if named and named.group(1).lower() == "high" and entry.strength_low != 0:
            warnings.append(f"{entry.lora_name} is named for the high-noise expert but has low-noise strength "
                            f"{entry.strength_low:g}")
        if named and named.group(1).lower() == "low" and entry.strength_high != 0:
            warnings.append(f"{entry.lora_name} is named for the low-noise expert but has high-noise strength "
                            f"{entry.strength_high:g}")
    return warnings
