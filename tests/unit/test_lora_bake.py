"""Baking a weighted LoRA stack into one LoRA: exact when the stack's rank fits, the reported SVD
error equal to the measured one when it does not, and the baked file loading back through the stack."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from velox.loaders.lora_formats import lora_state_dict, random_lora_factors
from velox.tiny.wan import TINY_WAN_CONFIGS, tiny_wan_state_dict

TARGETS = ("blocks.0.self_attn.q", "blocks.0.cross_attn.k", "blocks.1.ffn.0", "head.head")


@pytest.fixture(scope="module")
def wan_model(comfy_host):
    from velox.host.wan_loading import build_wan_model
    from velox.loaders.wan_detect import sniff_wan

    variant, state_dict = sniff_wan(tiny_wan_state_dict(TINY_WAN_CONFIGS["t2v"], seed=0))
    return build_wan_model(state_dict, variant, dtype=torch.bfloat16)


def stack_delta(patcher, key: str) -> torch.Tensor:
    import comfy.lora

    weight = torch.zeros(patcher.model.state_dict()[key].shape, dtype=torch.float32)
    return comfy.lora.calculate_weight(patcher.patches[key], weight, key)


@pytest.fixture()
def two_loras(wan_model, tmp_path):
    from velox.host.lora_stack import StackItem

    state = wan_model.model.diffusion_model.state_dict()
    shapes = {m: tuple(state[m + ".weight"].shape) for m in TARGETS}
    items = []
    for i, fmt in enumerate(["kohya_fun", "peft"]):
        path = tmp_path / f"reward_{i}.safetensors"
        save_file(lora_state_dict(random_lora_factors(shapes, rank=4, alpha=2.0, seed=20 + i), fmt), str(path))
        items.append(StackItem(path, 1.0))
    bias = tmp_path / "bias.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(256) * 0.01,
               "diffusion_model.head.modulation.diff": torch.randn(1, 2, 256) * 0.01}, str(bias))
    return items, StackItem(bias, 1.0)


def test_bake_within_the_stack_rank_is_exact_and_loads_back(wan_model, two_loras, tmp_path):
    from velox.host.lora_bake import bake_lora_stack
    from velox.host.lora_stack import StackItem, apply_lora_stack

    items, bias = two_loras
    items = [*items, bias]
    strengths = [0.6, 0.4, 1.0]
    tensors, report = bake_lora_stack(wan_model, items, strengths, rank=8, save_dtype=torch.float32)
    assert report.relative_error == 0.0 and report.exact_layers == report.layers == len(TARGETS)
    assert report.dense_diffs == 2
    baked = tmp_path / "baked.safetensors"
    save_file(tensors, str(baked))
    stacked, _, _ = apply_lora_stack(wan_model, None, [StackItem(i.path, s) for i, s in zip(items, strengths)])
    from_file, _, (loaded,) = apply_lora_stack(wan_model, None, [StackItem(baked, 1.0)])
    assert loaded.unmatched == [] and loaded.merged == len(TARGETS) + 2
    for key in stacked.patches:
        want, got = stack_delta(stacked, key), stack_delta(from_file, key)
        assert ((got - want).norm() / want.norm()).item() < 1e-5, key


def test_bake_below_the_stack_rank_reports_the_error_it_makes(wan_model, two_loras):
    from velox.host.lora_bake import bake_lora_stack
    from velox.host.lora_stack import StackItem, apply_lora_stack

    items, _ = two_loras
    strengths = [0.6, 0.4]
    tensors, report = bake_lora_stack(wan_model, items, strengths, rank=3, save_dtype=torch.float32)
    stacked, _, _ = apply_lora_stack(wan_model, None, [StackItem(i.path, s) for i, s in zip(items, strengths)])
    dropped = total = 0.0
    for module in TARGETS:
        want = stack_delta(stacked, f"diffusion_model.{module}.weight").double()
        up = tensors[f"diffusion_model.{module}.lora_up.weight"].double()
        got = up @ tensors[f"diffusion_model.{module}.lora_down.weight"].double()
        assert up.shape[1] == 3
        dropped += ((got - want) ** 2).sum().item()
        total += (want**2).sum().item()
    measured = (dropped / total) ** 0.5
    assert 0.05 < report.relative_error and abs(report.relative_error - measured) < 1e-4 * measured
    text = report.text("velox_blend.safetensors", items, strengths)
    assert f"overall {report.relative_error:.3e}" in text and "reward_0.safetensors @ 0.6" in text


def test_bake_of_a_loha_uses_the_dense_delta_and_reports_its_svd_error(wan_model, tmp_path):
    from velox.host.lora_bake import bake_lora_stack
    from velox.host.lora_stack import StackItem

    g = torch.Generator().manual_seed(5)
    shapes = {"hada_w1_a": (256, 2), "hada_w1_b": (2, 256), "hada_w2_a": (256, 2), "hada_w2_b": (2, 256)}
    loha = {n: torch.randn(*s, generator=g) for n, s in shapes.items()}
    save_file({f"diffusion_model.blocks.1.self_attn.o.{n}": v for n, v in loha.items()},
              str(tmp_path / "loha.safetensors"))
    tensors, report = bake_lora_stack(wan_model, [StackItem(tmp_path / "loha.safetensors", 1.0)], [1.0], rank=2)
    delta = (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"])  # Hadamard, rank 4
    s = torch.linalg.svdvals(delta.double())
    assert report.layers == 1 and abs(report.relative_error - (s[2:].square().sum() / s.square().sum()).sqrt()) < 1e-5
    assert report.relative_error > 0.01
    assert tensors["diffusion_model.blocks.1.self_attn.o.lora_up.weight"].shape == (256, 2)
