"""Checkpoint files and Sana detection: bad inputs fail with VeloxLoadError naming the file,
the offline Hugging Face cache resolves, and detection picks the right config or preset."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from velox.errors import VeloxLoadError
from velox.loaders.checkpoint_files import (
    list_hf_cache_repos,
    load_state_dict,
    read_safetensors_header,
    resolve_diffusers_component,
    resolve_hf_cache_repo,
    unwrap_state_dict,
)
from velox.loaders.sana_detect import (
    detect_sana_config,
    is_sana_diffusers_folder,
    load_sana_checkpoint,
    sniff_sana,
)
from velox.loaders.sana_keys import canonicalize_sana_state_dict, official_to_diffusers
from velox.models.sana import SANA_PRESETS, SanaTransformer
from velox.tiny import sana as tiny

TINY = tiny.TINY_SANA_CONFIGS["sana_600m_style"]


@pytest.fixture(scope="module")
def weights():
    return tiny.tiny_sana_state_dict(TINY, seed=5)


class Pickled:
    """A Python object inside a checkpoint: only an unsafe (non weights-only) unpickler can load it."""

    def __init__(self):
        self.tensor = torch.zeros(2)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


def test_truncated_safetensors_is_reported_as_truncated_with_the_file_name(tmp_path, weights):
    path = tiny.write_safetensors(tmp_path / "cut.safetensors", weights)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(VeloxLoadError, match=r"^cut\.safetensors: truncated or corrupt safetensors"):
        load_state_dict(path)


def test_safetensors_with_garbage_header_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 64)
    with pytest.raises(VeloxLoadError, match=r"^garbage\.safetensors: truncated or corrupt safetensors"):
        load_state_dict(path)


def test_safetensors_header_longer_than_the_file_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(VeloxLoadError, match="short.safetensors: truncated or corrupt"):
        read_safetensors_header(path)


def test_safetensors_tensor_extent_that_disagrees_with_its_shape_is_corrupt(tmp_path):
    path = tiny.write_safetensors(tmp_path / "liar.safetensors", {"a": torch.zeros(4)})
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header["a"]["shape"] = [3]
    text = json.dumps(header).encode().ljust(length)
    path.write_bytes(bytes(data[:8]) + text + bytes(data[8 + length:]))
    with pytest.raises(VeloxLoadError, match="liar.safetensors: truncated or corrupt safetensors"):
        load_state_dict(path)


def test_pth_that_needs_pickle_globals_is_refused_as_unsafe(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Pickled()}, path)
    with pytest.raises(VeloxLoadError, match=r"^unsafe\.pth: pickle-only checkpoint, refused; convert to safetensors .*Pickled"):
        load_state_dict(path)


def test_pth_that_is_not_a_checkpoint_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(b"definitely not a torch file")
    with pytest.raises(VeloxLoadError, match=r"^noise\.ckpt: truncated or corrupt"):
        load_state_dict(path)


def test_truncated_pth_is_reported_as_corrupt(tmp_path, weights):
    path = tiny.write_official_pth(tmp_path / "half.pth", weights)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VeloxLoadError, match=r"^half\.pth: truncated or corrupt"):
        load_state_dict(path)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module"])
def test_pth_wrappers_are_unwrapped(tmp_path, wrapper):
    path = tmp_path / "wrapped.pt"
    torch.save({wrapper: {"a.weight": torch.ones(2)}, "epoch": 3}, path)
    assert list(load_state_dict(path)) == ["a.weight"]


def test_unwrap_refuses_a_checkpoint_without_tensors():
    with pytest.raises(VeloxLoadError, match="x.pth: holds no tensors"):
        unwrap_state_dict({"epoch": 1}, "x.pth")


def test_unknown_extension_is_refused(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"0")
    with pytest.raises(VeloxLoadError, match=r"^model\.onnx: unknown checkpoint type"):
        load_state_dict(path)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(VeloxLoadError, match=r"^absent\.safetensors: file not found"):
        load_state_dict(tmp_path / "absent.safetensors")


def test_sharded_index_pointing_to_a_missing_shard_names_the_shard_and_the_index(tmp_path, weights):
    folder = tiny.write_diffusers_folder(tmp_path / "pipe", TINY, weights, shards=2)
    index = folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    (folder / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(VeloxLoadError, match=r"index\.json: shard diffusion_pytorch_model-00002-of-00002"):
        load_state_dict(index)


def test_corrupt_shard_index_json_is_reported(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": ')
    with pytest.raises(VeloxLoadError, match=r"^model\.safetensors\.index\.json: corrupt shard index"):
        load_state_dict(index)


def test_shard_index_without_a_weight_map_is_reported(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {}}')
    with pytest.raises(VeloxLoadError, match="corrupt shard index: no \"weight_map\""):
        load_state_dict(index)


def test_sharded_index_loads_all_shards(tmp_path, weights):
    folder = tiny.write_diffusers_folder(tmp_path / "pipe", TINY, weights, shards=2)
    loaded = load_state_dict(folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    assert sorted(loaded) == sorted(official_to_diffusers(weights))


def test_diffusers_component_resolves_from_pipeline_or_component_folder(tmp_path, weights):
    folder = tiny.write_diffusers_folder(tmp_path / "pipe", TINY, weights)
    from_pipeline = resolve_diffusers_component(folder, "transformer")
    from_component = resolve_diffusers_component(folder / "transformer", "transformer")
    assert from_pipeline == from_component
    assert from_pipeline.weight_files == [folder / "transformer" / "diffusion_pytorch_model.safetensors"]
    assert from_pipeline.config()["_class_name"] == "SanaTransformer2DModel"


def test_folder_without_weights_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VeloxLoadError, match=r"^empty: no transformer weights"):
        load_state_dict(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------
# the Hugging Face cache, offline
# ----------------------------------------------------------------------------------------------


def test_hf_cache_repos_are_listed_resolved_and_loaded_offline(tmp_path, monkeypatch, weights):
    cache = tmp_path / "hub"
    repo = "Efficient-Large-Model/Sana_600M_1024px_diffusers"
    snapshot = tiny.write_hf_cache_repo(cache, repo, TINY, weights)
    (cache / "models--google--gemma-2-2b-it" / "snapshots" / "abc").mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert list_hf_cache_repos() == [repo, "google/gemma-2-2b-it"]
    assert list_hf_cache_repos(lambda repo_id, folder: is_sana_diffusers_folder(folder)) == [repo]
    assert resolve_hf_cache_repo(repo) == snapshot
    config, state_dict = load_sana_checkpoint(snapshot)
    assert config.model_kwargs() == TINY.model_kwargs()
    assert sorted(state_dict) == sorted(canonicalize_sana_state_dict(weights))


def test_hf_cache_location_follows_hf_home(tmp_path, monkeypatch, weights):
    tiny.write_hf_cache_repo(tmp_path / "home" / "hub", "Org/Model", TINY, weights)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert list_hf_cache_repos() == ["Org/Model"]


def test_repo_missing_from_the_hf_cache_is_reported_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    missing = r"^Sana_1600M_1024px_diffusers: is not in the local Hugging Face cache"
    with pytest.raises(VeloxLoadError, match=missing):
        resolve_hf_cache_repo("Efficient-Large-Model/Sana_1600M_1024px_diffusers")


# ----------------------------------------------------------------------------------------------
# Sana detection
# ----------------------------------------------------------------------------------------------

WAN_KEYS = {"patch_embedding.weight": torch.zeros(1), "blocks.0.self_attn.q.weight": torch.zeros(1)}
UNET_KEYS = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
             "model.diffusion_model.out.2.weight": torch.zeros(1)}


@pytest.mark.parametrize("state_dict, looks_like", [
    (WAN_KEYS, "a Wan transformer"),
    (UNET_KEYS, r"a UNet \(Stable Diffusion / VideoCrafter"),
    ({"foo.bar": torch.zeros(1)}, "an unknown model"),
])
def test_other_families_are_refused_naming_what_they_look_like(state_dict, looks_like):
    message = rf"^wrong\.safetensors: looks like {looks_like}.*expected a Sana"
    with pytest.raises(VeloxLoadError, match=message):
        sniff_sana(state_dict, path="/models/wrong.safetensors")


def test_wan_file_on_disk_is_refused_with_its_name(tmp_path):
    path = tiny.write_safetensors(tmp_path / "wan2.1_t2v_1.3B.safetensors", WAN_KEYS)
    message = r"^wan2\.1_t2v_1\.3B\.safetensors: looks like a Wan transformer"
    with pytest.raises(VeloxLoadError, match=message):
        load_sana_checkpoint(path)


def test_sana_checkpoint_with_stray_keys_lists_them(weights):
    stray = {**weights, "lora_unet_up.weight": torch.zeros(1), "extra.thing": torch.zeros(1)}
    message = r"x\.pth: 2 tensor\(s\) match no Sana layout: extra\.thing, lora_unet"
    with pytest.raises(VeloxLoadError, match=message):
        sniff_sana(stray, path="x.pth")


def test_diffusers_file_missing_one_of_q_k_v_is_reported(weights):
    diffusers = official_to_diffusers(weights)
    del diffusers["transformer_blocks.1.attn1.to_v.weight"]
    with pytest.raises(VeloxLoadError, match=r"transformer_blocks\.1\.attn1\.to_v\.weight is missing"):
        sniff_sana(diffusers, path="d.safetensors")


def test_mixffn_1x1_convs_become_2d_and_buffers_are_dropped(weights):
    assert weights["blocks.0.mlp.inverted_conv.conv.weight"].ndim == 4
    canonical = canonicalize_sana_state_dict(weights)
    assert canonical["blocks.0.mlp.inverted_conv.conv.weight"].shape == (2 * 160, 64)
    assert canonical["blocks.0.mlp.point_conv.conv.weight"].shape == (64, 160)
    assert canonical["blocks.0.mlp.depth_conv.conv.weight"].ndim == 4
    assert not {"pos_embed", "y_embedder.y_embedding"} & set(canonical)
    with torch.device("meta"):
        expected = set(SanaTransformer.from_config(TINY).state_dict())
    assert set(canonical) == expected


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_comfyui_prefixes_are_stripped_from_official_and_diffusers_names(weights, prefix):
    for layout in (weights, official_to_diffusers(weights), official_to_diffusers(weights, legacy=True)):
        config, canonical = sniff_sana({prefix + k: v for k, v in layout.items()})
        assert config.model_kwargs() == TINY.model_kwargs()
        assert sorted(canonical) == sorted(canonicalize_sana_state_dict(weights))


def test_comfyui_bundle_keeps_only_the_diffusion_model_part(tmp_path, weights):
    bundle = {f"model.diffusion_model.{k}": v for k, v in weights.items()}
    bundle["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    path = tiny.write_safetensors(tmp_path / "bundle.safetensors", bundle)
    config, canonical = load_sana_checkpoint(path)
    assert config.model_kwargs() == TINY.model_kwargs()
    assert sorted(canonical) == sorted(canonicalize_sana_state_dict(weights))


@pytest.mark.parametrize("variant", sorted(tiny.TINY_SANA_CONFIGS))
def test_detection_recovers_each_tiny_variant_from_an_official_checkpoint(variant):
    config = tiny.TINY_SANA_CONFIGS[variant]
    detected, _ = sniff_sana({"state_dict": tiny.tiny_sana_state_dict(config)})
    assert detected.model_kwargs() == config.model_kwargs()
    assert detected.family == config.family
    assert detected.flow_shift == config.flow_shift


@pytest.mark.parametrize("name", sorted(SANA_PRESETS))
def test_detection_picks_each_preset_from_shapes_alone(name):
    """Real sizes as meta tensors: an official checkpoint's keys and shapes name the preset."""
    preset = SANA_PRESETS[name]
    with torch.device("meta"):
        state_dict = SanaTransformer.from_config(preset).state_dict()
    side = preset.sample_size // preset.patch_size
    pos_embed = torch.empty(1, side * side, preset.hidden_size, device="meta")
    if preset.use_pe:
        state_dict = {**state_dict, "pos_embed": pos_embed}
    assert detect_sana_config(state_dict, pos_embed=state_dict.get("pos_embed")) == preset


@pytest.mark.parametrize("name", sorted(SANA_PRESETS))
def test_diffusers_config_json_of_each_preset_maps_back_to_it(name):
    from velox.loaders.sana_detect import config_from_diffusers

    preset = SANA_PRESETS[name]
    assert config_from_diffusers(tiny.diffusers_transformer_config(preset)) == preset


def test_zero_pos_embed_buffer_of_a_1k_checkpoint_means_no_pe(weights):
    assert not weights["pos_embed"].any()
    assert sniff_sana(weights)[0].use_pe is False


def test_pe_interpolation_is_read_from_the_official_buffer():
    config = tiny.TINY_SANA_CONFIGS["sana_4k_pe"]
    detected, _ = sniff_sana(tiny.tiny_sana_state_dict(config))
    assert (detected.use_pe, detected.sample_size, detected.pe_interpolation) == (True, 8, 2.0)
    assert detected.flow_shift == 6.0 and detected.name == "custom"


def test_config_json_that_disagrees_with_the_tensors_is_refused(tmp_path, weights):
    folder = tiny.write_diffusers_folder(tmp_path / "pipe", TINY, weights)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_layers"] = 7
    config_path.write_text(json.dumps(config))
    message = r"^pipe: its config \(config\.json or the chosen preset\) disagrees with the tensors \(depth 7"
    with pytest.raises(VeloxLoadError, match=message):
        load_sana_checkpoint(folder)


def test_preset_that_disagrees_with_the_tensors_is_refused(weights):
    message = r"^x\.pth: its config .* \(hidden_size 2240 vs 64; depth 20 vs 2"
    with pytest.raises(VeloxLoadError, match=message):
        sniff_sana(weights, path="x.pth", config=SANA_PRESETS["sana_1600m"])


def test_single_file_inside_a_diffusers_folder_uses_its_config_json(tmp_path):
    config = tiny.TINY_SANA_CONFIGS["sana_2k_pe"]
    folder = tiny.write_diffusers_folder(tmp_path / "pipe", config, tiny.tiny_sana_state_dict(config))
    detected, _ = load_sana_checkpoint(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert detected.model_kwargs() == config.model_kwargs()


def test_torch_load_is_weights_only_for_every_pickle_suffix(tmp_path):
    for suffix in (".pth", ".pt", ".ckpt", ".bin"):
        path = tmp_path / f"unsafe{suffix}"
        torch.save({"obj": Pickled(), "w": torch.zeros(1)}, path)
        with pytest.raises(VeloxLoadError, match="pickle-only checkpoint, refused"):
            load_state_dict(path)


def test_safetensors_roundtrip_keeps_values(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.arange(6.0).view(2, 3)}, str(path))
    assert torch.equal(load_state_dict(path)["a"], torch.arange(6.0).view(2, 3))
