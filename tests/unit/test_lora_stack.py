"""LoRA stacks on tiny Wan and Sana models (CPU): every key dialect against the same weight delta,
exact parity with chained core ``LoraLoaderModelOnly`` on bf16, and bad input refused by name."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from velox.loaders.lora_formats import FORMATS, lora_state_dict, random_lora_factors
from velox.tiny.wan import TINY_WAN_CONFIGS, tiny_wan_state_dict

WAN_TARGETS = ("blocks.0.self_attn.q", "blocks.0.cross_attn.k", "blocks.1.cross_attn.o", "blocks.0.ffn.0", "blocks.1.ffn.2",
               "text_embedding.0", "head.head")
SANA_TARGETS = ("blocks.0.attn.qkv", "blocks.1.cross_attn.kv_linear", "blocks.0.cross_attn.q_linear",
                "blocks.1.attn.proj", "blocks.0.mlp.inverted_conv.conv", "t_block.1")


@pytest.fixture(scope="module")
def wan_model(comfy_host):
    from velox.host.wan_loading import build_wan_model
    from velox.loaders.wan_detect import sniff_wan

    variant, state_dict = sniff_wan(tiny_wan_state_dict(TINY_WAN_CONFIGS["t2v"], seed=0))
    return build_wan_model(state_dict, variant, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def sana_model(comfy_host):
    from velox.host.sana_model import build_sana_model
    from velox.tiny.sana import TINY_SANA_CONFIGS, tiny_sana_state_dict

    return build_sana_model(tiny_sana_state_dict(TINY_SANA_CONFIGS["sana_600m_style"], seed=0),
                            dtype=torch.bfloat16)


VC_TARGETS = ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
              "input_blocks.1.1.proj_in", "time_embed.0", "fps_embedding.2")


@pytest.fixture(scope="module")
def videocrafter_model(comfy_host, tmp_path_factory):
    """The tiny VideoCrafter 2 demo release through its loader (skipped while that code is unavailable)."""
    try:
        from velox.host.videocrafter_loading import load_videocrafter_checkpoint
        from velox.tiny.videocrafter import demo_release_state_dict
    except ImportError as error:
        pytest.skip(f"VideoCrafter loader unavailable: {error}")
    path = tmp_path_factory.mktemp("vc") / "videocrafter2_t2v.safetensors"
    save_file({k: v.contiguous() for k, v in demo_release_state_dict("vc2").items()}, str(path))
    return load_videocrafter_checkpoint(path, dtype=torch.bfloat16)[0]


def weight_shapes(patcher, modules) -> dict[str, tuple[int, ...]]:
    state = patcher.model.diffusion_model.state_dict()
    return {m: tuple(state[m + ".weight"].shape[:2]) for m in modules}


def patch_delta(patcher, key: str) -> torch.Tensor:
    """The fp32 change the patches on ``key`` make (core's own ``calculate_weight`` on a zero weight)."""
    import comfy.lora

    weight = torch.zeros(patcher.model.state_dict()[key].shape, dtype=torch.float32)
    return comfy.lora.calculate_weight(patcher.patches[key], weight, key)


def loaded_weights(patcher) -> dict[str, torch.Tensor]:
    """Every weight as ComfyUI loads it for sampling (patches applied by ``patch_model``), then unpatched."""
    patcher.patch_model(device_to=torch.device("cpu"))
    try:
        return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    finally:
        patcher.unpatch_model(device_to=torch.device("cpu"))


def write(tmp_path, name: str, tensors: dict) -> str:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def apply(patcher, *items, clip=None):
    from velox.host.lora_stack import StackItem, apply_lora_stack

    stack = [StackItem(path, strength) for path, strength in items]
    model, _, reports = apply_lora_stack(patcher, clip, stack)
    return model, reports


def assert_deltas(model, expected: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    for module, want in expected.items():
        key = f"diffusion_model.{module}.weight"
        got = patch_delta(model, key)
        want = want.reshape(got.shape)
        error = ((got - want).norm() / want.norm()).item()
        assert error <= rtol, f"{module}: relative error {error:.2e}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_lora_dialect_gives_the_same_wan_weight_delta(wan_model, tmp_path, fmt):
    factors = random_lora_factors(weight_shapes(wan_model, WAN_TARGETS), rank=4, alpha=2.0, seed=1)
    path = write(tmp_path, f"wan_{fmt}.safetensors", lora_state_dict(factors, fmt, family="wan"))
    model, (report,) = apply(wan_model, (path, 0.8))
    assert report.unmatched == [] and report.merged == len(WAN_TARGETS)
    assert_deltas(model, {m: 0.8 * f.delta() for m, f in factors.items()})


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_lora_dialect_gives_the_same_sana_weight_delta_fused_qkv_included(sana_model, tmp_path, fmt):
    factors = random_lora_factors(weight_shapes(sana_model, SANA_TARGETS), rank=4, alpha=8.0, seed=2)
    path = write(tmp_path, f"sana_{fmt}.safetensors", lora_state_dict(factors, fmt, family="sana"))
    model, (report,) = apply(sana_model, (path, -1.5))
    assert report.unmatched == [], report.unmatched
    assert_deltas(model, {m: -1.5 * f.delta() for m, f in factors.items()})


def test_kohya_keys_with_mixed_separators_still_resolve(wan_model, tmp_path):
    """kijai/ComfyUI-WanVideoWrapper#869: ``lora_unet_blocks_22.self_attn.k.alpha``."""
    factors = random_lora_factors(weight_shapes(wan_model, ["blocks.1.self_attn.k"]), rank=2, alpha=1.0)
    tensors = {k.replace("lora_unet_blocks_1_self_attn_k", "lora_unet_blocks_1.self_attn.k"): v
               for k, v in lora_state_dict(factors, "kohya").items()}
    model, (report,) = apply(wan_model, (write(tmp_path, "mixed.safetensors", tensors), 1.0))
    assert report.unmatched == []
    assert_deltas(model, {m: f.delta() for m, f in factors.items()})


def lycoris_tensors(prefix: str, out_features: int, in_features: int, generator) -> tuple[dict, dict]:
    """LoHa, LoKr and full / bias diffs on four modules, with their fp32 deltas written out by hand."""
    rank, alpha = 2, 1.0
    r = lambda *shape: torch.randn(*shape, generator=generator) * 0.1  # noqa: E731
    w1a, w1b, w2a, w2b = r(out_features, rank), r(rank, in_features), r(out_features, rank), r(rank, in_features)
    k1, k2a, k2b = r(2, 2), r(out_features // 2, rank), r(rank, in_features // 2)
    diff, diff_b = r(out_features, in_features), r(out_features)
    tensors = {
        f"{prefix}blocks.0.self_attn.q.hada_w1_a": w1a, f"{prefix}blocks.0.self_attn.q.hada_w1_b": w1b,
        f"{prefix}blocks.0.self_attn.q.hada_w2_a": w2a, f"{prefix}blocks.0.self_attn.q.hada_w2_b": w2b,
        f"{prefix}blocks.0.self_attn.q.alpha": torch.tensor(alpha),
        f"{prefix}blocks.0.self_attn.k.lokr_w1": k1, f"{prefix}blocks.0.self_attn.k.lokr_w2_a": k2a,
        f"{prefix}blocks.0.self_attn.k.lokr_w2_b": k2b, f"{prefix}blocks.0.self_attn.k.alpha": torch.tensor(alpha),
        f"{prefix}blocks.1.self_attn.v.diff": diff, f"{prefix}blocks.1.self_attn.v.diff_b": diff_b,
    }
    deltas = {
        "blocks.0.self_attn.q.weight": alpha / rank * (w1a @ w1b) * (w2a @ w2b),
        "blocks.0.self_attn.k.weight": alpha / rank * torch.kron(k1, k2a @ k2b),
        "blocks.1.self_attn.v.weight": diff, "blocks.1.self_attn.v.bias": diff_b,
    }
    return tensors, deltas


@pytest.mark.parametrize("prefix", ["diffusion_model.", "lycoris_"])
def test_loha_lokr_and_diffs_go_through_cores_adapters(wan_model, tmp_path, prefix):
    tensors, deltas = lycoris_tensors("diffusion_model.", 256, 256, torch.Generator().manual_seed(3))
    if prefix == "lycoris_":  # SimpleTuner LyCORIS spelling: dots as "_" in the module part
        tensors = {"lycoris_" + k[len("diffusion_model."):].rsplit(".", 1)[0].replace(".", "_") + "."
                   + k.rsplit(".", 1)[1]: v for k, v in tensors.items()}
    model, (report,) = apply(wan_model, (write(tmp_path, "lycoris.safetensors", tensors), 0.5))
    assert report.unmatched == [] and report.merged == 4
    for key, want in deltas.items():
        got = patch_delta(model, "diffusion_model." + key)
        assert torch.allclose(got, 0.5 * want, rtol=1e-5, atol=1e-7), key


def test_lightx2v_distill_lora_layout_applies_every_key_including_modulation_diffs(wan_model, tmp_path):
    """LightX2V's step-distill LoRAs: rank-64 ``lora_down/up`` + ``alpha``, ``diff_b`` biases, ``diff``
    norms and ``blocks.N.diff_m`` (Wan's ``modulation``, which core 0.3.75 leaves unloaded:
    Comfy-Org/ComfyUI#8922). Every key lands; each delta is the file's tensor times the strength."""
    state = wan_model.model.diffusion_model.state_dict()
    generator = torch.Generator().manual_seed(5)
    r = lambda shape: torch.randn(*shape, generator=generator) * 0.05  # noqa: E731
    factors = random_lora_factors(weight_shapes(wan_model, ["blocks.0.self_attn.q", "blocks.1.ffn.0"]), 4, 4.0, seed=6)
    tensors = lora_state_dict(factors, "official")
    diffs = {"blocks.0.self_attn.q.bias": "blocks.0.self_attn.q.diff_b", "blocks.1.ffn.0.bias": "blocks.1.ffn.0.diff_b",
             "blocks.0.cross_attn.norm_k.weight": "blocks.0.cross_attn.norm_k.diff",
             "blocks.0.modulation": "blocks.0.diff_m", "blocks.1.modulation": "blocks.1.diff_m",
             "head.modulation": "head.diff_m"}
    tensors.update({f"diffusion_model.{name}": r(state[key].shape) for key, name in diffs.items()})
    model, (report,) = apply(wan_model, (write(tmp_path, "lightx2v.safetensors", tensors), 0.75))
    assert report.unmatched == [] and report.merged == 2 + len(diffs)
    assert_deltas(model, {m: 0.75 * f.delta() for m, f in factors.items()})
    for key, name in diffs.items():
        got = patch_delta(model, f"diffusion_model.{key}")
        assert torch.allclose(got, 0.75 * tensors[f"diffusion_model.{name}"], rtol=1e-6, atol=0), key
    # core's loader skips parameters of non-leaf modules; our ON_LOAD callback patches them, once
    before = state["blocks.0.modulation"].float().clone()
    want = before + 0.75 * tensors["diffusion_model.blocks.0.diff_m"]
    after = loaded_weights(model)["blocks.0.modulation"].float()
    assert ((after - want).norm() / want.norm()).item() < 1e-2  # bf16 storage, stochastic rounding
    model.patch_model(device_to=torch.device("cpu"))
    model.load(torch.device("cpu"), force_patch_weights=True)  # a second load (partial loads do this)
    twice = model.model.diffusion_model.blocks[0].modulation.detach().float().clone()
    model.unpatch_model(device_to=torch.device("cpu"))
    assert torch.equal(twice, after)
    assert torch.equal(wan_model.model.diffusion_model.blocks[0].modulation.detach().float(), before)


# ----------------------------------------------------------------------------------------------
# parity with core's chained LoraLoaderModelOnly
# ----------------------------------------------------------------------------------------------


def core_chain(patcher, paths_and_strengths):
    """What a chain of core ``LoraLoaderModelOnly`` nodes does (its body: load_torch_file + load_lora_for_models)."""
    import comfy.sd
    import comfy.utils

    for path, strength in paths_and_strengths:
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        patcher = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)[0]
    return patcher


def test_wan_stack_equals_chained_core_lora_loaders_exactly_in_bf16(wan_model, tmp_path):
    shapes = weight_shapes(wan_model, WAN_TARGETS)
    fun = random_lora_factors(shapes, rank=8, alpha=4.0, seed=4, dtype=torch.bfloat16)
    lightning = random_lora_factors(shapes, rank=4, alpha=4.0, seed=5, dtype=torch.float32)
    kohya = random_lora_factors(dict(list(shapes.items())[:3]), rank=2, alpha=1.0, seed=6, dtype=torch.float16)
    lycoris, _ = lycoris_tensors("diffusion_model.", 256, 256, torch.Generator().manual_seed(7))
    items = [(write(tmp_path, "fun.safetensors", lora_state_dict(fun, "kohya_fun")), 0.6),
             (write(tmp_path, "lightning.safetensors", lora_state_dict(lightning, "official")), 1.0),
             (write(tmp_path, "kohya.safetensors", lora_state_dict(kohya, "kohya")), -0.4),
             (write(tmp_path, "lycoris.safetensors", lycoris), 0.3)]
    ours, reports = apply(wan_model, *items)
    assert [r.unmatched for r in reports] == [[], [], [], []]
    core = core_chain(wan_model, items)
    assert list(ours.patches) == list(core.patches) or set(ours.patches) == set(core.patches)
    ours_weights, core_weights = loaded_weights(ours), loaded_weights(core)
    base = loaded_weights(wan_model)
    changed = [k for k in base if not torch.equal(base[k], ours_weights[k])]
    assert len(changed) >= len(WAN_TARGETS)
    assert all(v.dtype == torch.bfloat16 for k, v in ours_weights.items() if k.endswith(".weight") and v.ndim == 2)
    different = [k for k in ours_weights if not torch.equal(ours_weights[k], core_weights[k])]
    assert different == []


def test_sana_stack_equals_chained_core_lora_loaders_exactly_in_bf16(sana_model, tmp_path):
    shapes = weight_shapes(sana_model, SANA_TARGETS)
    items = [(write(tmp_path, f"sana_{i}.safetensors",
                    lora_state_dict(random_lora_factors(shapes, rank=4, alpha=2.0, seed=10 + i), fmt)), strength)
             for i, (fmt, strength) in enumerate([("official", 0.7), ("kohya", 1.2)])]
    ours, _ = apply(sana_model, *items)
    ours_weights, core_weights = loaded_weights(ours), loaded_weights(core_chain(sana_model, items))
    assert [k for k in ours_weights if not torch.equal(ours_weights[k], core_weights[k])] == []


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_sana_lora_on_a_wan_model_is_refused_naming_both_families(wan_model, sana_model, tmp_path):
    from velox.errors import VeloxLoadError

    factors = random_lora_factors(weight_shapes(sana_model, SANA_TARGETS[:2]), rank=2, alpha=2.0)
    path = write(tmp_path, "sana_style.safetensors", lora_state_dict(factors, "kohya"))
    with pytest.raises(VeloxLoadError, match=r"sana_style.safetensors: is a Sana LoRA .* the model is Wan"):
        apply(wan_model, (path, 1.0))


def test_nan_weights_are_refused_with_the_key_named(wan_model, tmp_path):
    from velox.errors import VeloxLoadError

    tensors = lora_state_dict(random_lora_factors(weight_shapes(wan_model, WAN_TARGETS[:1]), 2, 2.0), "official")
    tensors["diffusion_model.blocks.0.self_attn.q.lora_up.weight"][1, 1] = float("nan")
    with pytest.raises(VeloxLoadError, match=r"nan.safetensors: 1 tensor\(s\) hold NaN .*self_attn.q.lora_up"):
        apply(wan_model, (write(tmp_path, "nan.safetensors", tensors), 1.0))


def test_mismatched_ranks_are_refused_with_the_module_named(wan_model, tmp_path):
    from velox.errors import VeloxLoadError

    tensors = lora_state_dict(random_lora_factors(weight_shapes(wan_model, WAN_TARGETS[:1]), 4, 4.0), "official")
    tensors["diffusion_model.blocks.0.self_attn.q.lora_down.weight"] = torch.zeros(3, 256)
    with pytest.raises(VeloxLoadError, match=r"mismatched ranks at blocks.0.self_attn.q: up \(256, 4\) has rank 4"):
        apply(wan_model, (write(tmp_path, "ranks.safetensors", tensors), 1.0))


def test_lora_for_another_size_is_refused_with_the_shapes(wan_model, tmp_path):
    from velox.errors import VeloxLoadError

    factors = random_lora_factors({"blocks.0.self_attn.q": (512, 512)}, 4, 4.0)
    with pytest.raises(VeloxLoadError, match=r"shape mismatch at blocks.0.self_attn.q: .*\(256, 256\)"):
        apply(wan_model, (write(tmp_path, "big.safetensors", lora_state_dict(factors, "official")), 1.0))


def test_half_a_lora_pair_is_refused(wan_model, tmp_path):
    from velox.errors import VeloxLoadError

    tensors = lora_state_dict(random_lora_factors(weight_shapes(wan_model, WAN_TARGETS[:1]), 2, 2.0), "kohya")
    del tensors["lora_unet_blocks_0_self_attn_q.lora_down.weight"]
    with pytest.raises(VeloxLoadError, match="lora_up.weight has no matching lora_down.weight"):
        apply(wan_model, (write(tmp_path, "half.safetensors", tensors), 1.0))


def test_unmatched_keys_are_reported_by_count_and_name_and_logged(wan_model, tmp_path, caplog):
    from velox.host.lora_stack import stack_report

    tensors = lora_state_dict(random_lora_factors(weight_shapes(wan_model, WAN_TARGETS[:2]), 2, 2.0), "official")
    i2v = random_lora_factors({"blocks.0.cross_attn.k_img": (256, 256)}, 2, 2.0)  # an I2V LoRA on a T2V model
    tensors.update(lora_state_dict(i2v, "official"))
    tensors["diffusion_model.blocks.0.self_attn.q.mystery_tensor"] = torch.zeros(2)
    with caplog.at_level(logging.WARNING):
        _, (report,) = apply(wan_model, (write(tmp_path, "i2v_on_t2v.safetensors", tensors), 1.0))
    assert report.merged == 2
    assert sorted(report.unmatched) == ["diffusion_model.blocks.0.cross_attn.k_img.alpha",
                                        "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight",
                                        "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight",
                                        "diffusion_model.blocks.0.self_attn.q.mystery_tensor"]
    text = stack_report("model", [report])
    assert "WARNING: 4 LoRA key(s) match no module of this model: diffusion_model.blocks.0.cross_attn.k_img" in text
    assert "i2v_on_t2v.safetensors" in caplog.text and "4 LoRA key(s)" in caplog.text


@pytest.mark.parametrize("name", ["lora.ckpt", "lora.pt", "broken.safetensors"])
def test_pickles_and_broken_files_are_refused(wan_model, tmp_path, name):
    from velox.errors import VeloxLoadError

    (tmp_path / name).write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(VeloxLoadError, match=name.replace(".", r"\.")):
        apply(wan_model, (tmp_path / name, 1.0))


def test_zero_strength_leaves_the_model_untouched(wan_model, tmp_path):
    tensors = lora_state_dict(random_lora_factors(weight_shapes(wan_model, WAN_TARGETS[:1]), 2, 2.0), "official")
    model, reports = apply(wan_model, (write(tmp_path, "zero.safetensors", tensors), 0.0))
    assert model is wan_model and reports == []


def test_text_encoder_keys_patch_the_clip_and_are_noted_without_one(wan_model, tmp_path):
    from velox.host.lora_stack import StackItem, apply_lora_stack
    from velox.host.wan_loading import load_umt5
    from velox.tiny.wan import write_tiny_umt5_file

    clip = load_umt5(write_tiny_umt5_file(tmp_path / "umt5_xxl_tiny.safetensors"), cpu=True)
    te_key = next(k for k in clip.cond_stage_model.state_dict() if k.endswith("SelfAttention.q.weight"))
    out_f, in_f = clip.cond_stage_model.state_dict()[te_key].shape
    tensors = lora_state_dict(random_lora_factors(weight_shapes(wan_model, WAN_TARGETS[:1]), 2, 2.0), "official")
    te_module = "text_encoders." + te_key.removesuffix(".weight")
    tensors |= {f"{te_module}.lora_up.weight": torch.ones(out_f, 2), f"{te_module}.lora_down.weight": torch.ones(2, in_f)}
    path = write(tmp_path, "with_te.safetensors", tensors)
    _, new_clip, (report,) = apply_lora_stack(wan_model, clip, [StackItem(path, 1.0, 0.5)])
    assert report.merged == 1 and report.clip_patched == 1 and report.unmatched == []
    assert new_clip.patcher.patches[te_key][0][0] == 0.5 and te_key not in clip.patcher.patches
    _, none_clip, (alone,) = apply_lora_stack(wan_model, None, [StackItem(path, 1.0, 0.5)])
    assert none_clip is None and alone.notes == ["2 text-encoder key(s): applied only where a CLIP is connected"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_lora_dialect_gives_the_same_videocrafter_weight_delta(videocrafter_model, tmp_path, fmt):
    shapes = weight_shapes(videocrafter_model, VC_TARGETS)
    assert all(len(s) == 2 for s in shapes.values())
    factors = random_lora_factors(shapes, rank=4, alpha=2.0, seed=30)
    path = write(tmp_path, f"vc_{fmt}.safetensors", lora_state_dict(factors, fmt, family="videocrafter"))
    model, (report,) = apply(videocrafter_model, (path, 0.9))
    assert report.unmatched == [] and report.merged == len(VC_TARGETS) and report.family == "videocrafter"
    assert_deltas(model, {m: 0.9 * f.delta() for m, f in factors.items()})


def test_videocrafter_stack_equals_chained_core_lora_loaders_exactly(videocrafter_model, wan_model, tmp_path):
    from velox.errors import VeloxLoadError

    shapes = weight_shapes(videocrafter_model, VC_TARGETS)
    items = [(write(tmp_path, f"vc_{i}.safetensors",
                    lora_state_dict(random_lora_factors(shapes, rank=4, alpha=1.0, seed=40 + i), fmt)), strength)
             for i, (fmt, strength) in enumerate([("kohya", 0.8), ("official", -0.3)])]
    ours, _ = apply(videocrafter_model, *items)
    ours_weights, core_weights = loaded_weights(ours), loaded_weights(core_chain(videocrafter_model, items))
    assert [k for k in ours_weights if not torch.equal(ours_weights[k], core_weights[k])] == []
    with pytest.raises(VeloxLoadError, match=r"vc_0.safetensors: is a VideoCrafter / DynamiCrafter LoRA .* Wan"):
        apply(wan_model, items[0])


def test_a_lone_alpha_is_reported_under_its_own_name(wan_model, tmp_path):
    tensors = lora_state_dict(random_lora_factors(weight_shapes(wan_model, WAN_TARGETS[:1]), 2, 2.0), "kohya")
    tensors["lora_unet_blocks_1_self_attn_k.alpha"] = torch.tensor(4.0)  # its pair was pruned away
    _, (report,) = apply(wan_model, (write(tmp_path, "lone.safetensors", tensors), 1.0))
    assert report.merged == 1 and report.unmatched == ["lora_unet_blocks_1_self_attn_k.alpha"]
