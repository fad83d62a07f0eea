"""Perceiver Resampler that turns CLIP ViT-H image tokens into UNet context tokens (I2V), pure PyTorch.

Upstream: ``lvdm/modules/encoders/resampler.py`` (DynamiCrafter) and ``ip_resampler.py`` (VideoCrafter 1
I2V), after IP-Adapter / open_flamingo. Names equal lvdm's (``latents``, ``proj_in``, ``layers.N.0.to_kv``,
``layers.N.1.{0,1,3}``, ``proj_out``, ``norm_out``), the ``image_proj_model.*`` keys of a release.

Released config: dim 1024, depth 4, dim_head 64, heads 12, num_queries 16, embedding_dim 1280 (ViT-H
hidden width, 257 tokens before ``ln_post``), output_dim 1024, ff_mult 4; DynamiCrafter sets
video_length 16, i.e. 16 queries per frame (256 learned latents).
x (B, N, embedding_dim) -> (B, num_queries * (video_length or 1), output_dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .unet3d_attention import DEFAULT_OPERATIONS, sdpa_attention


@dataclass(frozen=True)
class ResamplerConfig:
    dim: int = 1024
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = 1280
    output_dim: int = 1024
    ff_mult: int = 4
    video_length: int | None = 16  # None: one set of queries shared by all frames (VideoCrafter 1 I2V)

    @property
    def total_queries(self) -> int:
        return self.num_queries * (self.video_length or 1)


class PerceiverAttention(nn.Module):
    """Latents attend to [image tokens, latents]; keys/values from one ``to_kv`` projection."""

    def __init__(self, dim: int, dim_head: int, heads: int, device=None, dtype=None, operations=DEFAULT_OPERATIONS):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = operations.LayerNorm(dim, device=device, dtype=dtype)
        self.norm2 = operations.LayerNorm(dim, device=device, dtype=dtype)
        self.to_q = operations.Linear(dim, inner, bias=False, device=device, dtype=dtype)
        self.to_kv = operations.Linear(dim, inner * 2, bias=False, device=device, dtype=dtype)
        self.to_out = operations.Linear(inner, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(sdpa_attention(self.to_q(latents), k, v, self.heads))


def _feed_forward(dim, mult, device, dtype, operations):
    inner = dim * mult
    return nn.Sequential(
        operations.LayerNorm(dim, device=device, dtype=dtype),
        operations.Linear(dim, inner, bias=False, device=device, dtype=dtype),
        nn.GELU(),
        operations.Linear(inner, dim, bias=False, device=device, dtype=dtype),
    )


class Resampler(nn.Module):
    def __init__(self, config: ResamplerConfig = ResamplerConfig(), device=None, dtype=None,
                 operations=DEFAULT_OPERATIONS):
        super().__init__()
        c = config
        self.config = config
        self.latents = nn.Parameter(torch.empty(1, c.total_queries, c.dim, device=device, dtype=dtype))
        self.proj_in = operations.Linear(c.embedding_dim, c.dim, device=device, dtype=dtype)
        self.proj_out = operations.Linear(c.dim, c.output_dim, device=device, dtype=dtype)
        self.norm_out = operations.LayerNorm(c.output_dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList([
            nn.ModuleList([
                PerceiverAttention(c.dim, c.dim_head, c.heads, device=device, dtype=dtype, operations=operations),
                _feed_forward(c.dim, c.ff_mult, device, dtype, operations),
            ])
            for _ in range(c.depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))
