"""The browser check catches a UI workflow that drifted from its API twin, and says where.

Broken copies of sana_t2i.json are written to a tmp folder: one with two widget values swapped
(seed and steps of the sampler), one with an input renamed (the sampler's ``positive``), one with
an unknown node type and a model file the server lacks. Each is loaded in the real frontend and
checked exactly like an example workflow.
"""

from __future__ import annotations

import copy
import json

import pytest
from browser_helpers import check_workflow, compare_prompt, load_api_twin, load_ui_workflow

pytestmark = pytest.mark.browser

SOURCE = "sana_t2i"
SAMPLER = "VeloxSampler"


def sampler_node(workflow: dict) -> dict:
    return next(node for node in workflow["nodes"] if node["type"] == SAMPLER)


def widget_names(frontend, node_id: int) -> list[str]:
    return next([w["name"] for w in node["widgets"]] for node in frontend.live_nodes()
                if str(node["id"]) == str(node_id))


@pytest.fixture(scope="module")
def broken_copies(tmp_path_factory, frontend) -> dict:
    """name -> (path of the broken UI workflow, the sampler's node ID)."""
    folder = tmp_path_factory.mktemp("broken_workflows")
    source = load_ui_workflow(SOURCE)
    node_id = sampler_node(source)["id"]
    frontend.load(source)
    names = widget_names(frontend, node_id)

    swapped = copy.deepcopy(source)
    values = sampler_node(swapped)["widgets_values"]
    seed, steps = names.index("seed"), names.index("steps")
    values[seed], values[steps] = values[steps], values[seed]

    renamed = copy.deepcopy(source)
    slot = next(slot for slot in sampler_node(renamed)["inputs"] if slot["name"] == "positive")
    slot["name"] = "positive_prompt"

    missing = copy.deepcopy(source)
    loader = next(node for node in missing["nodes"] if node["type"] == "VeloxSanaLoader")
    loader["type"] = "VeloxNoSuchNode"
    vae = next(node for node in missing["nodes"] if node["type"] == "VeloxDCAELoader")
    vae["widgets_values"][0] = "no_such_vae.safetensors"

    paths = {}
    broken = {f"{SOURCE}_swapped": swapped, f"{SOURCE}_renamed": renamed, f"{SOURCE}_missing": missing}
    for name, workflow in broken.items():
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps(workflow))
    return {name: (path, node_id) for name, path in paths.items()}


def problems_of(frontend, path) -> list[str]:
    return check_workflow(frontend, path.stem, json.loads(path.read_text()), load_api_twin(SOURCE))


def lines_naming(problems: list[str], *words: str) -> list[str]:
    return [line for line in problems if all(word in line for word in words)]


def test_swapped_widget_values_are_reported_by_workflow_node_and_field(frontend, broken_copies):
    path, node_id = broken_copies[f"{SOURCE}_swapped"]
    problems = problems_of(frontend, path)
    where = (f"{SOURCE}_swapped:", f"node {node_id} ({SAMPLER}")
    assert lines_naming(problems, *where, "'seed'"), problems
    assert lines_naming(problems, *where, "'steps'"), problems


def test_renamed_input_is_reported_by_workflow_node_and_field(frontend, broken_copies):
    path, node_id = broken_copies[f"{SOURCE}_renamed"]
    problems = problems_of(frontend, path)
    where = (f"{SOURCE}_renamed:", f"node {node_id} ({SAMPLER}")
    assert lines_naming(problems, *where, "'positive'", "missing"), problems
    assert lines_naming(problems, *where, "'positive_prompt'"), problems


def test_missing_node_and_missing_model_are_reported(frontend, broken_copies):
    path, _ = broken_copies[f"{SOURCE}_missing"]
    problems = problems_of(frontend, path)
    # the app's dialog ("missing nodes", frontends up to 1.35) or the registry check ("(missing node)")
    assert lines_naming(problems, f"{SOURCE}_missing:", "missing node", "VeloxNoSuchNode"), problems
    assert lines_naming(problems, f"{SOURCE}_missing:", "(VeloxDCAELoader", "'vae_name'",
                        "no_such_vae.safetensors", "missing model"), problems


def test_compare_prompt_names_the_field_of_a_changed_value_and_a_moved_link():
    twin = load_api_twin(SOURCE)
    got = copy.deepcopy(twin)
    sampler = next(node_id for node_id, node in got.items() if node["class_type"] == SAMPLER)
    got[sampler]["inputs"]["cfg"] = 7.0
    got[sampler]["inputs"]["negative"], got[sampler]["inputs"]["positive"] = (
        got[sampler]["inputs"]["positive"], got[sampler]["inputs"]["negative"])
    problems = compare_prompt("edited", got, twin)
    assert len(problems) == 3, problems
    for field in ("cfg", "positive", "negative"):
        assert lines_naming(problems, "edited:", f"node {sampler} ({SAMPLER}", f"'{field}'"), problems


def test_compare_prompt_accepts_renumbered_node_ids():
    twin = load_api_twin(SOURCE)
    shift = {node_id: str(int(node_id) + 100) for node_id in twin}
    renumbered = {}
    for node_id, node in twin.items():
        node = copy.deepcopy(node)
        for field, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] in shift:
                node["inputs"][field] = [shift[value[0]], value[1]]
        renumbered[shift[node_id]] = node
    assert compare_prompt("renumbered", renumbered, twin) == []


def test_compare_prompt_tolerates_only_the_listed_frontend_inputs_of_core_nodes():
    twin = load_api_twin("wan22_reward_lora_blend")
    preview = next(node_id for node_id, node in twin.items() if node["class_type"] == "PreviewAny")
    newer = copy.deepcopy(twin)
    del newer[preview]["inputs"]["preview"]  # frontend 1.58 no longer serializes it
    newer[preview]["inputs"]["previewMode"] = False  # frontend 1.35 adds it
    assert compare_prompt("newer frontend", newer, twin) == []

    velox = next(node_id for node_id, node in twin.items() if node["class_type"].startswith("Velox"))
    newer[velox]["inputs"]["previewMode"] = False
    newer[preview]["inputs"]["source_extra"] = 1
    problems = compare_prompt("newer frontend", newer, twin)
    assert len(problems) == 2, problems
    assert lines_naming(problems, f"node {velox}", "'previewMode'") and lines_naming(problems, "'source_extra'")
