"""llama.cpp tensor names of GGUF text encoders -> Hugging Face / ComfyUI names: T5 / umT5 (Wan's
text encoder) and Gemma-2 (Sana's).

Facts from llama.cpp's ``convert_hf_to_gguf.py`` / ``gguf-py/gguf/tensor_mapping.py`` and
city96's ComfyUI-GGUF ``loader.py`` (``T5_SD_MAP``):

- T5 encoders are written as ``token_embd`` (``shared``), ``enc.output_norm`` and
  ``enc.blk.N.{attn_q,attn_k,attn_v,attn_o,attn_rel_b,attn_norm,ffn_gate,ffn_up,ffn_down,ffn_norm}``;
  umT5 has a relative-attention bias in every block, T5 only in block 0. No value changes.
- Gemma-2 is written as ``token_embd``, ``output_norm`` and ``blk.N.*``, and llama.cpp stores
  every RMSNorm weight as ``1 + w`` (Gemma's norm multiplies by ``1 + weight``); mapping back
  subtracts 1 from those (``NORM_OFFSETS``). Gemma has no q/k permutation (only Llama does).

Our converter writes text encoders under their HF names, which need no map.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .families import FAMILIES

T5_TO_HF: tuple[tuple[str, str], ...] = (
    (r"^token_embd\.weight$", "shared.weight"),
    (r"^enc\.output_norm\.weight$", "encoder.final_layer_norm.weight"),
    (r"^enc\.blk\.(\d+)\.attn_q\.weight$", r"encoder.block.\1.layer.0.SelfAttention.q.weight"),
    (r"^enc\.blk\.(\d+)\.attn_k\.weight$", r"encoder.block.\1.layer.0.SelfAttention.k.weight"),
    (r"^enc\.blk\.(\d+)\.attn_v\.weight$", r"encoder.block.\1.layer.0.SelfAttention.v.weight"),
    (r"^enc\.blk\.(\d+)\.attn_o\.weight$", r"encoder.block.\1.layer.0.SelfAttention.o.weight"),
    (r"^enc\.blk\.(\d+)\.attn_rel_b\.weight$",
     r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"^enc\.blk\.(\d+)\.attn_norm\.weight$", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"^enc\.blk\.(\d+)\.ffn_gate\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (r"^enc\.blk\.(\d+)\.ffn_up\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (r"^enc\.blk\.(\d+)\.ffn_down\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (r"^enc\.blk\.(\d+)\.ffn_norm\.weight$", r"encoder.block.\1.layer.1.layer_norm.weight"),
)

GEMMA2_TO_HF: tuple[tuple[str, str], ...] = (
    (r"^token_embd\.weight$", "model.embed_tokens.weight"),
    (r"^output_norm\.weight$", "model.norm.weight"),
    (r"^output\.weight$", "lm_head.weight"),
    (r"^blk\.(\d+)\.attn_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^blk\.(\d+)\.attn_q\.weight$", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"^blk\.(\d+)\.attn_k\.weight$", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"^blk\.(\d+)\.attn_v\.weight$", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"^blk\.(\d+)\.attn_output\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^blk\.(\d+)\.post_attention_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^blk\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.pre_feedforward_layernorm.weight"),
    (r"^blk\.(\d+)\.ffn_gate\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^blk\.(\d+)\.ffn_up\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    (r"^blk\.(\d+)\.ffn_down\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
    (r"^blk\.(\d+)\.post_ffw_norm\.weight$", r"model.layers.\1.post_feedforward_layernorm.weight"),
)

KEY_TABLES: dict[str, tuple[tuple[str, str], ...]] = {"umt5": T5_TO_HF, "gemma2": GEMMA2_TO_HF}
# What to add to a mapped tensor's values, by family and HF-name pattern.
NORM_OFFSETS: dict[str, tuple[tuple[str, float], ...]] = {"gemma2": ((r"norm\.weight$", -1.0),)}
# A name that only the llama.cpp layout of the family has (the registry's ``llama_cpp_marker``).
LLAMA_CPP_MARKERS = {f.name: f.llama_cpp_marker for f in FAMILIES.values() if f.llama_cpp_marker}


def gguf_to_hf_name(name: str, family: str) -> str | None:
    """One llama.cpp name under its HF name; None when the family's table has no rule for it."""
    for pattern, replacement in KEY_TABLES[family]:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def text_key_map(names: Iterable[str], family: str) -> dict[str, str]:
    """{gguf name: HF name} for a llama.cpp-layout text encoder; names without a rule keep theirs."""
    return {name: gguf_to_hf_name(name, family) or name for name in names}


def value_offset(hf_name: str, family: str) -> float:
    """What to add to the values of ``hf_name`` after the rename (Gemma's norms: -1), else 0."""
    return next((offset for pattern, offset in NORM_OFFSETS.get(family, ()) if re.search(pattern, hf_name)), 0.0)


def is_llama_cpp_layout(names: Iterable[str], family: str) -> bool:
    return LLAMA_CPP_MARKERS[family] in set(names)
