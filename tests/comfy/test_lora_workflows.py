"""Velox's LoRA nodes in a real ComfyUI: the reward-blend and Lightning + reward workflows through
POST /prompt on the tiny demo experts and demo LoRAs (release names), the per-expert report and
its MPS warning, zero strengths leaving the experts untouched, and the bake writing one LoRA file."""

from __future__ import annotations

import numpy as np
import pytest
from comfy_client import WorkflowError
from comfy_helpers import load_api_workflow
from PIL import Image, ImageSequence
from safetensors.torch import load_file, save_file

from velox.loaders.lora_formats import lora_state_dict, random_lora_factors


def video_frames(result, node: str = "11") -> list[np.ndarray]:
    files = [f for f in result.files if f.suffix == ".webp"]
    assert len(files) == 1, result.files
    with Image.open(files[0]) as video:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(video)]


def report_text(result, node: str) -> str:
    return "".join(result.outputs[node]["text"])


def test_reward_blend_workflow_puts_both_reward_loras_on_each_expert(server):
    prompt = load_api_workflow("wan22_reward_lora_blend")
    assert prompt["12"]["inputs"]["mps_weight"] == 0.6
    result = server.run(prompt, timeout=600)
    frames = video_frames(result)
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
    text = report_text(result, "13")
    for expert, side in (("high-noise expert", "high"), ("low-noise expert", "low")):
        assert f"{expert}: 2 LoRA(s)" in text
        assert f"Wan2.2-Fun-A14B-InP-{side}-noise-MPS.safetensors @ 0.33:" in text
        assert f"Wan2.2-Fun-A14B-InP-{side}-noise-HPS2.1.safetensors @ 0.22:" in text
    assert "match no module" not in text
    assert "WARNING: Wan2.2-Fun-A14B-InP-low-noise-MPS.safetensors (MPS) is on the low-noise expert" in text
    assert report_text(result, "14") == text, "core PreviewAny shows the same report on the canvas"


def test_lightning_reward_workflow_applies_lightning_and_reward_loras_per_expert(server):
    prompt = load_api_workflow("wan22_i2v_lightning_reward")
    result = server.run(prompt, timeout=600)
    frames = video_frames(result)
    assert len(frames) == 9
    text = report_text(result, "13")
    assert "high-noise expert: 3 LoRA(s)" in text and "low-noise expert: 2 LoRA(s)" in text
    assert "lightx2v_4steps_lora_v1_high_noise.safetensors @ 1:" in text and "WARNING" not in text

    untouched = load_api_workflow("wan22_i2v_lightning_reward")
    untouched["12"]["inputs"].update(strength_high=0.0, strength_low=0.0)
    for i in (1, 2):
        untouched["13"]["inputs"].update({f"strength_high_{i}": 0.0, f"strength_low_{i}": 0.0})
    untouched["11"]["inputs"]["filename_prefix"] = "velox_lora_zero"
    plain = load_api_workflow("wan22_i2v_lightning")
    plain["11"]["inputs"]["filename_prefix"] = "velox_lora_plain"
    zero_frames, plain_frames = video_frames(server.run(untouched, timeout=600)), video_frames(server.run(plain))
    assert all(np.array_equal(a, b) for a, b in zip(zero_frames, plain_frames)), "strength 0 must not patch"
    assert not all(np.array_equal(a, b) for a, b in zip(frames, plain_frames)), "the LoRAs changed nothing"


def test_bake_writes_one_lora_and_reports_its_error(server):
    prompt = {
        "1": {"class_type": "VeloxWanLoader", "inputs": {"model_name": "wan2.2_i2v_high_noise_14B_fp16.safetensors",
                                                         "weight_dtype": "default", "expert": "high_noise"}},
        "2": {"class_type": "VeloxWanRewardLoras", "inputs": {"preset": "blend both experts", "mps_weight": 0.6,
                                                              "strength_high": 1.0, "strength_low": 1.0}},
        "3": {"class_type": "VeloxLoraBake", "inputs": {"model": ["1", 0], "lora_stack": ["2", 0],
                                                        "expert": "high_noise", "rank": 8, "save_dtype": "fp32",
                                                        "filename_prefix": "loras/velox_test_bake"}},
    }
    result = server.run(prompt, timeout=300)
    text = report_text(result, "3")
    assert "baked 4 LoRA(s)" in text and "layer(s) at rank <= 8" in text and "overall" in text
    baked = sorted((server.output_dir / "loras").glob("velox_test_bake_*.safetensors"))
    assert baked and str(baked[-1]) in text
    tensors = load_file(str(baked[-1]))
    ups = [v for k, v in tensors.items() if k.endswith(".lora_up.weight")]
    assert ups and all(v.shape[1] == 8 for v in ups)
    assert all(k.startswith("diffusion_model.") for k in tensors)


def stack_graph(lora_1: str, lora_2: str = "None") -> dict:
    """Wan 2.2 high-noise expert -> VeloxLoraStack -> VeloxLoraBake (an output node, so the stack runs)."""
    return {
        "1": {"class_type": "VeloxWanLoader", "inputs": {"model_name": "wan2.2_i2v_high_noise_14B_fp16.safetensors",
                                                         "weight_dtype": "default", "expert": "high_noise"}},
        "2": {"class_type": "VeloxLoraStack", "inputs": {
            "model": ["1", 0], "lora_1": lora_1, "strength_1": 1.0, "lora_2": lora_2, "strength_2": 0.5,
            "lora_3": "None", "strength_3": 1.0, "lora_4": "None", "strength_4": 1.0}},
        "3": {"class_type": "VeloxLoraBake", "inputs": {"model": ["2", 0], "lora_stack": ["2", 2], "expert": "high_noise",
                                                        "rank": 4, "save_dtype": "bf16",
                                                        "filename_prefix": "loras/velox_test_stack_bake"}},
    }


def test_lora_stack_reports_unmatched_keys_by_name(server, models_dir):
    factors = random_lora_factors({"blocks.0.self_attn.q": (256, 256), "blocks.0.cross_attn.k_img": (256, 256)}, 2, 2.0)
    save_file(lora_state_dict(factors, "kohya_fun"), str(models_dir / "loras" / "velox_test_i2v_keys.safetensors"))
    result = server.run(stack_graph("wan2.2_i2v_lightx2v_4steps_lora_v1_high_noise.safetensors",
                                    "velox_test_i2v_keys.safetensors"), timeout=300)
    text = report_text(result, "2")
    assert "model: 2 LoRA(s)" in text
    assert ("WARNING: 3 LoRA key(s) match no module of this model: lora_unet__blocks_0_cross_attn_k_img.alpha, "
            "lora_unet__blocks_0_cross_attn_k_img.lora_down.weight") in text
    assert "baked 2 LoRA(s)" in report_text(result, "3")


def test_a_sana_lora_on_a_wan_model_fails_naming_both_families(server, models_dir):
    factors = random_lora_factors({"blocks.0.attn.qkv": (192, 64), "blocks.0.cross_attn.kv_linear": (128, 64)}, 2, 2.0)
    save_file(lora_state_dict(factors, "official"), str(models_dir / "loras" / "velox_test_sana_lora.safetensors"))
    with pytest.raises(WorkflowError, match="velox_test_sana_lora.safetensors: is a Sana LoRA .* the model is Wan"):
        server.run(stack_graph("velox_test_sana_lora.safetensors"), timeout=300)
