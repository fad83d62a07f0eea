"""Sana in a real ComfyUI 0.3.75: import, node listing, the example workflow, core interop, bad input."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from comfy_client import WorkflowError
from comfy_helpers import ROOT, load_api_workflow
from PIL import Image


def readme_node_ids() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^\| `(Velox\w+)` \|", text, flags=re.MULTILINE)


def test_pack_imports_without_import_failed(server):
    assert not server.pack_import_failed(), server.log_tail()


def test_object_info_lists_every_node_of_the_readme_table(server):
    listed = server.get_json("/object_info")
    expected = readme_node_ids()
    assert len(expected) >= 8
    missing = [node for node in expected if node not in listed]
    assert not missing, f"README nodes missing from /object_info: {missing}"


def test_sana_t2i_workflow_writes_a_1024_png(server):
    result = server.run(load_api_workflow("sana_t2i"), timeout=600)
    assert len(result.files) == 1 and result.files[0].suffix == ".png"
    with Image.open(result.files[0]) as image:
        assert image.size == (1024, 1024)
        extremes = image.convert("L").getextrema()
    assert extremes[0] != extremes[1], "the decoded image is a flat colour"


def core_ksampler_graph() -> dict:
    """Our MODEL and CONDITIONING through core KSampler, core VAEDecode and SaveImage."""
    prompt = load_api_workflow("sana_t2i")
    prompt["5"]["inputs"].update(width=256, height=256)
    prompt["6"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
        "seed": 7, "steps": 4, "cfg": 4.5, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    prompt["9"]["inputs"]["filename_prefix"] = "velox_core_ksampler"
    return prompt


def test_core_ksampler_vaedecode_saveimage_accept_our_types(server):
    result = server.run(core_ksampler_graph(), timeout=600)
    with Image.open(result.files[0]) as image:
        assert image.size == (256, 256)


def small_graph(**changes) -> dict:
    prompt = load_api_workflow("sana_t2i")
    prompt["5"]["inputs"].update(width=64, height=64)
    prompt["6"]["inputs"].update(preset="custom", steps=2)
    for path, value in changes.items():
        node, field = path.split(".")
        prompt[node]["inputs"][field] = value
    return prompt


def outputs_in(server) -> set[Path]:
    return set(Path(server.output_dir).rglob("*.png"))


BAD_RUNS = {
    "truncated safetensors": ({"1.model_name": "broken_truncated.safetensors"}, r"broken_truncated\.safetensors.*(truncated|corrupt)"),
    "pickle-only .pth": ({"1.model_name": "needs_pickle.pth"}, r"needs_pickle\.pth.*(pickle|weights.only)"),
    "Wan checkpoint in the Sana loader": ({"1.model_name": "wan_t2v_tiny.safetensors"}, r"wan_t2v_tiny\.safetensors.*Wan"),
    "missing tokenizer files": ({"2.text_encoder_name": "gemma_without_tokenizer/"}, r"gemma_without_tokenizer.*tokenizer"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_input_fails_in_the_node_names_the_file_and_writes_nothing(server, case):
    changes, pattern = BAD_RUNS[case]
    before = outputs_in(server)
    with pytest.raises(WorkflowError) as error:
        server.run(small_graph(**changes), timeout=300)
    assert re.search(pattern, str(error.value), flags=re.IGNORECASE | re.DOTALL), str(error.value)
    assert outputs_in(server) == before
    assert server.get_json("/system_stats")  # still serving


REFUSED = {
    "width not a multiple of 32": ({"5.width": 1000}, r"VeloxEmptySanaLatent.*width 1000.*multiple of 32"),
    "zero steps": ({"6.steps": 0}, r"steps"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_invalid_settings_are_refused_before_anything_runs(server, case):
    changes, pattern = REFUSED[case]
    before = outputs_in(server)
    prompt = copy.deepcopy(small_graph(**changes))
    with pytest.raises(WorkflowError) as error:
        server.run(prompt, timeout=120)
    assert re.search(pattern, str(error.value), flags=re.DOTALL), str(error.value)
    assert outputs_in(server) == before
    assert server.get_json("/system_stats")
