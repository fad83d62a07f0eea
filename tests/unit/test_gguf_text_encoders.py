"""GGUF text encoders through the loaders' own paths: umT5 (``wan_loading.load_umt5``, VeloxUMT5Loader)
and Gemma-2 (``sana_text_encoder.load_sana_text_encoder``, VeloxGemmaLoader).

Each GGUF is compared with the same weights dequantized and saved as a safetensors file of the
layout the loader already reads (relative L2 <= 1e-6, fp32 on the CPU): files from our converter
(HF names, tokenizer bytes in metadata) and llama.cpp-named files written with gguf-py (tokenizer
rebuilt from ``tokenizer.ggml.*``, Gemma norms stored as 1 + w). Q8_0 Linear weights must stay
packed in the loaded model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from velox.errors import VeloxLoadError
from velox.loaders.gguf_text_keys import GEMMA2_TO_HF, T5_TO_HF
from velox.tiny import gemma as tiny_gemma
from velox.tiny import wan as tiny_wan

gguf = pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")
Q = gguf.GGMLQuantizationType
RTOL = 1e-6
PROMPTS = ("a red fox running through fresh snow at sunrise", "一只红色的狐狸在雪地里奔跑")
GEMMA_PROMPT = "a small fluffy white cat curled up sleeping on a warm windowsill"


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def dequantized(path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF as fp32 under the file's own names (gguf-py's dequantizer)."""
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    out = {}
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        out[tensor.name] = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
    return out


def hf_name_to_llama_cpp(table) -> Callable[[str], str]:
    """The inverse of a ``gguf_text_keys`` table: HF name -> llama.cpp name."""
    inverse = []
    for pattern, replacement in table:
        hf = "^" + re.escape(replacement).replace(re.escape("\\1"), r"(\d+)") + "$"
        llama = pattern[1:-1].replace(r"(\d+)", r"\1").replace("\\.", ".")
        inverse.append((hf, llama))

    def convert(name: str) -> str:
        for hf, llama in inverse:
            if re.match(hf, name):
                return re.sub(hf, llama, name)
        raise KeyError(name)
    return convert


def tokenizer_metadata(writer, spiece_model: bytes, kind: str) -> None:
    """What llama.cpp's converter writes for a SentencePiece vocabulary."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spiece_model)
    writer.add_tokenizer_model(kind)
    writer.add_token_list([piece.piece for piece in proto.pieces])
    writer.add_token_scores([piece.score for piece in proto.pieces])
    writer.add_token_types([int(piece.type) for piece in proto.pieces])
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    for role, add in (("unk", writer.add_unk_token_id), ("bos", writer.add_bos_token_id),
                      ("eos", writer.add_eos_token_id), ("pad", writer.add_pad_token_id)):
        if getattr(trainer, f"{role}_id") >= 0:
            add(getattr(trainer, f"{role}_id"))
    writer.add_add_space_prefix(normalizer.add_dummy_prefix)
    writer.add_remove_extra_whitespaces(normalizer.remove_extra_whitespaces)
    if normalizer.precompiled_charsmap:
        writer.add_precompiled_charsmap(normalizer.precompiled_charsmap)


def write_llama_cpp_file(path, architecture: str, tensors: dict[str, torch.Tensor], quantized, metadata) -> None:
    """gguf-py's GGUFWriter, Q8_0 for names ``quantized(name)`` accepts, F32 otherwise."""
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(path), architecture)
    metadata(writer)
    for name, value in tensors.items():
        array = value.float().numpy()
        if quantized(name):
            packed = quantize(array, Q.Q8_0)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----------------------------------------------------------------------------------------------
# umT5
# ----------------------------------------------------------------------------------------------


def umt5_encode(clip, prompt: str) -> torch.Tensor:
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0][0]


def umt5_block_q(clip):
    return clip.cond_stage_model.umt5xxl.transformer.encoder.block[0].layer[0].SelfAttention.q


@pytest.fixture(scope="module")
def umt5_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("umt5")
    return tiny_wan.write_tiny_umt5_file(folder / "umt5.safetensors"), folder


def test_converted_umt5_gguf_encodes_as_its_dequantized_safetensors(comfy_host, umt5_source):
    from velox.host.wan_loading import load_umt5
    from velox.loaders.gguf_convert import convert_to_gguf

    source, folder = umt5_source
    convert_to_gguf(source, folder / "umt5_q8.gguf", "Q8_0")
    reference = dequantized(folder / "umt5_q8.gguf")
    reference["spiece_model"] = tiny_wan.tiny_umt5_state_dict()["spiece_model"]
    save_file(reference, str(folder / "umt5_deq.safetensors"))

    ours, ref = load_umt5(folder / "umt5_q8.gguf"), load_umt5(folder / "umt5_deq.safetensors")
    q = umt5_block_q(ours)
    assert q.weight.dtype == torch.uint8 and q.gguf_qtype == Q.Q8_0  # stays packed
    assert ours.patcher.model_size() < ref.patcher.model_size()  # memory counted at the packed size
    for prompt in PROMPTS:
        assert ours.tokenize(prompt) == ref.tokenize(prompt)
        assert rel_l2(umt5_encode(ours, prompt), umt5_encode(ref, prompt)) <= RTOL


def test_llama_cpp_umt5_gguf_rebuilds_its_tokenizer_and_encodes_the_same(comfy_host, umt5_source, tmp_path):
    from velox.host.wan_loading import load_umt5

    weights = tiny_wan.tiny_umt5_state_dict()
    spiece = weights.pop("spiece_model")
    to_llama = hf_name_to_llama_cpp(T5_TO_HF)
    tensors = {to_llama(name): value for name, value in weights.items()}
    assert "enc.blk.1.attn_rel_b.weight" in tensors and "token_embd.weight" in tensors

    def metadata(writer):
        tokenizer_metadata(writer, spiece.numpy().tobytes(), "t5")

    write_llama_cpp_file(tmp_path / "umt5_lcpp.gguf", "t5encoder", tensors,
                         lambda name: re.search(r"attn_[qkvo]\.|ffn_", name) is not None, metadata)
    deq = dequantized(tmp_path / "umt5_lcpp.gguf")
    reference = {name: deq[to_llama(name)] for name in weights}
    reference["spiece_model"] = spiece
    save_file(reference, str(tmp_path / "umt5_deq.safetensors"))

    ours, ref = load_umt5(tmp_path / "umt5_lcpp.gguf"), load_umt5(tmp_path / "umt5_deq.safetensors")
    assert umt5_block_q(ours).weight.dtype == torch.uint8
    for prompt in PROMPTS + (tiny_wan.WAN_NEGATIVE_PROMPT_ZH, "Ｆｕｌｌ－width  text,   spaces"):
        assert ours.tokenize(prompt) == ref.tokenize(prompt), prompt
        assert rel_l2(umt5_encode(ours, prompt), umt5_encode(ref, prompt)) <= RTOL


def test_llama_cpp_gguf_without_a_usable_tokenizer_is_refused_clearly(comfy_host, tmp_path):
    from velox.host.wan_loading import load_umt5

    weights = tiny_wan.tiny_umt5_state_dict()
    weights.pop("spiece_model")
    tensors = {hf_name_to_llama_cpp(T5_TO_HF)(k): v for k, v in weights.items()}
    write_llama_cpp_file(tmp_path / "bare.gguf", "t5encoder", tensors, lambda name: False, lambda writer: None)
    with pytest.raises(VeloxLoadError, match=r"bare.gguf: holds the weights but no tokenizer.*tokenizer.ggml.tokens"):
        load_umt5(tmp_path / "bare.gguf")

    def gpt2_vocabulary(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["a", "b"])

    write_llama_cpp_file(tmp_path / "bpe.gguf", "t5encoder", tensors, lambda name: False, gpt2_vocabulary)
    with pytest.raises(VeloxLoadError, match=r"bpe.gguf: has a 'gpt2' tokenizer.*convert_to_gguf"):
        load_umt5(tmp_path / "bpe.gguf")


# ----------------------------------------------------------------------------------------------
# Gemma-2
# ----------------------------------------------------------------------------------------------


def gemma_encode(clip, prompt: str, chi: bool = True) -> torch.Tensor:
    cond, extra = clip.encode_from_tokens_scheduled(clip.tokenize(prompt, sana_chi=chi))[0]
    return cond


def gemma_block_q(clip):
    return clip.cond_stage_model.gemma2_2b.transformer.model.layers[0].self_attn.q_proj


@pytest.fixture(scope="module")
def gemma_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma")
    return tiny_gemma.write_tiny_gemma_single_file(folder / "gemma.safetensors"), folder


def _gemma_reference(weights: dict, spiece: torch.Tensor, config: dict, path) -> None:
    from velox.loaders.sana_text import GEMMA2_CONFIG_METADATA_KEY

    save_file({**weights, "spiece_model": spiece}, str(path),
              metadata={GEMMA2_CONFIG_METADATA_KEY: json.dumps(config)})


def test_converted_gemma_gguf_encodes_as_its_dequantized_safetensors(comfy_host, gemma_source):
    from velox.host.sana_text_encoder import load_sana_text_encoder
    from velox.loaders.gguf_convert import convert_to_gguf
    from velox.loaders.sana_text import GEMMA2_CONFIG_METADATA_KEY

    source, folder = gemma_source
    convert_to_gguf(source, folder / "gemma_q8.gguf", "Q8_0")
    with safe_open(str(source), framework="pt") as handle:
        spiece, config = handle.get_tensor("spiece_model"), json.loads(handle.metadata()[GEMMA2_CONFIG_METADATA_KEY])
    _gemma_reference(dequantized(folder / "gemma_q8.gguf"), spiece, config, folder / "gemma_deq.safetensors")

    ours = load_sana_text_encoder(folder / "gemma_q8.gguf")
    ref = load_sana_text_encoder(folder / "gemma_deq.safetensors")
    assert gemma_block_q(ours).weight.dtype == torch.uint8 and gemma_block_q(ours).gguf_qtype == Q.Q8_0
    assert rel_l2(gemma_encode(ours, GEMMA_PROMPT), gemma_encode(ref, GEMMA_PROMPT)) <= RTOL
    assert rel_l2(gemma_encode(ours, "blurry", False), gemma_encode(ref, "blurry", False)) <= RTOL


def test_llama_cpp_gemma_gguf_maps_names_norms_config_and_tokenizer(comfy_host, gemma_source, tmp_path):
    """llama.cpp names, norms as 1 + w, a Q8_0 token embedding, config from gemma2.* and the tokenizer
    from tokenizer.ggml.* ("llama" = SentencePiece BPE). llama.cpp keeps no query_pre_attn_scalar
    (it scales by the key length), so the reference config says head_dim there too."""
    from velox.host.sana_text_encoder import load_sana_text_encoder

    source, _ = gemma_source
    with safe_open(str(source), framework="pt") as handle:
        spiece = handle.get_tensor("spiece_model")
        weights = {k: handle.get_tensor(k) for k in handle.keys() if k != "spiece_model"}
    config = tiny_gemma.tiny_gemma_config(weights["model.embed_tokens.weight"].shape[0])
    to_llama = hf_name_to_llama_cpp(GEMMA2_TO_HF)
    tensors = {to_llama(k): v + 1.0 if k.endswith("norm.weight") else v for k, v in weights.items()}

    def metadata(writer):
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(config["num_attention_heads"])
        writer.add_head_count_kv(config["num_key_value_heads"])
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])
        tokenizer_metadata(writer, spiece.numpy().tobytes(), "llama")

    write_llama_cpp_file(tmp_path / "gemma_lcpp.gguf", "gemma2", tensors,
                         lambda name: re.search(r"token_embd|attn_[qkv]\.|attn_output|ffn_(gate|up|down)", name) is not None,
                         metadata)
    deq = dequantized(tmp_path / "gemma_lcpp.gguf")
    reference = {k: deq[to_llama(k)] - 1.0 if k.endswith("norm.weight") else deq[to_llama(k)] for k in weights}
    _gemma_reference(reference, spiece, {**config, "query_pre_attn_scalar": config["head_dim"]},
                     tmp_path / "gemma_deq.safetensors")

    ours = load_sana_text_encoder(tmp_path / "gemma_lcpp.gguf", dtype=torch.float32)
    ref = load_sana_text_encoder(tmp_path / "gemma_deq.safetensors")
    assert gemma_block_q(ours).weight.dtype == torch.uint8
    for prompt in (GEMMA_PROMPT, "Cyberpunk alley\nwith  neon 24H"):
        assert ours.tokenize(prompt) == ref.tokenize(prompt)
        assert rel_l2(gemma_encode(ours, prompt), gemma_encode(ref, prompt)) <= RTOL


# ----------------------------------------------------------------------------------------------
# wrong family
# ----------------------------------------------------------------------------------------------


def test_a_gguf_of_another_family_is_a_clear_error(comfy_host, umt5_source, gemma_source):
    from velox.host.sana_text_encoder import load_sana_text_encoder
    from velox.host.wan_loading import load_umt5
    from velox.loaders.gguf_convert import convert_to_gguf

    umt5_file, umt5_folder = umt5_source
    gemma_file, gemma_folder = gemma_source
    convert_to_gguf(umt5_file, umt5_folder / "umt5_f16.gguf", "F16")
    convert_to_gguf(gemma_file, gemma_folder / "gemma_f16.gguf", "F16")
    with pytest.raises(VeloxLoadError, match=r"umt5_f16.gguf: is a GGUF of a umT5 / T5 encoder .*not of Gemma-2"):
        load_sana_text_encoder(umt5_folder / "umt5_f16.gguf")
    with pytest.raises(VeloxLoadError, match=r"gemma_f16.gguf: is a GGUF of Gemma-2 .*not of a umT5"):
        load_umt5(gemma_folder / "gemma_f16.gguf")
    wan = tiny_wan.write_official_file(tiny_wan.tiny_wan_state_dict(tiny_wan.TinyWanConfig("tiny_t2v", dim=64, ffn_dim=64, num_layers=1)),
                                       umt5_folder / "wan.safetensors")
    convert_to_gguf(wan, umt5_folder / "wan.gguf", "Q8_0")
    with pytest.raises(VeloxLoadError, match=r"wan.gguf: is a GGUF of a Wan transformer"):
        load_umt5(umt5_folder / "wan.gguf")


def test_both_loaders_list_gguf_files_in_text_encoders(comfy_host, tmp_path, monkeypatch):
    import folder_paths

    from velox.nodes.sana_nodes import GemmaLoader
    from velox.nodes.wan_nodes import UMT5Loader

    folder = tmp_path / "text_encoders"
    folder.mkdir()
    for name in ("umt5-xxl-encoder-Q8_0.gguf", "gemma-2-2b-it-Q4_K_M.gguf", "notes.txt"):
        (folder / name).write_bytes(b"GGUF")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "text_encoders",
                        ([str(folder)], folder_paths.supported_pt_extensions))
    folder_paths.filename_list_cache.clear()
    try:
        for node in (UMT5Loader, GemmaLoader):
            combo = next(i for i in node.define_schema().inputs if i.id == "text_encoder_name")
            assert combo.options[:2] == ["gemma-2-2b-it-Q4_K_M.gguf", "umt5-xxl-encoder-Q8_0.gguf"], node
    finally:
        folder_paths.filename_list_cache.clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_text_encoders_move_to_the_gpu_and_encode_as_on_the_cpu(comfy_host, umt5_source, gemma_source):
    """ComfyUI builds them on the offload device (CPU) and moves the packed bytes to the GPU to encode."""
    from velox.host.gguf_text_encoders import load_gemma2_gguf, load_umt5_gguf
    from velox.loaders.gguf_convert import convert_to_gguf

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    umt5_file, umt5_folder = umt5_source
    gemma_file, gemma_folder = gemma_source
    convert_to_gguf(umt5_file, umt5_folder / "umt5_gpu.gguf", "Q8_0")
    convert_to_gguf(gemma_file, gemma_folder / "gemma_gpu.gguf", "Q8_0")
    on_gpu = load_umt5_gguf(umt5_folder / "umt5_gpu.gguf", {"load_device": cuda, "offload_device": cpu})
    on_cpu = load_umt5_gguf(umt5_folder / "umt5_gpu.gguf", {"load_device": cpu, "offload_device": cpu})
    assert rel_l2(umt5_encode(on_gpu, PROMPTS[0]), umt5_encode(on_cpu, PROMPTS[0])) <= 1e-3
    assert umt5_block_q(on_gpu).weight.dtype == torch.uint8
    gemma_gpu = load_gemma2_gguf(gemma_folder / "gemma_gpu.gguf", torch.float32, "cuda")
    gemma_cpu = load_gemma2_gguf(gemma_folder / "gemma_gpu.gguf", torch.float32, "cpu")
    assert rel_l2(gemma_encode(gemma_gpu, GEMMA_PROMPT), gemma_encode(gemma_cpu, GEMMA_PROMPT)) <= 1e-3
