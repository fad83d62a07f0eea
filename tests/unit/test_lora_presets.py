"""Wan2.2-Fun reward-LoRA presets: files on their experts, blend weights, and the warnings upstream
advice implies (MPS on the low-noise expert, a file named for one expert on the other)."""

from __future__ import annotations

import pytest

from velox.host.lora_presets import (
    REWARD_LORA_FILES,
    REWARD_PRESETS,
    StackEntry,
    expert_warnings,
    reward_preset_entries,
)


def test_release_file_names():
    assert REWARD_LORA_FILES == ("Wan2.2-Fun-A14B-InP-high-noise-MPS.safetensors",
                                 "Wan2.2-Fun-A14B-InP-high-noise-HPS2.1.safetensors",
                                 "Wan2.2-Fun-A14B-InP-low-noise-MPS.safetensors",
                                 "Wan2.2-Fun-A14B-InP-low-noise-HPS2.1.safetensors")


def test_blend_both_experts_splits_each_strength_0_6_mps_0_4_hps():
    entries = reward_preset_entries("blend both experts", 0.6, 0.5, 1.0)
    got = {e.lora_name: (round(e.strength_high, 6), round(e.strength_low, 6)) for e in entries}
    assert got == {"Wan2.2-Fun-A14B-InP-high-noise-MPS.safetensors": (0.3, 0.0),
                   "Wan2.2-Fun-A14B-InP-high-noise-HPS2.1.safetensors": (0.2, 0.0),
                   "Wan2.2-Fun-A14B-InP-low-noise-MPS.safetensors": (0.0, 0.6),
                   "Wan2.2-Fun-A14B-InP-low-noise-HPS2.1.safetensors": (0.0, 0.4)}
    assert len(expert_warnings(entries)) == 1 and "low-noise MPS LoRA converges" in expert_warnings(entries)[0]


def test_recommended_preset_keeps_mps_off_the_low_noise_expert():
    entries = reward_preset_entries("blend high, HPS2.1 low (recommended)", 0.6, 0.55, 0.55)
    assert [e.lora_name for e in entries if e.strength_low] == ["Wan2.2-Fun-A14B-InP-low-noise-HPS2.1.safetensors"]
    assert expert_warnings(entries) == []
    assert set(REWARD_PRESETS) >= {"HPS2.1 both experts", "MPS both experts"}


def test_a_file_named_for_one_expert_on_the_other_is_warned_about():
    warnings = expert_warnings([StackEntry("lightx2v_high_noise_model.safetensors", 1.0, 1.0),
                                StackEntry("style.safetensors", 1.0, 1.0)])
    assert warnings == ["lightx2v_high_noise_model.safetensors is named for the high-noise expert but has "
                        "low-noise strength 1"]


@pytest.mark.parametrize("preset, weight", [("no such preset", 0.6), ("blend both experts", 1.5)])
def test_bad_preset_inputs_are_refused(preset, weight):
    with pytest.raises(ValueError, match="VeloxWanRewardLoras"):
        reward_preset_entries(preset, weight, 1.0, 1.0)
