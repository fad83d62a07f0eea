"""Wan 2.2's expert hand-over against the official rule, the Wan presets, and the one-node two-expert
sampler against core's two-KSamplerAdvanced graph on tiny Wan models (CPU)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from velox.sampling.presets import SAMPLING_PRESETS
from velox.sampling.wan_experts import (
    expert_switch_step,
    official_switch_step,
    official_timesteps,
    wan_flow_sigmas,
)


def official_flow_unipc_timesteps(steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Oracle: Wan-Video/Wan2.2 ``FlowUniPCMultistepScheduler`` (``__init__`` with shift 1, then
    ``set_timesteps(steps, shift=shift)``), transcribed line by line: (float32 sigmas, int64 timesteps)."""
    alphas = np.linspace(1, 1 / 1000, 1000)[::-1].copy()
    table = torch.from_numpy(1.0 - alphas).to(dtype=torch.float32)
    sigma_min, sigma_max = table[-1].item(), table[0].item()
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = sigmas * 1000
    sigmas = np.concatenate([sigmas, [0]]).astype(np.float32)
    return sigmas, torch.from_numpy(timesteps).to(dtype=torch.int64).numpy()


def official_high_noise_steps(steps: int, shift: float, boundary: float) -> int:
    """Oracle: the generate loop's ``t.item() >= boundary * num_train_timesteps`` per step."""
    _, timesteps = official_flow_unipc_timesteps(steps, shift)
    chosen = ["high" if int(t) >= boundary * 1000 else "low" for t in timesteps]
    assert chosen == sorted(chosen), "high-noise steps come first"
    return chosen.count("high")


SHIFTS = [float(s) for s in np.round(np.arange(0.5, 20.01, 0.25), 2)]


@pytest.mark.parametrize("boundary", [0.875, 0.9])
def test_hand_over_step_equals_the_official_rule_over_shifts_and_step_counts(boundary):
    mismatches = []
    for steps in range(1, 81):
        for shift in SHIFTS:
            want = official_high_noise_steps(steps, shift, boundary)
            got = expert_switch_step(wan_flow_sigmas(steps, shift), boundary)
            if got != want or official_switch_step(steps, shift, boundary) != want:
                mismatches.append((steps, shift, got, want))
    assert not mismatches, f"{len(mismatches)} of {80 * len(SHIFTS)} differ, e.g. {mismatches[:5]}"


@pytest.mark.parametrize("steps", [1, 4, 20, 40, 50])
@pytest.mark.parametrize("shift", [1.0, 5.0, 8.0, 12.0])
def test_wan_flow_sigmas_and_timesteps_equal_the_official_scheduler(steps, shift):
    sigmas, timesteps = official_flow_unipc_timesteps(steps, shift)
    assert torch.equal(wan_flow_sigmas(steps, shift), torch.from_numpy(sigmas))
    assert torch.equal(official_timesteps(steps, shift), torch.from_numpy(timesteps))


@pytest.mark.parametrize("steps,shift,boundary,high_steps", [
    (40, 5.0, 0.9, 15),     # I2V A14B: sigma >= 0.9 / (5 - 4 * 0.9) = 0.6429 for steps 0..14
    (40, 12.0, 0.875, 26),  # T2V A14B: sigma >= 0.875 / (12 - 11 * 0.875) = 0.3684 for steps 0..25
    (4, 5.0, 0.9, 2),       # Lightning: the 2 + 2 split follows from the rule
    (20, 8.0, 0.875, 11),   # core's T2V template (shift 8, 20 steps) splits at 10: the rule says 11
])
def test_hand_over_step_at_the_official_settings(steps, shift, boundary, high_steps):
    assert expert_switch_step(wan_flow_sigmas(steps, shift), boundary) == high_steps


def test_boundary_at_the_ends_gives_one_expert_and_out_of_range_is_refused():
    sigmas = wan_flow_sigmas(10, 5.0)
    assert expert_switch_step(sigmas, 0.0) == 10 and expert_switch_step(sigmas, 1.0) == 0
    with pytest.raises(ValueError, match="boundary must be in"):
        expert_switch_step(sigmas, 1.5)


def test_wan_presets_carry_the_official_settings_and_old_presets_are_unchanged():
    t2v, i2v, lightning = (SAMPLING_PRESETS[k] for k in ("wan22_t2v_a14b", "wan22_i2v_a14b", "wan22_lightning"))
    assert (t2v.steps, t2v.shift, t2v.cfg, t2v.cfg_low_noise, t2v.boundary) == (40, 12.0, 4.0, 3.0, 0.875)
    assert (i2v.steps, i2v.shift, i2v.cfg, i2v.cfg_low_noise, i2v.boundary) == (40, 5.0, 3.5, 3.5, 0.9)
    assert (lightning.steps, lightning.cfg, lightning.shift, lightning.sampler, lightning.switch_step) == (
        4, 1.0, 5.0, "euler", 2)
    wan21 = SAMPLING_PRESETS["wan21_t2v"]
    assert (wan21.steps, wan21.cfg, wan21.shift, wan21.boundary) == (50, 5.0, 5.0, None)
    assert list(SAMPLING_PRESETS)[:6] == ["sana_1024", "sana_1024_euler", "sana_4k", "sprint_1step",
                                          "sprint_2step", "sprint_4step"]
    for key in list(SAMPLING_PRESETS)[:6]:
        preset = SAMPLING_PRESETS[key]
        assert (preset.cfg_low_noise, preset.boundary, preset.switch_step) == (None, None, None), key


# --- the sampler node on tiny Wan models (core WanModel, official key names) ---------------------------

def tiny_wan(seed: int, dim: int = 128, in_dim: int = 16):
    """A 2-layer Wan 2.1-architecture MODEL through core's own loader (random weights, official names)."""
    import comfy.ldm.wan.model as wan
    import comfy.ops
    import comfy.sd

    net = wan.WanModel(model_type="t2v", in_dim=in_dim, dim=dim, ffn_dim=2 * dim, out_dim=16, num_heads=dim // 128,
                       num_layers=2, operations=comfy.ops.disable_weight_init)
    generator = torch.Generator().manual_seed(seed)
    state_dict = {key: torch.randn(value.shape, generator=generator) * 0.05 for key, value in net.state_dict().items()}
    return comfy.sd.load_diffusion_model_state_dict(state_dict)


@pytest.fixture(scope="module")
def experts(comfy_host):
    return tiny_wan(seed=1), tiny_wan(seed=2)


@pytest.fixture(scope="module")
def conds():
    generator = torch.Generator().manual_seed(3)
    return ([[torch.randn(1, 8, 4096, generator=generator), {}]],
            [[torch.randn(1, 8, 4096, generator=generator), {}]])


def video_latent(batch: int = 2) -> dict:
    return {"samples": torch.zeros(batch, 16, 3, 4, 4)}  # 9 frames at 32 x 32


def node_run(high, low, conds, latent, **settings):
    from velox.nodes.wan_sampling_nodes import WanExpertSampler

    args = dict(preset="custom", seed=5, steps=6, cfg_high_noise=3.0, cfg_low_noise=2.0, sampler_name="euler",
                scheduler="simple", shift=5.0, switch="step", boundary=0.9, switch_step=3)
    args.update(settings)
    out = WanExpertSampler.execute(high, conds[0], conds[1], latent, model_low_noise=low, **args)
    return out.result[0]["samples"]


def core_two_ksampler_advanced(high, low, conds, latent, seed, steps, cfg_high, cfg_low, sampler, scheduler,
                               shift, split):
    """Core's Wan 2.2 template graph: ModelSamplingSD3 on each expert, KSamplerAdvanced 0 -> split with
    leftover noise, then KSamplerAdvanced split -> end with add_noise disabled."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    import nodes

    high = ModelSamplingSD3().patch(high, shift)[0]
    low = ModelSamplingSD3().patch(low, shift)[0]
    advanced = nodes.KSamplerAdvanced()
    first = advanced.sample(high, "enable", seed, steps, cfg_high, sampler, scheduler, conds[0], conds[1], latent,
                            0, split, "enable")[0]
    second = advanced.sample(low, "disable", seed, steps, cfg_low, sampler, scheduler, conds[0], conds[1], first,
                             split, 10000, "disable")[0]
    return second["samples"]


@pytest.mark.parametrize("sampler,scheduler,split", [("euler", "simple", 3), ("euler", "simple", 1),
                                                     ("dpmpp_2m", "beta", 4)])
def test_step_switch_equals_two_core_ksampler_advanced_exactly(experts, conds, sampler, scheduler, split):
    high, low = experts
    ours = node_run(high, low, conds, video_latent(), sampler_name=sampler, scheduler=scheduler, switch_step=split)
    core = core_two_ksampler_advanced(high, low, conds, video_latent(), 5, 6, 3.0, 2.0, sampler, scheduler,
                                      5.0, split)
    assert ours.shape == (2, 16, 3, 4, 4)
    assert torch.equal(ours, core), f"max difference {(ours - core).abs().max().item()}"


def test_boundary_switch_hands_over_at_the_official_step(experts, conds):
    high, low = experts
    lightning = node_run(high, low, conds, video_latent(), preset="wan22_lightning")
    spelled_out = node_run(high, low, conds, video_latent(), steps=4, cfg_high_noise=1.0, cfg_low_noise=1.0,
                           sampler_name="euler", scheduler="wan_flow", shift=5.0, switch="step", switch_step=2)
    assert torch.equal(lightning, spelled_out)
    custom = dict(scheduler="wan_flow", steps=8, shift=5.0, switch="boundary", boundary=0.9)
    k = expert_switch_step(wan_flow_sigmas(8, 5.0), 0.9)
    assert 0 < k < 8
    assert torch.equal(node_run(high, low, conds, video_latent(), **custom),
                       node_run(high, low, conds, video_latent(), **{**custom, "switch": "step", "switch_step": k}))


def test_experts_are_really_switched_and_cfg_is_per_expert(experts, conds):
    high, low = experts
    both = node_run(high, low, conds, video_latent())
    assert not torch.equal(both, node_run(high, high, conds, video_latent()))
    assert not torch.equal(both, node_run(high, low, conds, video_latent(), cfg_low_noise=5.0))
    assert not torch.equal(both, node_run(high, low, conds, video_latent(), cfg_high_noise=5.0))


def test_only_one_expert_is_loaded_at_a_time_run_after_run(experts, conds, monkeypatch):
    """On a card that holds one expert with room to spare but not two (the residency plan one_at_a_time;
    every card size: tests/unit/test_wan_residency.py)."""
    import comfy.model_management as mm

    import velox.host.wan_residency as residency

    one_and_a_half = experts[0].model_size() * 3 // 2
    monkeypatch.setattr(residency, "card_memory", lambda device, experts: one_and_a_half)
    monkeypatch.setattr(residency, "headroom_bytes", lambda patcher, shape: 0)
    mm.unload_all_models()

    def loaded(expert) -> bool:
        return any(m.model is not None and m.model.is_clone(expert) for m in mm.current_loaded_models)

    high, low = experts
    seen = []

    def wrapper(apply_model, args):
        seen.append((loaded(high), loaded(low)))
        return apply_model(args["input"], args["timestep"], **args["c"])

    high, low = high.clone(), low.clone()
    high.set_model_unet_function_wrapper(wrapper)
    low.set_model_unet_function_wrapper(wrapper)
    for _ in range(2):  # the second run starts with the low-noise expert still loaded from the first
        node_run(high, low, conds, video_latent())
        assert not loaded(high) and loaded(low)
    assert seen == [(True, False)] * 3 + [(False, True)] * 3 + [(True, False)] * 3 + [(False, True)] * 3


def test_seeds_are_reproducible_and_batch_items_differ(experts, conds):
    high, low = experts
    a, b = node_run(high, low, conds, video_latent()), node_run(high, low, conds, video_latent())
    assert torch.equal(a, b)
    assert not torch.equal(a, node_run(high, low, conds, video_latent(), seed=6))
    assert not torch.equal(a[0], a[1]), "the two videos of a batch got the same noise"


def test_one_model_equals_core_ksampler(experts, conds):
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    import nodes

    high, _ = experts
    ours = node_run(high, None, conds, video_latent(), cfg_low_noise=3.0)
    core = nodes.common_ksampler(ModelSamplingSD3().patch(high, 5.0)[0], 5, 6, 3.0, "euler", "simple",
                                 conds[0], conds[1], video_latent())[0]["samples"]
    assert torch.equal(ours, core)


def test_progress_ticks_once_per_step_over_the_whole_run(experts, conds):
    import comfy.utils

    ticks = []
    saved = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: ticks.append((value, total)))
    try:
        node_run(experts[0], experts[1], conds, video_latent(1), steps=5, switch_step=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(saved)
    assert ticks == [(step, 5) for step in range(1, 6)]


def test_experts_of_different_sizes_are_refused(experts, conds):
    bigger = tiny_wan(seed=4, dim=256)
    with pytest.raises(ValueError, match=r"VeloxWanExpertSampler: .*same architecture and size.*dim: high 128 vs "
                                         r"low 256"):
        node_run(experts[0], bigger, conds, video_latent(1))


def test_i2v_expert_without_a_start_image_is_refused_and_runs_with_one(comfy_host, conds):
    import node_helpers

    expert = tiny_wan(seed=5, in_dim=36)  # a Wan 2.2 A14B I2V expert: 16 noise + 4 mask + 16 image channels
    with pytest.raises(ValueError, match=r"image-to-video Wan model \(in_dim 36\).*no start image.*WanImageToVideo"):
        node_run(expert, expert, conds, video_latent(1))
    image = {"concat_latent_image": torch.zeros(1, 16, 3, 4, 4), "concat_mask": torch.ones(1, 1, 3, 4, 4)}
    with_image = tuple(node_helpers.conditioning_set_values(c, image) for c in conds)
    assert node_run(expert, expert, with_image, video_latent(1)).shape == (1, 16, 3, 4, 4)


def test_wan21_preset_is_the_same_run_in_velox_sampler_and_the_expert_sampler(experts, conds):
    from velox.nodes.sampler_nodes import VeloxSampler

    expert_sampler = node_run(experts[0], None, conds, video_latent(1), preset="wan21_t2v")
    velox_sampler = VeloxSampler.execute(experts[0], conds[0], conds[1], video_latent(1), "wan21_t2v", 5, 1, 1.0,
                                         "euler", "simple", 1.0, 1.0).result[0]["samples"]
    assert torch.equal(expert_sampler, velox_sampler)


def test_velox_sampler_points_two_expert_presets_to_the_expert_sampler(experts, conds):
    from velox.nodes.sampler_nodes import VeloxSampler

    with pytest.raises(ValueError, match="VeloxWanExpertSampler"):
        VeloxSampler.execute(experts[0], conds[0], conds[1], video_latent(1), "wan22_i2v_a14b", 0, 4, 1.0,
                             "euler", "simple", 5.0, 1.0)


# --- the empty Wan latent --------------------------------------------------------------------------------

def test_empty_wan_latent_is_five_d_as_core_wan(comfy_host):
    from velox.nodes.wan_sampling_nodes import EmptyWanLatent

    latent = EmptyWanLatent.execute(64, 48, 9, 2).result[0]["samples"]
    assert latent.shape == (2, 16, 3, 6, 8) and not latent.any()
    assert EmptyWanLatent.validate_inputs(width=832, height=480, length=81, batch_size=1) is True


@pytest.mark.parametrize("width,height,length,message", [
    (64, 64, 8, r"length must be 4n \+ 1 frames .*got 8: use 5 or 9"),
    (64, 64, 0, r"length must be 4n \+ 1 .*got 0"),
    (72, 64, 9, r"width must be a multiple of 16, got 72: use 64 or 80"),
    (64, 40, 10, r"length .*got 10.*height must be a multiple of 16, got 40: use 32 or 48"),
])
def test_empty_wan_latent_refuses_bad_sizes_saying_what_to_use(comfy_host, width, height, length, message):
    from velox.nodes.wan_sampling_nodes import EmptyWanLatent

    problem = EmptyWanLatent.validate_inputs(width=width, height=height, length=length, batch_size=1)
    assert isinstance(problem, str) and problem.startswith("VeloxEmptyWanLatent: ")
    assert re.search(message, problem), problem
    with pytest.raises(ValueError, match=message):
        EmptyWanLatent.execute(width, height, length, 1)
