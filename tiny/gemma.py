"""A tiny Gemma-2 with a locally trained SentencePiece tokenizer, and writers for its two layouts.

Structure as `gemma-2-2b-it` (pre/post norms with the `1 + w` scale, GeGLU MLP, RoPE, grouped-query
attention, tanh logit softcap, alternating sliding-window layers); only the sizes are small. Three
settings are chosen so that a parity test notices a port that skips them: the q/k projections are
wide enough that attention logits reach the softcap's bend, `query_pre_attn_scalar` differs from
`head_dim`, and the sliding window is shorter than Sana's 300-token sequences.

The tokenizer is a SentencePiece BPE model trained in well under a second on a built-in corpus (the
complex human instruction plus some prompts), with Gemma's special ids (<pad>=0, <eos>=1, <bos>=2,
<unk>=3, <mask>=4), byte fallback, no dummy prefix and no whitespace folding, as Gemma's is.

Layouts written:
- a ComfyUI single file as Comfy-Org ships `gemma_2_2b` (HF names `model.layers.N...` plus the
  tokenizer as a uint8 tensor `spiece_model`); the config rides in the safetensors metadata, since
  head count and head size cannot be told apart from the shapes;
- a Hugging Face folder (config.json, model.safetensors, tokenizer.model, tokenizer_config.json,
  special_tokens_map.json, and tokenizer.json when transformers is importable).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_GEMMA_HIDDEN = 64  # the tiny Sana's caption_channels
TINY_GEMMA_VOCAB = 1024  # upper bound; the trained tokenizer decides the final size

_TINY_GEMMA_CONFIG = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "hidden_size": TINY_GEMMA_HIDDEN,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "query_pre_attn_scalar": 24,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "sliding_window": 96,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_act": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}

PROMPTS = (
    "a small fluffy white cat curled up sleeping on a warm sunny windowsill",
    "A bustling city street at dusk, glowing street lamps and a double-decker bus",
    "an astronaut riding a horse on mars, cinematic lighting, 35mm photo",
    "portrait of an old fisherman with a grey beard, oil painting",
    "a red fox in a snowy forest at sunrise",
    "Cyberpunk alley with neon signs reading OPEN 24H, rain, reflections",
    "a bowl of ramen with a soft boiled egg, steam rising, top view",
    "watercolor illustration of a lighthouse on a rocky coast",
    "A cozy library with tall wooden shelves and a fireplace",
    "macro photo of a dew drop on a green leaf",
    "a robot playing chess against a child in a park",
    "low poly 3d render of a mountain lake, pastel colors",
    "a medieval castle on a hill under a starry night sky",
    "The Eiffel Tower made of chocolate, studio photo",
    "a golden retriever puppy running through tall grass",
    "isometric pixel art of a tiny island with palm trees",
    "two cups of coffee on a marble table, morning light",
    "a samurai standing in a bamboo forest, mist, ink wash painting",
    "vintage poster of a rocket launch, bold typography, 1960s style",
    "a glass sphere containing a miniature galaxy",
    "children flying kites on a beach, sunset, film grain",
    "a cat wearing sunglasses, 8k, highly detailed",
    "an empty subway station at 3 am, fluorescent lights",
    "Hello World written in graffiti on a brick wall",
    "a hot air balloon over a field of sunflowers",
)


def _corpus() -> list[str]:
    from ..loaders.sana_text import SANA_COMPLEX_HUMAN_INSTRUCTION  # the text Sana prepends

    return list(SANA_COMPLEX_HUMAN_INSTRUCTION) + list(PROMPTS) + [p.lower() for p in PROMPTS]


def train_tiny_gemma_tokenizer() -> bytes:
    """A serialized SentencePiece BPE model that tokenizes the way Gemma's does (ids and rules)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="bpe",
        vocab_size=TINY_GEMMA_VOCAB, hard_vocab_limit=False, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=["<mask>"], user_defined_symbols=["\n"],
        byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def tiny_gemma_config(vocab_size: int) -> dict:
    """The tiny model's Hugging Face `config.json` content."""
    return {**_TINY_GEMMA_CONFIG, "vocab_size": vocab_size}


def tiny_gemma_state_dict(vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights under `Gemma2ForCausalLM` names (`model.` prefix, tied head)."""
    cfg = tiny_gemma_config(vocab_size)
    C, F, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    sd = {"model.embed_tokens.weight": randn(vocab_size, C, std=C**-0.5), "model.norm.weight": randn(C, std=0.2)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        # q/k this wide put attention logits in the tens, where the softcap at 50 visibly bends them
        sd[p + "self_attn.q_proj.weight"] = randn(H * D, C, std=0.5)
        sd[p + "self_attn.k_proj.weight"] = randn(KV * D, C, std=0.5)
        sd[p + "self_attn.v_proj.weight"] = randn(KV * D, C, std=0.15)
        sd[p + "self_attn.o_proj.weight"] = randn(C, H * D, std=0.15)
        sd[p + "mlp.gate_proj.weight"] = randn(F, C, std=0.15)
        sd[p + "mlp.up_proj.weight"] = randn(F, C, std=0.15)
        sd[p + "mlp.down_proj.weight"] = randn(C, F, std=0.1)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            sd[p + norm + ".weight"] = randn(C, std=0.2)
    return sd


def _vocab_size(spiece_model: bytes) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=spiece_model).get_piece_size()


def write_tiny_gemma_single_file(path: str | Path, seed: int = 0) -> Path:
    """The ComfyUI single-file layout (Comfy-Org `gemma_2_2b` keys + `spiece_model`)."""
    from ..loaders.sana_text import GEMMA2_CONFIG_METADATA_KEY

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spiece_model = train_tiny_gemma_tokenizer()
    vocab_size = _vocab_size(spiece_model)
    sd = tiny_gemma_state_dict(vocab_size, seed)
    sd["spiece_model"] = torch.frombuffer(bytearray(spiece_model), dtype=torch.uint8)
    save_file(sd, str(path), metadata={GEMMA2_CONFIG_METADATA_KEY: json.dumps(tiny_gemma_config(vocab_size))})
    return path


def write_tiny_gemma_hf_folder(folder: str | Path, seed: int = 0, tokenizer_json: bool = True) -> Path:
    """The Hugging Face layout of `gemma-2-2b-it` (a `Gemma2ForCausalLM` folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spiece_model = train_tiny_gemma_tokenizer()
    vocab_size = _vocab_size(spiece_model)
    (folder / "tokenizer.model").write_bytes(spiece_model)
    (folder / "config.json").write_text(json.dumps(tiny_gemma_config(vocab_size), indent=2))
    save_file(tiny_gemma_state_dict(vocab_size, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    tokenizer_config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                        "model_max_length": 8192, "padding_side": "right", **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    if tokenizer_json:
        _write_tokenizer_json(folder)
    return folder


def _write_tokenizer_json(folder: Path) -> None:
    """Let transformers convert tokenizer.model, as the Hub's Gemma folders ship both files."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return
    AutoTokenizer.from_pretrained(str(folder)).backend_tokenizer.save(str(folder / "tokenizer.json"))
