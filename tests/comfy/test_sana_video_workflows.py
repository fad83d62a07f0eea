"""SANA-Video in a real ComfyUI through POST /prompt: the text- and image-to-video example workflows on the
tiny demo checkpoints (official .pth and diffusers folder) write animated WEBPs of the requested length;
a Wan or image-Sana file in the SANA-Video loader and a frame count the Wan VAE cannot take are refused
in words."""

from __future__ import annotations

import re

import numpy as np
import pytest
from comfy_client import WorkflowError
from comfy_helpers import load_api_workflow
from PIL import Image, ImageSequence


def video_frames(result) -> list[np.ndarray]:
    assert len(result.files) == 1 and result.files[0].suffix == ".webp", result.files
    with Image.open(result.files[0]) as video:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(video)]


def node_inputs(prompt: dict, class_type: str) -> dict:
    return next(node["inputs"] for node in prompt.values() if node["class_type"] == class_type)


@pytest.mark.parametrize("name,sizes", [("sana_video_t2v", "VeloxEmptySanaVideoLatent"),
                                        ("sana_video_i2v", "VeloxSanaVideoImageToVideo")])
def test_sana_video_workflow_writes_a_video_of_the_requested_length(server, name, sizes):
    prompt = load_api_workflow(name)
    size = node_inputs(prompt, sizes)
    assert node_inputs(prompt, "VeloxSampler")["preset"] == "sana_video_480p"
    assert node_inputs(prompt, "VeloxSanaVideoTextEncode")["motion_score"] == 30
    frames = video_frames(server.run(prompt, timeout=600))
    assert len(frames) == size["length"] == 9
    assert frames[0].shape == (size["height"], size["width"], 3)
    assert frames[-1].min() != frames[-1].max(), "the decoded frame is a flat colour"


@pytest.mark.parametrize("model_name,message", [
    ("wan_t2v_tiny.safetensors", r"wan_t2v_tiny\.safetensors: looks like a Wan transformer, not a SANA-Video "
     r"transformer; load it with 'Load Wan Model \(Velox\)'; expected a SANA-Video transformer"),
    ("Sana_1600M_1024px_BF16.pth", r"Sana_1600M_1024px_BF16\.pth: looks like a Sana transformer, not a SANA-Video "
     r"transformer; load it with 'Load Sana Model \(Velox\)'"),
])
def test_sana_video_loader_refuses_other_families_in_words(server, model_name, message):
    prompt = load_api_workflow("sana_video_t2v")
    node_inputs(prompt, "VeloxSanaVideoLoader")["model_name"] = model_name
    with pytest.raises(WorkflowError) as error:
        server.run(prompt, timeout=300)
    assert re.search(message, str(error.value)), str(error.value)


@pytest.mark.parametrize("name,node", [("sana_video_t2v", "VeloxEmptySanaVideoLatent"),
                                       ("sana_video_i2v", "VeloxSanaVideoImageToVideo")])
def test_frame_count_the_wan_vae_cannot_take_is_refused_when_queued(server, name, node):
    prompt = load_api_workflow(name)
    node_inputs(prompt, node)["length"] = 80
    with pytest.raises(WorkflowError) as error:
        server.run(prompt, timeout=120)
    assert re.search(rf"{node}: length must be 4n \+ 1 frames .*got 80: use 77 or 81", str(error.value)), \
        str(error.value)
