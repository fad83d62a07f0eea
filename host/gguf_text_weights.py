"""GGUF text encoders' weights, tokenizer and config for native ComfyUI CLIPs: what umT5 (Wan's
``VeloxUMT5Loader``, ``wan_loading.load_umt5_gguf``) and Gemma-2 (Sana's ``VeloxGemmaLoader``,
``sana_text_encoder.load_gemma2_gguf``) share, on core's own T5 / Gemma-2 classes with
``host/quant_ops`` as their operations. Nothing family-specific is built here.

Files read:
- ours (``loaders/gguf_convert.py``): HF tensor names, the SentencePiece model as bytes in the
  metadata ``velox.bytes.spiece_model``, Gemma's config.json in ``velox.safetensors_metadata.gemma2_config``;
- llama.cpp's / city96's (``enc.blk.N.attn_q.weight`` / ``blk.N.attn_q.weight``): names mapped back
  by ``loaders/gguf_detect`` (Gemma's norms, stored as ``1 + w``, get 1 subtracted), the tokenizer
  rebuilt from ``tokenizer.ggml.*`` (``rebuild_spiece_model``), Gemma's config from ``gemma2.*``.

Weights: block-quantized Linear weights stay packed (``PackedWeight`` -> ``QuantLinear``, dequantized
per call to the activation dtype); anything else quantized (a Q8_0 token embedding) is dequantized
once at load, to its parameter's dtype. The CLIP's dtype is the token embedding's when it is stored
as a float (so a converted fp32 file computes exactly as its dequantized safetensors twin), else
core's text-encoder default (umT5) or bf16 (Gemma-2). The model is built on the offload device and
ComfyUI moves the packed bytes to the GPU when it encodes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.text_encoders.wan
import torch

from ..errors import VeloxLoadError
from ..loaders.families import FAMILIES
from ..loaders.gguf_detect import detect_gguf
from ..loaders.gguf_reader import GGUFContents, read_gguf, record_as_torch
from ..loaders.gguf_text_keys import is_llama_cpp_layout
from .quant_loading import Weights
from .quant_ops import QuantLinear, make_quant_operations
from .quant_tensor import PackedWeight

SPIECE_METADATA_KEY = "velox.bytes.spiece_model"  # what our converter makes of a `spiece_model` tensor
# config.json as our converter keeps it: a single file's safetensors metadata, or a folder's config.json
GEMMA2_CONFIG_KEYS = ("velox.safetensors_metadata.gemma2_config", "velox.diffusers_config")
FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGML F32, F16, BF16
# tokenizer.ggml.model -> SentencePiece ModelProto.TrainerSpec.ModelType (1 unigram: T5; 2 BPE: Gemma, Llama)
SPM_MODEL_TYPES = {"t5": 1, "llama": 2}
FAMILY_WORDS = {family.name: family.noun for family in FAMILIES.values()}
TOKENIZER_NEEDED = ("a GGUF with its tokenizer: one converted by Velox (scripts/convert_to_gguf.py, which keeps "
                    "the SentencePiece model as velox.bytes.spiece_model), or a llama.cpp file with "
                    "tokenizer.ggml.tokens / scores / token_type")


@dataclass(frozen=True)
class TextEncoderGGUF:
    """A text-encoder GGUF under HF names: ``weights`` (float tensors and ``PackedWeight``s), the
    SentencePiece model (``spiece_model`` bytes) and the file's metadata."""

    path: Path
    weights: Weights
    spiece_model: bytes
    metadata: Mapping[str, object]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(value.shape) for name, value in self.weights.items()}


def read_text_encoder_gguf(path: str | Path, family: str, expected: str) -> TextEncoderGGUF:
    """A GGUF of ``family`` (``umt5`` / ``gemma2``) -> HF-named weights and tokenizer; VeloxLoadError
    naming what the file holds when it is another family or lacks a tokenizer."""
    contents = read_gguf(path)
    detection = detect_gguf(contents)
    if detection.family != family:
        what = FAMILY_WORDS.get(detection.family, detection.family)
        raise VeloxLoadError(contents.path, f"is a GGUF of {what} ({detection.variant}), not of "
                             f"{FAMILY_WORDS[family]}", expected)
    # value offsets belong to llama.cpp's layout only: our converter stores Gemma's norms as HF does
    llama_cpp = is_llama_cpp_layout(contents.tensors, family)
    weights: Weights = {}
    for name, record in contents.tensors.items():
        hf_name = detection.key_map.get(name, name)
        value = _record_weight(record)
        offset = detection.value_offset(hf_name) if llama_cpp else 0.0
        if offset:  # llama.cpp's Gemma norms (1 + w): a few small vectors, computed on in fp32
            value = _dense(value, torch.float32) + offset
        weights[hf_name] = value
    return TextEncoderGGUF(contents.path, weights, _spiece_model(contents), contents.metadata)


def _record_weight(record) -> torch.Tensor | PackedWeight:
    data = record_as_torch(record)
    if record.qtype in FLOAT_TYPES:
        return data.view(FLOAT_TYPES[record.qtype]).reshape(record.shape)
    return PackedWeight(data, tuple(record.shape), qtype=record.qtype)


def _dense(value: torch.Tensor | PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    return value.dequantize(dtype) if isinstance(value, PackedWeight) else value.to(dtype)


# ----------------------------------------------------------------------------------------------
# tokenizer: stored bytes, or a SentencePiece model rebuilt from llama.cpp's vocabulary metadata
# ----------------------------------------------------------------------------------------------


def _spiece_model(contents: GGUFContents) -> bytes:
    stored = contents.metadata.get(SPIECE_METADATA_KEY)
    if isinstance(stored, bytes) and stored:
        return stored
    if isinstance(contents.metadata.get("tokenizer.ggml.tokens"), list):
        return rebuild_spiece_model(contents.metadata, contents.path)
    raise VeloxLoadError(contents.path, "holds the weights but no tokenizer (neither velox.bytes.spiece_model "
                         "nor llama.cpp's tokenizer.ggml.tokens)", TOKENIZER_NEEDED)


def rebuild_spiece_model(metadata: Mapping[str, object], path: str | Path | None = None) -> bytes:
    """A serialized SentencePiece ModelProto from llama.cpp's ``tokenizer.ggml.*`` metadata.

    Facts (llama.cpp ``convert_hf_to_gguf.py``, city96 ComfyUI-GGUF ``gguf_tokenizer_loader``):
    ``tokens`` / ``scores`` / ``token_type`` are the pieces in id order, and llama.cpp's token types
    use SentencePiece's numbering (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte);
    ``model`` is "t5" (unigram) or "llama" (BPE, Gemma's); T5 files also carry the normalizer's
    ``precompiled_charsmap``; special ids are ``{bos,eos,unknown,padding}_token_id``.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:  # protobuf missing
        raise VeloxLoadError(path, f"needs its tokenizer rebuilt, which needs protobuf ({error})",
                             "pip install protobuf sentencepiece") from None
    kind = metadata.get("tokenizer.ggml.model")
    if kind not in SPM_MODEL_TYPES:
        raise VeloxLoadError(path, f"has a {kind!r} tokenizer, which cannot become a SentencePiece model",
                             "tokenizer.ggml.model 't5' (umT5) or 'llama' (Gemma's SentencePiece BPE); "
                             "or convert the original checkpoint with Velox's scripts/convert_to_gguf.py")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    scores = list(metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if not len(tokens) == len(scores) == len(types):
        raise VeloxLoadError(path, f"tokenizer lists differ in length ({len(tokens)} tokens, {len(scores)} "
                             f"scores, {len(types)} types)", TOKENIZER_NEEDED)
    proto = sentencepiece_model_pb2.ModelProto()
    for token, score, token_type in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=float(score), type=int(token_type))
    trainer = proto.trainer_spec
    trainer.model_type = SPM_MODEL_TYPES[kind]
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = 6 in types
    trainer.allow_whitespace_only_pieces = kind == "llama"  # Gemma's pieces include runs of spaces
    for role, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        valid = isinstance(token_id, int) and 0 <= token_id < len(tokens)
        setattr(trainer, f"{role}_id", token_id if valid else -1)
        if valid:
            setattr(trainer, f"{role}_piece", tokens[token_id])
    normalizer = proto.normalizer_spec
    charsmap = metadata.get("tokenizer.ggml.precompiled_charsmap")
    if isinstance(charsmap, list):  # written as an int array rather than UINT8 bytes
        charsmap = bytes(value & 0xFF for value in charsmap)
    normalizer.name = "nmt_nfkc" if charsmap else "identity"
    if isinstance(charsmap, bytes) and charsmap:
        normalizer.precompiled_charsmap = charsmap
    # llama.cpp's defaults when the file does not say: a space prefix yes, whitespace folding no
    normalizer.add_dummy_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = bool(metadata.get("tokenizer.ggml.remove_extra_whitespaces", False))
    logging.info("Velox: rebuilt a %d-piece SentencePiece tokenizer from %s", len(tokens), path)
    return proto.SerializeToString()


def spiece_tensor(model: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(model), dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------


def encoder_dtype(weights: Weights, embedding: str, requested: torch.dtype | None = None,
                  fallback: torch.dtype | None = None) -> torch.dtype:
    """The CLIP's dtype: ``requested``, else the token embedding's float type, else ``fallback``,
    else core's text-encoder default (fp16)."""
    if requested is not None:
        return requested
    value = weights.get(embedding)
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return value.dtype
    return fallback or comfy.model_management.text_encoder_dtype(comfy.model_management.text_encoder_device())


def parameter_count(weights: Weights) -> int:
    return sum(int(torch.Size(value.shape).numel()) for value in weights.values())


def gguf_text_operations():
    """Core's manual-cast ops with a Linear that keeps GGUF blocks packed (no load-time quantization).

    ``comfy.sd.CLIP`` may load the model onto its device before the weights arrive, which a meta
    placeholder (``QuantLinear``'s) cannot survive; this Linear's placeholder is one zero expanded
    to the weight's shape: movable, no memory, replaced at load."""
    ops = make_quant_operations("none", "dequant")

    class Linear(ops.Linear):
        def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
            super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
            zero = torch.zeros((), device=device, dtype=dtype or torch.float32)
            self.weight = torch.nn.Parameter(zero.expand(out_features, in_features), requires_grad=False)

    ops.Linear = Linear
    return ops


def clip_devices(options: Mapping) -> dict:
    """Build on the offload device (unless told): the packed weights load there, and ComfyUI moves
    them to the load device when it encodes, as it does for any text encoder."""
    offload = options.get("offload_device", comfy.model_management.text_encoder_offload_device())
    return {"initial_device": offload, **options}


def load_packed(clip: comfy.sd.CLIP, weights: Weights, path: Path, what: str) -> tuple[list, list]:
    """``clip.load_sd`` for weights holding ``PackedWeight``s: only a ``QuantLinear``'s weight stays
    packed; any other packed tensor (a quantized token embedding) is dequantized once, straight to
    its parameter's dtype (an fp32 detour would cost 4 GB for umT5-XXL's table)."""
    encoder = getattr(clip.cond_stage_model, clip.cond_stage_model.clip).transformer
    linears = {name for name, module in encoder.named_modules() if isinstance(module, QuantLinear)}
    dtypes = {name: parameter.dtype for name, parameter in encoder.named_parameters()}
    state_dict = {name: value.dequantize(dtypes.get(name, torch.float32)) if isinstance(value, PackedWeight)
                  and not (name.endswith(".weight") and name[: -len(".weight")] in linears) else value
                  for name, value in weights.items()}
    try:
        missing, unexpected = clip.load_sd(state_dict)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1][:300]
        raise VeloxLoadError(path, f"weights do not fit {what} ({reason})", f"a complete {what} GGUF") from None
    unfilled = [name for name, parameter in encoder.named_parameters() if parameter.is_meta]
    if missing or unfilled:
        raise VeloxLoadError(path, f"weights do not fill {what}: missing {list(missing or unfilled)[:4]}",
                             f"a complete {what} GGUF")
    clip.patcher.size = 0  # measured again (model_size) on the packed bytes, not on the placeholders
    packed = sum(isinstance(v, PackedWeight) for v in state_dict.values())
    logging.info("Velox: %s loaded from %s (%d packed GGUF Linear weights)", what, path, packed)
    return missing, unexpected


def read_gemma2_gguf(path: str | Path, expected: str) -> tuple[Weights, dict, dict]:
    """(HF-named Gemma-2 weights, config.json, tokenizer data) from a Gemma-2 GGUF."""
    gguf = read_text_encoder_gguf(path, "gemma2", expected)
    weights = {name: value for name, value in gguf.weights.items() if name.startswith("model.")}
    return weights, gemma2_config_from_metadata(gguf.metadata, weights), {"spiece_model": spiece_tensor(gguf.spiece_model)}


def gemma2_config_from_metadata(metadata: Mapping[str, object], weights: Weights) -> dict:
    """config.json: our converter's copy, else llama.cpp's ``gemma2.*`` keys (query_pre_attn_scalar is
    not stored: llama.cpp scales by the key length for every Gemma-2 but the 27B, as here)."""
    for key in GEMMA2_CONFIG_KEYS:
        if isinstance(metadata.get(key), str) and json.loads(metadata[key]).get("model_type") == "gemma2":
            return json.loads(metadata[key])
    if "gemma2.block_count" not in metadata:
        return {}  # a bare file: gemma2_core_config's Gemma-2-2B defaults, checked against the shapes

    def get(name: str, default=None):
        return metadata.get(f"gemma2.{name}", default)

    vocab, hidden = weights["model.embed_tokens.weight"].shape
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    config = {"model_type": "gemma2", "vocab_size": int(vocab), "hidden_size": int(hidden),
              "intermediate_size": int(get("feed_forward_length")), "num_hidden_layers": int(get("block_count")),
              "num_attention_heads": heads, "num_key_value_heads": int(get("attention.head_count_kv", heads)),
              "head_dim": head_dim, "query_pre_attn_scalar": head_dim,
              "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
              "max_position_embeddings": int(get("context_length", 8192)),
              "rope_theta": float(get("rope.freq_base", 10000.0))}
    optional = {"attn_logit_softcapping": "attn_logit_softcapping", "sliding_window": "attention.sliding_window"}
    config.update({field: get(key) for field, key in optional.items() if get(key) is not None})
    for role, key in (("bos_token_id", "bos"), ("pad_token_id", "padding"), ("eos_token_id", "eos")):
        if isinstance(metadata.get(f"tokenizer.ggml.{key}_token_id"), int):
            config[role] = metadata[f"tokenizer.ggml.{key}_token_id"]
    return config
