"""Is this a Wan transformer, which one, and its canonical state dict (from keys and shapes).

``sniff_wan(raw)`` is the entry point: it refuses other families with a message that names what
the file looks like, maps the keys (``wan_keys``) and names the variant. What ComfyUI core needs
to build the model it reads from the same keys itself (``comfy.model_detection``); the variant
here is for messages, expert pairing and presets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import VeloxLoadError
from .checkpoint_files import unwrap_state_dict
from .families import WAN, refuse_foreign
from .wan_keys import canonicalize_wan_state_dict, strip_wan_prefix

WAN_EXPECTED = (
    "a Wan transformer: official / ComfyUI keys such as patch_embedding.weight, head.modulation, "
    "blocks.0.self_attn.q.weight, or diffusers keys such as condition_embedder.time_proj.weight, "
    "blocks.0.attn1.to_q.weight"
)
# config.json's head count: diffusers (WanTransformer3DModel), official (WanModel)
CONFIG_HEAD_KEYS = ("num_attention_heads", "num_heads")
# hidden width -> the release it belongs to
SIZE_BY_DIM = {1536: "1.3B", 3072: "5B", 5120: "14B"}
IMAGE_LATENT_IN_DIM = 36  # 16 noise + 4 mask + 16 image-latent channels


@dataclass(frozen=True)
class WanVariant:
    """What a Wan transformer checkpoint is, from its keys and shapes."""

    name: str  # e.g. "Wan 2.1 I2V 14B"
    kind: str  # "t2v", "i2v" (CLIP image embedding), "i2v_expert" (Wan 2.2 A14B I2V), "vace", "ti2v"
    dim: int
    num_layers: int
    in_dim: int
    out_dim: int
    ffn_dim: int
    vace_layers: int = 0

    def same_architecture(self, other: WanVariant) -> bool:
        return (self.kind, self.dim, self.num_layers, self.in_dim, self.out_dim, self.ffn_dim) == (
            other.kind, other.dim, other.num_layers, other.in_dim, other.out_dim, other.ffn_dim)

    def describe(self) -> str:
        return f"{self.name} (dim {self.dim}, {self.num_layers} blocks, in_dim {self.in_dim})"


def sniff_wan(
    raw_state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None
) -> tuple[WanVariant, dict[str, torch.Tensor]]:
    """Any Wan transformer layout -> (variant, state dict under official = ComfyUI names)."""
    raw = strip_wan_prefix(unwrap_state_dict(raw_state_dict, path))
    check_is_wan(raw, path)
    state_dict = canonicalize_wan_state_dict(raw, path)
    return detect_wan_variant(state_dict, path), state_dict


def check_is_wan(state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None) -> None:
    """Raise VeloxLoadError naming what the checkpoint looks like when it is not a Wan transformer."""
    if not WAN.marks(state_dict):
        refuse_foreign(state_dict, WAN, path, WAN_EXPECTED)


def detect_wan_variant(state_dict: Mapping[str, torch.Tensor], path: str | Path | None = None) -> WanVariant:
    """The variant of a canonical (official-name) Wan state dict."""
    has_vace = "vace_patch_embedding.weight" in state_dict
    if has_vace and "blocks.0.self_attn.q.weight" not in state_dict:
        raise VeloxLoadError(path, "is a VACE module without its base model (vace_blocks.* only, no blocks.*)",
                             "a complete VACE checkpoint (base Wan T2V blocks + vace_blocks), e.g. "
                             "wan2.1_vace_14B_fp16.safetensors, or merge the module into its T2V base first")
    needed = ("patch_embedding.weight", "head.modulation", "head.head.weight", "blocks.0.ffn.0.weight")
    absent = [key for key in needed if key not in state_dict]
    if absent:
        raise VeloxLoadError(path, f"Wan transformer is incomplete: no {absent}", WAN_EXPECTED)
    dim = state_dict["head.modulation"].shape[-1]
    in_dim = state_dict["patch_embedding.weight"].shape[1]
    out_dim = state_dict["head.head.weight"].shape[0] // 4
    kind = _kind(state_dict, in_dim, out_dim, has_vace)
    return WanVariant(
        name=_variant_name(kind, SIZE_BY_DIM.get(dim, f"custom dim {dim}")),
        kind=kind, dim=dim, num_layers=_count_blocks(state_dict, "blocks."), in_dim=in_dim, out_dim=out_dim,
        ffn_dim=state_dict["blocks.0.ffn.0.weight"].shape[0],
        vace_layers=_count_blocks(state_dict, "vace_blocks."),
    )


def _kind(state_dict: Mapping[str, torch.Tensor], in_dim: int, out_dim: int, has_vace: bool) -> str:
    if has_vace:
        return "vace"
    if "img_emb.proj.0.bias" in state_dict:
        return "i2v"
    if out_dim == 48:
        return "ti2v"
    return "i2v_expert" if in_dim == IMAGE_LATENT_IN_DIM else "t2v"


VARIANT_NAMES = {
    "t2v": "Wan 2.1 T2V {size}",
    "i2v": "Wan 2.1 I2V {size} (CLIP image embedding)",
    "i2v_expert": "Wan 2.2 A14B I2V expert",
    "vace": "Wan 2.1 VACE {size}",
    "ti2v": "Wan 2.2 TI2V {size}",
}
# Key-identical checkpoints that shapes cannot tell apart: both Wan 2.2 A14B T2V experts are 14B T2V models.
ALSO_KNOWN_AS = {("t2v", "14B"): "Wan 2.2 A14B T2V expert"}


def _variant_name(kind: str, size: str) -> str:
    name = VARIANT_NAMES[kind].format(size=size)
    alias = ALSO_KNOWN_AS.get((kind, size))
    return f"{name} / {alias}" if alias else name


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({key[len(prefix):].split(".", 1)[0] for key in state_dict if key.startswith(prefix)})


# ----------------------------------------------------------------------------------------------
# what core's detection fixes but the weights (or their config.json) decide
# ----------------------------------------------------------------------------------------------


def wan_core_config(state_dict: Mapping[str, torch.Tensor], model_config: Mapping | None = None,
                    path: str | Path | None = None) -> dict[str, int]:
    """Fields of core's Wan ``unet_config`` that its detection sets to the releases' values
    (text_dim 4096, freq_dim 256, num_heads dim // 128), as these canonical weights have them.

    text_dim and freq_dim are the in-features of ``text_embedding.0`` and ``time_embedding.0``.
    The head count is not in the weights: q / k / v / o are (dim, dim) and ``norm_q`` / ``norm_k``
    RMS-normalise all heads at once (weight (dim,)), so only a config.json (the folder's, or the one
    next to the file) can say it; without one core's dim // 128 stands."""
    fields = {key: int(state_dict[tensor].shape[1]) for key, tensor in
              (("text_dim", "text_embedding.0.weight"), ("freq_dim", "time_embedding.0.weight"))
              if tensor in state_dict}
    dim = int(state_dict["head.modulation"].shape[-1])
    heads = _config_heads(model_config, dim, path)
    if heads is not None:
        fields["num_heads"] = heads
    return fields


def _config_heads(model_config: Mapping | None, dim: int, path: str | Path | None) -> int | None:
    model_config = model_config or {}
    heads = next((model_config[k] for k in CONFIG_HEAD_KEYS if k in model_config), None)
    if heads is None:
        return None
    valid = isinstance(heads, int) and heads >= 1
    head_dim = model_config.get("attention_head_dim", dim // heads if valid else None)
    if not valid or heads * head_dim != dim:
        raise VeloxLoadError(path, f"its config.json gives {heads} heads of {head_dim} channels for a "
                             f"transformer {dim} wide", "a config.json written for these weights")
    return heads
