"""Unmerged LoRAs on quantized layers: the low-rank side product a quantized Linear adds to its output.

A quantized Linear (FP8 / INT8 / GGUF, ``host/quant_ops.py``) has an attribute ``velox_lowrank``
(None by default) and, when it is set, returns ``out + self.velox_lowrank(x)``. Merging a LoRA
into packed weights would mean dequantize-add-requantize (lossy) or a dequantize-add on every step
(ComfyUI-GGUF's 2-3x); the side product costs two thin GEMMs instead:

    side(x) = sum_i scale_i * (x @ down_i.T) @ up_i.T,   scale_i = strength_i * alpha_i / rank_i

All LoRAs of a layer are concatenated once, ``D = [down_1; ...; down_n]`` (R x in) and
``U = [scale_1 up_1, ..., scale_n up_n]`` (out x R), so a stack of n LoRAs is still two GEMMs.
The factors move to the input's device and dtype lazily, once per (device, dtype), and stay there
until ``release`` (called when ComfyUI detaches the model, see ``host/lora_stack.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LowRankTerm = tuple[torch.Tensor, torch.Tensor, float]  # (down (rank, in), up (out, rank), scale)


class LowRankSide:
    """The sum of low-rank products of a stack of LoRAs on one Linear layer.

    terms: (down (rank_i, in_features), up (out_features, rank_i), scale_i) per LoRA;
    bias: optional (out_features,) bias delta (a LoRA's ``diff_b``), already scaled.
    """

    def __init__(self, terms: Sequence[LowRankTerm], bias: torch.Tensor | None = None):
        if not terms and bias is None:
            raise ValueError("LowRankSide needs at least one (down, up, scale) term or a bias delta")
        self.terms: list[LowRankTerm] = list(terms)
        self.bias = bias
        self._cache: dict[tuple[torch.device, torch.dtype], tuple] = {}
        for down, up, _ in self.terms:
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                raise ValueError(f"LowRankSide: down {tuple(down.shape)} and up {tuple(up.shape)} are not "
                                 "(rank, in) and (out, rank) factors of one rank")
        shapes = {(up.shape[0], down.shape[1]) for down, up, _ in self.terms}
        if len(shapes) > 1:
            raise ValueError(f"LowRankSide: the LoRAs of one layer have different (out, in) shapes {sorted(shapes)}")

    @property
    def rank(self) -> int:
        return sum(int(down.shape[0]) for down, _, _ in self.terms)

    def extended(self, terms: Sequence[LowRankTerm], bias: torch.Tensor | None = None) -> LowRankSide:
        """A new side with more terms (the next LoRA of a stack); this one is left as it is, since
        an earlier MODEL on the graph may still use it."""
        total = self.bias if bias is None else (bias if self.bias is None else self.bias + bias)
        return LowRankSide(self.terms + list(terms), total)

    def _factors(self, device: torch.device, dtype: torch.dtype) -> tuple:
        cached = self._cache.get((device, dtype))
        if cached is None:
            down = up = None
            if self.terms:
                down = torch.cat([d.to(device=device, dtype=torch.float32) for d, _, _ in self.terms])
                up = torch.cat([s * u.to(device=device, dtype=torch.float32) for _, u, s in self.terms], dim=1)
                down, up = down.to(dtype).contiguous(), up.to(dtype).contiguous()
            bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype)
            cached = self._cache[(device, dtype)] = (down, up, bias)
        return cached

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), in x's dtype and on x's device."""
        down, up, bias = self._factors(x.device, x.dtype)
        if down is None:
            return bias.expand(*x.shape[:-1], bias.shape[0])
        out = torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
        return out if bias is None else out + bias

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + self(x)`` written into ``out``: the up-projection's GEMM accumulates straight into the
        layer's output (cuBLAS beta = 1), saving a pass over the (tokens x out_features) output."""
        down, up, bias = self._factors(x.device, x.dtype)
        if down is None or out.dtype != x.dtype or not out.is_contiguous() or out.requires_grad:
            return out + self(x)
        flat = out.view(-1, out.shape[-1])
        flat.addmm_(torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), down), up.t())
        return out if bias is None else out.add_(bias)

    def release(self) -> None:
        """Drop the device copies (ComfyUI unloaded the model; the next call copies again)."""
        self._cache.clear()

    def __repr__(self) -> str:
        return f"LowRankSide({len(self.terms)} LoRA(s), total rank {self.rank})"
