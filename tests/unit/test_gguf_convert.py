"""The GGUF converter (issue #4, acceptance point 2) and GGUF detection: files written from every
tiny layout are read by gguf-py and by our reader (same names, types, shapes, bytes), hold the
canonical tensors within each type's error bound, keep the never-quantize lists in float, restore
5-D shapes, stream one group of tensors at a time, and are detected as the model they came from;
city96-style Wan files and llama.cpp text encoders are detected too."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file

from velox.errors import VeloxLoadError
from velox.kernels.gguf_dequant_torch import dequantize_torch
from velox.loaders import gguf_convert
from velox.loaders.gguf_convert import convert_to_gguf
from velox.loaders.gguf_detect import detect_gguf, sana_config_from_metadata
from velox.loaders.gguf_reader import read_gguf, record_as_torch
from velox.loaders.gguf_text_keys import gguf_to_hf_name
from velox.loaders.sana_detect import sniff_sana
from velox.loaders.wan_detect import sniff_wan
from velox.tiny import sana as tiny_sana
from velox.tiny import wan as tiny_wan

# Relative RMS bound of a block type on these tiny weights (test_gguf_quantize.py measures Gaussian ones).
BOUND = {Q.Q8_0: 0.006, Q.Q4_K: 0.08, Q.Q6_K: 0.02}


pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # tests/unit/conftest.py


@pytest.fixture(scope="module")
def wan_t2v() -> dict[str, torch.Tensor]:
    return tiny_wan.tiny_wan_state_dict(tiny_wan.TINY_WAN_CONFIGS["t2v"])


@pytest.fixture(scope="module")
def sana_pe() -> tuple:
    config = tiny_sana.TINY_SANA_CONFIGS["sana_4k_pe"]
    return config, tiny_sana.tiny_sana_state_dict(config)


def logical(record) -> torch.Tensor:
    return dequantize_torch(record_as_torch(record), record.qtype, record.shape)


def check_against_gguf_py(path) -> dict:
    """Our reader and gguf-py's agree on every tensor: name, type, bytes, and shape (restored)."""
    ours = read_gguf(path)
    theirs = gguf.GGUFReader(str(path))
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for tensor in theirs.tensors:
        record = ours.tensors[tensor.name]
        assert record.qtype == int(tensor.tensor_type)
        assert np.array_equal(record.data.reshape(-1), tensor.data.view(np.uint8).reshape(-1))
        stored = tuple(reversed(tensor.shape.tolist()))
        orig = theirs.get_field(f"comfy.gguf.orig_shape.{tensor.name}")
        expected = stored if orig is None else tuple(int(orig.parts[i][0]) for i in orig.data)
        assert record.shape == expected
    return ours.tensors


def check_values(records, canonical: dict[str, torch.Tensor], *requested: Q) -> None:
    assert set(records) == set(canonical)
    for name, tensor in canonical.items():
        record, exact = records[name], tensor.float()
        assert record.shape == tuple(tensor.shape), name
        values = logical(record)
        if record.qtype in (Q.F32, Q.BF16, Q.F16):
            assert torch.equal(values, exact.to({Q.F32: torch.float32, Q.BF16: torch.bfloat16,
                                                 Q.F16: torch.float16}[Q(record.qtype)]).float()), name
        else:
            assert record.qtype in requested
            error = ((values - exact).pow(2).mean() / exact.pow(2).mean()).sqrt().item()
            assert error <= BOUND[Q(record.qtype)], f"{name}: {error}"


@pytest.mark.parametrize("layout", ["official", "comfyui", "diffusers"])
def test_tiny_wan_every_layout_converts_to_the_canonical_tensors(tmp_path, wan_t2v, layout):
    writer = {"official": tiny_wan.write_official_file, "comfyui": tiny_wan.write_comfyui_file,
              "diffusers": tiny_wan.write_diffusers_file}[layout]
    source = writer(wan_t2v, tmp_path / "wan.safetensors")
    report = convert_to_gguf(source, tmp_path / "wan.gguf", "Q8_0")
    records = check_against_gguf_py(tmp_path / "wan.gguf")
    variant, canonical = sniff_wan(wan_t2v)
    check_values(records, canonical, Q.Q8_0)
    quantized = {c.name for c in report.tensors if c.qtype == Q.Q8_0}
    assert "blocks.0.self_attn.q.weight" in quantized and "blocks.1.ffn.2.weight" in quantized
    for name in ("patch_embedding.weight", "text_embedding.0.weight", "time_projection.1.weight",
                 "head.head.weight", "blocks.0.modulation", "blocks.0.norm3.weight", "blocks.0.ffn.0.bias"):
        assert name not in quantized
    contents = read_gguf(tmp_path / "wan.gguf")
    assert contents.architecture == "wan" and contents.metadata["general.file_type"] == 7
    assert contents.metadata["comfy.gguf.orig_shape.patch_embedding.weight"] == [256, 16, 1, 2, 2]
    assert contents.tensors["blocks.0.modulation"].qtype == Q.F32  # city96 keeps modulation F32
    detection = detect_gguf(contents)
    assert (detection.family, detection.detail) == ("wan", variant)


@pytest.mark.parametrize("recipe, counts, file_type", [
    ("Q4_K", {"Q4_K": 20}, 14),  # q, k, v, o of both attentions and ffn.0 / ffn.2, in 2 blocks
    ("Q6_K", {"Q6_K": 20}, 18),
    ("Q4_K_M", {"Q4_K": 14, "Q6_K": 6}, 15),  # the _M mix: self/cross-attention V and FFN-down in Q6_K
])
def test_tiny_wan_k_quants_and_the_m_mix(tmp_path, wan_t2v, recipe, counts, file_type):
    source = tiny_wan.write_official_file(wan_t2v, tmp_path / "wan.safetensors")
    report = convert_to_gguf(source, tmp_path / "wan.gguf", recipe)
    check_values(check_against_gguf_py(tmp_path / "wan.gguf"), sniff_wan(wan_t2v)[1], *map(Q.__getitem__, counts))
    assert {k: v for k, v in report.type_counts().items() if k in ("Q4_K", "Q6_K")} == counts
    assert read_gguf(tmp_path / "wan.gguf").metadata["general.file_type"] == file_type
    if recipe == "Q4_K_M":
        types = {c.name: Q(c.qtype).name for c in report.tensors}
        assert types["blocks.0.cross_attn.v.weight"] == types["blocks.1.ffn.2.weight"] == "Q6_K"
        assert types["blocks.0.self_attn.q.weight"] == types["blocks.0.ffn.0.weight"] == "Q4_K"


def test_tiny_sana_official_pth_and_diffusers_folder_give_the_same_file_tensors(tmp_path, sana_pe):
    config, state_dict = sana_pe
    official = tiny_sana.write_official_pth(tmp_path / "sana.pth", state_dict)
    folder = tiny_sana.write_diffusers_folder(tmp_path / "sana_diffusers", config, state_dict, shards=2)
    convert_to_gguf(official, tmp_path / "a.gguf", "Q8_0")
    convert_to_gguf(folder, tmp_path / "b.gguf", "Q8_0")
    first, second = check_against_gguf_py(tmp_path / "a.gguf"), check_against_gguf_py(tmp_path / "b.gguf")
    detected, canonical = sniff_sana(state_dict)
    check_values(first, canonical, Q.Q8_0)
    for name, record in first.items():  # the fused qkv of the diffusers folder is the official one
        assert np.array_equal(record.data, second[name].data), name
    assert first["blocks.0.attn.qkv.weight"].qtype == Q.Q8_0
    assert first["blocks.0.mlp.depth_conv.conv.weight"].qtype == Q.F32
    assert first["blocks.0.mlp.inverted_conv.conv.weight"].shape == (320, 64)  # 1x1 conv as a linear
    for path in ("a.gguf", "b.gguf"):
        detection = detect_gguf(read_gguf(tmp_path / path))
        assert detection.family == "sana"
        assert detection.detail.model_kwargs() == config.model_kwargs() == detected.model_kwargs()
        # The 4K-style position embedding is not in any shape: the converter records the config.
        recorded = sana_config_from_metadata(read_gguf(tmp_path / path).metadata)
        assert (recorded.use_pe, recorded.pe_interpolation) == (True, 2.0)


def test_tiny_dynamicrafter_release_file_quantizes_only_unet_matrices(tmp_path):
    from velox.loaders.videocrafter_detect import detect_variant, split_components
    from velox.tiny.videocrafter import demo_release_state_dict

    state_dict = demo_release_state_dict("dc512")
    save_file(state_dict, str(tmp_path / "dynamicrafter_512.safetensors"))
    report = convert_to_gguf(tmp_path / "dynamicrafter_512.safetensors", tmp_path / "dc.gguf", "Q8_0")
    records = check_against_gguf_py(tmp_path / "dc.gguf")
    check_values(records, state_dict, Q.Q8_0)
    quantized = [c.name for c in report.tensors if c.qtype == Q.Q8_0]
    assert quantized and all(n.startswith("model.diffusion_model.") and len(records[n].shape) == 2
                             for n in quantized)
    assert not any("time_embed" in n or "emb_layers" in n for n in quantized)
    detection = detect_gguf(read_gguf(tmp_path / "dc.gguf"))
    assert detection.family == "videocrafter"
    assert detection.detail.name == detect_variant(split_components(state_dict)).name == "DynamiCrafter 512"


def test_bare_videocrafter_unet_quantizes_its_matrices(tmp_path):
    """A UNet saved on its own (no ``model.diffusion_model.`` prefix) gets block types like a release file."""
    from velox.tiny.videocrafter import demo_release_state_dict

    prefix = "model.diffusion_model."
    state_dict = {k[len(prefix):]: v for k, v in demo_release_state_dict("vc2").items() if k.startswith(prefix)}
    save_file(state_dict, str(tmp_path / "vc2_unet.safetensors"))
    report = convert_to_gguf(tmp_path / "vc2_unet.safetensors", tmp_path / "vc2_unet.gguf", "Q8_0")
    quantized = [c.name for c in report.tensors if c.qtype == Q.Q8_0]
    assert quantized and not any("time_embed" in n or n.startswith("out.") for n in quantized)


def test_groups_are_read_one_at_a_time_and_each_tensor_once(tmp_path, sana_pe, count_tensor_loads):
    config, state_dict = sana_pe
    folder = tiny_sana.write_diffusers_folder(tmp_path / "sana_diffusers", config, state_dict)
    loads = count_tensor_loads(gguf_convert)
    convert_to_gguf(folder, tmp_path / "s.gguf", "Q8_0")
    assert sorted(loads) == sorted(set(loads))
    blocks = [int(n.split(".")[1]) for n in loads if n.startswith("transformer_blocks.")]
    assert blocks == sorted(blocks)  # block 0's tensors all come before block 1's


def test_float_fallbacks_and_fp16_overflow(tmp_path):
    source = tmp_path / "generic.safetensors"
    wide = torch.randn(64, 256)
    wide[3, 5] = 1e6  # beyond fp16
    save_file({"odd.weight": torch.randn(64, 48), "wide.weight": wide, "bf.weight": torch.randn(64, 256).bfloat16()},
              str(source))
    report = convert_to_gguf(source, tmp_path / "q.gguf", "Q4_K", family="generic")
    choices = {c.name: c for c in report.tensors}
    assert choices["odd.weight"].qtype == Q.F32 and "not whole Q4_K blocks" in choices["odd.weight"].note
    assert choices["bf.weight"].qtype == Q.Q4_K
    report = convert_to_gguf(source, tmp_path / "h.gguf", "F16", family="generic")
    choices = {c.name: c for c in report.tensors}
    assert choices["wide.weight"].qtype == Q.BF16 and "fp16 range" in choices["wide.weight"].note
    records = check_against_gguf_py(tmp_path / "h.gguf")
    assert records["wide.weight"].qtype == Q.BF16 and records["odd.weight"].qtype == Q.F16
    assert logical(records["wide.weight"])[3, 5].item() == 1e6 // 4096 * 4096  # bf16 keeps the range


def test_text_encoder_keeps_tokenizer_bytes_and_is_detected(tmp_path):
    source = tiny_wan.write_tiny_umt5_file(tmp_path / "umt5.safetensors")
    report = convert_to_gguf(source, tmp_path / "umt5.gguf", "Q8_0")
    contents = read_gguf(tmp_path / "umt5.gguf")
    assert report.family == "t5encoder" and contents.architecture == "t5encoder"
    spiece = contents.metadata["velox.bytes.spiece_model"]
    assert isinstance(spiece, bytes) and spiece[:2] == bytes(tiny_wan.tiny_umt5_state_dict()["spiece_model"][:2])
    assert contents.tensors["shared.weight"].qtype != Q.Q8_0  # embeddings stay float
    detection = detect_gguf(contents)
    assert detection.family == "umt5" and detection.key_map["shared.weight"] == "shared.weight"


def test_llama_cpp_text_encoder_names_map_back_to_hf(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gemma.gguf"), "gemma2")
    for name, shape in {"token_embd.weight": (64, 32), "output_norm.weight": (32,),
                        "blk.0.attn_q.weight": (32, 32), "blk.0.post_ffw_norm.weight": (32,),
                        "blk.0.ffn_norm.weight": (32,)}.items():
        writer.add_tensor(name, np.zeros(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    detection = detect_gguf(read_gguf(tmp_path / "gemma.gguf"))
    assert detection.family == "gemma2" and "llama.cpp names" in detection.variant
    assert detection.key_map["blk.0.ffn_norm.weight"] == "model.layers.0.pre_feedforward_layernorm.weight"
    assert detection.key_map["token_embd.weight"] == "model.embed_tokens.weight"
    assert detection.value_offset("model.layers.0.post_feedforward_layernorm.weight") == -1.0
    assert detection.value_offset("model.layers.0.self_attn.q_proj.weight") == 0.0
    assert gguf_to_hf_name("enc.blk.3.attn_rel_b.weight", "umt5") == \
        "encoder.block.3.layer.0.SelfAttention.relative_attention_bias.weight"
    assert gguf_to_hf_name("enc.blk.0.ffn_gate.weight", "umt5") == "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    assert gguf_to_hf_name("token_embd.weight", "umt5") == "shared.weight"


def test_city96_style_wan_file_is_detected_with_its_5d_patch_embedding(tmp_path, wan_t2v):
    # city96: official names, arch "wan", 1-D / modulation in F32, the 5-D Conv3d weight as 5-D F32.
    writer = gguf.GGUFWriter(str(tmp_path / "city96.gguf"), "wan")
    for name, tensor in wan_t2v.items():
        array = tensor.numpy()
        if tensor.ndim == 2 and "embedding" not in name and not name.startswith("head."):
            writer.add_tensor(name, gguf.quants.quantize(array, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    contents = read_gguf(tmp_path / "city96.gguf")
    assert contents.tensors["patch_embedding.weight"].shape == (256, 16, 1, 2, 2)
    detection = detect_gguf(contents)
    assert detection.family == "wan" and detection.detail == sniff_wan(wan_t2v)[0]


def test_bad_requests_are_refused_clearly(tmp_path, wan_t2v):
    source = tiny_wan.write_official_file(wan_t2v, tmp_path / "wan.safetensors")
    with pytest.raises(ValueError, match="qtype 'IQ2_XXS' is not one of"):
        convert_to_gguf(source, tmp_path / "x.gguf", "IQ2_XXS")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            convert_to_gguf(source, tmp_path / "x.gguf", device="cuda")
    with pytest.raises(ValueError, match="family 'flux'"):
        convert_to_gguf(source, tmp_path / "x.gguf", family="flux")
    save_file({"a.weight": torch.zeros(4, 4), "a.scale_weight": torch.ones(1)}, str(tmp_path / "fp8.safetensors"))
    with pytest.raises(VeloxLoadError, match="scaled-fp8"):
        convert_to_gguf(tmp_path / "fp8.safetensors", tmp_path / "x.gguf")
    nan = torch.zeros(64, 64)
    nan[1, 2] = float("nan")
    save_file({"model.layers.0.self_attn.q_proj.weight": nan}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match="q_proj.weight: cannot quantize to Q8_0: the weight has inf or NaN"):
        convert_to_gguf(tmp_path / "nan.safetensors", tmp_path / "x.gguf")  # written half-way: removed
    save_file({"mystery.weight": torch.zeros(4, 4)}, str(tmp_path / "mystery.safetensors"))
    with pytest.raises(VeloxLoadError, match="matches no family"):
        convert_to_gguf(tmp_path / "mystery.safetensors", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.part").exists()


def test_detection_refuses_an_unknown_gguf(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(VeloxLoadError, match="llama.gguf: GGUF of architecture 'llama'"):
        detect_gguf(read_gguf(tmp_path / "llama.gguf"))


def test_cli_converts_and_refuses_to_overwrite(tmp_path, wan_t2v, capsys):
    import convert_to_gguf as cli  # scripts/ is on sys.path (tests/conftest.py)

    source = tiny_wan.write_official_file(wan_t2v, tmp_path / "wan.safetensors")
    assert cli.main([str(source), "--type", "q8_0", "--quiet"]) == 0
    destination = tmp_path / "wan-Q8_0.gguf"
    assert destination.is_file() and "Q8_0" in capsys.readouterr().out
    assert cli.main([str(source), "--type", "Q8_0", "--quiet"]) == 2
    assert cli.main([str(source), str(destination), "--type", "Q3_K", "--overwrite", "--quiet"]) == 1
    assert struct.unpack("<I", destination.read_bytes()[4:8])[0] == 3


def test_sources_old_pickles_load_whole_and_corrupt_ones_are_refused(tmp_path):
    from velox.loaders.gguf_source import open_checkpoint

    torch.save({"state_dict": {"a.weight": torch.randn(4, 4)}}, tmp_path / "old.pth",
               _use_new_zipfile_serialization=False)
    checkpoint = open_checkpoint(tmp_path / "old.pth")
    assert list(checkpoint.meta) == ["a.weight"] and "read whole" in checkpoint.notes[0]
    assert checkpoint.meta["a.weight"].is_meta and checkpoint.load("a.weight").shape == (4, 4)
    (tmp_path / "bad.pth").write_bytes(b"garbage" * 10)
    with pytest.raises(VeloxLoadError, match="bad.pth"):
        open_checkpoint(tmp_path / "bad.pth")
    with pytest.raises(VeloxLoadError, match="file not found"):
        open_checkpoint(tmp_path / "absent.safetensors")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_conversion_writes_the_cpu_bytes(tmp_path, wan_t2v):
    source = tiny_wan.write_official_file(wan_t2v, tmp_path / "wan.safetensors")
    convert_to_gguf(source, tmp_path / "cpu.gguf", "Q4_K_M")
    convert_to_gguf(source, tmp_path / "gpu.gguf", "Q4_K_M", device="cuda")
    assert (tmp_path / "cpu.gguf").read_bytes() == (tmp_path / "gpu.gguf").read_bytes()


def test_hf_named_gemma_gguf_norms_get_no_offset(tmp_path):
    """Only llama.cpp's names mean 1 + w norms; our converter keeps HF names and the values as they are."""
    writer = gguf.GGUFWriter(str(tmp_path / "gemma_hf.gguf"), "gemma2")
    for name, shape in {"model.embed_tokens.weight": (64, 32), "model.layers.0.self_attn.q_proj.weight": (32, 32),
                        "model.layers.0.post_feedforward_layernorm.weight": (32,)}.items():
        writer.add_tensor(name, np.zeros(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    detection = detect_gguf(read_gguf(tmp_path / "gemma_hf.gguf"))
    assert "HF names" in detection.variant
    assert detection.value_offset("model.layers.0.post_feedforward_layernorm.weight") == 0.0
