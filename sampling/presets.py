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
    # SANA-Sprint (sana.md §1.7): TrigFlow times from pi/2 (2 steps: pi/2 -> 1.3 -> 0), guidance 4.5
    # fed to the model's guidance embedder (cfg below), one pass per step; Sprint has no flow shift
    "sprint_1step": SamplingPreset("SANA-Sprint: 1 step, guidance 4.5 embedded (no CFG pass), TrigFlow", 1, 4.5,
                                   1.0, "trigflow", "trigflow"),
    "sprint_2step": SamplingPreset("SANA-Sprint: 2 steps (pi/2, 1.3, 0), guidance 4.5 embedded, TrigFlow", 2, 4.5,
                                   1.0, "trigflow", "trigflow"),
    "sprint_4step": SamplingPreset("SANA-Sprint: 4 steps, guidance 4.5 embedded, TrigFlow", 4, 4.5,
                                   1.0, "trigflow", "trigflow"),
}

CUSTOM = "custom"
PRESET_CHOICES = [CUSTOM, *SAMPLING_PRESETS]


def preset_help() -> str:
    rows = [f"{key}: {preset.description}" for key, preset in SAMPLING_PRESETS.items()]
    return "; ".join([f"{CUSTOM}: the steps/cfg/sampler/scheduler/shift widgets below", *rows])
