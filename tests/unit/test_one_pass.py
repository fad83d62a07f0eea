"""A file's way through the loader is one pass: read -> detect the family -> canonicalize -> config ->
build -> quantize, each step once, whatever the format; and every family builds through one
``build_patcher``. Counted by wrapping the steps' functions where they are looked up."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from velox.tiny import sana as tiny_sana
from velox.tiny import sana_video as tiny_sana_video
from velox.tiny import wan as tiny_wan

SANA_CONFIG = tiny_sana.TINY_SANA_CONFIGS["sana_1600m_style"]
SANA_4K = tiny_sana.TINY_SANA_CONFIGS["sana_4k_pe"]
BUILD_SITES = ("sana_model", "sana_video_model", "wan_model", "videocrafter_loading")


@pytest.fixture
def calls(comfy_host, monkeypatch) -> Counter:
    """step name -> how many times it ran since the test began."""
    from velox.host import (
        model_build,
        sana_model,
        sana_video_model,
        videocrafter_loading,
        wan_model,
    )
    from velox.loaders import gguf_reader, sana_detect, sana_keys
    from velox.loaders.families import Family

    counter: Counter = Counter()

    def count(owner, name: str, step: str) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            counter[step] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    def count_family_check(self, *args, **kwargs):
        counter[f"check {self.name}"] += 1
        return original_check(self, *args, **kwargs)

    original_check = Family.check
    monkeypatch.setattr(Family, "check", count_family_check)
    count(gguf_reader, "read_gguf", "read gguf")
    for module in (sana_keys, sana_detect, sana_model):  # every place the canonicalizer is looked up
        count(module, "canonicalize_sana_state_dict", "canonicalize sana")
    count(sana_detect, "detect_sana_config", "config sana")
    hosts = {"sana_model": sana_model, "sana_video_model": sana_video_model, "wan_model": wan_model,
             "videocrafter_loading": videocrafter_loading}
    for site in BUILD_SITES:
        count(hosts[site], "build_patcher", "build")
    count(model_build, "make_quant_operations", "quantized operations")
    return counter


def sana_pass(quantized: bool, gguf: bool = False) -> dict[str, int]:
    steps = {"check sana": 1, "canonicalize sana": 1, "config sana": 1, "build": 1,
             "quantized operations": int(quantized)}
    if gguf:
        steps["read gguf"] = 1
    return steps


def only(counter: Counter, expected: dict[str, int]) -> dict[str, int]:
    return {step: counter[step] for step in expected}


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_a_sana_safetensors_load_runs_each_step_once(calls, tmp_path, quantization):
    from velox.host.sana_loading import load_sana_model

    path = tiny_sana.write_safetensors(tmp_path / "sana.safetensors", tiny_sana.tiny_sana_state_dict(SANA_CONFIG))
    load_sana_model(path, dtype=torch.float32, quantization=quantization)
    expected = sana_pass(quantized=quantization != "none")
    assert only(calls, expected) == expected


def test_a_quantized_sana_gguf_load_reads_the_file_once_and_runs_each_step_once(calls, tmp_path):
    from velox.host.sana_loading import load_sana_model
    from velox.loaders.gguf_convert import convert_to_gguf

    source = tiny_sana.write_official_pth(tmp_path / "Sana_1600M_4Kpx_BF16.pth", tiny_sana.tiny_sana_state_dict(SANA_4K))
    convert_to_gguf(source, tmp_path / "sana_4k-Q8_0.gguf", "Q8_0")
    calls.clear()
    net = load_sana_model(tmp_path / "sana_4k-Q8_0.gguf", dtype=torch.float32).model.diffusion_model
    expected = sana_pass(quantized=True, gguf=True)
    assert only(calls, expected) == expected
    assert net.use_pe and net.pe_interpolation == SANA_4K.pe_interpolation  # the GGUF's recorded config


def test_a_sana_diffusers_folder_load_runs_each_step_once(calls, tmp_path):
    from velox.host.sana_loading import load_sana_model

    folder = tiny_sana.write_diffusers_folder(tmp_path / "sana", SANA_CONFIG, tiny_sana.tiny_sana_state_dict(SANA_CONFIG))
    load_sana_model(folder, dtype=torch.float32)
    expected = sana_pass(quantized=False)
    assert only(calls, expected) == expected


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_wan_builds_once_through_build_patcher(calls, tmp_path, quantization):
    from velox.host.wan_loading import load_wan_model

    weights = tiny_wan.tiny_wan_state_dict(tiny_wan.TINY_WAN_CONFIGS["t2v"])
    load_wan_model(tiny_wan.write_official_file(weights, tmp_path / "wan.safetensors"), dtype=torch.float32,
                   quantization=quantization)
    assert (calls["build"], calls["quantized operations"]) == (1, int(quantization != "none"))


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_sana_video_builds_once_through_build_patcher(calls, tmp_path, quantization):
    from velox.host.sana_video_model import load_sana_video_model

    config = tiny_sana_video.tiny_sana_video_config(caption_channels=32)
    path = tiny_sana_video.write_official(tmp_path / "sana_video.pth", tiny_sana_video.tiny_sana_video_state_dict(config))
    load_sana_video_model(path, dtype=torch.float32, quantization=quantization)
    assert (calls["build"], calls["quantized operations"]) == (1, int(quantization != "none"))
    assert calls["check sana"] == 0  # SANA-Video refines Sana: Sana's steps never run on it


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_videocrafter_builds_once_through_build_patcher(calls, tmp_path, quantization):
    from demo_models_videocrafter import write_release_ckpt

    from velox.host.videocrafter_loading import load_videocrafter_unet

    path = write_release_ckpt(tmp_path / "videocrafter2_t2v.ckpt", "vc2", 0)
    load_videocrafter_unet(path, dtype=torch.float32, quantization=quantization)
    assert (calls["build"], calls["quantized operations"]) == (1, int(quantization != "none"))


def test_a_videocrafter_gguf_is_read_once_and_built_once(calls, tmp_path):
    from demo_models_videocrafter import write_release_ckpt

    from velox.host.videocrafter_loading import load_videocrafter_unet
    from velox.loaders.gguf_convert import convert_to_gguf

    source = write_release_ckpt(tmp_path / "videocrafter2_t2v.ckpt", "vc2", 0)
    convert_to_gguf(source, tmp_path / "videocrafter2_t2v-Q8_0.gguf", "Q8_0")
    calls.clear()
    load_videocrafter_unet(tmp_path / "videocrafter2_t2v-Q8_0.gguf", dtype=torch.float32)
    assert (calls["read gguf"], calls["build"], calls["quantized operations"]) == (1, 1, 1)


def test_the_float_build_keeps_cores_operations_and_the_weights_bit_for_bit(comfy_host):
    """build_patcher on float weights that nobody asked to quantize: core's own Linear, the tensors as given."""
    from velox.host.quant_ops import QuantLinear
    from velox.host.sana_model import build_sana_model

    weights = tiny_sana.tiny_sana_state_dict(SANA_CONFIG, seed=4)
    net = build_sana_model(dict(weights), dtype=torch.float32).model.diffusion_model
    assert not any(isinstance(module, QuantLinear) for module in net.modules())
    assert torch.equal(net.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"])


def test_a_float_wan_file_with_a_tensor_core_has_no_place_for_still_loads(comfy_host, tmp_path, caplog):
    """As core's own loader lets it: the float Wan build through build_patcher warns, it does not refuse."""
    from velox.host.wan_loading import load_wan_model

    weights = tiny_wan.tiny_wan_state_dict(tiny_wan.TINY_WAN_CONFIGS["t2v"])
    weights["blocks.0.norm_extra.weight"] = torch.ones(4)
    with caplog.at_level("WARNING"):
        patcher = load_wan_model(tiny_wan.write_official_file(weights, tmp_path / "wan.safetensors"),
                                 dtype=torch.float32)
    assert torch.equal(patcher.model.diffusion_model.blocks[0].self_attn.q.weight, weights["blocks.0.self_attn.q.weight"])
    assert "blocks.0.norm_extra.weight" in caplog.text
