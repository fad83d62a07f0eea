"""Low-rank factors -> a LoRA state dict in a chosen key dialect (the Bake node, demo files, tests).

A LoRA here is ``{module: LowRankFactors}`` under canonical module names (official names without
the ``diffusion_model.`` prefix); its weight delta is ``alpha / rank * up @ down``.

| format | keys written for module ``blocks.0.self_attn.q`` | alpha |
|---|---|---|
| ``official`` | ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` / ``.lora_up.weight`` | ``.alpha`` |
| ``kohya`` | ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ... | ``.alpha`` |
| ``kohya_fun`` | ``lora_unet__blocks_0_self_attn_q...`` (VideoX-Fun's double underscore) | ``.alpha`` |
| ``peft`` | ``transformer.<diffusers name>.lora_A.weight`` / ``.lora_B.weight`` | folded into ``lora_B`` |

``peft`` writes diffusers module names (``blocks.0.attn1.to_q`` for Wan; Sana's fused ``attn.qkv``
becomes ``attn1.to_q/to_k/to_v``, each with the rows of ``up`` it owns).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .lora_keys import diffusers_names_of, underscored

FORMATS = ("official", "kohya", "kohya_fun", "peft")


@dataclass(frozen=True)
class LowRankFactors:
    """down: (rank, in_features); up: (out_features, rank); delta = alpha / rank * up @ down."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """The weight delta in fp32, (out_features, in_features)."""
        return (self.alpha / self.rank) * (self.up.float() @ self.down.float().flatten(1))


# format -> (module prefix, module name with dots as "_")
LOW_RANK_KEY_STYLES: dict[str, tuple[str, bool]] = {
    "official": ("diffusion_model.", False), "kohya": ("lora_unet_", True), "kohya_fun": ("lora_unet__", True),
}


def _low_rank_keys(module: str, fmt: str) -> tuple[str, str, str]:
    prefix, dots_as_underscores = LOW_RANK_KEY_STYLES[fmt]
    base = prefix + (underscored(module) if dots_as_underscores else module)
    return f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"


def _with_alpha(keys: tuple[str, str, str], factors: LowRankFactors) -> dict[str, torch.Tensor]:
    down, up, alpha = keys
    return {down: factors.down, up: factors.up, alpha: torch.tensor(float(factors.alpha))}


def _peft(module: str, factors: LowRankFactors, family: str) -> dict[str, torch.Tensor]:
    """diffusers names; peft stores no alpha, so alpha / rank is folded into ``lora_B``."""
    names = diffusers_names_of(family)(module, tuple(factors.up.shape)) or [(module, None)]
    scaled_up = factors.up * (factors.alpha / factors.rank)
    out = {}
    for name, rows in names:
        up = scaled_up if rows is None else scaled_up[rows[1]: rows[1] + rows[2]]
        out[f"transformer.{name}.lora_A.weight"] = factors.down.clone()
        out[f"transformer.{name}.lora_B.weight"] = up.contiguous()
        if rows is None:
            break  # one diffusers spelling is enough; fused projections need every part
    return out


def lora_state_dict(
    factors: Mapping[str, LowRankFactors], fmt: str = "official", family: str = "wan"
) -> dict[str, torch.Tensor]:
    """The LoRA file's tensors for ``factors`` (canonical module -> factors) in format ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"LoRA format {fmt!r} is not one of {FORMATS}")
    out: dict[str, torch.Tensor] = {}
    for module, pair in factors.items():
        if fmt == "peft":
            out.update(_peft(module, pair, family))
        else:
            out.update(_with_alpha(_low_rank_keys(module, fmt), pair))
    return {key: value.contiguous() for key, value in out.items()}


def random_lora_factors(
    weight_shapes: Mapping[str, tuple[int, ...]], rank: int, alpha: float, seed: int = 0,
    dtype: torch.dtype = torch.float32, scale: float = 1.0,
) -> dict[str, LowRankFactors]:
    """Deterministic random factors for 2-D weights (module -> (out, in) shape), for demos and tests.

    ``scale`` sets the size of the delta relative to a unit-variance weight (std of ``up @ down``
    entries is about ``scale / sqrt(in)`` before alpha / rank)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for module, shape in sorted(weight_shapes.items()):
        out_features, in_features = shape[0], shape[1]
        down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        up = scale * torch.randn(out_features, rank, generator=generator) / rank**0.5
        out[module] = LowRankFactors(down.to(dtype), up.to(dtype), alpha)
    return out
