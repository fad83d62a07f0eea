"""Sampling presets from the official configs, one row per model family setting.

Keys are saved in users' workflows (the sampler node's ``preset`` widget): never rename one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingPreset:
    """Steps, guidance, flow shift, sampler and sigma schedule of one reference setting."""

    description: str
    steps: int
    cfg: float
    shift: float
    sampler: str
    scheduler: str


SAMPLING_PRESETS: dict[str, SamplingPreset] = {
    # NVlabs Sana 1024 configs (flow_shift 3.0, Flow-DPM-Solver) with diffusers' default CFG 4.5
    "sana_1024": SamplingPreset("Sana 512-2K: 20 steps, CFG 4.5, shift 3, Flow-DPM-Solver", 20, 4.5, 3.0,
                                "flow_dpm_solver", "flow_dpm_solver"),
    "sana_1024_euler": SamplingPreset("Sana 512-2K: 20 steps, CFG 4.5, shift 3, flow Euler", 20, 4.5, 3.0,
                                      "euler", "flow_match_euler"),
    # Sana 4K: flow_shift 6.0 and CFG 5.0 (sana.md §4)
    "sana_4k": SamplingPreset("Sana 4K: 20 steps, CFG 5, shift 6, Flow-DPM-Solver", 20, 5.0, 6.0,
                              "flow_dpm_solver", "flow_dpm_solver"),
}

CUSTOM = "custom"
PRESET_CHOICES = [CUSTOM, *SAMPLING_PRESETS]


def preset_help() -> str:
    rows = [f"{key}: {preset.description}" for key, preset in SAMPLING_PRESETS.items()]
    return "; ".join([f"{CUSTOM}: the steps/cfg/sampler/scheduler/shift widgets below", *rows])
