"""Sana's text-conditioning constants and the Gemma-2 file conventions (no comfy import).

Shared by the host's text encoder and the tiny-model builders.
"""

from __future__ import annotations

SANA_MAX_SEQUENCE_LENGTH = 300
# The official configs' chi_prompt. diffusers' default differs in one place ('Enhanced prompt' in single
# quotes); Sana was trained with this text.
SANA_COMPLEX_HUMAN_INSTRUCTION = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable '
    "for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing "
    "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by "
    "towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)
GEMMA2_CONFIG_METADATA_KEY = "gemma2_config"  # config.json in a single file's safetensors metadata
TOKENIZER_JSON_KEY = "gemma_tokenizer_json"

# config.json of google/gemma-2-2b(-it); a single file without a config in its metadata must match it
GEMMA2_2B_CONFIG = {
    "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "sliding_window": 4096,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False, "pad_token_id": 0, "bos_token_id": 2,
}
