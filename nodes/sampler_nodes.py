"""Sampling nodes: the family-aware sampler, and Velox's SAMPLER / SIGMAS for core's custom sampling."""

from __future__ import annotations

from comfy_api.latest import io

from ..host.sampling import (
    SAMPLER_CHOICES,
    SCHEDULER_CHOICES,
    flow_sigmas,
    sample_latent,
    sampler_object,
    with_flow_shift,
)
from ..host.sana_sprint import is_sprint_model, sample_single_pass, sprint_sigmas, trigflow_sampler
from ..sampling.flow_schedules import FLOW_SCHEDULES
from ..sampling.presets import CUSTOM, PRESET_CHOICES, SAMPLING_PRESETS, preset_help
from ..sampling.trigflow import TRIGFLOW
from .queue_validation import VeloxNode

CATEGORY = "Velox/sampling"


def _settings(preset: str, steps: int, cfg: float, sampler_name: str, scheduler: str, shift: float):
    if preset == CUSTOM:
        return steps, cfg, sampler_name, scheduler, shift
    p = SAMPLING_PRESETS[preset]
    return p.steps, p.cfg, p.sampler, p.scheduler, p.shift


class VeloxSampler(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxSampler",
            display_name="Velox Sampler",
            category=CATEGORY,
            description="Samples a latent with the settings of the model family's official config (pick a "
            "preset) or your own (preset 'custom'). Runs on ComfyUI's sampling engine: previews, "
            "progress and cancel work as in KSampler.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model."),
                io.Conditioning.Input("positive", tooltip="What the image should show."),
                io.Conditioning.Input("negative", tooltip="What to steer away from (ignored at CFG 1)."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (empty for text-to-image)."),
                io.Combo.Input("preset", options=PRESET_CHOICES, default="sana_1024", tooltip=preset_help()),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; the same seed gives the same image."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Used when preset is 'custom'."),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale. Used when preset is 'custom'. "
                               "SANA-Sprint models take it as their embedded guidance and run one pass "
                               "per step (true CFG 1, negative ignored)."),
                io.Combo.Input("sampler_name", options=SAMPLER_CHOICES, default="flow_dpm_solver",
                               tooltip="flow_dpm_solver is Sana's reference solver; every core sampler "
                               "works too. Used when preset is 'custom'."),
                io.Combo.Input("scheduler", options=SCHEDULER_CHOICES, default="flow_dpm_solver",
                               tooltip="flow_dpm_solver / flow_match_euler reproduce the reference "
                               "schedulers' sigmas exactly. Used when preset is 'custom'."),
                io.Float.Input("shift", default=3.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Flow shift (Sana: 3, Sana 4K: 6). Used when preset is 'custom'."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1 keeps part of the input latent (image-to-image). With "
                               "SANA-Sprint's TrigFlow sampler it is diffusers' img2img strength: of the steps-long "
                               "schedule the last steps * denoise (rounded up) run."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, preset, seed, steps, cfg,
                sampler_name, scheduler, shift, denoise) -> io.NodeOutput:
        steps, cfg, sampler_name, scheduler, shift = _settings(preset, steps, cfg, sampler_name, scheduler, shift)
        if steps < 1:
            raise ValueError(f"VeloxSampler: steps must be at least 1, got {steps}")
        if preset != CUSTOM and SAMPLING_PRESETS[preset].boundary is not None:
            raise ValueError(f"VeloxSampler: preset '{preset}' samples Wan 2.2's two experts; use "
                             "VeloxWanExpertSampler (model_high_noise + model_low_noise) for it.")
        if denoise <= 0.0:
            return io.NodeOutput(latent_image)
        sprint = is_sprint_model(model)
        if sampler_name == TRIGFLOW and not sprint:
            raise ValueError(f"VeloxSampler: preset '{preset}' samples SANA-Sprint (TrigFlow); this MODEL has no "
                             "Sprint guidance embedder. Load a Sana_Sprint checkpoint or pick a Sana preset.")
        if sprint:  # guidance-distilled: cfg is embedded in the model, one pass per step
            if sampler_name == TRIGFLOW:
                sampler, sigmas = trigflow_sampler(), sprint_sigmas(steps, denoise)
            else:
                model = with_flow_shift(model, shift)
                sampler, sigmas = sampler_object(sampler_name), flow_sigmas(model, scheduler, steps, shift, denoise)
            out = sample_single_pass(model, positive, negative, latent_image, seed, cfg, sampler, sigmas)
            return io.NodeOutput(out)
        model = with_flow_shift(model, shift)
        sigmas = flow_sigmas(model, scheduler, steps, shift, denoise)
        out = sample_latent(model, positive, negative, latent_image, seed, cfg, sampler_object(sampler_name), sigmas)
        return io.NodeOutput(out)


class FlowDPMSolverSampler(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxFlowDPMSolver",
            display_name="Flow-DPM-Solver Sampler (Velox)",
            category=CATEGORY,
            description="Sana's reference Flow-DPM-Solver (multistep DPM-Solver++ 2M on flow sigmas) as a "
            "SAMPLER for core SamplerCustom / SamplerCustomAdvanced.",
            inputs=[],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(sampler_object("flow_dpm_solver"))


class FlowSigmas(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxFlowSigmas",
            display_name="Flow Sigmas (Velox)",
            category=CATEGORY,
            description="The sigma schedule of diffusers' flow schedulers, exactly: flow_dpm_solver "
            "(DPMSolverMultistep, flow sigmas) or flow_match_euler (FlowMatchEulerDiscrete).",
            inputs=[
                io.Combo.Input("schedule", options=list(FLOW_SCHEDULES), default="flow_dpm_solver",
                               tooltip="Which reference scheduler's sigmas to reproduce."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Number of sampling steps."),
                io.Float.Input("shift", default=3.0, min=0.01, max=100.0, step=0.01,
                               tooltip="Flow shift (Sana: 3, Sana 4K: 6)."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, schedule, steps, shift) -> io.NodeOutput:
        return io.NodeOutput(FLOW_SCHEDULES[schedule](steps, shift))


SAMPLER_NODES = [VeloxSampler, FlowDPMSolverSampler, FlowSigmas]
