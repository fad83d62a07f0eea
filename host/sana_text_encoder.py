"""Sana's text conditioning as a native ComfyUI `CLIP`: Gemma-2-2B(-it) on core's Gemma-2 class.

Reference: NVlabs/Sana `app/sana_pipeline.py` and `configs/sana_config/*` (chi_prompt); diffusers
`SanaPipeline.encode_prompt`; shared/reference/sana.md §3.

What Sana asks of the encoder, unlike core's Lumina 2 wiring of the same class:
- the last hidden state after the final RMSNorm (Lumina 2 takes layer -2 without the norm);
- positive prompt: the complex human instruction (CHI) in front, right-padded to
  `len(tokens(CHI)) + 300 - 2`, then BOS plus the last 299 positions kept; negative prompt: a plain
  300-token encode (no CHI; the same selection is then the identity);
- the (1, 300) attention mask in the conditioning dict as `attention_mask`;
- no lower-casing (diffusers lower-cases when clean_caption=False; the official pipeline does not),
  and no ComfyUI `(word:1.2)` weighting: the text goes to Gemma as typed, as in the reference.

Where core's Gemma-2 (`comfy/text_encoders/llama.py`) differs from Hugging Face's, and what we do:
- it has no attention-logit softcap, `tanh(s / 50) * 50`: our attention applies it;
- it scales scores by `head_dim ** -0.5`, HF by `query_pre_attn_scalar ** -0.5` (equal for the 2B,
  not for every Gemma-2): ours uses HF's;
- it ignores the sliding window (4096 on even layers; Sana's few hundred tokens never reach it): ours
  masks it anyway;
- its masks are -inf; with a sliding window a padded query can see no key at all, where -inf gives
  NaN and HF's fill (the dtype's minimum) gives a plain average: ours fills as HF does;
- its RMSNorm adds 1 to the weight in the weight's dtype, which rounds `1 + w` in bf16: ours keeps
  the (tiny) norm weights in fp32.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import comfy.model_management
import comfy.sd
import comfy.utils
import torch
from comfy import sd1_clip
from comfy.text_encoders import llama

from ..errors import VeloxLoadError
from ..loaders.checkpoint_files import load_state_dict, read_safetensors_metadata
from ..loaders.sana_text import (  # noqa: F401  (re-exported: the text-encoder API)
    GEMMA2_2B_CONFIG,
    GEMMA2_CONFIG_METADATA_KEY,
    SANA_COMPLEX_HUMAN_INSTRUCTION,
    SANA_MAX_SEQUENCE_LENGTH,
    TOKENIZER_JSON_KEY,
)
from .gguf_text_weights import (
    clip_devices,
    encoder_dtype,
    gguf_text_operations,
    load_packed,
    parameter_count,
    read_gemma2_gguf,
)

# a transformers folder's weights, most preferred first
HF_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors",
                   "pytorch_model.bin")
TOKENS_KEY = "gemma2_2b"  # also the module name, so a saved CLIP has Lumina 2's key layout
_SIGNATURE = "model.layers.0.post_feedforward_layernorm.weight"  # Gemma-2/3 only: the post-FFN norm
_PREFIXES = ("", "gemma2_2b.transformer.", "text_encoders.gemma2_2b.transformer.")  # plain, ComfyUI CLIPSave
# what a file that is not Gemma-2 most likely is, by one telling key (substring match)
_OTHER_FILES = (
    ("self_attn.q_norm.weight", "a model with q/k-norm (Gemma 3, Qwen 3), not Gemma-2"),
    ("SelfAttention.k.weight", "a T5 encoder"),
    ("attn.qkv.weight", "a Sana transformer (official layout)"),
    ("attn1.to_q.weight", "a diffusers transformer"),
    ("model.diffusion_model.", "a ComfyUI diffusion-model checkpoint"),
    ("text_model.encoder.layers.", "a CLIP text encoder"),
)


# 1. core's Gemma-2 stack, configured from config.json, with Hugging Face's attention scores

class Gemma2Attention(llama.Attention):
    """Core's projections and RoPE; HF Gemma-2's scores (scale, tanh softcap, sliding window)."""

    def __init__(self, config, scale: float, softcap: float | None, sliding_window: int | None,
                 device=None, dtype=None, ops=None):
        super().__init__(config, device=device, dtype=dtype, ops=ops)
        self.scale, self.softcap, self.sliding_window = scale, softcap, sliding_window

    def forward(self, hidden_states, attention_mask=None, freqs_cis=None, optimized_attention=None):
        return super().forward(hidden_states, attention_mask=attention_mask, freqs_cis=freqs_cis,
                               optimized_attention=self.attend)

    def attend(self, q, k, v, heads, mask=None, **kwargs):
        """q, k, v: (B, H, L, D), k and v already repeated to H heads; mask: additive, (B, 1, L, L)
        with -inf where not allowed. Returns (B, L, H*D)."""
        B, H, L, D = q.shape
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        floor = torch.finfo(scores.dtype).min
        if mask is not None:
            scores = scores + mask.float().clamp(min=floor)
        if self.sliding_window is not None:
            position = torch.arange(L, device=q.device)
            scores = scores.masked_fill(position[:, None] - position[None, :] >= self.sliding_window, floor)
        out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
        return out.transpose(1, 2).reshape(B, L, H * D)


_CORE_FIELDS = {f.name for f in dataclasses.fields(llama.Gemma2_2B_Config)}


class SanaGemma2(llama.BaseLlama, torch.nn.Module):
    """`llama.Llama2_` with `Gemma2_2B_Config` (what core's `Gemma2_2B` builds), sized by config.json."""

    def __init__(self, config_dict: dict, dtype, device, operations):
        super().__init__()
        config = llama.Gemma2_2B_Config(**{k: v for k, v in config_dict.items() if k in _CORE_FIELDS})
        config.head_dim = config_dict["head_dim"]  # a class attribute in core's config, not a field
        self.num_layers = config.num_hidden_layers
        self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
        self.dtype = dtype
        for layer, layer_type in zip(self.model.layers, config_dict["layer_types"]):
            sliding = config_dict["sliding_window"] if layer_type == "sliding_attention" else None
            layer.self_attn = Gemma2Attention(
                config, config_dict["query_pre_attn_scalar"] ** -0.5, config_dict["attn_logit_softcapping"],
                sliding, device=device, dtype=dtype, ops=operations)
        for module in self.modules():  # fp32 so that core's `1 + w` is not rounded to bf16
            if isinstance(module, llama.RMSNorm):
                module.weight = torch.nn.Parameter(torch.empty_like(module.weight, dtype=torch.float32))


class SanaGemma2Encoder(sd1_clip.SDClipModel):
    """One Gemma-2 stack read at its last layer after the final norm, with the padding mask."""

    def __init__(self, device="cpu", dtype=None, model_options={}, config=None):
        super().__init__(device=device, layer="last", textmodel_json_config=dict(config), dtype=dtype,
                         model_class=SanaGemma2, layer_norm_hidden_state=True,
                         special_tokens={"start": config["bos_token_id"], "pad": config["pad_token_id"]},
                         enable_attention_masks=True, return_attention_masks=True, model_options=model_options)


def sana_select_index(length: int) -> list[int]:
    """BOS plus the last 299 positions: drops the CHI body, keeps the prompt and its padding."""
    if length <= SANA_MAX_SEQUENCE_LENGTH:
        return list(range(length))
    return [0] + list(range(length - SANA_MAX_SEQUENCE_LENGTH + 1, length))


class SanaTextEncoder(sd1_clip.SD1ClipModel):
    """The `CLIP.cond_stage_model`: encodes tokens into Sana conditioning."""

    def __init__(self, device="cpu", dtype=None, model_options={}, config=None):
        super().__init__(device=device, dtype=dtype, model_options=model_options, name=TOKENS_KEY,
                         clip_model=SanaGemma2Encoder, config=config)

    def encode_token_weights(self, token_weight_pairs):
        """Returns cond (1, 300, C), no pooled output, and {"attention_mask": (1, 300) long}."""
        sequences = [[int(pair[0]) for pair in sequence] for sequence in token_weight_pairs[TOKENS_KEY]]
        hidden, _, extra = getattr(self, self.clip).encode(sequences)
        keep = sana_select_index(hidden.shape[1])
        device = comfy.model_management.intermediate_device()
        return hidden[:, keep].to(device), None, {"attention_mask": extra["attention_mask"][:, keep].to(device)}


# 2. tokenizer side: text -> ids exactly as the reference's GemmaTokenizer(Fast) with padding_side="right"

class SentencePieceGemma:
    """Gemma ids (BOS first, no EOS) from a SentencePiece model (tokenizer.model / `spiece_model`)."""

    def __init__(self, model: bytes):
        import sentencepiece

        self.model = model
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model)
        self.size = self.processor.get_piece_size()
        self.bos_id, self.pad_id = self.processor.piece_to_id("<bos>"), self.processor.piece_to_id("<pad>")

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + self.processor.encode(text)

    def id_to_piece(self, token: int) -> str:
        return self.processor.id_to_piece(token)

    def state_dict(self) -> dict:
        return {"spiece_model": torch.frombuffer(bytearray(self.model), dtype=torch.uint8)}


class TokenizersGemma:
    """The same ids from a Hugging Face tokenizer.json."""

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.pad_id = self.tokenizer.token_to_id("<bos>"), self.tokenizer.token_to_id("<pad>")

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + self.tokenizer.encode(text, add_special_tokens=False).ids

    def id_to_piece(self, token: int) -> str:
        return self.tokenizer.id_to_token(token)

    def state_dict(self) -> dict:
        return {}


def gemma_pieces(tokenizer_data: dict) -> SentencePieceGemma | TokenizersGemma:
    if tokenizer_data.get("spiece_model") is not None:
        model = tokenizer_data["spiece_model"]
        return SentencePieceGemma(model.numpy().tobytes() if torch.is_tensor(model) else bytes(model))
    if tokenizer_data.get(TOKENIZER_JSON_KEY) is not None:
        return TokenizersGemma(tokenizer_data[TOKENIZER_JSON_KEY])
    raise VeloxLoadError(None, "no Gemma tokenizer was given", "'spiece_model' or a tokenizer.json")


class SanaGemmaTokenizer:
    """The `CLIP.tokenizer`. `tokenize_with_weights(text, sana_chi=True)` gives the positive encoding;
    `sana_chi=False` the plain 300-token one Sana uses for the negative prompt. A family with its own
    complex human instruction (SANA-Video's) passes its lines as `sana_chi`."""

    def __init__(self, embedding_directory=None, tokenizer_data={}):
        self.pieces = gemma_pieces(tokenizer_data)
        self.chi_prompt = "\n".join(SANA_COMPLEX_HUMAN_INSTRUCTION)
        self.chi_length = self.instruction_length(self.chi_prompt)

    def instruction_length(self, chi_prompt: str) -> int:
        """Tokens of an instruction-prefixed prompt (the reference's "magic number 2: [bos], [_]")."""
        return len(self.pieces.encode(chi_prompt)) + SANA_MAX_SEQUENCE_LENGTH - 2

    def tokenize_with_weights(self, text: str, return_word_ids=False, sana_chi=True, **kwargs):
        if isinstance(sana_chi, (tuple, list)):
            chi_prompt = "\n".join(sana_chi)
            ids, length = self.pieces.encode(chi_prompt + text.strip()), self.instruction_length(chi_prompt)
        elif sana_chi:  # the official pipeline strips the positive prompt, not the negative one
            ids, length = self.pieces.encode(self.chi_prompt + text.strip()), self.chi_length
        else:
            ids, length = self.pieces.encode(text), SANA_MAX_SEQUENCE_LENGTH
        ids = ids[:length] + [self.pieces.pad_id] * max(0, length - len(ids))
        word_id = (0,) if return_word_ids else ()
        return {TOKENS_KEY: [[(token, 1.0, *word_id) for token in ids]]}

    def untokenize(self, token_weight_pair):
        return [(pair, self.pieces.id_to_piece(pair[0])) for pair in token_weight_pair]

    def state_dict(self):
        return self.pieces.state_dict()


# 3. files -> (Gemma-2 state dict, config.json, tokenizer data)

def canonical_gemma2_keys(state_dict: dict, where) -> dict:
    """`model.layers.N...` names (transformers' Gemma2ForCausalLM, Comfy-Org's file) from any known
    prefix; a bare Gemma2Model gets `model.` added; the tied `lm_head` is dropped."""
    for prefix in _PREFIXES:
        gemma3 = prefix + "model.layers.0.self_attn.q_norm.weight" in state_dict
        if prefix + _SIGNATURE in state_dict and not gemma3:
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix + "model.")}
    bare = _SIGNATURE[len("model."):]
    if bare in state_dict and "layers.0.self_attn.q_norm.weight" not in state_dict:
        return {"model." + k: v for k, v in state_dict.items() if not k.startswith("lm_head.")}
    raise VeloxLoadError(where, f"is not a Gemma-2 text encoder ({_describe(state_dict)})",
                         f"Gemma-2-2B(-it) weights with keys like {_SIGNATURE}")


def _describe(state_dict: dict) -> str:
    for marker, what in _OTHER_FILES:
        if any(marker in key for key in state_dict):
            return f"it looks like {what}"
    return "first keys: " + ", ".join(list(state_dict)[:3]) if state_dict else "it is empty"


def gemma2_core_config(hf_config: dict, where) -> dict:
    """config.json (HF names, any transformers version) -> what `SanaGemma2` needs."""
    cfg = {**GEMMA2_2B_CONFIG, **hf_config}
    rope = cfg.get("rope_parameters") or {}
    rope_scaling = cfg.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
    activation = cfg.get("hidden_activation") or cfg.get("hidden_act")
    if cfg["model_type"] != "gemma2":
        raise VeloxLoadError(where, f"model_type is {cfg['model_type']!r}", "'gemma2' (Gemma-2-2B or -2B-it)")
    if activation != "gelu_pytorch_tanh" or cfg["attention_bias"] or rope_scaling:
        raise VeloxLoadError(where, f"a Gemma-2 variant core's class cannot run (activation {activation}, "
                             f"attention_bias {cfg['attention_bias']}, rope scaling {rope_scaling})",
                             "gelu_pytorch_tanh, no attention bias and plain RoPE, as every released Gemma-2")
    layers = cfg["num_hidden_layers"]
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]  # HF's default
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "query_pre_attn_scalar",
            "attn_logit_softcapping", "sliding_window", "pad_token_id", "bos_token_id")
    rope_theta = hf_config.get("rope_theta") or rope.get("rope_theta") or GEMMA2_2B_CONFIG["rope_theta"]
    return {**{k: cfg[k] for k in keys}, "rope_theta": rope_theta, "layer_types": layer_types}


def _read_single_file(path: Path) -> tuple[dict, dict, dict]:
    # the pack's checked reader: a damaged or pickle-only file is refused by name, as by every loader
    state_dict = load_state_dict(path)
    metadata = read_safetensors_metadata(path) if path.suffix.lower() == ".safetensors" else {}
    spiece_model = state_dict.pop("spiece_model", None)
    state_dict = canonical_gemma2_keys(state_dict, path)
    if spiece_model is None:
        raise VeloxLoadError(path, "holds Gemma-2 weights but no tokenizer (no 'spiece_model' tensor)",
                             "ComfyUI's single-file Gemma, which embeds its SentencePiece model as "
                             "'spiece_model', or a Hugging Face folder with tokenizer.model or tokenizer.json")
    hf_config = json.loads(metadata[GEMMA2_CONFIG_METADATA_KEY]) if GEMMA2_CONFIG_METADATA_KEY in metadata else {}
    return state_dict, hf_config, {"spiece_model": spiece_model}


def _read_tokenizer_files(folder: Path) -> dict:
    if (folder / "tokenizer.model").is_file():
        model = bytearray((folder / "tokenizer.model").read_bytes())
        return {"spiece_model": torch.frombuffer(model, dtype=torch.uint8)}
    if (folder / "tokenizer.json").is_file():
        return {TOKENIZER_JSON_KEY: (folder / "tokenizer.json").read_text(encoding="utf-8")}
    raise VeloxLoadError(folder, f"has no Gemma tokenizer files (looked in {folder})",
                         "tokenizer.model (SentencePiece) and/or tokenizer.json in this folder")


def _read_hf_weights(folder: Path) -> dict:
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return load_state_dict(folder / name)  # an index loads its shards, each checked
    raise VeloxLoadError(folder, "has config.json but no weights",
                         "model.safetensors, or model.safetensors.index.json with its shards, or pytorch_model.bin")


def _read_hf_folder(folder: Path) -> tuple[dict, dict, dict]:
    """A transformers Gemma-2 folder, or a Sana diffusers folder's text_encoder/ + tokenizer/."""
    model_dir = folder / "text_encoder" if (folder / "text_encoder" / "config.json").is_file() else folder
    tokenizer_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else model_dir
    if not (model_dir / "config.json").is_file():
        raise VeloxLoadError(folder, "has no config.json", "a Hugging Face Gemma-2 folder (config.json, "
                             "model.safetensors, tokenizer.model) or a Sana diffusers folder with text_encoder/")
    hf_config = json.loads((model_dir / "config.json").read_text())
    gemma2_core_config(hf_config, model_dir / "config.json")  # fail on a T5 or Gemma-3 before reading weights
    tokenizer_data = _read_tokenizer_files(tokenizer_dir)
    return canonical_gemma2_keys(_read_hf_weights(model_dir), model_dir), hf_config, tokenizer_data


def _check_fits(state_dict: dict, config: dict, pieces, where) -> None:
    vocab, width = state_dict["model.embed_tokens.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("model.layers."))
    found = (vocab, width, layers)
    expected = (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"])
    if found != expected:
        raise VeloxLoadError(where, f"weights have vocabulary {vocab}, width {width} and {layers} layers, the "
                             f"config says {expected[0]}, {expected[1]} and {expected[2]}",
                             "the weights and the config of the same model (a single file without a config "
                             "in its metadata must be Gemma-2-2B)")
    if pieces.size > vocab or pieces.pad_id != config["pad_token_id"] or pieces.bos_id != config["bos_token_id"]:
        raise VeloxLoadError(where, f"the tokenizer ({pieces.size} pieces, <pad>={pieces.pad_id}, "
                             f"<bos>={pieces.bos_id}) does not belong to this Gemma-2 (vocabulary {vocab})",
                             f"Gemma's tokenizer, <pad>={config['pad_token_id']} and <bos>={config['bos_token_id']}")


def load_sana_text_encoder(source, dtype: torch.dtype | None = None,
                           device: torch.device | str | None = None) -> comfy.sd.CLIP:
    """Gemma-2-2B(-it) from a ComfyUI single file or a Hugging Face / Sana diffusers folder, as a CLIP
    whose `encode_from_tokens_scheduled(clip.tokenize(text, sana_chi=...))` gives Sana conditioning.

    dtype: weight dtype (default: the checkpoint's); compute runs in fp32 as in core's text encoders.
    device: where Gemma runs (default: ComfyUI's text-encoder device), e.g. "cpu" to keep it off the GPU.
    """
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return load_gemma2_gguf(path, dtype, device)
    if path.is_dir():
        state_dict, hf_config, tokenizer_data = _read_hf_folder(path)
    elif path.is_file():
        state_dict, hf_config, tokenizer_data = _read_single_file(path)
    else:
        raise VeloxLoadError(path, "does not exist", "a Gemma-2 file or a Hugging Face folder")
    config = gemma2_core_config(hf_config, path)
    pieces = gemma_pieces(tokenizer_data)
    _check_fits(state_dict, config, pieces, path)

    model_options = {"dtype": dtype or _checkpoint_dtype(state_dict)}
    if device is not None:
        model_options["load_device"] = model_options["initial_device"] = torch.device(device)
    target = SimpleNamespace(clip=SanaTextEncoder, tokenizer=SanaGemmaTokenizer, params={"config": config})
    clip = comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, model_options=model_options,
                         parameters=comfy.utils.calculate_parameters(state_dict))
    try:
        missing, unexpected = clip.load_sd(state_dict)
    except RuntimeError as error:
        reason = str(error).splitlines()[-1].strip()
        raise VeloxLoadError(path, f"weights do not fit the Gemma-2 config ({reason})",
                             "weights and config.json of the same model") from error
    if missing:
        raise VeloxLoadError(path, f"lacks {len(missing)} Gemma-2 weights, e.g. {missing[0]}",
                             "a complete checkpoint")
    if unexpected:
        logging.debug("Velox Gemma-2: ignored keys %s", unexpected)
    return clip


def _checkpoint_dtype(state_dict: dict) -> torch.dtype | None:
    dtype = state_dict["model.norm.weight"].dtype
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else None


def load_gemma2_gguf(path: str | Path, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> comfy.sd.CLIP:
    """A Gemma-2 GGUF as Sana's CLIP (this module's classes, checks and tokenizer)."""
    expected = "a Gemma-2-2B(-it) GGUF (converted by Velox, or by llama.cpp with its tokenizer)"
    weights, hf_config, tokenizer_data = read_gemma2_gguf(path, expected)
    path = Path(path)
    if "model.embed_tokens.weight" not in weights:
        raise VeloxLoadError(path, f"lacks the token embedding (first tensors: {list(weights)[:3]})", expected)
    config = gemma2_core_config(hf_config, path)
    pieces = gemma_pieces(tokenizer_data)
    _check_fits(weights, config, pieces, path)
    # a quantized embedding tells no dtype: bf16, Gemma-2's own (its activations overflow fp16)
    model_options = {"dtype": encoder_dtype(weights, "model.embed_tokens.weight", dtype, torch.bfloat16),
                     "custom_operations": gguf_text_operations()}
    if device is not None:
        model_options["load_device"] = torch.device(device)
    model_options = clip_devices(model_options)
    target = SimpleNamespace(clip=SanaTextEncoder, tokenizer=SanaGemmaTokenizer, params={"config": config})
    clip = comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, model_options=model_options,
                         parameters=parameter_count(weights))
    load_packed(clip, weights, path, "Gemma-2")
    return clip
