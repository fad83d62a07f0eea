"""VideoCrafter 2 T2V and DynamiCrafter 512 I2V in a real ComfyUI through POST /prompt, on the tiny demo
release files (``scripts/demo_models_videocrafter.py``): both workflows write 16-frame videos; bad
inputs (a frame count DynamiCrafter cannot take, I2V without a start image, a Wan file in this loader,
a corrupt checkpoint) are refused with messages naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
from comfy_client import WorkflowError
from comfy_helpers import load_api_workflow
from PIL import Image, ImageSequence

FAST_STEPS = 4  # the shipped workflows use the release's 50 steps; 4 keep the CPU tier quick


def video_frames(result) -> list[np.ndarray]:
    assert len(result.files) == 1 and result.files[0].suffix == ".webp", result.files
    with Image.open(result.files[0]) as video:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(video)]


def node_of(prompt: dict, class_type: str) -> dict:
    return next(node["inputs"] for node in prompt.values() if node["class_type"] == class_type)


def fast(prompt: dict) -> dict:
    node_of(prompt, "VeloxVideoCrafterSampler")["steps"] = FAST_STEPS
    return prompt


@pytest.mark.parametrize("name", ["videocrafter2_t2v", "dynamicrafter_i2v"])
def test_workflow_writes_a_16_frame_video(server, name):
    prompt = fast(load_api_workflow(name))
    size = node_of(prompt, "VeloxEmptyVideoCrafterLatent")
    frames = video_frames(server.run(prompt, timeout=600))
    assert len(frames) == size["frames"] == 16
    assert frames[0].shape == (size["height"], size["width"], 3)


def test_dynamicrafter_refuses_8_frames(server):
    prompt = fast(load_api_workflow("dynamicrafter_i2v"))
    node_of(prompt, "VeloxEmptyVideoCrafterLatent")["frames"] = 8
    with pytest.raises(WorkflowError, match="cannot make 8 frames; it takes 16"):
        server.run(prompt, timeout=300)


def test_dynamicrafter_without_a_start_image_is_refused(server):
    prompt = fast(load_api_workflow("dynamicrafter_i2v"))
    sampler = node_of(prompt, "VeloxVideoCrafterSampler")
    sampler["positive"], sampler["negative"] = ["2", 0], ["3", 0]  # bypass the image conditioning
    with pytest.raises(WorkflowError, match="needs a start image"):
        server.run(prompt, timeout=300)


@pytest.fixture(scope="module")
def bad_checkpoints(models_dir):
    """A Wan transformer and a truncated model.ckpt in models/checkpoints (removed afterwards)."""
    import torch
    from safetensors.torch import save_file

    folder = models_dir / "checkpoints"
    wan, corrupt = folder / "velox_test_wan_t2v.safetensors", folder / "velox_test_corrupt_model.ckpt"
    save_file({"patch_embedding.weight": torch.zeros(32, 16, 1, 2, 2), "head.modulation": torch.zeros(1, 2, 32),
               "blocks.0.self_attn.q.weight": torch.zeros(32, 32)}, str(wan))
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    yield {"wan": wan.name, "corrupt": corrupt.name}
    wan.unlink(missing_ok=True)
    corrupt.unlink(missing_ok=True)


@pytest.mark.parametrize(("kind", "message"), [("wan", "Wan transformer"), ("corrupt", "truncated or corrupt")])
def test_loader_refuses_foreign_and_corrupt_files(server, bad_checkpoints, kind, message):
    ckpt = bad_checkpoints[kind]
    prompt = fast(load_api_workflow("videocrafter2_t2v"))
    node_of(prompt, "VeloxVideoCrafterLoader")["ckpt_name"] = ckpt
    with pytest.raises(WorkflowError, match=message):
        server.run(prompt, timeout=300)
