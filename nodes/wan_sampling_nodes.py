"""Wan sampling nodes: the two-expert sampler and the validated empty video latent."""

from __future__ import annotations

import comfy.model_management
import torch
from comfy_api.latest import io

from ..host.sampling import SAMPLER_CHOICES, SCHEDULER_CHOICES, flow_sigmas, sampler_object, with_flow_shift
from ..host.wan_sampling import check_expert_pair, check_start_image, sample_two_experts
from ..sampling.presets import CUSTOM, SAMPLING_PRESETS
from ..sampling.wan_experts import T2V_BOUNDARY, expert_switch_step
from .queue_validation import VeloxNode

CATEGORY = "Velox/sampling"
WAN_PRESETS = [key for key in SAMPLING_PRESETS if key.startswith("wan")]
SWITCH_BOUNDARY, SWITCH_STEP = "boundary", "step"
WAN_LATENT_CHANNELS = 16


def _wan_preset_help() -> str:
    rows = [f"{key}: {SAMPLING_PRESETS[key].description}" for key in WAN_PRESETS]
    return "; ".join([f"{CUSTOM}: the widgets below", *rows])


def _wan_settings(preset, steps, cfg_high, cfg_low, sampler_name, scheduler, shift, switch, boundary, switch_step):
    if preset == CUSTOM:
        return steps, cfg_high, cfg_low, sampler_name, scheduler, shift, switch, boundary, switch_step
    p = SAMPLING_PRESETS[preset]
    cfg_low_noise = p.cfg if p.cfg_low_noise is None else p.cfg_low_noise
    if p.switch_step is not None:
        return p.steps, p.cfg, cfg_low_noise, p.sampler, p.scheduler, p.shift, SWITCH_STEP, boundary, p.switch_step
    return (p.steps, p.cfg, cfg_low_noise, p.sampler, p.scheduler, p.shift, SWITCH_BOUNDARY,
            p.boundary if p.boundary is not None else 0.0, switch_step)


class WanExpertSampler(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxWanExpertSampler",
            display_name="Wan Expert Sampler (Velox)",
            category=CATEGORY,
            description="Samples Wan in one node. Wan 2.2 A14B: the high-noise expert runs from pure noise "
            "until the official hand-over (shifted timestep below boundary x 1000, or a fixed step), then the "
            "low-noise expert finishes with no new noise, each with its own CFG; one progress bar over the whole "
            "run. The 'step' switch equals core's two-KSamplerAdvanced graph exactly. Wan 2.1: leave "
            "model_low_noise empty.",
            inputs=[
                io.Model.Input("model_high_noise", tooltip="The high-noise expert (Wan 2.2 A14B), or the only "
                               "model (Wan 2.1)."),
                io.Model.Input("model_low_noise", optional=True, tooltip="The low-noise expert of the same "
                               "release. Empty: model_high_noise runs every step."),
                io.Conditioning.Input("positive", tooltip="What the video should show."),
                io.Conditioning.Input("negative", tooltip="What to steer away from (ignored at CFG 1)."),
                io.Latent.Input("latent_image", tooltip="The 5-D video latent to denoise (VeloxEmptyWanLatent, "
                                "or WanImageToVideo for I2V)."),
                io.Combo.Input("preset", options=[CUSTOM, *WAN_PRESETS], default="wan22_t2v_a14b",
                               tooltip=_wan_preset_help()),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; the same seed gives the same video."),
                io.Int.Input("steps", default=40, min=1, max=1000, tooltip="Used when preset is 'custom'."),
                io.Float.Input("cfg_high_noise", default=4.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG of the high-noise expert. Used when preset is 'custom'."),
                io.Float.Input("cfg_low_noise", default=3.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG of the low-noise expert. Used when preset is 'custom'."),
                io.Combo.Input("sampler_name", options=SAMPLER_CHOICES, default="uni_pc_bh2",
                               tooltip="Used when preset is 'custom' (official: UniPC; Lightning: euler)."),
                io.Combo.Input("scheduler", options=SCHEDULER_CHOICES, default="wan_flow",
                               tooltip="wan_flow is the official Wan schedule (FlowUniPC sigmas); 'simple' is "
                               "what core's Wan templates use. Used when preset is 'custom'."),
                io.Float.Input("shift", default=12.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Flow shift (Wan 2.2 T2V: 12, I2V and Lightning: 5). Used when preset "
                               "is 'custom'."),
                io.Combo.Input("switch", options=[SWITCH_BOUNDARY, SWITCH_STEP], default=SWITCH_BOUNDARY,
                               tooltip="boundary: hand over at the official shifted-timestep boundary; step: at "
                               "switch_step, as two KSamplerAdvanced nodes split at that step. Used when preset "
                               "is 'custom' (presets bring their own)."),
                io.Float.Input("boundary", default=T2V_BOUNDARY, min=0.0, max=1.0, step=0.005,
                               tooltip="Official boundary: 0.875 T2V, 0.9 I2V. Used with switch 'boundary'."),
                io.Int.Input("switch_step", default=20, min=0, max=1000,
                             tooltip="First step of the low-noise expert. Used with switch 'step'."),
                io.Float.Input("vram_budget_gb", default=0.0, min=0.0, max=1024.0, step=0.5, optional=True,
                               tooltip="The most GPU memory (GB) the experts and the VAE may use; 0 = automatic "
                               "(the card's free memory). Both experts stay on the card when they fit with room "
                               "for activations and the VAE; else one at a time, put away to a pinned host copy "
                               "at no cost; else streamed from it."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model_high_noise, positive, negative, latent_image, preset, seed, steps, cfg_high_noise,
                cfg_low_noise, sampler_name, scheduler, shift, switch, boundary, switch_step,
                model_low_noise=None, vram_budget_gb=0.0) -> io.NodeOutput:
        steps, cfg_high, cfg_low, sampler_name, scheduler, shift, switch, boundary, switch_step = _wan_settings(
            preset, steps, cfg_high_noise, cfg_low_noise, sampler_name, scheduler, shift, switch, boundary,
            switch_step)
        if model_low_noise is not None:
            check_expert_pair(model_high_noise, model_low_noise, "VeloxWanExpertSampler")
        check_start_image(model_high_noise, positive, "VeloxWanExpertSampler")
        high = with_flow_shift(model_high_noise, shift)
        low = high if model_low_noise is None else with_flow_shift(model_low_noise, shift)
        sigmas = flow_sigmas(high, scheduler, steps, shift)
        if model_low_noise is None:  # one model (Wan 2.1): one uninterrupted pass, as KSampler
            k = steps
        else:
            k = expert_switch_step(sigmas, boundary) if switch == SWITCH_BOUNDARY else switch_step
        out = sample_two_experts(high, low, positive, negative, latent_image, seed, cfg_high, cfg_low,
                                 sampler_object(sampler_name), sampler_object(sampler_name), sigmas, k,
                                 vram_budget_gb=vram_budget_gb or 0.0)
        return io.NodeOutput(out)


def wan_video_problem(width: int, height: int, length: int) -> str | None:
    """What is wrong with a Wan video size, or None: Wan's VAE packs 4 frames after the first into one
    latent frame and the DiT patches 2 x 2 latent pixels (8 x downsampling), hence 4n + 1 and 16."""
    return video_size_problem(width, height, length, frames_per_latent=4, size_multiple=16)


def video_size_problem(width: int, height: int, length: int, frames_per_latent: int,
                       size_multiple: int) -> str | None:
    """What is wrong with a video size for a VAE that packs ``frames_per_latent`` frames after the first
    into one latent frame (length kn + 1) and a model that needs sides in multiples of ``size_multiple``,
    or None. Each problem names the value and the nearest valid values."""
    k, problems = frames_per_latent, []
    if length < 1 or (length - 1) % k:
        below, above = max(1, (length - 1) // k * k + 1), (length - 1) // k * k + k + 1
        series = f"1, {k + 1}, {2 * k + 1}, ..., {(80 // k) * k + 1}"
        problems.append(f"length must be {k}n + 1 frames ({series}), got {length}: use {below} or {above}")
    for name, value in (("width", width), ("height", height)):
        if value % size_multiple:
            problems.append(f"{name} must be a multiple of {size_multiple}, got {value}: use "
                            f"{value // size_multiple * size_multiple or size_multiple} or "
                            f"{value // size_multiple * size_multiple + size_multiple}")
    return "; ".join(problems) or None


class EmptyWanLatent(VeloxNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VeloxEmptyWanLatent",
            display_name="Empty Wan Latent (Velox)",
            category=CATEGORY,
            description="Empty 5-D Wan 2.1 / 2.2 A14B video latent (B, 16, (frames - 1) / 4 + 1, H / 8, W / 8), "
            "as core Wan uses. Refuses frame counts other than 4n + 1 and sizes that are not multiples of 16, "
            "saying which value to use.",
            inputs=[
                io.Int.Input("width", default=832, min=16, max=8192, step=16, tooltip="Video width in pixels, a "
                             "multiple of 16 (480p: 832)."),
                io.Int.Input("height", default=480, min=16, max=8192, step=16, tooltip="Video height in pixels, a "
                             "multiple of 16 (480p: 480)."),
                io.Int.Input("length", default=81, min=1, max=8192, step=4, tooltip="Frames, 4n + 1 (Wan: 81 at "
                             "16 fps)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Videos per batch."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def value_problems(cls, values: dict) -> list[str]:
        sizes = {"width": 16, "height": 16, "length": 1}  # stand-ins for linked sizes, checked at run time
        sizes.update((name, value) for name, value in values.items() if name in sizes and isinstance(value, int))
        problem = wan_video_problem(**sizes)
        return [problem] if problem else []

    @classmethod
    def execute(cls, width, height, length, batch_size) -> io.NodeOutput:
        cls.check_values(width=width, height=height, length=length, batch_size=batch_size)
        shape = [batch_size, WAN_LATENT_CHANNELS, (length - 1) // 4 + 1, height // 8, width // 8]
        latent = torch.zeros(shape, device=comfy.model_management.intermediate_device())
        return io.NodeOutput({"samples": latent})


WAN_SAMPLING_NODES = [WanExpertSampler, EmptyWanLatent]
