"""Wan 2.2 I2V Lightning end to end through a real ComfyUI server: POST /prompt to the saved video.

    python bench/bench_wan_e2e.py --tiny                  # CPU, demo checkpoints, seconds (CI)
    python bench/bench_wan_e2e.py --models-dir /data/m    # device: real-size random weights, 480x832x81

Queues ``example_workflows/api/wan22_i2v_lightning.json`` and, in the same server, ComfyUI's own graph for
the same job (two UNETLoader + ModelSamplingSD3, WanImageToVideo, two KSamplerAdvanced 2 + 2, VAEDecode,
save) as the anchor, ``--runs`` times each (run 1 loads the files, later runs are the steady state; the
seed changes so nothing is served from core's cache). Models are freed between the two graphs (POST /free).
Phases come from the websocket: the time from each ``executing`` message to the next, summed by phase.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from comfy_client import ComfyServer, WorkflowError  # noqa: E402

WORKFLOW = ROOT / "example_workflows" / "api" / "wan22_i2v_lightning.json"
FULL_SIZE = {"width": 832, "height": 480, "length": 81}  # the 480p x 81 frames
PHASES = {  # class_type -> phase of the breakdown
    "VeloxWanLoader": "load", "UNETLoader": "load", "VeloxUMT5Loader": "load", "VeloxWanVAELoader": "load",
    "CLIPTextEncode": "text", "EmptyImage": "image", "WanImageToVideo": "vae_encode",
    "ModelSamplingSD3": "sampling", "VeloxWanExpertSampler": "sampling", "KSamplerAdvanced": "sampling",
    "VAEDecode": "vae_decode", "SaveAnimatedWEBP": "save",
}
SAVE_NODE, SAMPLER_NODE = "11", "9"


def velox_prompt(size: dict | None) -> dict:
    """The shipped workflow, at its own (tiny) size or at ``size``."""
    prompt = json.loads(WORKFLOW.read_text())
    if size:
        prompt["7"]["inputs"].update(width=size["width"], height=size["height"])
        prompt["8"]["inputs"].update(size)
    return prompt


def comfyui_prompt(ours: dict, core_loaders: bool = True) -> dict:
    """Core's Wan 2.2 Lightning template for the same job: same files, text, image, size, seed, 2 + 2 split.
    ``core_loaders=False`` keeps our loaders: core's UNETLoader builds a 4096-wide text embedding and cannot
    read the tiny experts (made for the 64-wide tiny umT5); the sampling graph is core's either way."""
    prompt = {key: dict(node, inputs=dict(node["inputs"])) for key, node in ours.items()}
    sampler = prompt.pop(SAMPLER_NODE)["inputs"]
    for key in ("1", "2") if core_loaders else ():
        prompt[key] = {"class_type": "UNETLoader", "inputs": {"unet_name": ours[key]["inputs"]["model_name"],
                                                              "weight_dtype": "default"}}
    for key in ("1", "2"):
        prompt[f"{key}s"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": [key, 0],
                                                                          "shift": sampler["shift"]}}
    common = {"steps": sampler["steps"], "cfg": sampler["cfg_high_noise"], "sampler_name": sampler["sampler_name"],
              "scheduler": "simple", "positive": ["8", 0], "negative": ["8", 1], "noise_seed": sampler["seed"]}
    split = sampler["switch_step"]
    prompt["9a"] = {"class_type": "KSamplerAdvanced", "inputs": dict(
        common, model=["1s", 0], add_noise="enable", latent_image=["8", 2], start_at_step=0, end_at_step=split,
        return_with_leftover_noise="enable")}
    prompt["9b"] = {"class_type": "KSamplerAdvanced", "inputs": dict(
        common, model=["2s", 0], add_noise="disable", latent_image=["9a", 0], start_at_step=split,
        end_at_step=10000, return_with_leftover_noise="disable", cfg=sampler["cfg_low_noise"])}
    prompt["10"]["inputs"]["samples"] = ["9b", 0]
    prompt[SAVE_NODE]["inputs"]["filename_prefix"] = "comfyui_wan22_i2v_lightning"
    return prompt


def with_seed(prompt: dict, run: int) -> dict:
    """The prompt for run ``run``: another seed and start-image colour, so that core's cache serves only the
    loaders and the text encoding (outside the issue's timing) and the VAE encode runs every time."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        for name in ("seed", "noise_seed"):
            if name in node["inputs"]:
                node["inputs"][name] = 42 + run
        if node["class_type"] == "EmptyImage":
            node["inputs"]["color"] += run
    return prompt


async def timed_run(server: ComfyServer, prompt: dict, timeout: float) -> dict:
    """POST the prompt and follow the websocket; returns the total to the saved file and the phases."""
    import aiohttp

    client_id = uuid.uuid4().hex
    url = f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}"
    async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as ws:
        start = time.perf_counter()
        prompt_id = server.post_prompt(prompt, client_id)
        marks = await asyncio.wait_for(_node_marks(ws, prompt_id), timeout)
    saved = server.output_files(await server._history_outputs(prompt_id))
    if not saved or not all(file.is_file() for file in saved):
        raise WorkflowError(f"prompt {prompt_id} saved no file")
    # total: POST to the saved file (the measure); finished: to the end of the prompt, which the
    # per-node phases add up to (the save node's own tail after its file is written included)
    return {"total_s": round(marks["saved"] - start, 3), "finished_s": round(marks["end"] - start, 3),
            "queue_s": round(marks["start"] - start, 3),
            "phases_s": _phases(prompt, marks["nodes"]), "nodes_s": {k: round(v, 3) for k, v in marks["nodes"].items()}}


async def _node_marks(ws, prompt_id: str) -> dict:
    """Seconds spent in each node (``executing`` to the next ``executing``), and when the save finished."""
    nodes, current, since, marks = {}, None, None, {}
    async for message in ws:
        if not isinstance(message.data, str):
            continue  # binary frames are previews
        now, event = time.perf_counter(), json.loads(message.data)
        data, kind = event.get("data", {}), event.get("type")
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        if kind == "execution_start":
            marks["start"] = now
        elif kind == "execution_error":
            raise WorkflowError(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                                f"{data.get('exception_message', '').strip()}")
        elif kind == "executed" and str(data.get("node")) == SAVE_NODE:
            marks["saved"] = now
        if kind == "executing":
            if current is not None:
                nodes[current] = nodes.get(current, 0.0) + now - since
            current, since = data.get("node"), now
            if current is None:
                marks["end"] = now
                break
    marks.setdefault("start", since)
    marks.setdefault("saved", since)
    marks.setdefault("end", since)
    return dict(marks, nodes=nodes)


def _phases(prompt: dict, nodes: dict) -> dict:
    phases: dict[str, float] = {}
    for node, seconds in nodes.items():
        phase = PHASES.get(prompt.get(str(node), {}).get("class_type"), "other")
        phases[phase] = phases.get(phase, 0.0) + seconds
    return {phase: round(seconds, 3) for phase, seconds in sorted(phases.items())}


def free_models(server: ComfyServer) -> None:
    body = json.dumps({"unload_models": True, "free_memory": True}).encode()
    request = urllib.request.Request(server.url + "/free", data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()


def write_models(models: Path, tiny: bool) -> None:
    """The workflow's files, unless all are there already (a comfy-tier session's demo models)."""
    needed = [node["inputs"][name] for node in velox_prompt(None).values() for name in node["inputs"]
              if name in ("model_name", "text_encoder_name", "vae_name")]
    if all(any(models.glob(f"*/{name}")) for name in needed):
        return
    if tiny:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_models.py"), "--models-dir", str(models)],
                       check=True, stdout=subprocess.DEVNULL)
    else:
        write_real_size_models(models)


def write_real_size_models(models: Path) -> None:
    """Both A14B I2V experts (bf16, random, ComfyUI's layout and file names), the Wan 2.1 VAE at its real
    width and the tiny umT5 (text encoding is outside the timed sampling; the real one is 11 GB more)."""
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from velox_import import register_pack

    register_pack()
    from safetensors.torch import save_file

    from velox.tiny.wan import (
        TinyWanConfig,
        tiny_wan_vae_state_dict,
        wan_official_shapes,
        write_comfyui_file,
        write_tiny_umt5_file,
    )

    expert = TinyWanConfig("wan22_i2v_a14b_expert", dim=5120, ffn_dim=13824, num_layers=40, in_dim=36, text_dim=4096)
    for seed, name in ((1, "high"), (2, "low")):
        path = models / "diffusion_models" / f"wan2.2_i2v_{name}_noise_14B_fp16.safetensors"
        if path.is_file():
            continue
        generator = torch.Generator().manual_seed(seed)
        weights = {key: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
                   for key, shape in wan_official_shapes(expert).items()}
        write_comfyui_file(weights, path)
        del weights
    (models / "vae").mkdir(parents=True, exist_ok=True)
    vae = {key: value.contiguous() for key, value in tiny_wan_vae_state_dict(dim=96, seed=0).items()}
    save_file(vae, str(models / "vae" / "wan_2.1_vae.safetensors"))
    write_tiny_umt5_file(models / "text_encoders" / "umt5_xxl_fp16.safetensors")


def bench_on(server: ComfyServer, tiny: bool, runs: int, timeout: float) -> dict:
    """Both graphs, ``runs`` times each, on a running server that sees the models."""
    ours = velox_prompt(None if tiny else FULL_SIZE)
    graphs = {"velox": ours, "comfyui": comfyui_prompt(ours, core_loaders=not tiny)}
    result = {"bench": "wan_e2e", "tiny": tiny, "size": {k: ours["8"]["inputs"][k] for k in FULL_SIZE},
              "device": server.get_json("/system_stats")["devices"][0]["name"], "runs": {}}
    for name, prompt in graphs.items():
        free_models(server)  # each graph loads its files from disk on its first run
        result["runs"][name] = [asyncio.run(timed_run(server, with_seed(prompt, run), timeout))
                                for run in range(runs)]
    last = {name: runs_[-1]["total_s"] for name, runs_ in result["runs"].items()}
    result["velox_over_comfyui"] = round(last["velox"] / last["comfyui"], 3) if last["comfyui"] else None
    return result


def bench(comfyui: Path, models: Path, tiny: bool, runs: int, timeout: float) -> dict:
    write_models(models, tiny)
    with ComfyServer(comfyui, extra_models=models) as server:
        if server.pack_import_failed():
            raise RuntimeError(f"Velox failed to import into ComfyUI:\n{server.log_tail()}")
        return bench_on(server, tiny, runs, timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="demo checkpoints at the workflow's own size (CPU)")
    parser.add_argument("--comfyui", type=Path, default=Path(os.environ.get("COMFYUI_PATH") or ROOT / ".host/ComfyUI"))
    parser.add_argument("--models-dir", type=Path, help="where the models are written (default: a temp folder)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each graph (run 1 includes loading)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run")
    args = parser.parse_args(argv)
    models = args.models_dir or Path(tempfile.mkdtemp(prefix="velox-wan-e2e-"))
    print(json.dumps(bench(args.comfyui, models, args.tiny, args.runs, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
