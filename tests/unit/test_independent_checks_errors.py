"""Errors that escaped (issue 21, points 3-5): every loader node refuses the same corpus of broken
files with a VeloxLoadError naming the file, a pickle-only checkpoint is refused in the pack's own
words, and a LoRA whose keys match nothing is refused by every LoRA node instead of doing nothing."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from velox.errors import VeloxLoadError
from velox.loaders.lora_formats import lora_state_dict, random_lora_factors
from velox.tiny.wan import TINY_WAN_CONFIGS, tiny_wan_state_dict

# loader node -> the models/ folder its dropdown lists
LOADER_FOLDERS = {
    "VeloxSanaLoader": "diffusion_models", "VeloxGemmaLoader": "text_encoders", "VeloxDCAELoader": "vae",
    "VeloxWanLoader": "diffusion_models", "VeloxWanVAELoader": "vae", "VeloxUMT5Loader": "text_encoders",
    "VeloxVideoCrafterLoader": "checkpoints", "VeloxVideoCrafterUNetLoader": "diffusion_models",
    "VeloxSanaControlNetLoader": "controlnet", "VeloxSanaVideoLoader": "diffusion_models", "VeloxLTX2VAELoader": "vae",
}
GGUF_LOADERS = ("VeloxSanaLoader", "VeloxGemmaLoader", "VeloxWanLoader", "VeloxUMT5Loader",
                "VeloxVideoCrafterLoader", "VeloxVideoCrafterUNetLoader", "VeloxSanaVideoLoader")  # those that list .gguf files
PICKLE_ONLY = "pickle-only checkpoint, refused; convert to safetensors"


# ----------------------------------------------------------------------------------------------
# the corpus of broken files
# ----------------------------------------------------------------------------------------------


def _good_safetensors() -> bytes:
    """A small, valid safetensors file's bytes (the broken files are cut or edited from it)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "good.safetensors"
        save_file({"blocks.0.weight": torch.ones(64, 64), "blocks.1.weight": torch.ones(64)}, str(path))
        return path.read_bytes()


def _offsets_past_end(data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header["blocks.1.weight"]["data_offsets"][1] += 1 << 20
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


def _truncated_pickle() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(256, 256)}}, buffer)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def broken_files() -> dict[str, bytes]:
    """File name -> bytes, each one broken in its own way."""
    good = _good_safetensors()
    noise = random.Random(21).randbytes(4096)
    return {
        "truncated.safetensors": good[: len(good) // 2],
        "empty.safetensors": b"",
        "random.safetensors": noise,
        "huge_header.safetensors": struct.pack("<Q", 1 << 40) + b"{}",
        "not_json.safetensors": struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 64,
        "offsets_past_end.safetensors": _offsets_past_end(good),
        "random.ckpt": noise,
        "empty.ckpt": b"",
        "truncated.ckpt": _truncated_pickle(),
    }


def broken_gguf_files() -> dict[str, bytes]:
    return {"empty.gguf": b"", "header_only.gguf": b"GGUF" + struct.pack("<IQQ", 3, 1 << 40, 1 << 40)}


BROKEN = sorted(broken_files())


@contextlib.contextmanager
def models_folders(folders: dict[str, Path]):
    """ComfyUI's ``folder_paths`` pointed at ``folders`` (folder key -> directory), restored after."""
    import folder_paths

    saved = {key: folder_paths.folder_names_and_paths.get(key) for key in folders}
    for key, directory in folders.items():
        folder_paths.folder_names_and_paths[key] = ([str(directory)], folder_paths.supported_pt_extensions)
    folder_paths.filename_list_cache.clear()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                folder_paths.folder_names_and_paths.pop(key, None)
            else:
                folder_paths.folder_names_and_paths[key] = value
        folder_paths.filename_list_cache.clear()


@pytest.fixture(scope="module")
def models_dir(comfy_host, tmp_path_factory):
    """Every loader folder holding the whole corpus, plus a pickle-only checkpoint."""
    root = tmp_path_factory.mktemp("models")
    corpus = broken_files() | broken_gguf_files()
    for folder in set(LOADER_FOLDERS.values()):
        (root / folder).mkdir()
        for name, data in corpus.items():
            (root / folder / name).write_bytes(data)
        torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(model="x")},
                   root / folder / "pickle_only.ckpt")
    with models_folders({key: root / key for key in LOADER_FOLDERS.values()}):
        yield root


@functools.cache
def loader_nodes() -> dict[str, type]:
    """Every node of the pack whose id ends in "Loader", from the extension's own node list."""
    import asyncio

    from velox.nodes.extension import VeloxExtension

    every = asyncio.run(VeloxExtension().get_node_list())
    return {n.define_schema().node_id: n for n in every if n.define_schema().node_id.endswith("Loader")}


def run_loader(node, file_name: str):
    """``node.execute`` with the file as its first (dropdown) input and every other input at its default."""
    inputs = node.define_schema().inputs
    kwargs = {inputs[0].id: file_name}
    for spec in inputs[1:]:
        default = getattr(spec, "default", None)
        if default is None and getattr(spec, "options", None):
            default = spec.options[0]
        if default is not None:
            kwargs[spec.id] = default
    if "device" in kwargs:
        kwargs["device"] = "cpu"
    return node.execute(**kwargs)


def test_every_loader_node_is_fed_the_corpus(comfy_host):
    assert sorted(loader_nodes()) == sorted(LOADER_FOLDERS)


@pytest.mark.parametrize("node_id", sorted(LOADER_FOLDERS))
@pytest.mark.parametrize("file_name", BROKEN)
def test_every_loader_node_refuses_every_broken_file_naming_it(models_dir, node_id, file_name):
    node = loader_nodes()[node_id]
    with pytest.raises(VeloxLoadError, match=rf"^{re.escape(file_name)}: truncated or corrupt"):
        run_loader(node, file_name)


@pytest.mark.parametrize("node_id", GGUF_LOADERS)
@pytest.mark.parametrize("file_name", sorted(broken_gguf_files()))
def test_every_gguf_loader_node_refuses_a_broken_gguf_naming_it(models_dir, node_id, file_name):
    with pytest.raises(VeloxLoadError, match=rf"^{re.escape(file_name)}: truncated or corrupt GGUF"):
        run_loader(loader_nodes()[node_id], file_name)


@pytest.mark.parametrize("node_id", sorted(LOADER_FOLDERS))
def test_every_loader_node_refuses_a_pickle_only_checkpoint_in_the_packs_words(models_dir, node_id):
    with pytest.raises(VeloxLoadError, match=rf"^pickle_only\.ckpt: {re.escape(PICKLE_ONLY)}") as error:
        run_loader(loader_nodes()[node_id], "pickle_only.ckpt")
    message = str(error.value)
    assert "weights_only" not in message and "\n" not in message, message


# ----------------------------------------------------------------------------------------------
# a LoRA that matches nothing
# ----------------------------------------------------------------------------------------------

MYSTERY = {"mystery_net.stage_0.mixer": (64, 64), "mystery_net.stage_1.mixer": (64, 64)}


@pytest.fixture(scope="module")
def wan_model(comfy_host):
    from velox.host.wan_loading import build_wan_model
    from velox.loaders.wan_detect import sniff_wan

    variant, state_dict = sniff_wan(tiny_wan_state_dict(TINY_WAN_CONFIGS["t2v"], seed=0))
    return build_wan_model(state_dict, variant, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def loras_dir(comfy_host, wan_model, tmp_path_factory):
    """models/loras with a Wan LoRA, a LoRA of no family, and the no-family LoRA under a reward release name."""

    from velox.host.lora_presets import reward_lora_file

    root = tmp_path_factory.mktemp("loras")
    state = wan_model.model.diffusion_model.state_dict()
    good = random_lora_factors({"blocks.0.self_attn.q": tuple(state["blocks.0.self_attn.q.weight"].shape)}, 2, 2.0)
    save_file(lora_state_dict(good, "kohya"), str(root / "wan_good.safetensors"))
    mystery = lora_state_dict(random_lora_factors(MYSTERY, 2, 2.0), "kohya")
    for name in ("mystery.safetensors", *(reward_lora_file(side, r) for side in ("high", "low")
                                          for r in ("MPS", "HPS2.1"))):
        save_file(mystery, str(root / name))
    with models_folders({"loras": root}):
        yield root


UNMATCHED = r"^mystery\.safetensors: .*match.*lora_unet_mystery_net_stage_0_mixer\.alpha"
REWARD_UNMATCHED = r"^Wan2\.2-Fun-A14B-InP-high-noise-.*\.safetensors: .*lora_unet_mystery_net_stage_0_mixer"


def test_mystery_lora_has_no_family():
    from velox.loaders.lora_detect import lora_family

    assert lora_family(lora_state_dict(random_lora_factors(MYSTERY, 2, 2.0), "kohya")) is None


@pytest.mark.parametrize("stack", [["mystery.safetensors"], ["wan_good.safetensors", "mystery.safetensors"]])
def test_lora_stack_refuses_a_lora_that_matches_nothing(wan_model, loras_dir, stack):
    from velox.nodes.lora_nodes import NONE, VeloxLoraStack

    names = [*stack, NONE, NONE, NONE][:4]
    slots = {f"{kind}_{i + 1}": value for i, name in enumerate(names)
             for kind, value in (("lora", name), ("strength", 1.0))}
    with pytest.raises(VeloxLoadError, match=UNMATCHED):
        VeloxLoraStack.execute(wan_model, **slots)
    good = dict(slots, lora_1="wan_good.safetensors", lora_2=NONE)
    assert "1 weight(s) merged" in VeloxLoraStack.execute(wan_model, **good).args[3]


def test_wan_expert_lora_stack_refuses_a_lora_that_matches_nothing(wan_model, loras_dir):
    from velox.nodes.lora_nodes import NONE, VeloxWanExpertLoraStack

    slots = {f"lora_{i}": NONE for i in range(1, 5)}
    slots |= {f"strength_{side}_{i}": 1.0 for side in ("high", "low") for i in range(1, 5)}
    slots |= {"lora_1": "wan_good.safetensors", "lora_2": "mystery.safetensors", "strength_high_2": 0.0}
    with pytest.raises(VeloxLoadError, match=UNMATCHED):  # on the low-noise expert only
        VeloxWanExpertLoraStack.execute(wan_model, wan_model, **slots)


def test_wan_reward_loras_refuses_release_files_that_match_no_wan_layer(loras_dir):
    from velox.host.lora_presets import REWARD_PRESETS
    from velox.nodes.lora_nodes import VeloxWanRewardLoras

    with pytest.raises(VeloxLoadError, match=REWARD_UNMATCHED):
        VeloxWanRewardLoras.execute(next(iter(REWARD_PRESETS)), 0.6, 0.5, 0.5)


def test_lora_bake_refuses_a_stack_holding_a_lora_that_matches_nothing(wan_model, loras_dir, tmp_path, monkeypatch):
    import folder_paths

    from velox.host.lora_presets import StackEntry
    from velox.nodes.lora_nodes import VeloxLoraBake

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    stack = [StackEntry("wan_good.safetensors", 1.0, 1.0), StackEntry("mystery.safetensors", 1.0, 1.0)]
    with pytest.raises(VeloxLoadError, match=UNMATCHED):
        VeloxLoraBake.execute(wan_model, stack, "high_noise", 4, "bf16", "loras/mystery_bake")
    assert list(tmp_path.rglob("*.safetensors")) == []
