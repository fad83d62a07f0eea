"""The LoRA-training example workflows through POST /prompt on the real host, and an interrupt mid-run.

The demo dataset (``scripts/demo_models_training.py``) is written into the session's demo models
folder, whose ``training_data`` folder the server lists (``comfy_client.write_extra_model_paths``).
Trained LoRAs land in the host's first ``loras`` folder, as for a user.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid

import pytest
from comfy_helpers import load_api_workflow
from safetensors import safe_open

STEP_NODE = {"wan_lora_train": "5", "videocrafter_lora_train": "3"}
INTERRUPT_AFTER = 3  # training steps seen on the websocket before POST /interrupt


@pytest.fixture(scope="module")
def training_server(server, models_dir):
    from demo_models_training import write_training_data

    write_training_data(models_dir)
    return server


def saved_lora(server, name: str):
    """(keys, metadata) of a LoRA the server wrote under its first loras folder."""
    with safe_open(str(server.comfyui / "models" / "loras" / name), "pt") as file:
        return set(file.keys()), file.metadata()


@pytest.mark.parametrize("name, family", [("wan_lora_train", "wan"), ("videocrafter_lora_train", "videocrafter")])
def test_training_workflow_trains_saves_the_lora_and_samples_with_it(training_server, name, family):
    prompt = load_api_workflow(name)
    train = prompt[STEP_NODE[name]]["inputs"]
    train["lora_name"] = f"comfy_tier_{name}"
    result = training_server.run(prompt, timeout=900)
    assert {f.suffix for f in result.files} == {".png", ".webp"}, result.files
    assert all(f.stat().st_size > 0 for f in result.files)
    keys, metadata = saved_lora(training_server, f"comfy_tier_{name}.safetensors")
    assert metadata["velox.family"] == family and metadata["velox.steps_done"] == str(train["steps"])
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    report = next(out for out in result.outputs.values() if "text" in out)["text"]
    assert "2 clip(s)" in "".join(report)  # the dataset node's report: both demo clips were used


async def _interrupt_mid_training(server, prompt: dict, node: str) -> int:
    """Queue ``prompt``, POST /interrupt once node ``node`` reported INTERRUPT_AFTER steps; the step count
    seen then. Raises if the run is not reported interrupted."""
    import aiohttp

    client_id = uuid.uuid4().hex
    seen = 0
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", max_msg_size=0) as ws:
        prompt_id = server.post_prompt(prompt, client_id)
        async for message in ws:
            if not isinstance(message.data, str):
                continue
            event = json.loads(message.data)
            data = event.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if event["type"] == "progress" and str(data.get("node")) == node and seen < INTERRUPT_AFTER <= data["value"]:
                seen = data["value"]
                request = urllib.request.Request(server.url + "/interrupt", data=b"{}", method="POST",
                                                 headers={"Content-Type": "application/json"})
                await asyncio.to_thread(urllib.request.urlopen, request, None, 30)
            elif event["type"] == "execution_interrupted":
                return seen
            elif event["type"] in ("execution_error", "execution_success"):
                raise AssertionError(f"the run ended with {event['type']} instead of an interrupt: {data}")
    raise AssertionError("the websocket closed before the run ended")


def test_interrupt_mid_training_keeps_a_loadable_lora_and_the_server_runs_the_next_prompt(training_server):
    prompt = load_api_workflow("wan_lora_train")
    train = prompt["5"]["inputs"]
    train.update(lora_name="comfy_tier_interrupted", steps=100000, seed=7)
    seen = asyncio.run(asyncio.wait_for(_interrupt_mid_training(training_server, prompt, "5"), 600))
    assert seen >= INTERRUPT_AFTER
    keys, metadata = saved_lora(training_server, "comfy_tier_interrupted.safetensors")
    steps_done = int(metadata["velox.steps_done"])
    assert INTERRUPT_AFTER <= steps_done < 100000
    assert "diffusion_model.blocks.0.self_attn.q.lora_up.weight" in keys

    # the next prompt: the kept LoRA through core's loader, then sampling and saving
    follow = {k: v for k, v in prompt.items() if k not in ("4", "5", "6")}
    follow["13"] = {"class_type": "LoraLoaderModelOnly",
                    "inputs": {"model": ["1", 0], "lora_name": "comfy_tier_interrupted.safetensors",
                               "strength_model": 1.0}}
    follow["10"]["inputs"]["model_high_noise"] = ["13", 0]
    follow["12"]["inputs"]["filename_prefix"] = "after_interrupt/wan"
    files = training_server.run(follow, timeout=600).files
    assert files and all(f.parent.name == "after_interrupt" and f.stat().st_size > 0 for f in files)
