"""The family registry (``loaders/families.py``): every entry is complete and consistent, each tiny
model is marked by its own family alone, a file of one family handed to another family's loader is
named by its family, and every table that used to be written out per module now reads from the
registry under its old public name."""

from __future__ import annotations

import importlib
import re

import pytest
import torch

from velox.errors import VeloxLoadError
from velox.loaders import families
from velox.loaders.families import (
    FAMILIES,
    SANA,
    SANA_VIDEO,
    VIDEOCRAFTER,
    WAN,
    family_by_architecture,
    family_by_markers,
)

KINDS = ("diffusion", "controlnet", "text_encoder")
FUNCTION_FIELDS = ("sniff", "canonicalize", "demo")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_entry_is_complete(name):
    family = FAMILIES[name]
    assert family.name == name and family.display_name and family.noun and family.kind in KINDS
    assert family.markers, f"{name}: no markers, so detection cannot find it"
    for pattern in family.keep_float + family.keep_f32 + family.shared_input + family.lora_rules:
        re.compile(pattern)
    assert set(family.keep_f32) <= set(family.keep_float), f"{name}: an F32 pattern not also kept in float"
    for field in FUNCTION_FIELDS:
        if getattr(family, field) is not None:
            assert callable(family.function(field)), f"{name}.{field} does not resolve"


def test_names_architectures_and_signs_are_unique():
    architectures = [a for f in FAMILIES.values() for a in (f.gguf_architecture, *f.gguf_aliases) if a]
    assert len(architectures) == len(set(architectures))
    fragments = [fragment for f in FAMILIES.values() for fragment, _ in f.signs]
    assert len(fragments) == len(set(fragments))
    assert len({f.display_name for f in FAMILIES.values()}) == len(FAMILIES)


def test_sana_keeps_the_union_of_the_converter_and_quantized_loader_tables():
    """The two tables disagreed (issue 17): the registry keeps both Sana entries in float."""
    assert SANA.keeps_float("logvar_linear.weight") and SANA.keeps_float("blocks.0.scale_shift_table")
    assert SANA.keeps_f32("blocks.0.scale_shift_table") and not SANA.keeps_f32("logvar_linear.weight")
    assert not SANA.keeps_float("blocks.0.attn.qkv") and not SANA.keeps_float("blocks.0.mlp.point_conv.conv")


# ----------------------------------------------------------------------------------------------
# detection from the tiny models
# ----------------------------------------------------------------------------------------------


def tiny_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    from velox.tiny.sana import TINY_SANA_CONFIGS, tiny_sana_state_dict
    from velox.tiny.videocrafter import demo_release_state_dict
    from velox.tiny.wan import TINY_UMT5, TINY_UMT5_VOCAB, TINY_WAN_CONFIGS, tiny_wan_state_dict, umt5_shapes

    umt5 = {key: torch.empty(shape, device="meta") for key, shape in umt5_shapes(TINY_UMT5_VOCAB, **TINY_UMT5).items()}
    return {
        "sana": tiny_sana_state_dict(TINY_SANA_CONFIGS["sana_600m_style"]),
        "wan": tiny_wan_state_dict(TINY_WAN_CONFIGS["t2v"]),
        "videocrafter": demo_release_state_dict("vc2"),
        "umt5": umt5,
    }


@pytest.fixture(scope="module")
def tiny():
    return tiny_state_dicts()


@pytest.mark.parametrize("name", ["sana", "wan", "videocrafter", "umt5"])
def test_each_tiny_model_is_marked_by_its_own_family(tiny, name):
    keys = list(tiny[name])
    assert family_by_markers(keys) is FAMILIES[name]
    assert [f.name for f in FAMILIES.values() if f.kind != "controlnet" and f.marks(keys)] == [name]


def test_gguf_architectures_name_their_families():
    assert family_by_architecture("t5") is FAMILIES["umt5"] and family_by_architecture("wan") is WAN
    assert family_by_architecture("pig") is None and family_by_architecture(None) is None


@pytest.mark.parametrize(("owner", "wanted", "check"), [
    ("sana", "wan", "velox.loaders.wan_detect:check_is_wan"),
    ("videocrafter", "wan", "velox.loaders.wan_detect:check_is_wan"),
    ("wan", "sana", "velox.loaders.sana_detect:check_is_sana"),
    ("videocrafter", "sana", "velox.loaders.sana_detect:check_is_sana"),
    ("umt5", "sana", "velox.loaders.sana_detect:check_is_sana"),
])
def test_a_file_of_another_family_is_refused_naming_it_and_its_loader(tiny, owner, wanted, check):
    module, _, function = check.partition(":")
    owner_family = FAMILIES[owner]
    with pytest.raises(VeloxLoadError) as error:
        getattr(importlib.import_module(module), function)(tiny[owner], "wrong.safetensors")
    message = str(error.value)
    assert message.startswith("wrong.safetensors: looks like ")
    assert f", not {FAMILIES[wanted].noun}; load it with '{owner_family.loader_node}'" in message
    what = message.removeprefix("wrong.safetensors: looks like ").split(", not ")[0]
    assert what in [w for _, w in owner_family.signs]


def test_videocrafter_loader_names_a_wan_file(tiny):
    from velox.loaders.videocrafter_detect import refuse_foreign

    with pytest.raises(VeloxLoadError, match=r"looks like a Wan transformer, not a VideoCrafter / DynamiCrafter "
                       r"UNet; load it with 'Load Wan Model \(Velox\)'"):
        refuse_foreign(tiny["wan"], "wan.safetensors")


def test_models_no_family_loads_are_named_after_the_families():
    keys = ["double_blocks.0.img_attn.qkv.weight"]
    assert families.identify(keys, exclude=("sana",)) == ("a Flux-style transformer", None)
    assert families.identify(["foo.weight"]) is None


# ----------------------------------------------------------------------------------------------
# the tables that read from the registry, under their old public names
# ----------------------------------------------------------------------------------------------


def test_loader_tables_read_from_the_registry():
    from velox.loaders import (
        gguf_detect,
        gguf_families,
        gguf_text_keys,
        lora_detect,
        nvfp4_convert,
        sana_controlnet_keys,
        sana_detect,
        videocrafter_detect,
    )

    for family in FAMILIES.values():
        if family.gguf_architecture:
            converter = gguf_families.FAMILIES[family.gguf_architecture]
            assert (converter.keep_float, converter.keep_f32, converter.markers) == (
                family.keep_float, family.keep_f32, family.markers)
            assert gguf_detect.ARCHITECTURES[family.gguf_architecture] == family.name
        if family.llama_cpp_marker:
            assert gguf_text_keys.LLAMA_CPP_MARKERS[family.name] == family.llama_cpp_marker
        if family.lora_rules:
            assert lora_detect.FAMILY_RULES[family.name] == family.lora_rules
            assert lora_detect.FAMILY_NAMES[family.name] == family.display_name
    assert gguf_families.AUTO_ORDER == ("sana", "wan", "videocrafter", "sana_video", "t5encoder", "gemma2")
    assert gguf_detect.ARCHITECTURES["t5"] == "umt5"
    assert nvfp4_convert.NVFP4_FAMILIES == ("sana", "wan")
    assert sana_detect.DIFFUSERS_CLASS == "SanaTransformer2DModel" and sana_detect.SANA_MARKERS == SANA.markers
    assert sana_detect.FOREIGN_FAMILIES[0] == ("head.modulation", "a Wan transformer")
    assert sana_controlnet_keys.DIFFUSERS_CLASS == "SanaControlNetModel"
    assert videocrafter_detect.UNET_MARKER == "input_blocks.0.0.weight"


def test_fp8_constants_keep_their_old_home():
    from velox.kernels import fp8_format, fp8_linear

    assert (fp8_linear.FP8_DTYPE, fp8_linear.FP8_MAX, fp8_linear.MIN_SCALE_AMAX) == (
        fp8_format.FP8_DTYPE, fp8_format.FP8_MAX, fp8_format.MIN_SCALE_AMAX) == (torch.float8_e4m3fn, 448.0, 1e-12)


def test_host_tables_read_from_the_registry(comfy_host):
    from velox.host import (
        gguf_text_encoders,
        quant_loading,
        sana_text_encoder,
        shared_activation,
        wan_loading,
    )

    assert quant_loading.NEVER_QUANTIZE == {f.name: f.keep_float for f in (SANA, WAN, VIDEOCRAFTER, SANA_VIDEO)}
    assert shared_activation.SHARED_INPUT == {"wan": WAN.shared_input, "videocrafter": VIDEOCRAFTER.shared_input}
    assert gguf_text_encoders.load_umt5_gguf is wan_loading.load_umt5_gguf
    assert gguf_text_encoders.load_gemma2_gguf is sana_text_encoder.load_gemma2_gguf
