"""SANA-Sprint, linear-attention PAG and the tiled 4K workflow in a real ComfyUI, on tiny demo checkpoints."""

from __future__ import annotations

import re

import numpy as np
import pytest
from comfy_client import WorkflowError
from comfy_helpers import load_api_workflow
from PIL import Image


def image_of(result) -> np.ndarray:
    assert len(result.files) == 1 and result.files[0].suffix == ".png"
    with Image.open(result.files[0]) as image:
        return np.asarray(image.convert("RGB"))


def test_sana_sprint_1step_workflow_writes_a_1024_png(server):
    pixels = image_of(server.run(load_api_workflow("sana_sprint_1step"), timeout=600))
    assert pixels.shape == (1024, 1024, 3)
    assert pixels.min() != pixels.max(), "the decoded image is a flat colour"


def test_sana_4k_tiled_workflow_samples_with_pag_and_decodes_in_tiles(server):
    prompt = load_api_workflow("sana_4k_tiled")
    assert prompt["10"]["class_type"] == "VeloxSanaPAG" and prompt["8"]["class_type"] == "VAEDecodeTiled"
    pixels = image_of(server.run(prompt, timeout=600))
    height, width = prompt["5"]["inputs"]["height"], prompt["5"]["inputs"]["width"]
    assert pixels.shape == (height, width, 3)
    assert width > 1024, "wider than one 1024 px tile, so the tiled path blends"
    assert pixels.min() != pixels.max(), "the decoded image is a flat colour"


def sprint_graph(size: int = 256) -> dict:
    prompt = load_api_workflow("sana_sprint_1step")
    prompt["5"]["inputs"].update(width=size, height=size)
    return prompt


def core_custom_sampling_graph(size: int = 256) -> dict:
    """The Sprint preset rebuilt from core nodes: FluxGuidance + SamplerCustom (CFG 1) + our SAMPLER/SIGMAS."""
    prompt = sprint_graph(size)
    sampler = prompt["6"]["inputs"]
    prompt["11"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": sampler["cfg"]}}
    prompt["12"] = {"class_type": "VeloxTrigFlowSampler", "inputs": {}}
    prompt["13"] = {"class_type": "VeloxTrigFlowSigmas", "inputs": {"steps": 1}}
    prompt["6"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": sampler["seed"], "cfg": 1.0, "positive": ["11", 0],
        "negative": ["4", 0], "sampler": ["12", 0], "sigmas": ["13", 0], "latent_image": ["5", 0]}}
    prompt["9"]["inputs"]["filename_prefix"] = "velox_sprint_core_custom"
    return prompt


def test_core_custom_sampling_with_trigflow_nodes_equals_the_sprint_preset(server):
    preset = image_of(server.run(sprint_graph(), timeout=600))
    core = image_of(server.run(core_custom_sampling_graph(), timeout=600))
    assert preset.shape == (256, 256, 3)
    assert np.array_equal(preset, core), f"max pixel difference {np.abs(preset.astype(int) - core).max()}"


def test_sprint_preset_on_a_model_without_guidance_embedder_is_refused(server):
    prompt = load_api_workflow("sana_t2i")
    prompt["5"]["inputs"].update(width=64, height=64)
    prompt["6"]["inputs"]["preset"] = "sprint_2step"
    with pytest.raises(WorkflowError) as error:
        server.run(prompt, timeout=300)
    assert re.search(r"VeloxSampler.*sprint_2step.*Sprint", str(error.value), flags=re.DOTALL), str(error.value)
