"""GGUF text encoders as native ComfyUI CLIPs: umT5 (Wan's ``VeloxUMT5Loader``) and Gemma-2 (Sana's
``VeloxGemmaLoader``). Each is built beside its family's other loaders (``wan_loading``,
``sana_text_encoder``) from the shared reading in ``gguf_text_weights``; this module names both."""

from __future__ import annotations

from .sana_text_encoder import load_gemma2_gguf
from .wan_loading import load_umt5_gguf

__all__ = ["load_gemma2_gguf", "load_umt5_gguf"]
