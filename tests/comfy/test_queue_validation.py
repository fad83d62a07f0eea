"""Bad widget values are refused when the prompt is queued (HTTP 400 naming the node and input), never
mid-run: sizes and batches below their min or above their max, sampler / scheduler names that do not
exist, model and LoRA names the loader does not list (path traversal included). Issue 21, points 6-9."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from comfy_helpers import load_api_workflow

TRAVERSAL = "../../etc/passwd"


def sana_graph(**changes) -> dict:
    """The shipped Sana workflow, at 64 x 64, with ``{"node.input": value}`` changes."""
    prompt = load_api_workflow("sana_t2i")
    prompt["5"]["inputs"].update(width=64, height=64)
    return _changed(prompt, changes)


def wan_graph(**changes) -> dict:
    return _changed(load_api_workflow("wan21_t2v"), changes)


def sana_lora_graph(**changes) -> dict:
    """The Sana workflow with a VeloxLoraStack (node 10) between the loader and the sampler."""
    prompt = sana_graph()
    slots = {f"lora_{i}": "None" for i in range(1, 5)} | {f"strength_{i}": 1.0 for i in range(1, 5)}
    prompt["10"] = {"class_type": "VeloxLoraStack", "inputs": {"model": ["1", 0], **slots}}
    prompt["6"]["inputs"]["model"] = ["10", 0]
    return _changed(prompt, changes)


def _changed(prompt: dict, changes: dict) -> dict:
    prompt = copy.deepcopy(prompt)
    for path, value in changes.items():
        node, field = path.split(".")
        prompt[node]["inputs"][field] = value
    return prompt


def post_prompt(server, prompt: dict) -> tuple[int, dict]:
    """POST /prompt; the HTTP status and ComfyUI's JSON answer."""
    body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()
    request = urllib.request.Request(server.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def written_files(server) -> set[Path]:
    return {path for path in Path(server.output_dir).rglob("*") if path.is_file()}


def serves_next_prompt(server) -> None:
    """A small valid prompt of ours (schedule -> PreviewAny, which writes no file) still runs."""
    probe = {"1": {"class_type": "VeloxFlowSigmas", "inputs": {"schedule": "flow_dpm_solver", "steps": 2,
                                                               "shift": 3.0}},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    result = server.run(probe, timeout=120)
    assert "2" in result.outputs, result.outputs


def assert_refused_at_queue_time(server, prompt: dict, node: str, message: str) -> None:
    """HTTP 400 whose node_errors for ``node`` carry ``message``; then the server runs the next prompt
    and no file was written (a prompt accepted by mistake would have run before the probe)."""
    before = written_files(server)
    status, answer = post_prompt(server, prompt)
    assert status == 400, f"queued instead of refused: {answer}"
    errors = answer.get("node_errors", {}).get(node, {}).get("errors", [])
    details = [f"{error.get('message')}: {error.get('details')}" for error in errors]
    assert any(re.search(message, text) for text in details), f"node {node}: {details or answer}"
    serves_next_prompt(server)
    assert written_files(server) == before


# --- 6. every size, length and batch has a real minimum ---------------------------------------------------

TOO_SMALL = {
    "Sana height 0": (sana_graph, {"5.height": 0}, "5", r"height 0 is below the minimum 32"),
    "Sana width -64": (sana_graph, {"5.width": -64}, "5", r"width -64 is below the minimum 32"),
    "Sana batch 0": (sana_graph, {"5.batch_size": 0}, "5", r"batch_size 0 is below the minimum 1"),
    "Wan width 0": (wan_graph, {"5.width": 0}, "5", r"width 0 is below the minimum 16"),
    "Wan batch 0": (wan_graph, {"5.batch_size": 0}, "5", r"batch_size 0 is below the minimum 1"),
}


@pytest.mark.parametrize("case", list(TOO_SMALL))
def test_size_or_batch_below_its_minimum_is_refused_at_queue_time(server, case):
    graph, changes, node, message = TOO_SMALL[case]
    assert_refused_at_queue_time(server, graph(**changes), node, message)


# --- 7. the declared maximum holds, also where the node has a validate_inputs of its own -----------------

TOO_LARGE = {
    "Sana width 8224": (sana_graph, {"5.width": 8224}, "5", r"width 8224 is above the maximum 8192"),
    "Wan height 8208": (wan_graph, {"5.height": 8208}, "5", r"height 8208 is above the maximum 8192"),
}


@pytest.mark.parametrize("case", list(TOO_LARGE))
def test_size_above_its_declared_maximum_is_refused_at_queue_time(server, case):
    graph, changes, node, message = TOO_LARGE[case]
    assert_refused_at_queue_time(server, graph(**changes), node, message)


# --- 8. sampler and scheduler names exist (presets used to hide a wrong one) ------------------------------

UNKNOWN_SAMPLING = {
    "Sana sampler": (sana_graph, {"6.sampler_name": "no_such_sampler"}, "6", r"sampler_name 'no_such_sampler'"),
    "Sana scheduler": (sana_graph, {"6.scheduler": "no_such_scheduler"}, "6", r"scheduler 'no_such_scheduler'"),
    "Sana custom sampler": (sana_graph, {"6.preset": "custom", "6.sampler_name": "eulerr"}, "6",
                            r"sampler_name 'eulerr'"),
    "Wan sampler": (wan_graph, {"6.sampler_name": "no_such_sampler"}, "6", r"sampler_name 'no_such_sampler'"),
    "Wan scheduler": (wan_graph, {"6.scheduler": "no_such_scheduler"}, "6", r"scheduler 'no_such_scheduler'"),
}


@pytest.mark.parametrize("case", list(UNKNOWN_SAMPLING))
def test_unknown_sampler_or_scheduler_is_refused_at_queue_time(server, case):
    graph, changes, node, message = UNKNOWN_SAMPLING[case]
    assert_refused_at_queue_time(server, graph(**changes), node, message)


# --- 9. model and LoRA names come from the loader's list ----------------------------------------------------

UNLISTED_NAMES = {
    "Sana model traversal": (sana_graph, {"1.model_name": TRAVERSAL}, "1", r"model_name '\.\./\.\./etc/passwd'"),
    "Sana model not listed": (sana_graph, {"1.model_name": "not_listed.safetensors"}, "1",
                              r"model_name 'not_listed\.safetensors'"),
    "Gemma folder traversal": (sana_graph, {"2.text_encoder_name": "../../etc/"}, "2",
                               r"text_encoder_name '\.\./\.\./etc/'"),
    "DC-AE not listed": (sana_graph, {"7.vae_name": "no_such_vae/"}, "7", r"vae_name 'no_such_vae/'"),
    "Wan model traversal": (wan_graph, {"1.model_name": TRAVERSAL}, "1", r"model_name '\.\./\.\./etc/passwd'"),
    "umT5 not listed": (wan_graph, {"2.text_encoder_name": "umt5_missing.safetensors"}, "2",
                        r"text_encoder_name 'umt5_missing\.safetensors'"),
    "LoRA traversal": (sana_lora_graph, {"10.lora_1": TRAVERSAL}, "10", r"lora_1 '\.\./\.\./etc/passwd'"),
    "LoRA not listed": (sana_lora_graph, {"10.lora_3": "missing_lora.safetensors"}, "10",
                        r"lora_3 'missing_lora\.safetensors'"),
    "unknown weight dtype": (sana_graph, {"1.weight_dtype": "int3"}, "1", r"weight_dtype 'int3'"),
}


@pytest.mark.parametrize("case", list(UNLISTED_NAMES))
def test_name_not_in_the_loaders_list_is_refused_at_queue_time(server, case):
    graph, changes, node, message = UNLISTED_NAMES[case]
    assert_refused_at_queue_time(server, graph(**changes), node, message)


def test_listed_names_and_sizes_still_queue(server):
    """The checks refuse only what is wrong: the shipped Sana graph with a LoRA slot at 'None' runs."""
    result = server.run(sana_lora_graph(**{"6.preset": "custom", "6.steps": 1}), timeout=600)
    assert len(result.files) == 1 and result.files[0].suffix == ".png"


# --- every node, every declared limit, through the host's own validate_inputs ------------------------------

WIDGET_TYPES = ("INT", "FLOAT", "COMBO", "BOOLEAN", "STRING")
CORE_VALUE_ERRORS = ("value_smaller_than_min", "value_bigger_than_max", "value_not_in_list")


@pytest.fixture(scope="module")
def velox_node_classes(comfy_host) -> dict:
    """Velox's node classes, registered with the in-process host as the server registers them."""
    import nodes
    from velox.nodes.extension import VeloxExtension

    classes = {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(VeloxExtension().get_node_list())}
    added = {node_id: cls for node_id, cls in classes.items() if node_id not in nodes.NODE_CLASS_MAPPINGS}
    nodes.NODE_CLASS_MAPPINGS.update(added)
    yield classes
    for node_id in added:
        nodes.NODE_CLASS_MAPPINGS.pop(node_id, None)


def _widgets(cls) -> dict[str, tuple[str, dict]]:
    groups = cls.INPUT_TYPES()
    return {name: (str(spec[0]), spec[1]) for group in ("required", "optional")
            for name, spec in groups.get(group, {}).items() if str(spec[0]) in WIDGET_TYPES}


def _valid_value(kind: str, spec: dict):
    if kind == "COMBO":
        return spec.get("default", (spec.get("options") or [None])[0])
    return spec.get("default", {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}[kind])


def _bad_values(cls) -> list[tuple[str, str, object]]:
    """(node, input, value) for every limit a Velox node declares: just past min and max, an unlisted name."""
    cases = []
    for name, (kind, spec) in _widgets(cls).items():
        step = 1 if kind == "INT" else 0.5
        if "min" in spec:
            cases.append((name, spec["min"] - step))
        if "max" in spec:
            cases.append((name, spec["max"] + step))
        if kind == "COMBO":
            cases.append((name, TRAVERSAL))
    return cases


def host_validation_errors(node_class_id: str, cls, values: dict) -> list[dict]:
    """The errors of ComfyUI's own execution.validate_inputs for one node with these widget values; links
    (MODEL, ...) are left out, so their required_input_missing errors are dropped."""
    import execution

    inputs = {name: _valid_value(kind, spec) for name, (kind, spec) in _widgets(cls).items()}
    inputs = {name: value for name, value in inputs.items() if value is not None} | values
    prompt = {"1": {"class_type": node_class_id, "inputs": inputs}}
    _, errors, _ = asyncio.run(execution.validate_inputs("velox-test", prompt, "1", {}))
    return [error for error in errors if error["type"] != "required_input_missing"]


def test_every_node_accepts_its_defaults(velox_node_classes):
    refused = {node_id: errors for node_id, cls in velox_node_classes.items()
               if (errors := host_validation_errors(node_id, cls, {}))}
    assert not refused, refused


def test_every_declared_limit_of_every_node_is_enforced_by_the_host(velox_node_classes):
    let_through = []
    for node_id, cls in sorted(velox_node_classes.items()):
        for name, value in _bad_values(cls):
            errors = host_validation_errors(node_id, cls, {name: value})
            if not any(_refuses(error, name, value) for error in errors):
                said = " | ".join(f"{error['type']}: {error['details']}" for error in errors)
                let_through.append(f"{node_id}.{name} = {value!r}: {said or 'accepted'}")
    assert not let_through, "\n".join(let_through)


def _refuses(error: dict, name: str, value) -> bool:
    """Core's own range / list error on this input, or a node's message naming the input and the value."""
    if error["type"] in CORE_VALUE_ERRORS:
        return error["extra_info"].get("input_name") == name
    return bool(re.search(rf"\b{name}\W+{re.escape(str(value))}", str(error["details"])))


@pytest.mark.parametrize("choice", [TRAVERSAL, "../../etc/", "/etc/", "sub/../../../etc/", "..\\..\\etc\\passwd"])
def test_a_name_that_leaves_the_model_folder_is_never_opened(comfy_host, choice, monkeypatch):
    """At run time too (a stack or an older prompt can carry a name): refused before any file access."""
    import folder_paths

    from velox.errors import VeloxLoadError
    from velox.host.model_paths import resolve_model_choice

    touched = []
    monkeypatch.setattr(folder_paths, "get_full_path", lambda *args: touched.append(args))
    monkeypatch.setattr(folder_paths, "get_folder_paths", lambda *args: touched.append(args) or ["/"])
    with pytest.raises(VeloxLoadError, match="leaves models/text_encoders"):
        resolve_model_choice("text_encoders", choice)
    assert not touched
