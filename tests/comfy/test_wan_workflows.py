"""Velox's Wan sampling nodes in a real ComfyUI: listing, the 5-D empty latent through POST /prompt, and
bad sizes refused at queue time with a message saying what to use."""

from __future__ import annotations

import re

import pytest
from comfy_client import WorkflowError
from safetensors.torch import load_file


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
