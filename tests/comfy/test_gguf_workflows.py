"""The GGUF example workflows in a real ComfyUI (POST /prompt) on the tiny demo GGUF checkpoints:
Sana from a Q8_0 file and Wan 2.1 VACE from a Q4_K_M file, listed in the loaders' dropdowns and run
end to end; a float checkpoint quantized at load (fp8 / int8, dequant and lowp) runs too, and the
workflows saved before the quantization inputs existed still validate."""

from __future__ import annotations

import numpy as np
import pytest
from comfy_helpers import load_api_workflow
from PIL import Image, ImageSequence


def loader(prompt: dict, class_type: str) -> dict:
    return next(node["inputs"] for node in prompt.values() if node["class_type"] == class_type)


def test_gguf_files_are_listed_by_the_sana_and_wan_loaders(server):
    info = server.get_json("/object_info")
    selectors = ["quantization", "quant_compute"]
    for node, name, optional_inputs in (("VeloxSanaLoader", "Sana_1600M_1024px_BF16-Q8_0.gguf", selectors),
                                        ("VeloxWanLoader", "Wan2.1_14B_VACE-Q4_K_M.gguf", [*selectors, "attention"])):
        spec = info[node]["input"]["required"]["model_name"]
        options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]
        assert name in options, f"{name} not offered by {node}"
        optional = info[node]["input"]["optional"]
        assert list(optional) == optional_inputs
        assert info[node]["input_order"]["optional"] == optional_inputs


def test_sana_t2i_gguf_workflow_writes_an_image(server):
    prompt = load_api_workflow("sana_t2i_gguf")
    assert loader(prompt, "VeloxSanaLoader")["model_name"].endswith(".gguf")
    result = server.run(prompt, timeout=300)
    assert len(result.files) == 1 and result.files[0].suffix == ".png"
    with Image.open(result.files[0]) as image:
        pixels = np.asarray(image.convert("RGB"))
    size = loader(prompt, "VeloxEmptySanaLatent")
    assert pixels.shape == (size["height"], size["width"], 3)
    assert pixels.min() != pixels.max(), "the decoded image is a flat colour"


def test_wan21_vace_gguf_workflow_writes_a_video(server):
    prompt = load_api_workflow("wan21_vace_gguf")
    assert loader(prompt, "VeloxWanLoader")["model_name"] == "Wan2.1_14B_VACE-Q4_K_M.gguf"
    result = server.run(prompt, timeout=300)
    assert len(result.files) == 1 and result.files[0].suffix == ".webp"
    with Image.open(result.files[0]) as video:
        frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(video)]
    vace = loader(prompt, "WanVaceToVideo")
    assert len(frames) == vace["length"] and frames[0].shape == (vace["height"], vace["width"], 3)


@pytest.mark.parametrize("quantization, compute", [("fp8_e4m3", "dequant"), ("int8", "lowp")])
def test_float_wan_quantized_at_load_runs_the_vace_workflow(server, quantization, compute):
    prompt = load_api_workflow("wan21_vace")
    inputs = loader(prompt, "VeloxWanLoader")
    assert inputs["quantization"] == "none"  # the shipped workflow keeps the weights as stored
    inputs.update(quantization=quantization, quant_compute=compute)
    loader(prompt, "WanVaceToVideo")["length"] = 5
    result = server.run(prompt, timeout=300)
    assert len(result.files) == 1 and result.files[0].suffix == ".webp"
