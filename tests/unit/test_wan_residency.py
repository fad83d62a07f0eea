"""Wan expert residency: the pure plan for cards of 141, 80, 40, 24 and 16 GB, the sampler following it call
by call on tiny experts (fake cards scaled to their size), streamed output equal to resident output bit for
bit, and putting an expert away re-pointing its weights to the host copy without copying (CPU)."""

from __future__ import annotations

import pytest
import torch

from velox.sampling.wan_residency import (
    BOTH_RESIDENT,
    HIGH,
    LOW,
    ONE_AT_A_TIME,
    STREAMED,
    plan_residency,
    resident_during_calls,
)

GB = 10 ** 9
A14B_EXPERT = int(28.6 * GB)  # one Wan 2.2 A14B expert in bf16
HEADROOM = 10 * GB  # 480p x 81 activations + core's inference reserve + the VAE decode
TWO_EXPERTS = {HIGH: A14B_EXPERT, LOW: A14B_EXPERT}
H, L, HL = frozenset({HIGH}), frozenset({LOW}), frozenset({HIGH, LOW})
LIGHTNING = {HIGH: 2, LOW: 2}  # model calls per phase: 4 steps split 2 + 2, CFG 1

# card GB -> (plan, GB of one expert's weights on the card, resident set at each call of two runs)
CARDS = {
    141: (BOTH_RESIDENT, 28.6, [H, H, HL, HL] + [HL] * 4),
    80: (BOTH_RESIDENT, 28.6, [H, H, HL, HL] + [HL] * 4),
    40: (ONE_AT_A_TIME, 28.6, [H, H, L, L] * 2),
    24: (STREAMED, 14.0, [H, H, L, L] * 2),
    16: (STREAMED, 6.0, [H, H, L, L] * 2),
}


@pytest.mark.parametrize("card_gb", sorted(CARDS, reverse=True))
def test_resident_set_at_each_model_call_for_cards_of_141_to_16_gb(card_gb):
    plan_name, weights_gb, calls = CARDS[card_gb]
    plan = plan_residency(card_gb * GB, TWO_EXPERTS, HEADROOM)
    assert plan.plan == plan_name
    assert plan.weight_budget == pytest.approx(weights_gb * GB, abs=1)
    assert plan.host_copies == (plan_name != BOTH_RESIDENT), "a pinned host copy exactly when experts move"
    assert resident_during_calls(plan, LIGHTNING) == calls
    assert plan.weight_budget + HEADROOM <= card_gb * GB, "the VAE and activations always keep their room"


def test_cap_overrides_the_card_and_zero_means_automatic():
    assert plan_residency(141 * GB, TWO_EXPERTS, HEADROOM, cap_bytes=24 * GB).weight_budget == 14 * GB
    assert plan_residency(141 * GB, TWO_EXPERTS, HEADROOM, cap_bytes=0).plan == BOTH_RESIDENT
    assert plan_residency(16 * GB, TWO_EXPERTS, HEADROOM, cap_bytes=80 * GB).plan == STREAMED, "a cap never adds"


@pytest.mark.parametrize("card_gb,plan_name", [(80, BOTH_RESIDENT), (40, BOTH_RESIDENT), (24, STREAMED)])
def test_single_expert_and_wan21_stay_resident_or_stream_never_swap(card_gb, plan_name):
    plan = plan_residency(card_gb * GB, {HIGH: A14B_EXPERT}, HEADROOM)
    assert plan.plan == plan_name
    assert resident_during_calls(plan, {HIGH: 4}, runs=1) == [H] * 4


def test_a_card_with_no_room_left_streams_with_an_empty_budget():
    plan = plan_residency(8 * GB, TWO_EXPERTS, HEADROOM)
    assert (plan.plan, plan.weight_budget) == (STREAMED, 0)


# --- the sampler on tiny experts, with fake cards scaled so that one tiny expert stands for 28.6 GB ----------

def tiny_expert(seed: int):
    """A tiny Wan 2.1-architecture expert through core's own loader (official key names)."""
    import comfy.sd

    from velox.tiny.wan import TINY_WAN_CONFIGS, tiny_wan_state_dict

    return comfy.sd.load_diffusion_model_state_dict(tiny_wan_state_dict(TINY_WAN_CONFIGS["t2v"], seed=seed))


@pytest.fixture(scope="module")
def experts(comfy_host):
    return tiny_expert(seed=1), tiny_expert(seed=2)


@pytest.fixture(scope="module")
def conds():
    generator = torch.Generator().manual_seed(3)
    return ([[torch.randn(1, 8, 4096, generator=generator), {}]],
            [[torch.randn(1, 8, 4096, generator=generator), {}]])


def fake_card(monkeypatch, expert, card_gb: float) -> float:
    """Make the host see a card of ``card_gb`` for experts of 28.6 GB; returns bytes per fake GB."""
    import velox.host.wan_residency as residency

    per_gb = expert.model_size() / 28.6
    monkeypatch.setattr(residency, "card_memory", lambda device, experts: int(card_gb * per_gb))
    monkeypatch.setattr(residency, "headroom_bytes", lambda patcher, shape: int(10 * per_gb))
    return per_gb


def lightning_run(high, low, conds):
    from velox.nodes.wan_sampling_nodes import WanExpertSampler

    latent = {"samples": torch.zeros(1, 16, 3, 4, 4)}
    args = dict(preset="custom", seed=5, steps=4, cfg_high_noise=1.0, cfg_low_noise=1.0, sampler_name="euler",
                scheduler="simple", shift=5.0, switch="step", boundary=0.9, switch_step=2)
    return WanExpertSampler.execute(high, conds[0], conds[1], latent, model_low_noise=low, **args).result[0]["samples"]


def watched(experts):
    """Clones of the experts that record, at each model call, which are loaded and how many bytes."""
    import comfy.model_management as mm

    high, low = experts
    seen = []

    def loaded(expert):
        return [m.model.loaded_size() for m in mm.current_loaded_models if m.model is not None
                and m.model.is_clone(expert)]

    def wrapper(apply_model, args):
        sizes = {name: loaded(e) for name, e in ((HIGH, high), (LOW, low))}
        seen.append((frozenset(name for name, s in sizes.items() if s), max(sum(s) for s in sizes.values())))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clones = high.clone(), low.clone()
    for clone in clones:
        clone.set_model_unet_function_wrapper(wrapper)
    return clones, seen


@pytest.mark.parametrize("card_gb", sorted(CARDS, reverse=True))
def test_sampler_follows_the_plan_call_by_call_and_streams_within_the_budget(experts, conds, monkeypatch, card_gb):
    import comfy.model_management as mm

    mm.unload_all_models()
    per_gb = fake_card(monkeypatch, experts[0], card_gb)
    plan_name, weights_gb, calls = CARDS[card_gb]
    (high, low), seen = watched(experts)
    for _ in range(2):
        lightning_run(high, low, conds)
    assert [resident for resident, _ in seen] == calls
    most_loaded = max(size for _, size in seen)
    assert most_loaded <= weights_gb * per_gb, f"{most_loaded} bytes loaded, budget {weights_gb * per_gb:.0f}"
    if plan_name == STREAMED:
        assert most_loaded < experts[0].model_size(), "a streamed expert is loaded only in part"
    mm.unload_all_models()


def test_streamed_output_equals_resident_output_bit_for_bit(experts, conds, monkeypatch):
    import comfy.model_management as mm

    outputs = {}
    for card_gb in (141, 16):
        mm.unload_all_models()
        fake_card(monkeypatch, experts[0], card_gb)
        outputs[card_gb] = lightning_run(*experts, conds)
    mm.unload_all_models()
    assert torch.equal(outputs[141], outputs[16])


def test_putting_an_expert_away_reuses_its_host_tensors_without_a_copy(comfy_host):
    """Loaded on the meta device, core's unload would have to copy every weight back (and cannot: meta holds
    no data); after the restore, every weight is its own host tensor again, at the same address."""
    from velox.host.wan_residency import keep_host_copy, restore_host_copy

    patcher = tiny_expert(seed=9)
    before = {key: tensor.data_ptr() for key, tensor in patcher.model.state_dict().items()}
    keep_host_copy(patcher)
    patcher.patch_model(device_to=torch.device("meta"))
    moved = len(patcher.model.state_dict())  # parameters and buffers (model_sampling's sigmas)
    assert all(t.device.type == "meta" for t in patcher.model.state_dict().values())
    assert restore_host_copy(patcher) == moved
    patcher.detach()  # core's own unload: model.to(offload_device) must find nothing left to copy
    after = {key: tensor.data_ptr() for key, tensor in patcher.model.state_dict().items()}
    assert after == before
