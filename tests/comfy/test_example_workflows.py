"""Every example workflow, discovered from example_workflows/api/, runs through POST /prompt.

The per-family files pin what each workflow must produce; this one makes sure a workflow added to
the folder is run at all, and that each UI workflow has its API twin and the other way round. The
output prefix is made unique so ComfyUI's cache (shared with the per-family tests) still saves.
"""

from __future__ import annotations

import json

import pytest
from comfy_helpers import ROOT

WORKFLOWS = ROOT / "example_workflows"
API_NAMES = sorted(path.stem for path in (WORKFLOWS / "api").glob("*.json"))


def test_every_ui_workflow_has_an_api_twin_and_back():
    ui_names = sorted(path.stem for path in WORKFLOWS.glob("*.json"))
    assert ui_names == API_NAMES and len(API_NAMES) >= 12


@pytest.mark.parametrize("name", API_NAMES)
def test_discovered_workflow_runs_and_saves_its_output(server, name):
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    savers = [node["inputs"] for node in prompt.values() if "filename_prefix" in node["inputs"]]
    assert savers, f"{name} saves nothing"
    for inputs in savers:
        inputs["filename_prefix"] = f"discovered/{name}"
    files = server.run(prompt, timeout=900).files
    assert files, f"{name} ran but ComfyUI lists no saved output"
    assert all(file.parent.name == "discovered" and file.stat().st_size > 0 for file in files)
