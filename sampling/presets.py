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
    # Wan 2.2 A14B's two experts (None: one model). ``cfg`` is the high-noise expert's scale.
    cfg_low_noise: float | None = None
    boundary: float | None = None  # shifted-timestep boundary of the official expert switch
    switch_step: int | None = None  # a fixed step split instead of the boundary (Lightning: 2 + 2)


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
    # NVlabs Sana asset/docs/sana_video.md + diffusers SANA-Video_2B_480p_diffusers: 50 steps, CFG 6, flow_shift 8
    "sana_video_480p": SamplingPreset("SANA-Video 2B 480p: 50 steps, CFG 6, shift 8, Flow-DPM-Solver", 50, 6.0, 8.0,
                                      "flow_dpm_solver", "flow_dpm_solver"),
    # Wan-Video/Wan2.1 generate.py defaults for t2v-14B / t2v-1.3B: 50 steps, shift 5, guide 5, UniPC
    "wan21_t2v": SamplingPreset("Wan 2.1 T2V: 50 steps, CFG 5, shift 5, UniPC on the official schedule", 50, 5.0,
                                5.0, "uni_pc_bh2", "wan_flow"),
    # Wan-Video/Wan2.2 wan/configs/wan_t2v_A14B.py: 40 steps, shift 12, guide (low 3, high 4), boundary 0.875
    "wan22_t2v_a14b": SamplingPreset("Wan 2.2 T2V A14B: 40 steps, shift 12, CFG 4 high-noise / 3 low-noise, "
                                     "experts switch at boundary 0.875", 40, 4.0, 12.0, "uni_pc_bh2", "wan_flow",
                                     cfg_low_noise=3.0, boundary=0.875),
    # wan_i2v_A14B.py: 40 steps, shift 5, guide (3.5, 3.5), boundary 0.9
    "wan22_i2v_a14b": SamplingPreset("Wan 2.2 I2V A14B: 40 steps, shift 5, CFG 3.5 both experts, experts switch "
                                     "at boundary 0.9", 40, 3.5, 5.0, "uni_pc_bh2", "wan_flow",
                                     cfg_low_noise=3.5, boundary=0.9),
    # ModelTC/Wan2.2-Lightning: 4 steps, CFG 1, shift 5, Euler ("used in distillation"); 2 + 2 expert split
    "wan22_lightning": SamplingPreset("Wan 2.2 A14B Lightning: 4 steps, CFG 1, shift 5, Euler, 2 steps per "
                                      "expert", 4, 1.0, 5.0, "euler", "wan_flow",
                                      cfg_low_noise=1.0, boundary=0.9, switch_step=2),
}

CUSTOM = "custom"
PRESET_CHOICES = [CUSTOM, *SAMPLING_PRESETS]


def preset_help() -> str:
    rows = [f"{key}: {preset.description}" for key, preset in SAMPLING_PRESETS.items()]
    return "; ".join([f"{CUSTOM}: the steps/cfg/sampler/scheduler/shift widgets below", *rows])
