"""Velox's Wan nodes in a real ComfyUI: the example workflows (Wan 2.1 T2V, Wan 2.1 VACE, Wan 2.2 I2V
Lightning) end to end on the tiny demo checkpoints (tiny umT5 included), listing, the 5-D empty latent through POST /prompt,
and bad sizes refused at queue time with a message saying what to use."""

from __future__ import annotations

import re

import numpy as np
import pytest
from comfy_client import WorkflowError
from comfy_helpers import load_api_workflow
from PIL import Image, ImageSequence
from safetensors.torch import load_file


def video_frames(result) -> list[np.ndarray]:
    """The frames of the one animated WEBP a workflow saved."""
    assert len(result.files) == 1 and result.files[0].suffix == ".webp", result.files
    with Image.open(result.files[0]) as video:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(video)]


def latent_node(prompt: dict, class_type: str) -> dict:
    return next(node["inputs"] for node in prompt.values() if node["class_type"] == class_type)


def test_wan21_t2v_workflow_writes_a_video_of_the_requested_length(server):
    prompt = load_api_workflow("wan21_t2v")
    size = latent_node(prompt, "VeloxEmptyWanLatent")
    assert latent_node(prompt, "VeloxWanExpertSampler")["preset"] == "wan21_t2v"
    frames = video_frames(server.run(prompt, timeout=300))
    assert len(frames) == size["length"] == 9
    assert frames[0].shape == (size["height"], size["width"], 3)
    assert frames[0].min() != frames[0].max(), "the decoded frame is a flat colour"


def test_wan22_i2v_lightning_workflow_runs_both_experts_from_a_start_image(server):
    prompt = load_api_workflow("wan22_i2v_lightning")
    i2v = latent_node(prompt, "WanImageToVideo")
    sampler = latent_node(prompt, "VeloxWanExpertSampler")
    assert sampler["preset"] == "wan22_lightning" and "model_low_noise" in sampler
    frames = video_frames(server.run(prompt, timeout=300))
    assert len(frames) == i2v["length"] == 9
    assert frames[0].shape == (i2v["height"], i2v["width"], 3)


def test_wan21_vace_workflow_trims_the_reference_frame_off_the_video(server):
    prompt = load_api_workflow("wan21_vace")
    vace = latent_node(prompt, "WanVaceToVideo")
    assert "control_video" in vace and "reference_image" in vace
    assert latent_node(prompt, "TrimVideoLatent")["trim_amount"] == [next(
        key for key, node in prompt.items() if node["class_type"] == "WanVaceToVideo"), 3]
    frames = video_frames(server.run(prompt, timeout=300))
    assert len(frames) == vace["length"] == 9
    assert frames[0].shape == (vace["height"], vace["width"], 3)
    assert frames[0].min() != frames[0].max(), "the decoded frame is a flat colour"


def test_wan21_vace_without_the_trim_keeps_the_reference_latent_frame(server):
    prompt = load_api_workflow("wan21_vace")
    latent_node(prompt, "TrimVideoLatent")["trim_amount"] = 0
    frames = video_frames(server.run(prompt, timeout=300))
    assert len(frames) == 9 + 4  # one more latent frame (the reference image) decodes to 4 more frames


def empty_latent_graph(width: int, height: int, length: int, batch_size: int = 1) -> dict:
    return {
        "1": {"class_type": "VeloxEmptyWanLatent",
              "inputs": {"width": width, "height": height, "length": length, "batch_size": batch_size}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "velox_wan_latent"}},
    }


def test_empty_wan_latent_runs_and_saves_core_wans_5d_layout(server):
    result = server.run(empty_latent_graph(64, 48, 9, batch_size=2), timeout=120)
    saved = result.outputs["2"]["latents"]
    assert len(saved) == 1
    latent = load_file(str(server.output_dir / saved[0].get("subfolder", "") / saved[0]["filename"]))
    assert tuple(latent["latent_tensor"].shape) == (2, 16, 3, 6, 8)  # 9 frames -> (9 - 1) / 4 + 1, 48x64 / 8


@pytest.mark.parametrize("width,height,length,message", [
    (64, 64, 8, r"length must be 4n \+ 1 frames .*got 8: use 5 or 9"),
    (72, 64, 9, r"width must be a multiple of 16, got 72: use 64 or 80"),
])
def test_bad_wan_sizes_are_refused_when_queued(server, width, height, length, message):
    with pytest.raises(WorkflowError) as error:
        server.run(empty_latent_graph(width, height, length), timeout=120)
    assert re.search(r"VeloxEmptyWanLatent: " + message, str(error.value)), str(error.value)


def test_expert_sampler_is_listed_with_the_wan_presets_and_an_optional_low_noise_expert(server):
    info = server.get_json("/object_info/VeloxWanExpertSampler")["VeloxWanExpertSampler"]
    required, optional = info["input"]["required"], info["input"].get("optional", {})
    presets = required["preset"][1]["options"] if isinstance(required["preset"][0], str) else required["preset"][0]
    assert {"wan21_t2v", "wan22_t2v_a14b", "wan22_i2v_a14b", "wan22_lightning"} <= set(presets)
    assert "model_low_noise" in optional and optional["model_low_noise"][0] == "MODEL"
    assert info["output"] == ["LATENT"] and info["category"] == "Velox/sampling"
